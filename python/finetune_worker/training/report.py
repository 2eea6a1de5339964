"""``report.html``: one self-contained page per training run, to look at.

The loss and eval curves, learning rate and throughput (from ``metrics.jsonl``), the base vs
fine-tuned table, sample answers, the data statistics and the resolved config (from the
summary). No script, no stylesheet or font from the network: it opens from disk, offline, in any
browser, and survives being mailed around.

The charts are inline SVG written here rather than drawn with a plotting library: a line chart
is a few dozen lines of SVG, while matplotlib or plotly would add tens of MB to the install (and
plotly's page a megabyte of JavaScript) for four line charts; SVG also stays sharp when zoomed
and its numbers stay text in the page.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from finetune_worker.outputs import write_text_atomic

REPORT = "report.html"
_W, _H = 640, 220
_M = {"left": 64, "right": 16, "top": 16, "bottom": 36}
#: Series colours (colour-blind safe pair from the Okabe-Ito palette).
TRAIN_COLOUR, EVAL_COLOUR = "#0072B2", "#D55E00"


def fmt(value: Any) -> str:
    """How every number appears in the page (tables and chart labels alike)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def write_report(out: Path, summary: dict[str, Any], history: list[dict[str, Any]], title: str) -> Path:
    path = out / REPORT
    write_text_atomic(path, render(summary, history, title))
    return path


def render(summary: dict[str, Any], history: list[dict[str, Any]], title: str) -> str:
    train = sorted((r for r in history if r.get("kind") == "train"), key=lambda r: r.get("step", 0))
    evals = sorted((r for r in history if r.get("kind") == "eval"), key=lambda r: r.get("step", 0))
    data = summary.get("data") or {}
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}: finetune-worker run</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="sub">{e(str(summary.get("method")))} on <code>{e(str(summary.get("model_name")))}</code>: '
        f"{fmt(summary.get('steps'))} steps, {fmt(summary.get('epochs'))} epochs, "
        f"{fmt(summary.get('tokens_seen'))} tokens, {fmt(summary.get('runtime_s'))} s</p>",
        "<h2>Curves</h2>",
        '<div class="charts">',
        _chart(
            "loss",
            "Loss",
            [
                ("train loss", TRAIN_COLOUR, _points(train, "loss"), False),
                ("eval loss", EVAL_COLOUR, _points(evals, "eval_loss"), True),
            ],
        ),
        _chart(
            "learning_rate",
            "Learning rate",
            [("learning rate", TRAIN_COLOUR, _points(train, "learning_rate"), False)],
        ),
        _chart(
            "tokens_per_second",
            "Throughput (tokens/s)",
            [("tokens/s", TRAIN_COLOUR, _points(train, "tokens_per_second"), False)],
        ),
        _chart(
            "grad_norm", "Gradient norm", [("grad norm", TRAIN_COLOUR, _points(train, "grad_norm"), False)]
        ),
        "</div>",
        "<h2>Base vs fine-tuned</h2>",
        _table(["metric", "base", "fine-tuned"], [list(row) for row in comparison(summary)], "comparison"),
    ]
    samples = (summary.get("evaluation") or {}).get("samples") or []
    if samples:
        parts.append("<h2>Sample answers</h2>")
        for s in samples:
            parts.append(
                '<div class="sample">'
                f"<p><b>prompt</b></p><pre>{e(str(s.get('prompt', '')))}</pre>"
                f"<p><b>reference</b> {e(str(s.get('reference', '')))}</p>"
                f"<p><b>base</b> {e(str(s.get('base', '')))}</p>"
                f"<p><b>fine-tuned</b> {e(str(s.get('fine_tuned', '')))}</p></div>"
            )
    parts += [
        "<h2>Data</h2>",
        _table(
            ["rows", "trained", "held out", "tokens", "trained tokens", "truncated", "dropped", "batching"],
            [
                [
                    data.get("rows"),
                    data.get("train_rows"),
                    data.get("eval_rows"),
                    data.get("tokens"),
                    data.get("trained_tokens"),
                    data.get("truncated"),
                    data.get("dropped"),
                    data.get("batching"),
                ]
            ],
            "data",
        ),
        _table(
            ["source", "rows", "held out", "sequences", "tokens", "trained tokens", "share"],
            [
                [
                    s.get("name"),
                    s.get("rows"),
                    s.get("eval_rows"),
                    s.get("sequences"),
                    s.get("tokens"),
                    s.get("trained_tokens"),
                    None if s.get("share") is None else f"{100 * s['share']:.1f}%",
                ]
                for s in data.get("sources") or []
            ],
            "sources",
        ),
        "<h2>Logged steps</h2>",
        _table(
            [
                "kind",
                "step",
                "loss",
                "learning rate",
                "grad norm",
                "tokens/s",
                "eval loss",
                "perplexity",
                "stage",
            ],
            [
                [
                    r.get("kind"),
                    r.get("step"),
                    r.get("loss"),
                    r.get("learning_rate"),
                    r.get("grad_norm"),
                    r.get("tokens_per_second"),
                    r.get("eval_loss"),
                    r.get("perplexity"),
                    r.get("stage"),
                ]
                for r in history
            ],
            "history",
        ),
        "<h2>Config</h2>",
        f"<pre>{e(json.dumps(summary.get('config'), indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        x, y = r.get("step"), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            out.append((float(x), float(y)))
    return out


def _chart(ident: str, title: str, series: list[tuple[str, str, list[tuple[float, float]], bool]]) -> str:
    """A line chart (markers for ``dots`` series) of ``(label, colour, points, dots)`` series."""
    points = [p for _, _, pts, _ in series for p in pts]
    head = f'<figure id="chart-{ident}"><figcaption>{html.escape(title)}</figcaption>'
    if not points:
        return head + '<p class="empty">nothing logged</p></figure>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = (y0 - pad if y0 - pad >= 0 or y0 < 0 else 0.0), y1 + pad  # a non-negative series stays above 0
    iw, ih = _W - _M["left"] - _M["right"], _H - _M["top"] - _M["bottom"]

    def sx(x: float) -> float:
        return _M["left"] + (x - x0) / (x1 - x0) * iw

    def sy(y: float) -> float:
        return _M["top"] + (1 - (y - y0) / (y1 - y0)) * ih

    svg = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{html.escape(title)}">',
        f'<rect x="{_M["left"]}" y="{_M["top"]}" width="{iw}" height="{ih}" fill="#fff" stroke="#999"/>',
    ]
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        svg.append(
            f'<line x1="{_M["left"]}" x2="{_M["left"] + iw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
            f'<text x="{_M["left"] - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{fmt(float(f"{y:.3g}"))}</text>'
        )
    for x in (x0, (x0 + x1) / 2, x1):
        svg.append(
            f'<text x="{sx(x):.1f}" y="{_H - _M["bottom"] + 16}" text-anchor="middle">{fmt(round(x))}</text>'
        )
    svg.append(f'<text x="{_M["left"] + iw / 2}" y="{_H - 4}" text-anchor="middle">step</text>')
    legend_x = _M["left"] + 8
    for label, colour, pts, dots in series:
        if not pts:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if dots or len(pts) == 1:
            svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}"/>' for x, y in pts]
        if not dots and len(pts) > 1:
            svg.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        svg.append(
            f'<rect x="{legend_x}" y="{_M["top"] + 6}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{_M["top"] + 15}">{html.escape(label)}</text>'
        )
        legend_x += 24 + 7 * len(label)
    svg.append("</svg>")
    return head + "".join(svg) + "</figure>"


def comparison(summary: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(metric, base, fine-tuned)`` of a run's summary: the held-out loss and perplexity, then
    the evaluation block's answer scores (the report's table and the model card's)."""
    rows: list[tuple[str, Any, Any]] = [
        ("eval loss", summary.get("base_eval_loss"), summary.get("final_eval_loss"))
    ]
    if summary.get("preference") is None:  # a preference loss has no perplexity
        rows.append(("perplexity", summary.get("base_perplexity"), summary.get("final_perplexity")))
    for section, keys in (
        ("evaluation", ("exact_match", "f1", "bleu", "rouge_l")),
        ("preference", PREFERENCE_SCORES),
    ):
        by_model = (summary.get(section) or {}).get("metrics") or {}
        base, tuned = by_model.get("base") or {}, by_model.get("fine_tuned") or {}
        rows += [(key, base.get(key), tuned.get(key)) for key in score_keys(base, tuned, keys)]
    return rows


#: A preference run's held-out scores (``training/preference.py``), in the order tables show them
#: (the CLI's tables too); GRPO's per-reward means (``rewards/<name>/mean``) follow them.
PREFERENCE_SCORES = (
    "accuracy",
    "margin",
    "reward_accuracy",
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "desirable_logp",
    "undesirable_logp",
    "reward",
    "reward_std",
)


def score_keys(first: dict[str, Any], second: dict[str, Any], known: tuple[str, ...]) -> list[str]:
    """The scores either model has, ``known`` ones in their order, then GRPO's per-reward means."""
    per_reward = sorted(k for k in set(first) | set(second) if k.startswith("rewards/"))
    return [k for k in (*known, *per_reward) if k in first or k in second]


def _table(header: list[str], rows: list[list[Any]], ident: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1360px;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#555;margin-top:.2em}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-weight:600}
svg text{font-size:11px;fill:#444}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px}
.sample{border-left:3px solid #0072B2;padding-left:10px;margin-bottom:1em}.empty{color:#888}
"""
