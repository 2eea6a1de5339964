"""What every benchmark part shares: the result row, statistics, timers and process memory.

A part returns a list of :class:`Row`; the runner prints them as one table and appends them to
BENCHMARKS.md. Rows carry a ratio and a target where the issue names one, so "met" or "missed"
is decided here, in code, not by whoever reads the numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the results table."""

    part: str
    name: str
    value: str
    compare: str = ""  # a ratio or the variant it is compared with
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, for tests and the JSON dump

    @property
    def verdict(self) -> str:
        if self.met is None:
            return ""
        return "met" if self.met else "MISSED"


@dataclass
class Options:
    """Sizes of one run: ``quick`` shrinks every part to seconds (the smoke test, a first look)."""

    quick: bool = False
    work_dir: Path = REPO / "runs" / "bench"
    rounds: int = 2  # interleaved A/B/C rounds of the training matrix
    steps: int = 100  # training steps per A/B/C run
    extra_steps: int = 20  # steps of the full fine-tuning and QLoRA rows (keeps make bench < 15 min)
    examples: int = 2000
    status_calls: int = 2000
    log: Callable[[str], None] = print

    @classmethod
    def make(cls, quick: bool, work_dir: Path | None = None, log: Callable[[str], None] = print) -> Options:
        opts = cls(quick=quick, log=log)
        if work_dir is not None:
            opts.work_dir = work_dir
        if quick:
            opts.rounds, opts.steps, opts.extra_steps, opts.examples, opts.status_calls = 1, 2, 2, 64, 200
        opts.work_dir.mkdir(parents=True, exist_ok=True)
        return opts


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an observed value, never an interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])


def ns_per_op(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Median over ``repeat`` runs of the mean time of ``number`` calls, in nanoseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter_ns() - start) / number)
    return median(runs)


def peak_rss_bytes(pid: int | None = None) -> int:
    """VmHWM (peak resident set) of a live process; this process when ``pid`` is None."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in {path}")


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms/op"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs/op"
    return f"{ns:.0f} ns/op"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def worker_env(test_jobs: bool = False) -> dict[str, str]:
    """Environment for spawned workers and scripts: offline, quiet, two threads like the machine."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # The worker defaults to passive OpenMP waits (cli.py); give the plain script the same, or
        # B/A measures spinning OpenMP threads on a shared 2-core machine, not the worker.
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    )
    if test_jobs:
        env["FINETUNE_WORKER_TEST_JOBS"] = "1"
    return env


def run_baseline(
    script: str, model: Path, data: Path, out: Path, steps: int, extra_args: tuple[str, ...] = ()
) -> tuple[dict[str, Any], float]:
    """A baseline script (``bench.hf_baseline``, or a peer's taking the same arguments and printing
    the same result line) in its own process: ``(its result, wall seconds from spawn to exit)``."""
    from bench.hf_baseline import RESULT_PREFIX  # imports torch: only when a baseline runs

    log_path = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", script, "--model", str(model), "--data", str(data)]
    cmd += ["--output", str(out), "--steps", str(steps), *extra_args]
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.monotonic() - started
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); {log_path}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), wall


@dataclass
class CliRun:
    """One ``finetune-worker run CONFIG --json`` in its own process."""

    peak_anon: int  # the largest RssAnon sampled (every 50 ms): memory the process owns
    peak_rss: int  # ru_maxrss from wait4: also the file pages it mapped (clean, reclaimable)
    seconds: float


def run_cli_job(config: dict[str, Any], out: Path) -> CliRun:
    """Write ``config`` beside ``out``, run it through the CLI and measure its memory; the log
    goes to ``out.log``. Raises with the log's tail when the run fails."""
    import json
    import subprocess
    import sys

    cfg_path = out.with_suffix(".json")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(config))
    log_path = out.with_suffix(".log")
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_worker", "run", str(cfg_path), "--json"],
            cwd=REPO,
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon(proc.pid))
            time.sleep(0.05)
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cfg_path.name} failed (exit {code}); {log_path}:\n{tail}")
    return CliRun(anon, usage.ru_maxrss * 1024, seconds)  # Linux reports ru_maxrss in KiB


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
