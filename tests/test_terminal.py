"""What ``finetune-worker run`` shows a person: in a real terminal (tmux's pseudo-terminal, read
back with ``capture-pane``) and piped, the generated text must be there as it streams and in the
final display, not overwritten by the live progress bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import REPO, TMUX, Terminal, render_events, run_cli
from finetune_worker.cli.render import shown_text

PROMPTS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Spain?"},
    ],
    "The cat sat on the",
]


def _generate_config(tmp_path: Path, model: Path, **extra: object) -> Path:
    config = {
        "job": "generate",
        "model_path": str(model),
        "prompts": PROMPTS,
        "max_new_tokens": 12,
        "temperature": 0,
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    path = tmp_path / "generate.json"
    path.write_text(json.dumps(config))
    return path


def _completions(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _screen_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


@pytest.mark.skipif(TMUX is None, reason="needs tmux (Debian's tmux package; CI installs it)")
def test_generated_text_stays_on_a_real_terminal(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _generate_config(tmp_path, tiny_model_dir)
    with Terminal(f"fw-test-{tmp_path.name}", "run", str(config), cwd=tmp_path) as terminal:
        screen = terminal.wait_for("EXITED-")
    assert "EXITED-0" in screen, screen
    lines = _screen_lines(screen)
    completions = _completions(tmp_path)
    assert len(completions) == len(PROMPTS)
    table_at = next(i for i, line in enumerate(lines) if "completed" in line)
    for c in completions:
        first, *rest = _screen_lines(shown_text(c["text"]))
        assert first or rest, c  # greedy from the tiny model: each prompt gets some text
        # Printed for good while the job ran (above the bar and the final table)...
        assert f"[{c['prompt_index']}] {first}".rstrip() in lines[:table_at], (c, screen)
        # ...and again in the final display, under its prompt.
        assert any(line.endswith(f": {first}".rstrip()) and "completion" in line for line in lines[table_at:])
        assert all(line in lines[table_at:] for line in rest), (c, screen)
    for shown in ("prompt 0: What colour is the sky?", "prompt 1: What is the capital of Spain?"):
        assert shown in lines, screen


def test_generated_text_piped_is_one_line_per_completion(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _generate_config(tmp_path, tiny_model_dir)
    done = run_cli("run", str(config), cwd=tmp_path, env={"FINETUNE_WORKER_WARM": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _screen_lines(done.stdout)
    for c in _completions(tmp_path):
        first = _screen_lines(shown_text(c["text"]) or " ")[0]
        # Its own line: not glued to the progress bar or to the next prompt's text.
        assert f"[{c['prompt_index']}] {first}".rstrip() in lines, done.stdout
    bar = [line for line in lines if line.startswith("generating ")]
    assert bar and all("3/3" in line and "[" not in line for line in bar), done.stdout


def test_piped_sequences_of_one_prompt_are_not_interleaved() -> None:
    tokens = [
        ("token", {"prompt_index": 0, "sequence": s, "index": i, "text": piece})
        for i, pieces in enumerate([("Hel", "Bon"), ("lo", "jour"), (" there", "!")])
        for s, piece in enumerate(pieces)
    ]
    events = [
        *tokens,
        ("progress", {"done": 1, "total": 2, "unit": "prompts"}),
        ("token", {"prompt_index": 1, "sequence": 0, "index": 0, "text": "next"}),
        ("log", {"level": "info", "message": "a line in between"}),
    ]
    lines = _screen_lines(render_events(events, terminal=False))
    assert lines[:4] == ["[0.0] Hello there", "[0.1] Bonjour!", "[1.0] next", "  info: a line in between"]


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
def test_control_characters_in_generated_text_are_shown_not_obeyed(terminal: bool) -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07wiped\r"  # clear screen, retitle, return to column 0
    out = render_events([("token", {"prompt_index": 0, "index": 0, "text": hostile})], terminal)
    assert "\x1b" not in out.replace("\x1b[?25l", "").replace("\x1b[?25h", "").replace("\x1b[2K", "")
    assert "[0] ␛[2J␛]0;owned␇wiped␍" in _screen_lines(out)


def test_a_reader_that_closes_the_pipe_stops_the_job(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``run job.json | head``: the job stops at a step boundary, with a checkpoint, and the
    command exits (it used to wait for ever: rich exits on a closed pipe, in the job's thread)."""
    import os

    from finetune_worker.cli import EXIT_CANCELLED

    config = json.loads((REPO / "configs" / "tiny-lora.json").read_text())
    config.update(
        model_name=str(tiny_model_dir),
        dataset={"path": str(REPO / "configs" / "data" / "conversations.jsonl")},
        output_dir=str(tmp_path / "out"),
        max_steps=400,
        checkpoint={"every_steps": 4, "keep": 2},
    )
    config.pop("evaluation")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "FINETUNE_WORKER_WARM": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_worker", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("checkpoint step"):
            break  # what `head` does once it has its lines
    proc.stdout.close()
    try:
        rc = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the command did not exit once its reader had gone") from None
    stderr = proc.stderr.read()
    assert rc == EXIT_CANCELLED, stderr
    assert "the output's reader closed the pipe: the job stopped (checkpoint " in stderr, stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))


def test_the_final_bar_is_the_training_bar_not_the_last_evaluations_count() -> None:
    """A training run with an evaluation section: its answers count (20/20) is a bar of its own,
    gone once saving starts; the last bar shows the training steps with their loss."""
    answers = [("progress", {"done": d, "total": 20, "unit": "answers"}) for d in (10, 20)]
    events = [
        ("phase", {"phase": "evaluating"}),
        *answers,
        ("phase", {"phase": "training"}),
        *[("progress", {"step": s, "total_steps": 60}) for s in (30, 60)],
        ("metrics", {"step": 60, "metrics": {"loss": 2.9552, "learning_rate": 2.45e-06}}),
        ("phase", {"phase": "evaluating"}),
        *answers,
        ("phase", {"phase": "saving"}),
    ]
    for terminal in (True, False):
        shown = render_events(events, terminal).replace("\x1b[2K", "")  # the live display's line erase
        bars = [line for line in shown.splitlines() if "━" in line]
        assert bars and "60/60" in bars[-1] and "loss 2.9552" in bars[-1], bars
        assert bars[-1].startswith("saving") and "20/20" not in bars[-1], bars


def test_the_final_evaluation_counts_its_answers_on_a_visible_bar() -> None:
    """The base evaluation's answers bar is hidden once training starts; the fine-tuned
    evaluation's answers count on it again, shown from zero."""
    import io

    from rich.console import Console

    from finetune_worker.cli.render import Renderer
    from finetune_worker.wire.vocabulary import Event

    render = Renderer(Console(file=io.StringIO(), width=120, force_terminal=False))
    events = [
        ("phase", {"phase": "evaluating"}),
        ("progress", {"done": 20, "total": 20, "unit": "answers"}),
        ("phase", {"phase": "training"}),
        ("progress", {"step": 60, "total_steps": 60}),
        ("phase", {"phase": "evaluating"}),
        ("progress", {"done": 5, "total": 20, "unit": "answers"}),
    ]
    for kind, payload in events:
        render(None, Event("j", kind, payload))
    shown = [(bar.description, bar.completed, bar.total) for bar in render.progress.tasks if bar.visible]
    render.close()
    assert ("evaluating", 5, 20) in shown, shown
