"""10,000 random and mutated frames into one live worker; afterwards it still answers ``info``.

A seeded generator (reproducible: the seed is in the failure message) mutates valid call
frames: truncations, bit flips, foreign tags, inserted and deleted bytes, random bytes,
well-formed terms of the wrong shape, hostile length fields inside terms, deep nesting, bad
compressed terms, and frames over the worker's ``--max_frame_size``.
"""

from __future__ import annotations

import random
import struct

from finetune_worker.testing import WorkerHarness, make_pid, make_ref
from finetune_worker.wire import Atom, encode

SEED = 20261123
FRAMES = 10_000
MAX_FRAME = 4096
TAGS = bytes(
    [70, 77, 80, 82, 88, 90, 97, 98, 99, 100, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 115, 116]
)
TAGS += bytes([118, 119, 120, 121])
CHEAP = ["ping", "info", "jobs", "status", "cancel", "validate"]


def base_frame(rng: random.Random, n: int) -> bytes:
    """A valid frame: a call of a harmless API function, a cast, or a term of some other shape."""
    args: list = {
        "status": [f"job-{n}"],
        "cancel": [f"job-{n}"],
        "validate": [rng.choice(['{"job": "x"}', "{bad json", {Atom("steps"): 3}])],
    }.get(fn := rng.choice(CHEAP), [])
    choice = rng.random()
    if choice < 0.6:
        term = (Atom("C"), n, Atom("finetune_worker"), Atom(fn), args)
    elif choice < 0.7:
        term = (Atom("M"), (Atom("cancel"), f"job-{n}"))
    else:
        term = random_term(rng, 3)
    return encode(term, compressed=6 if rng.random() < 0.1 else 0)


def random_term(rng: random.Random, depth: int) -> object:
    leaves = [
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.random() * 1e9,
        lambda: Atom(
            rng.choice(["C", "M", "r", "e", "P", "finetune_worker", "ok", "x" * rng.randint(1, 255)])
        ),
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 20))),
        lambda: "ü" * rng.randint(0, 10),
        make_pid,
        make_ref,
        lambda: None,
        lambda: True,
    ]
    if depth <= 0 or rng.random() < 0.4:
        return rng.choice(leaves)()
    kind = rng.randint(0, 2)
    items = [random_term(rng, depth - 1) for _ in range(rng.randint(0, 5))]
    if kind == 0:
        return tuple(items)
    if kind == 1:
        return items
    return {f"k{i}": v for i, v in enumerate(items)}


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    op = rng.randint(0, 11)
    if op == 0 and len(data) > 1:  # truncation
        return bytes(data[: rng.randint(0, len(data) - 1)])
    if op == 1:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if op == 2:  # a foreign tag somewhere
        data[rng.randrange(len(data))] = rng.choice(TAGS)
        return bytes(data)
    if op == 3:  # inserted bytes
        i = rng.randrange(len(data) + 1)
        return bytes(data[:i] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8))) + data[i:])
    if op == 4 and len(data) > 2:  # deleted slice
        i = rng.randrange(1, len(data))
        return bytes(data[:i] + data[i + rng.randint(1, 8) :])
    if op == 5:  # random bytes, with or without the version byte
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        return (b"\x83" + junk) if rng.random() < 0.7 else junk
    if op == 6:  # a huge length field inside the term
        field = rng.choice(
            [b"m\xff\xff\xff\xff", b"l\x7f\xff\xff\xff", b"i\xff\xff\xff\xff", b"t\xff\xff\xff\xff"]
        )
        return b"\x83" + field + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 16)))
    if op == 7:  # deep nesting
        return b"\x83" + b"l\x00\x00\x00\x01" * rng.randint(200, 700) + b"j" * rng.randint(0, 3)
    if op == 8:  # compressed with a lying size, or a zlib bomb claim
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        return b"\x83P" + struct.pack(">I", rng.choice([0, 1, 2**31, 2**32 - 1])) + body
    if op == 9:  # a call whose parts have the wrong types
        return encode(
            (Atom("C"), random_term(rng, 1), random_term(rng, 1), random_term(rng, 1), random_term(rng, 2))
        )
    if op == 10:  # a bignum or atom length that overruns the frame
        return b"\x83" + rng.choice([b"o\xff\xff\xff\xff\x00", b"v\xff\xff", b"w\xff", b"d\xff\xff"]) + b"abc"
    return bytes(data)


def test_fuzzed_frames_do_not_break_the_worker() -> None:
    rng = random.Random(SEED)
    with WorkerHarness(["--max_frame_size", str(MAX_FRAME)]) as w:
        assert w.call("ping", timeout=30) == "pong"
        batch: list[bytes] = []
        for n in range(FRAMES):
            if n % 97 == 0:  # over the frame limit: dropped whole, the stream stays in sync
                payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(MAX_FRAME + 1, 2 * MAX_FRAME)))
            else:
                frame = base_frame(rng, n)
                payload = frame if rng.random() < 0.1 else mutate(rng, frame)
            batch.append(len(payload).to_bytes(4, "big") + payload)
            if len(batch) == 250:
                w.send_bytes(b"".join(batch))
                batch.clear()
        w.send_bytes(b"".join(batch))
        # Fuzzed calls are answered too (every call gets a reply), with their own small integer
        # ids: this call's id must be one no fuzzed frame can carry.
        info = w.call("info", timeout=120, call_id=make_ref())
        assert w.alive, f"seed {SEED}: worker died\n{w.stderr_text()[-3000:]}"
        assert info["pid"] == w.proc.pid
        assert w.stray == [], f"seed {SEED}: the worker sent frames that do not decode: {w.stray[:3]}"
        err = w.stderr_text()
        assert "Traceback" not in err, err[-3000:]
        assert "exceeds max_frame_size" in err
        assert w.call("ping", call_id=make_ref()) == "pong"
