"""Event sinks for ``finetune-worker run``: a live rich display, or JSON lines for scripts.

Both are :data:`finetune_worker.server.jobs.Sink` callables ``(record, event) -> None``, fed the very
events a BEAM subscriber would get, so the terminal shows what the port would send.
"""

from __future__ import annotations

import json
import math
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

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


class Renderer:
    """Progress bar (step/total, loss, learning rate, tokens/s, ETA); other events as lines."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("[cyan]{task.fields[eta]}"),
            console=self.console,
        )
        self.task: TaskID | None = None
        self.phase = "running"
        self.stats: dict[str, str] = {}
        self.prompt_index: Any = None

    def __call__(self, record: Any, event: Event) -> None:
        p = plain(event.payload)
        handler = getattr(self, f"_on_{event.type}", None)
        if handler is not None:
            handler(event.job_id, p)

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    # ---- one method per event type -------------------------------------------------------------

    def _line(self, text: str) -> None:
        # Printing through the Progress console keeps the live bar below the scrolled lines.
        self.progress.console.print(text, highlight=False)

    def _on_queued(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[dim]{job_id} queued ({p.get('kind')}, position {p.get('position')})")

    def _on_started(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[bold]{job_id}[/] started: {p.get('kind')}")

    def _on_phase(self, job_id: str, p: dict[str, Any]) -> None:
        self.phase = str(p.get("phase"))
        self._line(f"[magenta]▸ {self.phase}")
        if self.task is not None:
            self.progress.update(self.task, description=self.phase)

    def _on_log(self, job_id: str, p: dict[str, Any]) -> None:
        style = {"warning": "yellow", "error": "red", "debug": "dim"}.get(str(p.get("level")), "")
        text = f"  {p.get('level')}: {p.get('message')}"
        self._line(f"[{style}]{text}[/]" if style else text)

    def _on_progress(self, job_id: str, p: dict[str, Any]) -> None:
        # Training reports step/total_steps; merges and evaluations report done/total/unit.
        total = p.get("total_steps", p.get("total"))
        done = p.get("step", p.get("done")) or 0
        eta = _duration(p.get("eta_s"))
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.phase, total=total, stats="", eta="")
        self.progress.update(
            self.task, completed=done, total=total, description=self.phase, eta=f"ETA {eta}" if eta else ""
        )

    def _on_metrics(self, job_id: str, p: dict[str, Any]) -> None:
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("learning_rate", "lr", "{:.2e}"),
            ("tokens_per_second", "tok/s", "{:,.0f}"),
        ):
            value = (p.get("metrics") or {}).get(key)
            if isinstance(value, (int, float)):
                self.stats[label] = fmt.format(value)
        if self.task is not None:
            self.progress.update(self.task, stats="  ".join(f"{k} {v}" for k, v in self.stats.items()))

    def _on_eval(self, job_id: str, p: dict[str, Any]) -> None:
        metrics = p.get("metrics") or {}
        rows = metrics.get("rows")
        # The Trainer's held-out loss carries its step; an evaluation block's scores, how many rows.
        where = (
            f"step {p['step']}"
            if p.get("step") is not None
            else (f"{rows} rows scored" if isinstance(rows, int) and not isinstance(rows, bool) else "")
        )
        model = {"base": "base model", "fine_tuned": "fine-tuned"}.get(str(p.get("model")), p.get("model"))
        label = f"{model}, {where}" if model and where else (model or where)
        parts = [f"{k} {v:.4f}" for k, v in (p.get("metrics") or {}).items() if isinstance(v, float)]
        self._line(f"[blue]eval[/] {label + ': ' if label else ''}{'  '.join(parts)}")

    def _on_checkpoint(self, job_id: str, p: dict[str, Any]) -> None:
        self._line(f"[green]checkpoint[/] step {p.get('step')}: {p.get('path')}")

    def _on_token(self, job_id: str, p: dict[str, Any]) -> None:
        # Tokens of one prompt run together; each prompt's completion starts on its own line.
        index = p.get("prompt_index")
        if index != self.prompt_index:
            prefix = "\n" if self.prompt_index is not None else ""
            self.progress.console.print(f"{prefix}[bold]\\[{index}][/] ", end="", highlight=False)
            self.prompt_index = index
        self.progress.console.print(str(p.get("text", "")), end="", highlight=False, markup=False)

    def _on_completed(self, job_id: str, p: dict[str, Any]) -> None:
        self.close()
        if self.prompt_index is not None:
            self.console.print()
        table = Table(title=f"{job_id} completed", show_header=False, title_style="bold green")
        table.add_column("key", style="bold")
        table.add_column("value")
        for section in ("summary", "outputs"):
            for key, value in (p.get(section) or {}).items():
                if value is not None and key != "evaluation":
                    table.add_row(str(key), _cell(value))
        self.console.print(table)
        evaluation = (p.get("summary") or {}).get("evaluation")
        if isinstance(evaluation, dict):
            self._print_evaluation(evaluation)
        self._print_next_steps(p.get("outputs") or {})

    def _print_next_steps(self, outputs: dict[str, Any]) -> None:
        """A training run's next steps, with the commands (the configs are in its ``next/``)."""
        out = outputs.get("output_dir")
        key = next((k for k in ("adapter_path", "model_path") if k in outputs), None)
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

    def _print_evaluation(self, evaluation: dict[str, Any]) -> None:
        """Before/after scores and sample answers of a training job's ``evaluation`` block."""
        by_model = evaluation.get("metrics") or {}
        base, tuned = by_model.get("base") or {}, by_model.get("fine_tuned") or {}
        where = f"{evaluation.get('rows')} rows, {evaluation.get('rows_from', '')}".rstrip(", ")
        scores = Table(title=f"base vs fine-tuned ({where})")
        for column in ("metric", "base", "fine-tuned"):
            scores.add_column(column, justify="left" if column == "metric" else "right")
        for key in ("eval_loss", "perplexity", "exact_match", "f1", "bleu", "rouge_l"):
            if key in base or key in tuned:
                scores.add_row(key, _cell(base.get(key)), _cell(tuned.get(key)))
        self.console.print(scores)
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
