"""Every call gets an answer, whatever its arguments hold; ErlPort's wrapped pids work; peer terms
never crash a log line.

ErlPort's call timeout defaults to ``infinity``: a call the worker drops hangs its caller forever.
So a call frame whose ``Id`` decodes but whose other terms cannot be held in Python (map keys that
collide, a malformed term deep in the arguments) must get an ``'e'`` reply, and an ``Id`` Python
cannot re-encode (NaN) must still come back, byte for byte.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_worker.testing import WorkerHarness, make_pid, make_ref
from finetune_worker.wire import Atom, encode

PROTOCOL_ERROR = "finetune_worker.errors.ProtocolError"


def enc(term: Any) -> bytes:
    """One term's bytes without the version byte, to splice into hand-made frames."""
    return encode(term)[1:]


def call_frame(call_id: bytes, function: str, args: list[bytes]) -> bytes:
    """``{'C', Id, finetune_worker, Function, Args}`` from pre-encoded ``Id`` and argument bytes."""
    arglist = b"l" + struct.pack(">I", len(args)) + b"".join(args) + b"j" if args else b"j"
    return (
        b"\x83h\x05" + enc(Atom("C")) + call_id + enc(Atom("finetune_worker")) + enc(Atom(function)) + arglist
    )


def raw_map(*pairs: tuple[Any, Any]) -> bytes:
    return b"t" + struct.pack(">I", len(pairs)) + b"".join(enc(k) + enc(v) for k, v in pairs)


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerHarness]:
    with WorkerHarness(test_jobs=True) as w:
        assert w.call("ping", timeout=30) == "pong"
        yield w
        assert w.alive, w.stderr_text()[-3000:]
        assert w.stray == []


@pytest.mark.parametrize(
    "bad_map",
    [
        raw_map((Atom("a"), 1), ("a", 2)),  # #{a => 1, <<"a">> => 2}
        raw_map((1, Atom("x")), (1.0, Atom("y"))),  # #{1 => x, 1.0 => y}
        raw_map((1, Atom("x")), (True, Atom("y"))),  # 1 == True in Python
    ],
    ids=["atom-and-binary", "int-and-float", "int-and-true"],
)
def test_a_call_whose_arguments_do_not_decode_gets_an_error_reply(
    worker: WorkerHarness, bad_map: bytes
) -> None:
    call_id = worker.next_id()
    reply = worker.call_raw(call_frame(enc(call_id), "validate", [bad_map]), expect_id=call_id, timeout=10)
    assert reply is not None and not reply.ok and reply.error is not None
    assert reply.error.cls == PROTOCOL_ERROR
    assert "collides with another key" in reply.error.message and "at byte" in reply.error.message
    assert worker.call("ping") == "pong"


def test_a_bad_term_deep_in_the_arguments_is_answered(worker: WorkerHarness) -> None:
    call_id = worker.next_id()
    truncated = b"m\x00\x00\x00\x10abc"  # a binary that claims 16 bytes and has 3
    reply = worker.call_raw(call_frame(enc(call_id), "validate", [truncated]), expect_id=call_id)
    assert reply is not None and reply.error is not None and reply.error.cls == PROTOCOL_ERROR


def test_a_nan_id_comes_back_as_it_was_sent(worker: WorkerHarness) -> None:
    nan_id = b"F" + struct.pack(">d", math.nan)
    reply = worker.call_raw(call_frame(nan_id, "ping", []), expect_id=math.nan)
    assert reply is not None and reply.ok and reply.value == "pong"
    assert math.isnan(reply.call_id)
    bad = worker.call_raw(call_frame(nan_id, "validate", [raw_map((1, 2), (1.0, 3))]), expect_id=math.nan)
    assert bad is not None and bad.error is not None and bad.error.cls == PROTOCOL_ERROR


def test_a_frame_without_an_id_is_logged_not_answered(worker: WorkerHarness) -> None:
    before = len(worker.stderr_text())
    worker.send_frame(b"\x83h\x05" + enc(Atom("C")) + b"m\x00\x00\x00\x10ab")  # the Id itself is cut
    worker.send_frame(b"\x83h\x02" + enc(Atom("M")) + raw_map((1, 2), (1.0, 3)))  # a cast: no Id
    assert worker.call("ping") == "pong"
    log = worker.stderr_text()[before:]
    assert log.count("not a valid term") == 2, log


def erlport_opaque(term: Any) -> tuple[Any, ...]:
    """What ErlPort's erlport_utils:prepare_term/1 makes of a pid, reference, port or fun."""
    return (Atom("$erlport.opaque"), Atom("erlang"), enc(term))


def test_erlport_wrapped_pid_subscribes_and_events_go_to_the_bare_pid(worker: WorkerHarness) -> None:
    pid = make_pid()
    config = '{"job": "test_steps", "steps": 2, "step_seconds": 0}'
    ok, job_id = worker.call("submit", config, erlport_opaque(pid))
    assert ok == "ok"
    events = worker.wait_for(job_id, "terminal", timeout=30)
    assert events[-1].type == "completed"
    assert {e.to for e in events} == {pid}  # the real pid, byte for byte, not the wrapper

    # Wrapped anywhere: inside a cast, and a reference inside a map argument stays a term.
    _, long_job = worker.call("submit", '{"job": "test_steps", "steps": 500, "step_seconds": 0.02}', pid)
    worker.wait_for(long_job, "progress", timeout=30)
    worker.cast((Atom("cancel"), long_job))
    assert worker.wait_for(long_job, "terminal", timeout=30)[-1].type == "cancelled"
    _, issues = worker.call("validate", {"job": "test_steps", "steps": erlport_opaque(make_ref())})
    assert [i["path"] for i in issues] == ["steps"]


def test_a_broken_wrapper_is_named_not_crashed_on(worker: WorkerHarness) -> None:
    bad = (Atom("$erlport.opaque"), Atom("erlang"), b"\xff\x00")
    with pytest.raises(Exception, match="ReplyTo must be a pid"):
        worker.call("submit", '{"job": "test_steps", "steps": 1}', bad)


def test_huge_integers_in_any_place_never_kill_the_worker(worker: WorkerHarness) -> None:
    """Python refuses str() of an int over 4,300 digits; peer terms are only rendered bounded."""
    big = 1 << 20000
    worker.send_term((Atom("M"), big))  # an unknown cast
    worker.send_term((Atom("M"), (Atom("cancel"), big)))  # a cancel with a bad job id
    worker.send_term((Atom("Z"), big))  # an unknown tag
    refused = worker.call_raw((Atom("C"), big, Atom("os"), Atom("system"), []), expect_id=big)
    assert refused is not None and refused.error is not None and "is not callable" in refused.error.message
    reply = worker.call_raw(
        (Atom("C"), big + 1, Atom("finetune_worker"), Atom("ping"), []), expect_id=big + 1
    )
    assert reply is not None and reply.ok
    with pytest.raises(Exception, match="JobId must be a binary"):
        worker.call("status", big)
    with pytest.raises(Exception, match="bits"):
        worker.call("submit", '{"job": "test_steps", "steps": 1}', big)
    assert worker.call("ping") == "pong"
    assert "<int of 20001 bits>" in worker.stderr_text()
