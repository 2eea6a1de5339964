"""The harness itself: fabricated pids/refs are what OTP emits, and its routing is exact."""

from __future__ import annotations

import pytest

from finetune_worker.testing import HarnessEvent, RemoteError, WorkerHarness, make_pid, make_ref
from finetune_worker.wire import Atom, Pid, Reference, decode, encode


def test_make_pid_is_a_new_pid_ext_term() -> None:
    pid = make_pid()
    raw = encode(pid)
    assert raw[:2] == b"\x83\x58"  # NEW_PID_EXT
    assert raw[2] == 119  # node as SMALL_ATOM_UTF8_EXT, as OTP 26 writes it
    assert isinstance(pid, Pid) and decode(raw) == pid
    assert pid.node == "harness@127.0.0.1"
    assert make_pid() != pid and make_pid(number=7) == make_pid(number=7)


def test_make_ref_is_a_newer_reference_ext_term() -> None:
    ref = make_ref()
    raw = encode(ref)
    assert raw[:4] == b"\x83\x5a\x00\x03"  # NEWER_REFERENCE_EXT with three ids
    assert isinstance(ref, Reference) and decode(raw) == ref
    assert make_ref() != ref


def test_pids_and_refs_survive_a_round_trip_through_the_worker() -> None:
    with WorkerHarness() as w:
        for term in (make_pid(), make_ref(), (make_pid(), [make_ref()])):
            call_id = (Atom("id"), term)
            reply = w.call_raw(
                (Atom("C"), call_id, Atom("finetune_worker"), Atom("ping"), []), expect_id=call_id
            )
            assert reply is not None and reply.ok and reply.term[1] == call_id


def test_events_are_routed_per_job_and_per_pid() -> None:
    with WorkerHarness(test_jobs=True) as w:
        a, b = make_pid(), make_pid()
        job_a = w.call("submit", '{"job": "test_steps", "steps": 2, "step_seconds": 0}', a)[1]
        job_b = w.call("submit", '{"job": "test_steps", "steps": 1, "step_seconds": 0}', b)[1]
        events_b = w.wait_for(job_b, "completed", timeout=30)
        events_a = w.events(job_a)
        assert all(isinstance(e, HarnessEvent) and e.job_id == job_a and e.to == a for e in events_a)
        assert all(e.job_id == job_b and e.to == b for e in events_b)
        assert events_b[-1].terminal and events_b[-1].term[0] == Atom("fine_tuning")
        assert isinstance(events_b[-1].term[2], Atom)
        # next_event consumes; events() does not
        assert w.events(job_b) == events_b
        with pytest.raises(TimeoutError):
            w.next_event(job_b, timeout=0.2)


def test_remote_error_and_timeouts() -> None:
    with WorkerHarness() as w:
        with pytest.raises(RemoteError) as err:
            w.call("nope")
        assert err.value.cls == "finetune_worker.errors.CallError" and "nope" in err.value.message
        with pytest.raises(TimeoutError):
            w.wait_reply("never-sent", timeout=0.2)
        with pytest.raises(TimeoutError):
            w.wait_for("no-such-job", "completed", timeout=0.2)
        w.kill()
        assert w.wait(10) != 0
        with pytest.raises(ConnectionError):
            w.wait_reply("never-sent", timeout=5)


def test_context_manager_always_kills() -> None:
    with WorkerHarness() as w:
        proc = w.proc
        assert w.call("ping", timeout=30) == "pong"
    assert proc.poll() is not None
