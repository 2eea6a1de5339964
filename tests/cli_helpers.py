"""Running the console script as users do: ``python -m finetune_worker ARGS`` in a folder."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The worker's CLI in ``cwd`` (this checkout's package first on the path, a wide terminal);
    ``input`` is piped to its stdin."""
    full = {**os.environ, "PYTHONPATH": str(REPO / "python"), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "finetune_worker", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full,
        timeout=timeout,
        input=input,
    )


def render_events(events: list[tuple[str, dict]], terminal: bool = False, width: int = 120) -> str:
    """What ``finetune-worker run``'s display shows for these events (``(type, payload)``), on a
    terminal (``force_terminal``, no colours) or piped."""
    import io

    from rich.console import Console

    from finetune_worker.cli.render import Renderer
    from finetune_worker.wire.vocabulary import Event

    buffer = io.StringIO()
    render = Renderer(Console(file=buffer, width=width, force_terminal=terminal, color_system=None))
    for kind, payload in events:
        render(None, Event("j", kind, payload))
    render.close()
    return buffer.getvalue()


TMUX = shutil.which("tmux")


class Terminal:
    """The worker's CLI in a real pseudo-terminal: a tmux pane on a tmux server of its own (no
    user's sessions touched), read back with ``capture-pane``. The pane outlives the command
    (it ends with ``EXITED-<status>``), so the screen can be read after it exits."""

    def __init__(self, name: str, *args: str, cwd: Path, width: int = 150, height: int = 60):
        self.session = name[:50].replace(".", "-")
        self._tmux = [TMUX or "tmux", "-L", self.session]
        env = {"PYTHONPATH": str(REPO / "python"), "FINETUNE_WORKER_WARM": "0", "TERM": "xterm-256color"}
        command = " ".join(
            [
                "env",
                *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                shlex.quote(sys.executable),
                "-m finetune_worker",
                *(shlex.quote(a) for a in args),
            ]
        )
        script = f"{command}; echo EXITED-$?; sleep 300"
        subprocess.run(
            [
                *self._tmux,
                "new-session",
                "-d",
                "-s",
                self.session,
                "-x",
                str(width),
                "-y",
                str(height),
                script,
            ],
            check=True,
            cwd=cwd,
        )

    def screen(self) -> str:
        return subprocess.run(
            [*self._tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", self.session],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def wait_for(self, check: Callable[[str], bool] | str, timeout: float = 120) -> str:
        """The screen once ``check`` (a predicate, or a text to find) holds; raises on timeout."""
        test = (lambda screen: check in screen) if isinstance(check, str) else check
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not test(screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {check!r}; the screen:\n{screen}")
            time.sleep(0.3)
            screen = self.screen()
        return screen

    def send(self, *keys: str) -> None:
        """tmux key names (``Enter``, ``C-c``, ``C-d``) or literal text."""
        subprocess.run([*self._tmux, "send-keys", "-t", self.session, *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self._tmux, "kill-server"], capture_output=True)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
