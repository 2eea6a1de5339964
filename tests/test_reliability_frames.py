"""Bad frames, hypothesis-driven: 10,000+ of them into ONE live worker, which keeps answering.

Every hypothesis example is a batch of bad frames (random bytes, truncated and padded terms,
over-deep nesting, frames over ``--max_frame_size``, compressed garbage, valid terms of the
wrong shape, unknown message tags, calls of unknown or private functions, wrong arity and
argument types) followed by a ``ping`` that must be answered. Afterwards ``info`` answers and
a real tiny training job still completes on the same process. ``test_worker_fuzz.py`` is the
seeded byte-mutation counterpart; this file lets hypothesis choose (and shrink) the frames.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_worker.testing import WorkerHarness, make_pid
from finetune_worker.wire import Atom, decode, encode
from test_train_helpers import tiny_config

# hypothesis would render a failing 100-frame batch in full; the assertion says enough
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

MAX_FRAME = 4096
PER_EXAMPLE = 100
EXAMPLES = 101  # 101 x 100 frames: at least 10,000 even if hypothesis replays none twice
SENT: Counter[str] = Counter()

# Every API function but shutdown (a valid shutdown() would end the worker, as it should).
FUNCTIONS = ["ping", "info", "validate", "submit", "status", "jobs", "cancel"]


@pytest.fixture(scope="module")
def worker():
    with WorkerHarness(["--max_frame_size", str(MAX_FRAME)]) as w:
        assert w.call("ping", timeout=60) == "pong"
        yield w


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# ---- strategies -----------------------------------------------------------------------------

atoms = st.sampled_from(["C", "M", "r", "e", "P", "X", "call", "finetune_worker", "os", "nil", "ok"]).map(
    Atom
)
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    atoms,
    st.booleans(),
    st.none(),
    st.just(make_pid()),
)
terms = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 99)), inner, max_size=3),
    ),
    max_leaves=12,
)


@st.composite
def wrong_calls(draw: Any) -> bytes:
    """Call-shaped terms that must be refused: unknown modules/functions, wrong arity and types."""
    module = draw(st.one_of(st.just(Atom("finetune_worker")), atoms, st.text(max_size=12)))
    function = draw(
        st.one_of(
            st.sampled_from(FUNCTIONS).map(Atom),
            st.sampled_from(["system", "eval", "_parse", "Runtime", "os.system", "__import__"]).map(Atom),
            st.text(max_size=12),
        )
    )
    args = draw(st.one_of(st.lists(terms, max_size=4), terms))
    # never a small integer: the harness numbers its own calls 1, 2, ... and a fuzzed reply
    # with such an id would answer the harness's ping
    call_id = draw(st.one_of(st.integers(2**41, 2**64), terms.map(lambda t: (Atom("fuzz"), t))))
    return encode((Atom("C"), call_id, module, function, args))


@st.composite
def bad_payloads(draw: Any) -> tuple[str, bytes]:
    kind = draw(
        st.sampled_from(
            [
                "random",
                "truncated",
                "padded",
                "deep",
                "oversize",
                "shape",
                "tag",
                "call",
                "compressed",
                "lying",
            ]
        )
    )
    if kind == "random":
        return kind, draw(st.binary(max_size=300))
    if kind in ("truncated", "padded"):
        good = encode(
            (Atom("C"), draw(st.integers(2**41, 2**50)), Atom("finetune_worker"), Atom("status"), ["x"])
        )
        if kind == "truncated":
            return kind, good[: draw(st.integers(0, len(good) - 1))]
        return kind, good + draw(st.binary(min_size=1, max_size=20))
    if kind == "deep":
        depth = draw(st.integers(257, 2000))
        opener = draw(st.sampled_from([b"l\x00\x00\x00\x01", b"h\x01"]))
        closer = b"j" if opener[:1] == b"l" else b""
        return kind, b"\x83" + opener * depth + b"j" + closer * depth
    if kind == "oversize":
        return kind, b"\x83m" + struct.pack(">I", MAX_FRAME) + bytes(
            draw(st.integers(MAX_FRAME, MAX_FRAME + 64))
        )
    if kind == "shape":
        return kind, encode(draw(terms))
    if kind == "tag":
        tag = draw(st.text(min_size=1, max_size=6).filter(lambda t: t not in ("C", "M")))
        return kind, encode((Atom(tag), draw(terms), draw(terms)))
    if kind == "call":
        return kind, draw(wrong_calls())
    if kind == "compressed":
        body = draw(st.one_of(st.binary(max_size=100), st.binary(max_size=100).map(zlib.compress)))
        return kind, b"\x83P" + struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + body
    # a length field inside the term that lies about what follows
    tag = draw(st.sampled_from([b"m", b"l", b"h", b"t", b"o", b"n", b"k", b"w", b"v"]))
    size = draw(st.sampled_from([1, 2, 4]))
    return kind, b"\x83" + tag + (b"\xff" * size) + draw(st.binary(max_size=8))


def _key(call_id: Any) -> Any:
    try:
        hash(call_id)
    except TypeError:
        return ("unhashable id", repr(call_id))
    return call_id


# ---- tests ----------------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(batch=st.lists(bad_payloads(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_bad_frames_never_stop_the_worker(worker: WorkerHarness, batch: list[tuple[str, bytes]]) -> None:
    worker.send_bytes(b"".join(frame(payload) for _, payload in batch))
    SENT.update(kind for kind, _ in batch)
    SENT["total"] += len(batch)
    assert worker.call("ping", timeout=60) == "pong", worker.stderr_text()[-3000:]
    # every call-shaped frame got its own answer (an error reply, or a result for a valid call)
    ids = [decode(payload)[1] for kind, payload in batch if kind == "call"]
    counts = Counter(_key(i) for i in ids)  # keyed as the harness keys replies (1 == 1.0 == True)
    for call_id in ids:
        if counts[_key(call_id)] == 1:
            reply = worker.wait_reply(call_id, timeout=30)
            assert reply.ok or reply.error.cls.endswith(("CallError", "ProtocolError")), reply


def test_afterwards_info_answers_and_a_training_job_completes(
    worker: WorkerHarness, tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert SENT["total"] >= 10_000, SENT
    assert all(SENT[k] > 100 for k in ("random", "deep", "oversize", "shape", "tag", "call", "lying")), SENT
    info = worker.call("info", timeout=60)
    assert worker.alive and info["pid"] == worker.proc.pid
    assert info["queue_length"] == 0
    assert worker.stray == [], worker.stray[:3]
    err = worker.stderr_text()
    assert "Traceback" not in err, err[-3000:]
    assert "exceeds max_frame_size" in err

    ok, job = worker.call(
        "submit", json.dumps(tiny_config(tiny_model_dir, tmp_path / "out", max_steps=3)), worker.pid
    )
    assert str(ok) == "ok"
    events = worker.wait_for(str(job), "terminal", timeout=300)
    assert events[-1].type == "completed", events[-1].payload
    assert (tmp_path / "out" / "summary.json").is_file()


def test_a_length_prefix_that_lies_at_the_end_of_input_is_a_clean_exit() -> None:
    with WorkerHarness() as w:
        assert w.call("ping", timeout=60) == "pong"
        w.send_bytes(struct.pack(">I", 1000) + b"\x83h\x01")  # promises 1000 bytes, sends 3
        w.close_stdin()
        assert w.wait(15) == 0
        assert "truncated frame" in w.stderr_text()


def test_a_frame_over_the_limit_is_skipped_and_the_next_one_answered() -> None:
    with WorkerHarness(["--max_frame_size", "64"]) as w:
        big = encode((Atom("C"), 1, Atom("finetune_worker"), Atom("ping"), [b"x" * 200]))
        call_id = w.next_id()
        ping = encode((Atom("C"), call_id, Atom("finetune_worker"), Atom("ping"), []))
        w.send_bytes(frame(big) + frame(ping))
        reply = w.wait_reply(call_id, timeout=30)
        assert reply.ok and reply.value == "pong"
        assert "exceeds max_frame_size" in w.stderr_text()
