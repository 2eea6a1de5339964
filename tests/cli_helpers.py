"""Running the console script as users do: ``python -m finetune_worker ARGS`` in a folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The worker's CLI in ``cwd`` (this checkout's package first on the path, a wide terminal)."""
    full = {**os.environ, "PYTHONPATH": str(REPO / "python"), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "finetune_worker", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full,
        timeout=timeout,
    )
