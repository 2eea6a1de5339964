"""Load: 200 queued jobs, 10,000 status calls during training, events to a BEAM that reads slowly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.testing import WorkerHarness, make_pid
from finetune_worker.wire import Atom, decode, encode
from test_train_helpers import tiny_config


def submit(w: WorkerHarness, cfg: dict[str, Any]) -> str:
    ok, job_id = w.call("submit", json.dumps(cfg), w.pid, timeout=60)
    assert str(ok) == "ok", job_id
    return str(job_id)


def pipelined_calls(w: WorkerHarness, calls: list[tuple[str, list[Any]]], window: int = 500) -> list[Any]:
    """Send calls ``window`` at a time without waiting in between; return the replies in order."""
    results: list[Any] = []
    for start in range(0, len(calls), window):
        ids = []
        frames = []
        for function, args in calls[start : start + window]:
            call_id = w.next_id()
            ids.append(call_id)
            payload = encode((Atom("C"), call_id, Atom("finetune_worker"), Atom(function), args))
            frames.append(len(payload).to_bytes(4, "big") + payload)
        w.send_bytes(b"".join(frames))
        for call_id in ids:
            reply = w.wait_reply(call_id, timeout=60)
            assert reply.ok, reply.error
            results.append(reply.value)
    return results


def test_200_queued_jobs_run_in_order_with_correct_positions() -> None:
    n = 200
    with WorkerHarness(test_jobs=True) as w:
        # a running job ahead of them all, so every position is known exactly
        blocker = submit(w, {"job": "test_steps", "steps": 100_000, "step_seconds": 0.01})
        w.wait_for(blocker, "progress", timeout=60)
        config = json.dumps({"job": "test_steps", "steps": 1, "step_seconds": 0.001})
        replies = pipelined_calls(w, [("submit", [config, w.pid])] * n, window=n)
        jobs = [str(r[1]) for r in replies]
        assert all(str(r[0]) == "ok" for r in replies) and len(set(jobs)) == n
        assert [str(s["job_id"]) for s in w.call("jobs")][1:] == jobs

        firsts = [w.wait_for(job, "queued", timeout=30)[-1] for job in jobs]
        # job k has the blocker and k earlier jobs ahead of it
        assert [e.payload["position"] for e in firsts] == list(range(2, n + 2))
        assert w.call("info")["queue_length"] == n

        assert w.call("cancel", blocker) == "ok"
        for k, job in enumerate(jobs):
            w.wait_for(job, "terminal", timeout=120)
            events = w.events(job)
            assert events[-1].type == "completed", (job, events[-1].payload)
            positions = [e.payload["position"] for e in events if e.type == "queued"]
            # re-sent, one smaller, each time a job ahead starts; 2 = the running one is the last ahead
            assert positions == list(range(k + 2, 1, -1)), (job, positions)
            assert [e.type for e in events][-3:] == ["progress", "metrics", "completed"]

        started = [e.job_id for e in w.event_log if e.type == "started"]
        assert started == [blocker, *jobs]
        completed = [e.job_id for e in w.event_log if e.type in ("completed", "cancelled")]
        assert completed == [blocker, *jobs]
        assert all(str(s["state"]) == "completed" for s in w.call("jobs")[1:])
        assert w.call("info")["queue_length"] == 0


@pytest.mark.slow
def test_10000_status_calls_during_training_are_all_answered(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", max_steps=2000, checkpoint={"every_steps": 10_000})
    with WorkerHarness() as w:
        job = submit(w, cfg)
        w.wait_for(job, "progress", timeout=300)
        statuses = pipelined_calls(w, [("status", [job])] * 10_000)
        # The worker answers 10,000 calls in well under a second here: keep calling until the
        # training has visibly moved on meanwhile (the point is that both go on at once).
        for _ in range(20):
            if statuses[-1]["step"] > statuses[0]["step"]:
                break
            statuses += pipelined_calls(w, [("status", [job])] * 1_000)
        assert len(statuses) >= 10_000
        assert all(str(s["job_id"]) == job for s in statuses)
        assert all(str(s["state"]) == "running" for s in statuses), "training ended before the calls did"
        steps = [s["step"] for s in statuses]
        assert steps == sorted(steps) and steps[-1] > steps[0], (steps[0], steps[-1])
        assert w.call("cancel", job) == "ok"
        assert w.wait_for(job, "terminal", timeout=120)[-1].type == "cancelled"
        assert w.call("ping") == "pong"


# ---- a BEAM that reads slowly -------------------------------------------------------------------


class SlowReader:
    """A raw port peer: writes frames, and reads the worker's output only when asked to."""

    def __init__(self) -> None:
        env = dict(os.environ, FINETUNE_WORKER_TEST_JOBS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_worker", "port"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.out = self.proc.stdout

    def send(self, term: Any) -> None:
        payload = encode(term)
        assert self.proc.stdin is not None
        self.proc.stdin.write(len(payload).to_bytes(4, "big") + payload)
        self.proc.stdin.flush()

    def read(self) -> Any:
        header = self.out.read(4)
        assert len(header) == 4, "worker closed its output"
        return decode(self.out.read(int.from_bytes(header, "big")))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_events_reach_a_slow_reader_in_order_and_complete() -> None:
    steps = 3000  # ~6,000 events, far more than a pipe buffer holds
    peer = SlowReader()
    try:
        pid = make_pid()
        config = json.dumps({"job": "test_steps", "steps": steps, "step_seconds": 0})
        peer.send((Atom("C"), 1, Atom("finetune_worker"), Atom("submit"), [config, pid]))
        time.sleep(3)  # not reading: the pipe fills and the worker's writes must wait, not drop
        events: list[tuple[str, dict[str, Any]]] = []
        job_id = None
        n = 0
        while True:
            term = peer.read()
            n += 1
            if n % 200 == 0:
                time.sleep(0.05)  # and keep reading slowly
            if term[0] == "r":
                assert term[1] == 1 and str(term[2][0]) == "ok", term
                job_id = term[2][1]
                continue
            assert term[0] == "M" and term[1] == pid, term
            _, jid, etype, payload = term[2]
            events.append((str(etype), payload))
            if str(etype) in ("completed", "failed", "cancelled"):
                break
        assert job_id is not None and jid == job_id
        types = [t for t, _ in events]
        assert types[:2] == ["queued", "started"] and types[-1] == "completed"
        for kind in ("progress", "metrics"):
            got = [p["step"] for t, p in events if t == kind]
            assert got == list(range(1, steps + 1)), (
                f"{kind}: {len(got)} of {steps}, first gap near {_gap(got)}"
            )
        peer.send((Atom("C"), 2, Atom("finetune_worker"), Atom("ping"), []))
        assert peer.read() == ("r", 2, "pong")
    finally:
        peer.close()


def _gap(steps: list[int]) -> int | None:
    for i, s in enumerate(steps, 1):
        if s != i:
            return i
    return None
