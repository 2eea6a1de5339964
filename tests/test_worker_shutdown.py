"""Shutdown: stdin EOF, SIGTERM and shutdown() end the process in time, with or without a job.

The deadline (grace + 2 s) is the contract under test, so it is asserted through
``wait(timeout=...)``; ``--grace 1`` keeps it short.
"""

from __future__ import annotations

import json
import os

import pytest

from finetune_worker.testing import WorkerHarness

GRACE = 1.0
DEADLINE = GRACE + 2.0


def long_job(**extra: object) -> str:
    return json.dumps({"job": "test_steps", "steps": 100000, "step_seconds": 0.02, **extra})


def start_job(w: WorkerHarness, config: str) -> str:
    ok, job_id = w.call("submit", config, w.pid, timeout=30)
    assert ok == "ok"
    w.wait_for(job_id, "progress", timeout=30)
    return str(job_id)


def assert_gone(w: WorkerHarness) -> None:
    assert w.wait(timeout=DEADLINE) == 0, w.stderr_text()
    with pytest.raises(ProcessLookupError):
        os.kill(w.proc.pid, 0)


@pytest.mark.parametrize("stop", ["eof", "sigterm", "shutdown"])
def test_idle_worker_exits_cleanly(stop: str) -> None:
    with WorkerHarness(["--grace", str(GRACE)]) as w:
        assert w.call("ping", timeout=30) == "pong"
        if stop == "eof":
            w.close_stdin()
        elif stop == "sigterm":
            w.terminate()
        else:
            assert w.call("shutdown") == "ok"
        assert_gone(w)
        assert "shutting down" in w.stderr_text()


@pytest.mark.parametrize("stop", ["eof", "sigterm", "shutdown"])
def test_running_job_is_cancelled_then_worker_exits(stop: str) -> None:
    with WorkerHarness(["--grace", str(GRACE)], test_jobs=True) as w:
        job = start_job(w, long_job())
        queued = w.call("submit", long_job(), w.pid)[1]
        if stop == "eof":
            w.close_stdin()
        elif stop == "sigterm":
            w.terminate()
        else:
            assert w.call("shutdown") == "ok"
        assert_gone(w)
        # the job got its cancel and said so before the process ended
        assert w.wait_for(job, "terminal", timeout=5)[-1].type == "cancelled"
        assert w.wait_for(str(queued), "terminal", timeout=5)[-1].type == "cancelled"


@pytest.mark.parametrize("stop", ["eof", "sigterm"])
def test_job_ignoring_cancel_cannot_keep_the_process_alive(stop: str) -> None:
    with WorkerHarness(["--grace", str(GRACE)], test_jobs=True) as w:
        start_job(w, long_job(ignore_cancel=True))
        if stop == "eof":
            w.close_stdin()
        else:
            w.terminate()
        assert_gone(w)
        assert "did not stop within" in w.stderr_text()


def test_grace_comes_from_the_environment() -> None:
    env = dict(os.environ, FINETUNE_WORKER_GRACE="0.5", FINETUNE_WORKER_TEST_JOBS="1")
    with WorkerHarness(env=env) as w:
        start_job(w, long_job(ignore_cancel=True))
        w.close_stdin()
        assert w.wait(timeout=0.5 + 2.0) == 0
        assert "grace period 0.5 s" in w.stderr_text()


def test_sigint_is_ignored_in_port_mode() -> None:
    import signal

    with WorkerHarness() as w:
        assert w.call("ping", timeout=30) == "pong"
        w.proc.send_signal(signal.SIGINT)
        assert w.call("ping") == "pong"


PROBE = """
import atexit
import os


class _Finalized:
    def __init__(self, path):
        self.path = path

    def __del__(self, open=open):  # os and the builtins may be gone by then
        with open(self.path, "w") as f:
            f.write("the interpreter tore the modules down")


def _hook():
    with open(os.environ["PROBE_DIR"] + "/atexit", "w") as f:
        f.write("ran")


atexit.register(_hook)
_finalized = _Finalized(os.environ["PROBE_DIR"] + "/finalized")
"""


def test_a_clean_exit_runs_the_exit_hooks_and_skips_finalization(tmp_path) -> None:
    """The libraries' exit hooks (tracking clients, temporary folders) run as in a normal exit;
    the interpreter's module-by-module teardown (~1.5 s with torch and transformers loaded, every
    restart waiting on it) does not."""
    (tmp_path / "exit_probe.py").write_text(PROBE)
    env = dict(os.environ)
    env.update(
        PROBE_DIR=str(tmp_path),
        FINETUNE_WORKER_KIND_MODULES="exit_probe",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
    )
    with WorkerHarness(["--grace", str(GRACE)], env=env) as w:
        w.call("validate", json.dumps({"job": "no_such_kind"}), timeout=30)  # imports the probe
        w.close_stdin()
        assert_gone(w)
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "finalized").exists()
