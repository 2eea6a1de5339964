"""The runner through the real worker: stdio hygiene, cancel, queueing, subscribers."""

from __future__ import annotations

import json
import time

import pytest

from finetune_worker.testing import WorkerHarness, make_pid


def steps(n: int, seconds: float = 0.02, **extra: object) -> str:
    return json.dumps({"job": "test_steps", "steps": n, "step_seconds": seconds, **extra})


@pytest.fixture(scope="module")
def worker():
    with WorkerHarness(test_jobs=True) as w:
        yield w
        assert w.stray == []


def submit(w: WorkerHarness, config: str, pid: object = None) -> str:
    result = w.call("submit", config, w.pid if pid is None else pid)
    assert result[0] == "ok", result
    return str(result[1])


def test_stdout_writes_never_reach_the_frame_stream(worker: WorkerHarness) -> None:
    """print, os.write(1), libc printf and a child's echo all land on stderr; frames stay intact."""
    noisy = submit(worker, steps(3, 0.01, write_stdout=True))
    events = worker.wait_for(noisy, "terminal", timeout=30)
    assert events[-1].type == "completed"
    assert [e.payload["step"] for e in events if e.type == "progress"] == [1, 2, 3]
    # every later reply and event still arrives intact
    for _ in range(20):
        assert worker.call("ping") == "pong"
    assert worker.call("info")["queue_length"] == 0
    quiet = submit(worker, steps(2, 0.0))
    assert worker.wait_for(quiet, "terminal", timeout=30)[-1].type == "completed"
    assert worker.stray == []
    assert worker.prints == []
    err = worker.stderr_text()
    for how in ("print()", "os.write", "printf", "echo"):
        for step in (1, 2, 3):
            assert f"junk {noisy} step {step} via {how}" in err


def test_cancel_running_job(worker: WorkerHarness) -> None:
    job = submit(worker, steps(1000, 0.02))
    seen = worker.wait_for(job, "progress", timeout=30)
    assert worker.call("cancel", job) == "ok"
    rest = worker.wait_for(job, "terminal", timeout=30)
    last = rest[-1]
    assert last.type == "cancelled"
    assert 1 <= last.payload["step"] < 1000
    assert last.payload["checkpoint"] is None
    steps_seen = [e.payload["step"] for e in seen + rest if e.type == "progress"]
    assert last.payload["step"] == steps_seen[-1]
    assert worker.call("status", job)["state"] == "cancelled"
    assert worker.call("cancel", job) == "ok"  # cancelling a finished job is a no-op


def test_cancel_queued_job_and_unknown_id(worker: WorkerHarness) -> None:
    running = submit(worker, steps(1000, 0.02))
    waiting = submit(worker, steps(3, 0.0))
    worker.wait_for(running, "started", timeout=30)
    assert worker.call("cancel", waiting) == "ok"
    events = worker.wait_for(waiting, "terminal", timeout=10)
    assert events[0].type == "queued" and events[-1].type == "cancelled"
    assert events[-1].payload["step"] == 0
    assert "started" not in [e.type for e in events]
    assert worker.call("cancel", "job-does-not-exist") == ("error", "not_found")
    assert worker.call("cancel", running) == "ok"
    assert worker.wait_for(running, "terminal", timeout=30)[-1].type == "cancelled"
    assert worker.call("status", waiting)["state"] == "cancelled"


def test_three_jobs_run_in_order(worker: WorkerHarness) -> None:
    start = len(worker.event_log)
    ids = [submit(worker, steps(3, 0.02)) for _ in range(3)]
    for job in ids:
        assert worker.wait_for(job, "terminal", timeout=60)[-1].type == "completed"
    log = [e for e in worker.event_log[start:] if e.job_id in ids]
    first_queued = {}
    for e in log:
        if e.type == "queued":
            first_queued.setdefault(e.job_id, e.payload["position"])
    assert [first_queued[j] for j in ids] == [1, 2, 3]
    assert [e.job_id for e in log if e.type == "started"] == ids
    assert [e.job_id for e in log if e.type == "completed"] == ids
    # a job starts only after the one before it finished
    order = [(e.job_id, e.type) for e in log if e.type in ("started", "completed")]
    assert order == [(j, t) for j in ids for t in ("started", "completed")]
    # and each job's own stream is ordered: queued ... started ... completed
    for job in ids:
        types = [e.type for e in worker.events(job)]
        assert types[0] == "queued" and types.index("started") < types.index("completed")
        # the last job moves up the queue as the others start
        if job == ids[2]:
            positions = [e.payload["position"] for e in worker.events(job) if e.type == "queued"]
            assert positions == sorted(positions, reverse=True) and positions[-1] == 2


def test_events_go_to_the_given_pid_or_nowhere(worker: WorkerHarness) -> None:
    other = make_pid()
    job = submit(worker, steps(2, 0.0), pid=other)
    events = worker.wait_for(job, "terminal", timeout=30)
    assert {e.to for e in events} == {other}
    silent = worker.call("submit", steps(2, 0.0))  # no ReplyTo: status is the only window
    assert silent[0] == "ok"
    for _ in range(400):
        if worker.call("status", silent[1])["state"] == "completed":
            break
        time.sleep(0.05)
    assert worker.call("status", silent[1])["state"] == "completed"
    assert worker.events(str(silent[1])) == []


def test_failed_job_reports_error_and_worker_goes_on(worker: WorkerHarness) -> None:
    job = submit(worker, steps(5, 0.0, fail_at_step=2))
    last = worker.wait_for(job, "terminal", timeout=30)[-1]
    assert last.type == "failed"
    assert last.payload["error"] == "internal_error"
    assert "step 2" in last.payload["message"]
    status = worker.call("status", job)
    assert status["state"] == "failed" and status["error"]["error"] == "internal_error"
    assert worker.call("ping") == "pong"
