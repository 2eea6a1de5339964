"""The background import of the training stack (server/warmup.py): on by default, off on request,
``info`` answered while it runs, and the first job uses what it imported."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from finetune_worker.testing import WorkerHarness
from test_train_helpers import tiny_config


def _env(warm: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FINETUNE_WORKER_WARM", None)  # conftest turns it off for the other tests
    if warm is not None:
        env["FINETUNE_WORKER_WARM"] = warm
    return env


def _wait_state(w: WorkerHarness, want: str, timeout: float = 180) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = str(w.call("info", timeout=30)["warm"])
        seen.append(state)
        if state == want:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"warm-up never reached {want}: {seen[-5:]}")


def test_the_warm_up_runs_by_default_and_the_first_job_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    with WorkerHarness(env=_env(None)) as w:
        # The first reply comes before the warm-up starts; it is still importing on the next ones.
        assert str(w.call("info")["warm"]) == "warming"
        assert w.call("ping") == "pong"  # answered while the import runs
        seen = _wait_state(w, "ready")
        assert seen[0] == "warming"
        events = w.submit_and_wait(
            json.dumps(tiny_config(tiny_model_dir, tmp_path / "o", max_steps=2)), timeout=300
        )
        assert events[-1].type == "completed", events[-1].payload


def test_no_warm_and_the_env_switch_leave_the_stack_unimported() -> None:
    for env, args in ((_env("0"), ()), (_env(None), ("--no-warm",))):
        with WorkerHarness(args, env=env) as w:
            assert str(w.call("info")["warm"]) == "off"
            time.sleep(1.0)  # past the half second after which an idle worker would start warming
            assert str(w.call("info")["warm"]) == "off"


def test_an_explicit_warm_flag_beats_the_env() -> None:
    with WorkerHarness(("--warm",), env=_env("0")) as w:
        assert str(w.call("info")["warm"]) in ("warming", "ready")
