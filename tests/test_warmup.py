"""The background import of the training stack (server/warmup.py): on by default, off on request,
``info`` answered while it runs, and the first job uses what it imported."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import weakref
from pathlib import Path

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.server.jobs import JobManager
from finetune_worker.testing import WorkerHarness
from finetune_worker.wire.vocabulary import Event
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


def test_the_warm_up_does_the_first_model_loads_one_time_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5 compiles its weight-renaming table on a process's first from_pretrained
    (0.4 s of a fresh worker's first job); the warm-up builds it instead."""
    from transformers import conversion_mapping

    from finetune_worker.server.warmup import Warmup

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    warmup = Warmup(True)
    warmup.start()
    assert warmup.wait(timeout=300) and warmup.state == "ready"
    assert conversion_mapping._checkpoint_conversion_mapping_cache is not None


def test_a_job_runs_with_the_older_heap_frozen_and_everything_is_collected_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collections made during a job (the Trainer's gc.collect at the start of train(), each
    ~0.3 s over the imported stack) skip the objects that were alive before it; after its
    terminal event they are unfrozen and collected, so a cycle that died meanwhile is freed."""
    monkeypatch.setenv("FINETUNE_WORKER_TEST_JOBS", "1")

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # type: ignore[attr-defined]  # only the cyclic collector frees it
    alive = weakref.ref(cycle)
    events: list[Event] = []
    manager = JobManager(lambda record, event: events.append(event), job_prefix="gc")
    try:
        # Long enough (6 s) that it is still running when the test looks, on a loaded machine.
        manager.submit(*parse_job_config({"job": "test_steps", "steps": 300, "step_seconds": 0.02}))
        deadline = time.monotonic() + 30
        while not any(e.type == "progress" for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
        del cycle
        gc.collect()
        assert gc.get_freeze_count() > 0
        assert alive() is not None, "the job's collections scanned the heap from before it"
        while alive() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert events[-1].type == "completed", events[-1]
        assert alive() is None, "the cycle was never collected after the job"
        assert gc.get_freeze_count() == 0
    finally:
        manager.close(5)


def test_a_job_waits_for_the_warm_up_instead_of_importing_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads importing transformers at once can each wait on a module the other holds; Python
    then hands one a half-initialized module and the job fails ("cannot import name
    'TrainerCallback' from 'transformers'"). So the runner starts the warm-up if it has not
    started (a job can be the first call) and waits for it before the job runs."""
    from finetune_worker.server import warmup as warmup_module

    monkeypatch.setenv("FINETUNE_WORKER_TEST_JOBS", "1")
    monkeypatch.setattr(warmup_module, "_prime", lambda: time.sleep(1.0))  # a warm-up that takes a while
    warmup = warmup_module.Warmup(True)  # not started: the job comes first
    seen: list[str] = []
    done = threading.Event()

    def sink(record: object, event: Event) -> None:
        seen.append(f"{event.type}:{warmup.state}")
        if event.terminal:
            done.set()

    manager = JobManager(sink, job_prefix="w", before_job=warmup.before_job)
    try:
        manager.submit(*parse_job_config({"job": "test_steps", "steps": 2, "step_seconds": 0.0}))
        assert done.wait(60), seen
    finally:
        manager.close(5)
    started = [e for e in seen if e.startswith("started:")]
    assert started == ["started:ready"], seen
    assert seen[-1] == "completed:ready", seen
