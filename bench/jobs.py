"""Driving the real worker for the benchmarks: job configs, a spawned worker, timestamped events.

Everything goes through :class:`finetune_worker.testing.WorkerHarness`, the same BEAM stand-in
the tests use: the worker is a separate process speaking frames on its stdio, so what is timed
includes the codec, the pipes and the worker's dispatch, as a BEAM would see them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, peak_rss_bytes, worker_env


def train_config(
    model: Path,
    data: Path,
    output_dir: Path,
    *,
    steps: int,
    packing: bool | str = True,
    method: str = "lora",
    bits: int | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 42,
    max_seq_length: int = 512,
) -> dict[str, Any]:
    """A train job matching the plain script's settings (``bench.hf_baseline``), step for step."""
    config: dict[str, Any] = {
        "job": "train",
        "model_name": str(model),
        "output_dir": str(output_dir),
        "dataset": {"path": str(data), "validation_split": 0},
        "data": {
            "format": "instruction",
            "train_on_responses_only": True,
            "max_seq_length": max_seq_length,  # above the longest row: nothing is truncated
            # True/False: flattened (same rows, same order as the padded script) or padded; a
            # string is a data.packing value as users write it ("auto" groups rows by length
            # on CPU, which reorders them).
            "packing": {True: "flatten", False: "pad"}.get(packing, packing)
            if isinstance(packing, bool)
            else packing,
        },
        "peft": {"method": "full"}
        if method == "full"
        else {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "training_parameters": {
            "epochs": 1,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "lr_scheduler": "linear",
            "warmup_steps": 0,
            "logging_steps": 1,
        },
        "max_steps": steps,
        "checkpoint": {"every_steps": 1_000_000, "keep": 1},  # the script saves none either
        "resume": False,
        "overwrite": True,
        "seed": seed,
    }
    if bits:
        config["quantization"] = {"bits": bits, "use_double_quant": True}
    return config


@dataclass
class TimedEvent:
    at: float  # time.perf_counter() when the harness handed it over
    type: str
    payload: dict[str, Any]


@dataclass
class JobRun:
    job_id: str
    submitted_at: float
    events: list[TimedEvent] = field(default_factory=list)

    def first(self, type: str, **match: Any) -> TimedEvent | None:
        for e in self.events:
            if e.type == type and all(e.payload.get(k) == v for k, v in match.items()):
                return e
        return None

    @property
    def terminal(self) -> TimedEvent:
        return self.events[-1]


def spawn(*, test_jobs: bool = False, warm: bool = False) -> Any:
    """A fresh worker process (one per measured job, so its peak RSS is that job's). The warm-up
    import is off unless asked for: a measured job must not share the cores with it."""
    from finetune_worker.testing import WorkerHarness

    env = worker_env(test_jobs)
    env["FINETUNE_WORKER_WARM"] = "1" if warm else "0"
    return WorkerHarness(env=env, cwd=REPO, test_jobs=test_jobs)


def submit(harness: Any, config: dict[str, Any]) -> JobRun:
    submitted = time.perf_counter()
    result = harness.call("submit", json.dumps(config), harness.pid, timeout=30)
    if not (isinstance(result, tuple) and result[0] == "ok"):
        raise RuntimeError(f"the worker refused the job: {result!r}")
    return JobRun(job_id=str(result[1]), submitted_at=submitted)


def follow(harness: Any, run: JobRun, *, until: str = "terminal", timeout: float = 1800) -> JobRun:
    """Consume ``run``'s events, timestamping each on arrival, up to a terminal event (or ``until``)."""
    from finetune_worker.wire.vocabulary import TERMINAL_TYPES

    deadline = time.monotonic() + timeout
    while True:
        event = harness.next_event(run.job_id, timeout=max(0.0, deadline - time.monotonic()))
        run.events.append(TimedEvent(time.perf_counter(), event.type, event.payload))
        if event.type in TERMINAL_TYPES:
            if event.type != "completed" and until == "terminal":
                raise RuntimeError(
                    f"job {run.job_id} ended {event.type}: {event.payload}\n"
                    f"worker stderr (tail):\n{harness.stderr_text()[-3000:]}"
                )
            return run
        if until != "terminal" and event.type == until:
            return run


def worker_peak_rss(harness: Any) -> int:
    return peak_rss_bytes(harness.proc.pid)


def stop(harness: Any, timeout: float = 30) -> None:
    """Close the port as the BEAM would and let the worker exit on its own."""
    harness.close_stdin()
    try:
        harness.wait(timeout)
    finally:
        harness.__exit__(None, None, None)  # kills it if it did not exit, removes the stderr log


def run_in_fresh_worker(config: dict[str, Any]) -> tuple[JobRun, int]:
    """``config`` run to its end in a worker spawned for it: ``(its events, the worker's peak RSS)``."""
    harness = spawn()
    try:
        run = follow(harness, submit(harness, config))
        rss = worker_peak_rss(harness)
    finally:
        stop(harness, timeout=60)
    return run, rss
