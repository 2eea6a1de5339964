"""What a finished training run leaves in its folder, and what the terminal says at its end:
a filled model card, shareable file modes, and next-step configs that really run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cli_helpers import render_events, run_cli
from finetune_worker.config import parse_job_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny LoRA run through ``finetune-worker run`` (the live display, piped): its folder and output."""
    tmp_path = tmp_path_factory.mktemp("finished")
    config = json.loads((REPO / "configs" / "tiny-lora.json").read_text())
    config.pop("evaluation", None)
    config.update(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=4)
    config["dataset"]["path"] = str(REPO / config["dataset"]["path"])
    config["checkpoint"] = {"every_steps": 2, "keep": 1}
    config["training_parameters"]["logging_steps"] = 1
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    old = os.umask(0o022)
    try:
        done = run_cli("run", str(path), cwd=tmp_path, timeout=300)  # the live display, piped
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for noise in ("Warning", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in done.stderr, (noise, done.stderr[-2000:])
    return tmp_path / "run", done.stdout


def test_a_run_leaves_a_model_card_shareable_files_and_next_steps(
    finished: tuple[Path, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    out, stdout = finished

    # The live display is all the terminal shows: third-party warnings and progress bars went
    # to the run's worker.log.
    for noise in ("Warning", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in stdout, noise
    assert (out / "worker.log").is_file()

    # The terminal ends with what to do next, as commands that name this run's files.
    tail = stdout[stdout.index("next steps") :]
    load = next(line.strip() for line in tail.splitlines() if line.strip().startswith("python -c"))
    assert shlex.split(load) == [
        "python",
        "-c",
        f"from peft import AutoPeftModelForCausalLM; m = AutoPeftModelForCausalLM.from_pretrained({json.dumps(str(out))})",
    ]
    for name in ("generate", "evaluate", "merge"):
        assert f"finetune-worker run {out / 'next' / (name + '.json')}" in tail
    assert f"finetune-worker chat {out}" in tail
    assert f"the model card: {out / 'README.md'}" in tail
    assert f"the run report (open it in a browser): {out / 'report.html'}" in tail

    # Every file is readable by the group and others, the safetensors (written 0600) included.
    private = [
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and stat.S_IMODE(p.stat().st_mode) != 0o644 and not p.name.startswith(".")
    ]
    assert private == [] and (out / "adapter_model.safetensors").is_file()
    assert stat.S_IMODE((out / "checkpoint-4" / "adapter_model.safetensors").stat().st_mode) == 0o644

    # The model card is this run's, not peft's blank template.
    card = (out / "README.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "More Information Needed" not in card
    assert card.startswith("---\nbase_model: ") and f'"{tiny_model_dir}"' in card.split("---")[1]
    assert "lora (r=8, alpha=16.0)" in card and "| learning rate | 0.003 |" in card
    assert f"| eval loss | {summary['base_eval_loss']:.4g} | {summary['final_eval_loss']:.4g} |" in card
    assert "| `conversations.jsonl` | 270 |" in card

    # The loss history outlives the checkpoints that rotate away (keep 1: checkpoint-2 is gone).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = {r["stage"]: r for r in rows if r["kind"] == "eval"}
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in train)
    assert not (out / "checkpoint-2").exists()
    assert evals["before_training"]["eval_loss"] == summary["base_eval_loss"]
    assert evals["after_training"]["eval_loss"] == summary["final_eval_loss"]
    assert set(evals) == {"before_training", "after_training"}

    # The next-step configs are valid jobs of their kind, and generating with the run works.
    kinds = {
        name: parse_job_config(("file", str(out / "next" / f"{name}.json")))[0]
        for name in ("generate", "evaluate", "merge")
    }
    assert kinds == {"generate": "generate", "evaluate": "evaluate", "merge": "merge_lora"}
    generated = run_cli("run", str(out / "next" / "generate.json"), "--json", cwd=tmp_path, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    last = json.loads(generated.stdout.splitlines()[-1])
    assert last["type"] == "completed"


def test_overwrite_removes_the_previous_runs_history_and_pages(tmp_path: Path) -> None:
    from finetune_worker.training.checkpoints import wipe_run

    for name in ("metrics.jsonl", "report.html", "next/merge.json", "checkpoint-3/x", "mine.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("old")
    wipe_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # the user's own file stays


def test_a_resumed_history_drops_the_steps_trained_again(tmp_path: Path) -> None:
    from finetune_worker.training.callbacks import MetricsHistory

    history = MetricsHistory(tmp_path / "metrics.jsonl")
    for row in (
        {"kind": "eval", "step": 0, "stage": "before_training", "eval_loss": 5.0},
        *({"kind": "train", "step": s, "loss": 4.0 - s / 10} for s in (1, 2, 3, 4, 5)),
        {"kind": "eval", "step": 4, "stage": "training", "eval_loss": 3.0},
    ):
        history.append(row)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a row torn by the kill
    # The resumed session evaluates the base again, then resumes from checkpoint-4.
    history.append({"kind": "eval", "step": 0, "stage": "before_training", "eval_loss": 5.5})
    history.resume_at(4)
    kept = [(r["kind"], r["step"], r.get("eval_loss")) for r in history.rows()]
    assert kept == [
        ("train", 1, None),
        ("train", 2, None),
        ("train", 3, None),
        ("train", 4, None),
        ("eval", 4, 3.0),
        ("eval", 0, 5.5),
    ]


CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's chromium package; CI installs it)")
def test_the_report_renders_its_curves_and_the_metrics_file_numbers(
    finished: tuple[Path, str], tmp_path: Path
) -> None:
    from html.parser import HTMLParser

    from PIL import Image

    from finetune_worker.training.report import EVAL_COLOUR, TRAIN_COLOUR, fmt

    out, _ = finished
    report = out / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # opens offline

    # The page as the browser built it: the history table holds the metrics file's numbers.
    dom = _chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]

    class Tables(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tables: dict[str, list[list[str]]] = {}
            self._table: str | None = None
            self._cell: list[str] | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "table":
                self._table = dict(attrs).get("id") or ""
                self.tables[self._table] = []
            elif tag == "tr" and self._table is not None:
                self.tables[self._table].append([])
            elif tag == "td":
                self._cell = []

        def handle_endtag(self, tag: str) -> None:
            if tag == "td" and self._cell is not None and self._table is not None:
                self.tables[self._table][-1].append("".join(self._cell))
                self._cell = None
            elif tag == "table":
                self._table = None

        def handle_data(self, data: str) -> None:
            if self._cell is not None:
                self._cell.append(data)

    parser = Tables()
    parser.feed(dom.stdout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shown = [r for r in parser.tables["history"] if r]
    keys = (
        "kind",
        "step",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "eval_loss",
        "perplexity",
        "stage",
    )
    assert shown == [[fmt(r.get(k)) for k in keys] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    comparison = {r[0]: r[1:] for r in parser.tables["comparison"] if r}
    assert comparison["eval loss"] == [fmt(summary["base_eval_loss"]), fmt(summary["final_eval_loss"])]

    # The screenshot shows the curves: the train series' colour draws lines, the eval's dots.
    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1400,1600", report.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")

    def pixels(colour: str) -> int:
        want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        return sum(1 for p in image.getdata() if all(abs(a - b) <= 24 for a, b in zip(p, want, strict=True)))

    assert pixels(TRAIN_COLOUR) > 1500, pixels(TRAIN_COLOUR)  # four line charts of 4 points each
    assert pixels(EVAL_COLOUR) > 80, pixels(EVAL_COLOUR)  # two eval points and a legend swatch


def test_eval_lines_say_which_model_and_which_evaluation() -> None:
    payloads = (
        {"step": 0, "model": "base", "metrics": {"eval_loss": 7.6, "perplexity": 2000.0}},
        {"model": "base", "metrics": {"eval_loss": 7.7, "perplexity": 2200.0, "rows": 20, "f1": 0.3}},
        {"step": 40, "metrics": {"eval_loss": 4.0, "perplexity": 54.6}},
        {"step": 60, "model": "fine_tuned", "metrics": {"eval_loss": 3.0, "perplexity": 20.1}},
    )
    shown = render_events([("eval", p) for p in payloads], width=200)
    lines = [line for line in shown.splitlines() if line.startswith("eval")]
    assert [line.split(":")[0] for line in lines] == [
        "eval base model, step 0",
        "eval base model, 20 rows scored",
        "eval step 40",
        "eval fine-tuned, step 60",
    ]


def test_an_evaluation_section_on_the_held_out_rows_is_the_one_evaluation_per_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One base line and one fine-tuned line (the section's scores, with the step), not the
    Trainer's loss on the same rows as well; the section reports progress while it answers."""
    config = json.loads((REPO / "configs" / "tiny-lora.json").read_text())
    config.update(model_name=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=3)
    config["dataset"]["path"] = str(REPO / config["dataset"]["path"])
    config["checkpoint"] = {"every_steps": 3, "keep": 1}
    config["evaluation"] = {"max_rows": 4, "batch_size": 2, "samples": 1, "generation": {"max_new_tokens": 3}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    done = run_cli("run", str(path), "--json", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    evals = [(e["payload"].get("model"), e["payload"].get("step")) for e in events if e["type"] == "eval"]
    assert evals == [("base", 0), ("fine_tuned", 3)]
    assert all("f1" in e["payload"]["metrics"] for e in events if e["type"] == "eval")
    training_at = next(i for i, e in enumerate(events) if e["payload"].get("phase") == "training")
    answering = [
        (i < training_at, e["payload"]["done"], e["payload"]["total"])
        for i, e in enumerate(events)
        if e["type"] == "progress" and e["payload"].get("unit") == "answers"
    ]
    assert answering == [(True, 2, 4), (True, 4, 4), (False, 2, 4), (False, 4, 4)]
    summary = events[-1]["payload"]["summary"]
    scores = summary["evaluation"]["metrics"]
    assert summary["base_eval_loss"] == scores["base"]["eval_loss"]
    assert summary["final_eval_loss"] == scores["fine_tuned"]["eval_loss"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    history = [(r["stage"], r["step"], r["rows"]) for r in rows if r["kind"] == "eval"]
    assert history == [("before_training", 0, 4), ("after_training", 3, 4)]


def test_an_evaluate_jobs_comparison_is_a_table() -> None:
    summary = {
        "model_path": "/m/base",
        "adapter_path": "/runs/tiny-lora",
        "metrics": {"eval_loss": 3.0, "perplexity": 20.1, "f1": 11.7, "rows": 20},
        "compare": {"model_path": "/m/base", "adapter_path": None, "metrics": {"eval_loss": 7.7, "f1": 0.36}},
        "improvement": {"eval_loss_delta": 4.7},
    }
    shown = render_events([("completed", {"summary": summary, "outputs": {}})])
    assert "entries (in the job's summary file)" not in shown
    assert "tiny-lora vs base (20 rows)" in shown
    lines = {line.split()[1]: line.split()[2:] for line in shown.splitlines() if line.startswith("│ ")}
    assert lines["eval_loss"][:3] == ["│", "3", "│"] and lines["eval_loss"][3] == "7.7"
    assert lines["f1"][1] == "11.7" and lines["f1"][3] == "0.36"
