"""The test-only job kind ``test_steps``: exercises the runner without loading a model.

It is reachable only when the worker runs with ``FINETUNE_WORKER_TEST_JOBS=1`` (see
:mod:`finetune_worker.config`), so no production config can select it. Each step sleeps a
little, reports ``progress`` and ``metrics`` like a training step would, and can misbehave on
purpose: write to fd 1 in every way a library might (``write_stdout``), fail at a given step
(``fail_at_step``) or ignore cancel requests (``ignore_cancel``, to test the shutdown deadline).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_worker.context import JobContext
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.kinds import JobKind


class TestStepsConfig(BaseModel):
    """Config of a ``test_steps`` job."""

    __test__ = False  # not a pytest test class, despite the name
    model_config = ConfigDict(extra="forbid")

    job: Literal["test_steps"]
    steps: int = Field(default=5, ge=0, le=100_000, description="how many fake steps to run")
    step_seconds: float = Field(default=0.05, ge=0, le=60, description="sleep per step")
    ignore_cancel: bool = Field(default=False, description="never look at the cancel flag")
    write_stdout: bool = Field(default=False, description="write junk to fd 1 at each step")
    fail_at_step: int | None = Field(default=None, ge=1, description="raise JobFailed at this step")
    output_dir: str | None = Field(default=None, description="write result.json here")


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: TestStepsConfig = ctx.config
    started = time.monotonic()
    ctx.phase("training")
    for step in range(1, cfg.steps + 1):
        if not cfg.ignore_cancel:
            ctx.check_cancelled(step=step - 1)
        time.sleep(cfg.step_seconds)
        if cfg.write_stdout:
            _write_junk(ctx.job_id, step)
        if cfg.fail_at_step == step:
            raise JobFailed("internal_error", f"test job failed at step {step} as asked", hint="fail_at_step")
        elapsed = time.monotonic() - started
        ctx.emit(
            "progress",
            step=step,
            total_steps=cfg.steps,
            percent=round(100.0 * step / cfg.steps, 2),
            elapsed_s=round(elapsed, 4),
            eta_s=round(elapsed / step * (cfg.steps - step), 4),
        )
        ctx.emit(
            "metrics",
            step=step,
            metrics={"loss": 1.0 / step, "learning_rate": 1e-3, "tokens_per_second": 1000.0},
        )
    if cfg.ignore_cancel and ctx.cancelled:
        # Report what really happened: the job ran to its end although a cancel was asked for.
        ctx.log("cancel requested but ignored (ignore_cancel=true)", level="warning")
    outputs: dict[str, Any] = {}
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = out / "result.json"
        result.write_text(json.dumps({"job_id": ctx.job_id, "steps": cfg.steps}), encoding="utf-8")
        outputs["output_dir"] = str(out)
        outputs["path"] = str(result)
    if not cfg.ignore_cancel and ctx.cancelled:
        raise JobCancelled(step=cfg.steps)
    return {"outputs": outputs, "summary": {"steps": cfg.steps, "runtime_s": time.monotonic() - started}}


KINDS = (JobKind("test_steps", TestStepsConfig, run="finetune_worker.testing.testjobs:run", test_only=True),)


def _write_junk(job_id: str, step: int) -> None:
    """Write to fd 1 the four ways real libraries do; none of it may reach the frame stream."""
    tag = f"junk {job_id} step {step}"
    print(f"{tag} via print()", flush=True)
    os.write(1, f"{tag} via os.write\n".encode())
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        libc.printf(f"{tag} via printf\n".encode())
        libc.fflush(None)  # C stdio buffers fd 1 itself; flush so the bytes land now
    subprocess.run(["echo", f"{tag} via echo"], check=False)
    sys.stdout.flush()
