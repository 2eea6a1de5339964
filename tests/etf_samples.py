"""Shared ETF test material: hand-written encodings per tag (from the ETF spec), a strict
comparison, and term generators for round trips and fuzzing."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

from hypothesis import strategies as st

from finetune_worker.wire import (
    Atom,
    BitBinary,
    ErlangPort,
    ImproperList,
    OpaqueTerm,
    Pid,
    Reference,
    decode,
    decode_opaque,
)


def same(a: Any, b: Any) -> bool:
    """Equal *and* of the same types all the way down (``Atom('a') == 'a'`` is not enough here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        keys_b = {k: k for k in b}
        return all(k in b and same(k, keys_b[k]) and same(v, b[k]) for k, v in a.items())
    if isinstance(a, ImproperList):
        return same(a.items, b.items) and same(a.tail, b.tail)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def atom_bytes(text: str) -> bytes:
    raw = text.encode()
    return bytes([119, len(raw)]) + raw


NODE = atom_bytes("nonode@nohost")
PID_RAW = b"X" + NODE + struct.pack(">III", 85, 0, 0)
OLD_PID_RAW = b"g" + b"d\x00\x0dnonode@nohost" + struct.pack(">IIB", 7, 1, 2)
REF_RAW = b"Z\x00\x03" + NODE + struct.pack(">IIII", 1, 111, 222, 333)
NEW_REF_RAW = b"r\x00\x02" + NODE + b"\x01" + struct.pack(">II", 5, 6)
OLD_REF_RAW = b"e" + NODE + struct.pack(">IB", 9, 1)
V4_PORT_RAW = b"x" + NODE + struct.pack(">QI", 2**40 + 3, 7)
NEW_PORT_RAW = b"Y" + NODE + struct.pack(">II", 4, 0)
OLD_PORT_RAW = b"f" + NODE + struct.pack(">IB", 4, 0)
EXPORT_RAW = b"q" + atom_bytes("lists") + atom_bytes("map") + b"a\x02"


def fun_raw(free: list[bytes]) -> bytes:
    body = (
        b"\x01"  # arity
        + bytes(range(16))  # uniq
        + struct.pack(">II", 3, len(free))  # index, num_free
        + atom_bytes("erl_eval")
        + b"a\x03"  # old index
        + b"b\x00\x01\x00\x00"  # old uniq
        + PID_RAW
        + b"".join(free)
    )
    return b"p" + struct.pack(">I", len(body) + 4) + body


FUN_RAW = fun_raw([b"a\x07", b"j"])

# (body after the version byte, expected decoded value): one or more per tag.
DECODE_FIXTURES: list[tuple[bytes, Any]] = [
    (b"a\x00", 0),
    (b"a\xff", 255),
    (b"b\xff\xff\xff\xff", -1),
    (b"b\x7f\xff\xff\xff", 2**31 - 1),
    (b"b\x80\x00\x00\x00", -(2**31)),
    (b"n\x08\x00" + b"\x00" * 8 + b"", 0),
    (b"n\x09\x00" + b"\x00" * 8 + b"\x01", 2**64),
    (b"n\x01\x01\x05", -5),
    (b"o\x00\x00\x01\x00\x01" + b"\x00" * 255 + b"\x01", -(2 ** (8 * 255))),
    (b"F" + struct.pack(">d", 1.5), 1.5),
    (b"F" + struct.pack(">d", -0.0), -0.0),
    (b"c" + b"1.50000000000000000000e+00".ljust(31, b"\x00"), 1.5),
    (b"d\x00\x02ok", Atom("ok")),
    (b"s\x03caf\xe9"[:0] + b"s\x04caf\xe9", Atom("café")),  # latin-1
    (b"v\x00\x05caf\xc3\xa9", Atom("café")),
    (b"w\x04\xf0\x9f\x98\x80", Atom("\U0001f600")),
    (b"w\x04true", True),
    (b"d\x00\x05false", False),
    (b"w\x03nil", None),
    (b"s\x09undefined", None),
    (b"m\x00\x00\x00\x00", ""),
    (b"m\x00\x00\x00\x03abc", "abc"),
    (b"m\x00\x00\x00\x02\xff\xfe", b"\xff\xfe"),
    (b"M\x00\x00\x00\x01\x03\x20", BitBinary(b"\x20", 3)),
    (b"k\x00\x03abc", [97, 98, 99]),
    (b"j", []),
    (b"l\x00\x00\x00\x02a\x01a\x02j", [1, 2]),
    (b"l\x00\x00\x00\x01a\x01w\x01t", ImproperList([1], Atom("t"))),
    (b"l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02j", [1, 2]),  # a list tail extends the list
    (b"h\x00", ()),
    (b"h\x02w\x02oka\x05", (Atom("ok"), 5)),
    (b"i\x00\x00\x01\x00" + b"a\x01" * 256, (1,) * 256),
    (b"t\x00\x00\x00\x00", {}),
    (b"t\x00\x00\x00\x02w\x01aa\x01m\x00\x00\x00\x01bj", {Atom("a"): 1, "b": []}),
    (b"t\x00\x00\x00\x01h\x02a\x01a\x02a\x03", {(1, 2): 3}),
]

OPAQUE_FIXTURES: list[tuple[bytes, type, dict[str, Any]]] = [
    (PID_RAW, Pid, {"node": "nonode@nohost", "id": 85, "serial": 0, "creation": 0}),
    (OLD_PID_RAW, Pid, {"node": "nonode@nohost", "id": 7, "serial": 1, "creation": 2}),
    (REF_RAW, Reference, {"node": "nonode@nohost", "creation": 1, "ids": (111, 222, 333)}),
    (NEW_REF_RAW, Reference, {"creation": 1, "ids": (5, 6)}),
    (OLD_REF_RAW, Reference, {"creation": 1, "ids": (9,)}),
    (V4_PORT_RAW, ErlangPort, {"id": 2**40 + 3, "creation": 7}),
    (NEW_PORT_RAW, ErlangPort, {"id": 4, "creation": 0}),
    (OLD_PORT_RAW, ErlangPort, {"id": 4, "creation": 0}),
    (EXPORT_RAW, OpaqueTerm, {"kind": "export", "module": "lists", "function": "map", "arity": 2}),
    (FUN_RAW, OpaqueTerm, {"kind": "fun", "module": "erl_eval", "arity": 1}),
]

# Python value -> exact encoding (after the version byte).
ENCODE_FIXTURES: list[tuple[Any, bytes]] = [
    (0, b"a\x00"),
    (255, b"a\xff"),
    (256, b"b\x00\x00\x01\x00"),
    (-1, b"b\xff\xff\xff\xff"),
    (2**31 - 1, b"b\x7f\xff\xff\xff"),
    (2**31, b"n\x04\x00\x00\x00\x00\x80"),
    (-(2**31) - 1, b"n\x04\x01\x01\x00\x00\x80"),
    (2 ** (8 * 255), b"o\x00\x00\x01\x00\x00" + b"\x00" * 255 + b"\x01"),
    (1.5, b"F" + struct.pack(">d", 1.5)),
    ("héllo", b"m\x00\x00\x00\x06h\xc3\xa9llo"),
    (b"\x00\xff", b"m\x00\x00\x00\x02\x00\xff"),
    (bytearray(b"ab"), b"m\x00\x00\x00\x02ab"),
    (memoryview(b"ab"), b"m\x00\x00\x00\x02ab"),
    (Atom("ok"), b"w\x02ok"),
    (Atom("é" * 200), b"v\x01\x90" + "é".encode() * 200),
    (True, b"w\x04true"),
    (False, b"w\x05false"),
    (None, b"w\x03nil"),
    ((), b"h\x00"),
    (tuple(range(256)), b"i\x00\x00\x01\x00" + b"".join(b"a" + bytes([i]) for i in range(256))),
    ([], b"j"),
    ([1, "a"], b"l\x00\x00\x00\x02a\x01m\x00\x00\x00\x01aj"),
    (ImproperList([1], Atom("t")), b"l\x00\x00\x00\x01a\x01w\x01t"),
    ({Atom("k"): 1}, b"t\x00\x00\x00\x01w\x01ka\x01"),
    (BitBinary(b"\xe0", 3), b"M\x00\x00\x00\x01\x03\xe0"),
]


ALL_FIXTURE_BODIES = [body for body, _ in DECODE_FIXTURES] + [raw for raw, _, _ in OPAQUE_FIXTURES]


def normal(value: Any) -> Any:
    """What ``decode(encode(value))`` gives back (binaries that are UTF-8 come back as ``str``...)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if type(value) is Atom:
        return {"true": True, "false": False, "nil": None, "undefined": None}.get(value, value)
    if isinstance(value, list):
        return [normal(v) for v in value]
    if isinstance(value, tuple):
        return tuple(normal(v) for v in value)
    if isinstance(value, dict):
        return {normal(k): normal(v) for k, v in value.items()}
    if isinstance(value, ImproperList):
        return ImproperList([normal(v) for v in value.items], normal(value.tail))
    return value


def opaque_strategy() -> st.SearchStrategy[Any]:
    nodes = st.sampled_from(["nonode@nohost", "a@b", "wörker@host"]).map(atom_bytes)
    u32 = st.integers(0, 2**32 - 1)
    pids = st.builds(
        lambda n, a, b, c: decode_opaque(Pid, b"X" + n + struct.pack(">III", a, b, c)), nodes, u32, u32, u32
    )
    refs = st.builds(
        lambda n, c, ids: decode_opaque(
            Reference,
            b"Z"
            + struct.pack(">H", len(ids))
            + n
            + struct.pack(">I", c)
            + b"".join(struct.pack(">I", i) for i in ids),
        ),
        nodes,
        u32,
        st.lists(u32, min_size=1, max_size=5),
    )
    ports = st.builds(
        lambda n, i, c: decode_opaque(ErlangPort, b"x" + n + struct.pack(">QI", i, c)),
        nodes,
        st.integers(0, 2**64 - 1),
        u32,
    )
    return st.one_of(pids, refs, ports)


atoms = st.text(max_size=20).map(Atom)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=-(2**3000), max_value=2**3000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.binary(max_size=30),
    atoms,
    st.builds(BitBinary, st.binary(min_size=1, max_size=4), st.integers(1, 8)),
    opaque_strategy(),
)
# Keys that cannot collide once decoded (no bytes next to str, no float next to int).
keys = st.one_of(
    st.integers(-1000, 1000), st.text(max_size=8), atoms, st.tuples(st.integers(), st.text(max_size=4))
)


def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=6),
        st.lists(children, max_size=6).map(tuple),
        st.dictionaries(keys, children, max_size=6),
        st.builds(ImproperList, st.lists(children, min_size=1, max_size=4), scalars),
    )


terms = st.recursive(scalars, extend, max_leaves=40)


def random_term(rng: random.Random, depth: int = 0) -> Any:
    """A cheap seeded term generator, so the mutation fuzz below can run tens of thousands of cases."""
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return rng.choice([None, True, False, Atom("ok"), Atom("é" * rng.randrange(4))])
    if kind == 1:
        return rng.randrange(-(2 ** rng.randrange(1, 300)), 2 ** rng.randrange(1, 300))
    if kind == 2:
        return rng.uniform(-1e300, 1e300)
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(6)))
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(6)))
    if kind == 5:
        return BitBinary(bytes([rng.randrange(256)]), rng.randint(1, 8))
    if kind == 6:
        return decode(b"\x83" + rng.choice([raw for raw, _, _ in OPAQUE_FIXTURES]))
    if kind == 7:
        return rng.randrange(256)
    children = [random_term(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 8:
        return children
    if kind == 9:
        return tuple(children)
    if kind == 10:
        return {i: c for i, c in enumerate(children)}
    return ImproperList([*children, 1], Atom("tail"))
