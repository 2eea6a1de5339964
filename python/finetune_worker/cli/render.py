"""Event sinks for ``finetune-worker run``: a live rich display, or JSON lines for scripts.

Both are :data:`finetune_worker.server.jobs.Sink` callables ``(record, event) -> None``, fed the very
events a BEAM subscriber would get, so the terminal shows what the port would send.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from finetune_worker.training.report import PREFERENCE_SCORES, score_keys
from finetune_worker.wire.vocabulary import Event, plain


class JsonLines:
    """One JSON object per event: ``{"job_id", "type", "payload"}``, flushed at once."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __call__(self, record: Any, event: Event) -> None:
        line = {"job_id": event.job_id, "type": event.type, "payload": plain(event.payload)}
        self.stream.write(json.dumps(line, default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


#: A completion being generated, by (prompt_index, sequence); sequence is None with one per prompt.
StreamKey = tuple[Any, Any]
#: The scores of an evaluation, in the order the tables show them.
SCORE_KEYS = ("eval_loss", "perplexity", "exact_match", "f1", "bleu", "rouge_l", *PREFERENCE_SCORES)
#: How many lines of a completion still being generated the live region shows (its tail).
LIVE_TEXT_LINES = 6


#: The progress unit of training (its events carry ``step``/``total_steps``).
STEPS = "steps"


class _LiveProgress(Progress):
    """The progress bar with the completions being generated above it, in one live region.

    Text printed above a rich live display with ``end=""`` is overwritten by the display's next
    refresh, so in a terminal the streamed text is part of the display until its completion ends;
    then it is printed for good, above the bar.
    """

    def __init__(self, *columns: Any, streams: dict[StreamKey, str], **kwargs: Any):
        self.streams = streams  # before Progress builds its first display, which reads it
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Any:
        for key, text in self.streams.items():
            shown = _stream_label(key) + text
            tail = max(self.console.width, 20) * LIVE_TEXT_LINES
            yield Text(shown if len(shown) <= tail else "…" + shown[-tail:], style="bright_white")
        yield self.make_tasks_table(self.tasks)


class Renderer:
    """Progress bar (step/total, loss, learning rate, tokens/s, ETA); other events as lines.

    Generated text streams as it comes: in a terminal inside the live display, piped straight to
    the stream (one completion per line); either way each completion ends up on its own line.
    """

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.streams: dict[StreamKey, str] = {}
        self.progress = _LiveProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("[cyan]{task.fields[eta]}"),
            console=self.console,
            streams=self.streams,
        )
        #: One bar per progress unit: training steps (which carry the loss, lr and tok/s) and the
        #: rows, sequences or answers of the phases around training, each under its own count.
        self.tasks: dict[str, TaskID] = {}
        self.phase = "running"
        self.stats: dict[str, str] = {}
        #: Piped: the completion whose text is being written on the current, unfinished line.
        self.open_stream: StreamKey | None = None

    def __call__(self, record: Any, event: Event) -> None:
        p = plain(event.payload)
        handler = getattr(self, f"_on_{event.type}", None)
        if handler is not None:
            handler(event.job_id, p)

    def close(self) -> None:
        self._finish_streams()
        if self.progress.live.is_started:
            self.progress.stop()

    # ---- one method per event type -------------------------------------------------------------

    def _line(self, text: str) -> None:
        self._end_open_line()
        # Printing through the Progress console keeps the live bar below the scrolled lines.
        self.progress.console.print(text, highlight=False)

    @property
    def _live_text(self) -> bool:
        """Streamed text lives in the display (a terminal), or goes straight out (piped)."""
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def _end_open_line(self) -> None:
        if self.open_stream is not None:
            self.open_stream = None
            self.progress.console.print(highlight=False)

    def _on_queued(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[dim]{job_id} queued ({p.get('kind')}, position {p.get('position')})")

    def _on_started(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[bold]{job_id}[/] started: {p.get('kind')}")

    def _on_phase(self, job_id: str, p: dict[str, Any]) -> None:
        self.phase = str(p.get("phase"))
        if "stage" in p:  # progressive unfreezing: a new stage of training
            self._line(
                f"[magenta]▸ {self.phase} stage {p['stage']}/{p.get('stages')}: "
                + ("all layers, " if p.get("layers") == "all" else f"last {p.get('layers')} layer(s), ")
                + f"{p.get('trainable_parameters', 0):,} parameters, lr {p.get('learning_rate'):g}"
            )
            return
        trial = f"trial {p['trial']}: " if "trial" in p else ""  # a sweep's trial
        self._line(f"[magenta]▸ {trial}{self.phase}")
        if STEPS in self.tasks:
            self.progress.update(self.tasks[STEPS], description=self.phase)
            self._hide_finished(keep=STEPS)

    def _on_log(self, job_id: str, p: dict[str, Any]) -> None:
        style = {"warning": "yellow", "error": "red", "debug": "dim"}.get(str(p.get("level")), "")
        text = f"  {p.get('level')}: {p.get('message')}"
        self._line(f"[{style}]{text}[/]" if style else text)

    def _on_progress(self, job_id: str, p: dict[str, Any]) -> None:
        # Training reports step/total_steps; merges and evaluations report done/total/unit.
        total = p.get("total_steps", p.get("total"))
        done = p.get("step", p.get("done")) or 0
        eta = _duration(p.get("eta_s"))
        if p.get("unit") == "prompts":  # a generate job: the prompts before `done` are answered
            self._finish_streams(lambda key: isinstance(key[0], int) and key[0] < int(done))
        # A sweep counts its trials on a bar of their own; each trial's steps go on the steps bar.
        unit = STEPS if "step" in p and p.get("unit") != "trials" else str(p.get("unit") or "items")
        task = self.tasks.get(unit)
        if task is None:
            self._start_live()
            task = self.tasks[unit] = self.progress.add_task(self.phase, total=total, stats="", eta="")
        elif done < self._bar(task).completed:  # counting again (the final evaluation's answers)
            self.progress.reset(task, total=total, completed=done)
        self._hide_finished(keep=unit)
        self.progress.update(
            task,
            completed=done,
            total=total,
            description=self.phase,
            eta=f"ETA {eta}" if eta else "",
            visible=True,
        )

    def _bar(self, task: TaskID) -> Any:
        return next(bar for bar in self.progress.tasks if bar.id == task)

    def _hide_finished(self, keep: str) -> None:
        """Bars of finished phases go (an evaluation's answers once training or saving follows),
        so the final display shows the training bar, not the last count before it."""
        for unit, task in self.tasks.items():
            if unit not in (keep, STEPS) and self._bar(task).finished:
                self.progress.update(task, visible=False)

    def _on_metrics(self, job_id: str, p: dict[str, Any]) -> None:
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("learning_rate", "lr", "{:.2e}"),
            ("tokens_per_second", "tok/s", "{:,.0f}"),
        ):
            value = (p.get("metrics") or {}).get(key)
            if isinstance(value, (int, float)):
                self.stats[label] = fmt.format(value)
        if STEPS in self.tasks:
            self.progress.update(
                self.tasks[STEPS], stats="  ".join(f"{k} {v}" for k, v in self.stats.items())
            )

    def _on_eval(self, job_id: str, p: dict[str, Any]) -> None:
        metrics = p.get("metrics") or {}
        rows = metrics.get("rows")
        # The Trainer's held-out loss carries its step; an evaluation block's scores, how many rows.
        where = ", ".join(
            [
                *([f"trial {p['trial']}"] if p.get("trial") is not None else []),
                *([f"step {p['step']}"] if p.get("step") is not None else []),
                *([f"{rows} rows scored"] if isinstance(rows, int) and not isinstance(rows, bool) else []),
            ]
        )
        model = {"base": "base model", "fine_tuned": "fine-tuned"}.get(str(p.get("model")), p.get("model"))
        label = f"{model}, {where}" if model and where else (model or where)
        parts = [f"{k} {v:.4f}" for k, v in (p.get("metrics") or {}).items() if isinstance(v, float)]
        self._line(f"[blue]eval[/] {label + ': ' if label else ''}{'  '.join(parts)}")

    def _on_checkpoint(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[green]checkpoint[/] step {p.get('step')}: {p.get('path')}")

    def _on_token(self, job_id: str, p: dict[str, Any]) -> None:
        key: StreamKey = (p.get("prompt_index"), p.get("sequence"))
        text = shown_text(str(p.get("text", "")))
        if key not in self.streams:  # a new prompt: the ones before it are answered
            self._finish_streams(lambda k: k[0] != key[0])
            self.streams[key] = ""
        self.streams[key] += text
        if self._live_text:
            self._start_live()
            self.progress.refresh()
        elif key[1] in (None, 0) and self.open_stream in (None, key):
            # Piped: one completion at a time runs on, as it comes; other sequences of the same
            # prompt (generated alongside it) are written whole when the prompt is answered.
            if self.open_stream is None:
                self.progress.console.print(Text(_stream_label(key), style="bold"), end="")
                self.open_stream = key
            self.progress.console.print(text, end="", highlight=False, markup=False)

    def _start_live(self) -> None:
        if not self.progress.live.is_started:
            self.progress.start()

    def _finish_streams(self, done: Callable[[StreamKey], bool] | None = None) -> None:
        """Print the completions ``done(key)`` picks (all by default) for good, and drop them."""
        for key in [k for k in self.streams if done is None or done(k)]:
            text = self.streams.pop(key)
            streamed = self.open_stream == key  # piped, and already written as it came
            self._end_open_line()
            if not streamed:
                label = Text(_stream_label(key), style="bold")
                self.progress.console.print(label + Text(text), highlight=False, soft_wrap=True)
        if self._live_text and self.progress.live.is_started:
            self.progress.refresh()

    def _on_completed(self, job_id: str, p: dict[str, Any]) -> None:
        self.close()
        summary = p.get("summary") or {}
        table = Table(title=f"{job_id} completed", show_header=False, title_style="bold green")
        table.add_column("key", style="bold")
        table.add_column("value")
        compare = summary.get("compare")
        # Shown below as tables of their own, not as "N entries" cells.
        apart = {"evaluation", "preference", "completions", "trials", "continual"} | (
            {"metrics", "compare", "improvement"} if compare else set()
        )
        for section in ("summary", "outputs"):
            for key, value in (p.get(section) or {}).items():
                if value is not None and key not in apart:
                    table.add_row(str(key), _cell(value))
        self.console.print(table)
        evaluation = summary.get("evaluation")
        if isinstance(evaluation, dict):
            self._print_evaluation(evaluation)
        preference = summary.get("preference")
        if isinstance(preference, dict):
            method = str(preference.get("method", "")).upper()
            title = f"base vs fine-tuned, {method} ({preference.get('rows')} held-out rows)"
            self._print_evaluation(preference, title)
        if isinstance(compare, dict):
            self._print_comparison(summary, compare)
        continual = summary.get("continual")
        if isinstance(continual, dict) and continual.get("reference_loss_before") is not None:
            self.console.print(
                f"reference data ({continual.get('reference_rows')} rows): loss "
                f"{_cell(continual.get('reference_loss_before'))} before training, "
                f"{_cell(continual.get('reference_loss_after'))} after (forgetting {_cell(continual.get('forgetting'))})"
            )
        if isinstance(summary.get("completions"), list):
            self._print_completions(summary["completions"])
        if isinstance(summary.get("trials"), list):
            self._print_trials(summary["trials"])
        self._print_next_steps(p.get("outputs") or {})

    def _print_trials(self, trials: list[Any]) -> None:
        """A sweep's trials: each one's values, how it ended and its held-out loss."""
        rows = [t for t in trials if isinstance(t, dict)]
        keys = list(dict.fromkeys(k for t in rows for k in (t.get("params") or {})))
        leaves = [k.rsplit(".", 1)[-1] for k in keys]  # peft.r -> r, when that names one key
        names = leaves if len(set(leaves)) == len(leaves) else keys
        table = Table(title="trials")
        for column in ("trial", "state", *names, "eval_loss", "steps"):
            table.add_column(column, justify="left" if column == "state" else "right")
        for t in rows:
            params = t.get("params") or {}
            table.add_row(
                *(_cell(v) for v in (t.get("trial"), t.get("state"), *(params.get(k) for k in keys))),
                _cell(t.get("eval_loss")),
                _cell(t.get("steps")),
            )
        self.console.print(table)

    def _print_completions(self, completions: list[Any]) -> None:
        """A generate job's prompts, each with its completion(s) in full."""
        for c in completions:
            if not isinstance(c, dict):
                continue
            key = (c.get("prompt_index"), c.get("sequence"))
            if key[1] in (None, 0):
                self.console.print(
                    Text(f"prompt {key[0]}: ", style="bold")
                    + Text(shown_text(_prompt_text(c.get("prompt")))),
                    soft_wrap=True,
                )
            label = "completion" if key[1] is None else f"completion {key[1]}"
            reason = f" ({c['finish_reason']})" if c.get("finish_reason") else ""
            self.console.print(
                Text(f"  {label}{reason}: ", style="green") + Text(shown_text(str(c.get("text", "")))),
                soft_wrap=True,
            )

    def _print_next_steps(self, outputs: dict[str, Any]) -> None:
        """A training run's next steps, with the commands (the configs are in its ``next/``)."""
        key = next((k for k in ("adapter_path", "model_path") if k in outputs), None)
        out = outputs.get(key) if key is not None else None  # a sweep's: its best trial's folder
        if not isinstance(out, str) or key is None:
            return
        from pathlib import Path

        from finetune_worker.training.report import REPORT
        from finetune_worker.training.run_card import CARD, next_steps

        self.console.print("[bold]next steps[/]")
        for what, command in next_steps(Path(out), key):
            self.console.print(f"  {what}:", highlight=False)
            self.console.print(f"    {command}", markup=False, highlight=False, soft_wrap=True)
        for label, name in (("the model card", CARD), ("the run report (open it in a browser)", REPORT)):
            if (Path(out) / name).is_file():
                self.console.print(
                    f"  {label}: {Path(out) / name}", markup=False, highlight=False, soft_wrap=True
                )

    def _scores_table(
        self, title: str, columns: tuple[str, str], first: dict[str, Any], second: dict[str, Any]
    ) -> None:
        """One row per score either model has: the two models' values side by side."""
        scores = Table(title=title)
        for column in ("metric", *columns):
            scores.add_column(column, justify="left" if column == "metric" else "right")
        for key in score_keys(first, second, SCORE_KEYS):
            scores.add_row(key, _cell(first.get(key)), _cell(second.get(key)))
        self.console.print(scores)

    def _print_comparison(self, summary: dict[str, Any], compare: dict[str, Any]) -> None:
        """An evaluate job's model against its ``compare_model_path``, as the train job shows
        base vs fine-tuned; lower loss and perplexity are better, higher answer scores."""

        def name(record: dict[str, Any]) -> str:
            path = str(record.get("adapter_path") or record.get("model_path") or "")
            return path.rstrip("/").rsplit("/", 1)[-1] or path

        mine, theirs = name(summary), name(compare)
        if mine == theirs:
            mine, theirs = "model", "compared with"
        rows = (summary.get("metrics") or {}).get("rows")
        self._scores_table(
            f"{mine} vs {theirs} ({rows} rows)",
            (mine, theirs),
            summary.get("metrics") or {},
            compare.get("metrics") or {},
        )

    def _print_evaluation(self, evaluation: dict[str, Any], title: str | None = None) -> None:
        """Before/after scores and sample answers of a training job's ``evaluation`` block (or
        its preference scores)."""
        by_model = evaluation.get("metrics") or {}
        where = f"{evaluation.get('rows')} rows, {evaluation.get('rows_from', '')}".rstrip(", ")
        self._scores_table(
            title or f"base vs fine-tuned ({where})",
            ("base", "fine-tuned"),
            by_model.get("base") or {},
            by_model.get("fine_tuned") or {},
        )
        for sample in evaluation.get("samples") or []:
            prompt = str(sample.get("prompt", ""))
            # Show the last user turn, not the whole rendered chat template.
            question = prompt.rsplit("user\n", 1)[-1].split("<|im_end|>", 1)[0].strip()
            self.console.print(f"[bold]Q:[/] {question}", highlight=False)
            self.console.print(f"  reference:  {sample.get('reference')}", markup=False, highlight=False)
            self.console.print(
                f"  base:       {str(sample.get('base'))[:100]}", markup=False, highlight=False
            )
            self.console.print(
                f"  fine-tuned: {str(sample.get('fine_tuned'))[:100]}", markup=False, highlight=False
            )

    def _on_failed(self, job_id: str, p: dict[str, Any]) -> None:
        self.close()
        self.console.print(f"[bold red]{job_id} failed: {p.get('error')}[/]")
        self.console.print(str(p.get("message")), markup=False, highlight=False)
        if p.get("hint"):
            self.console.print(f"hint: {p['hint']}", style="yellow", markup=False, highlight=False)

    def _on_cancelled(self, job_id: str, p: dict[str, Any]) -> None:
        self.close()
        where = f" (checkpoint {p['checkpoint']})" if p.get("checkpoint") else ""
        self.console.print(f"[yellow]{job_id} cancelled at step {p.get('step')}{where}")


#: C0 controls and DEL but newline and tab, shown as their Unicode "control pictures" (\x1b as
#: U+241B): a model's output must not move the cursor, clear the screen or retitle the terminal.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


def shown_text(text: str) -> str:
    """Generated text as the terminal shows it (control characters made visible, not obeyed)."""
    return text.translate(_CONTROL_PICTURES)


def _stream_label(key: StreamKey) -> str:
    index, sequence = key
    return f"[{index}] " if sequence is None else f"[{index}.{sequence}] "


def _prompt_text(prompt: Any) -> str:
    """A prompt as a user would recognize it: a chat prompt's last user turn."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else json.dumps(prompt, ensure_ascii=False)
    return str(prompt)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        # The full config and data report live in summary.json; a table cell is for a glance.
        return text if len(text) <= 80 else f"{len(value)} entries (in the job's summary file)"
    return str(value)
