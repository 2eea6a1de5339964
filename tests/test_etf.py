"""ETF codec: byte fixtures per tag, round trips, limits on both sides, and garbage in -> ETFDecodeError only."""

from __future__ import annotations

import math
import random
import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_worker import etf
from finetune_worker.errors import ProtocolError
from finetune_worker.etf import (
    Atom,
    BitBinary,
    ErlangPort,
    ETFDecodeError,
    ImproperList,
    OpaqueTerm,
    Pid,
    Reference,
    decode,
    encode,
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
    (tuple(range(256)), b"i\x00\x00\x01\x00" + b"".join(etf.encode(i)[1:] for i in range(256))),
    ([], b"j"),
    ([1, "a"], b"l\x00\x00\x00\x02a\x01m\x00\x00\x00\x01aj"),
    (ImproperList([1], Atom("t")), b"l\x00\x00\x00\x01a\x01w\x01t"),
    ({Atom("k"): 1}, b"t\x00\x00\x00\x01w\x01ka\x01"),
    (BitBinary(b"\xe0", 3), b"M\x00\x00\x00\x01\x03\xe0"),
]


@pytest.mark.parametrize(("body", "expected"), DECODE_FIXTURES)
def test_decode_fixture(body: bytes, expected: Any) -> None:
    assert same(decode(b"\x83" + body), expected)


def test_decode_binaries_as_bytes() -> None:
    assert same(decode(b"\x83m\x00\x00\x00\x03abc", binaries="bytes"), b"abc")


@pytest.mark.parametrize(("raw", "cls", "fields"), OPAQUE_FIXTURES)
def test_opaque_terms_keep_their_bytes(raw: bytes, cls: type, fields: dict[str, Any]) -> None:
    term = decode(b"\x83" + raw)
    assert type(term) is cls
    assert term.raw == raw
    for name, value in fields.items():
        assert getattr(term, name) == value, name
    assert encode(term) == b"\x83" + raw
    assert cls.from_bytes(raw) == term  # type: ignore[attr-defined]
    assert hash(term) == hash(cls.from_bytes(raw))  # type: ignore[attr-defined]
    assert {term: 1}[decode(b"\x83" + raw)] == 1  # usable as a dict key
    assert decode(encode((term, [term]))) == (term, [term])


def test_opaque_equality_is_by_type_and_bytes() -> None:
    assert Pid.from_bytes(PID_RAW) != Pid.from_bytes(OLD_PID_RAW)
    with pytest.raises(ETFDecodeError, match="not Pid"):
        Pid.from_bytes(REF_RAW)


def test_local_ext_is_kept_whole() -> None:
    term = decode(b"\x83y\x01\x02\x03anything")
    assert isinstance(term, OpaqueTerm) and term.kind == "local"
    assert encode(term) == b"\x83y\x01\x02\x03anything"


def test_fun_with_wrong_size_is_rejected() -> None:
    bad = bytearray(FUN_RAW)
    bad[1:5] = struct.pack(">I", len(FUN_RAW) - 2)  # one byte short of its content
    with pytest.raises(ETFDecodeError, match=r"fun .*size"):
        decode(b"\x83" + bytes(bad) + b"\x00")


@pytest.mark.parametrize(("value", "body"), ENCODE_FIXTURES)
def test_encode_fixture(value: Any, body: bytes) -> None:
    assert encode(value) == b"\x83" + body


def test_subclasses_encode_by_base_type() -> None:
    import enum
    from collections import OrderedDict

    class Color(enum.IntEnum):
        RED = 1

    class Mode(str, enum.Enum):
        FAST = "fast"

    assert encode(Color.RED) == encode(1)
    assert encode(Mode.FAST) == encode("fast")
    assert encode(OrderedDict(a=1)) == encode({"a": 1})


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j, frozenset(), type, print])
def test_encode_refuses_unknown_types(value: Any) -> None:
    with pytest.raises(TypeError, match=type(value).__qualname__):
        encode(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1, {"x": math.nan}]])
def test_encode_refuses_non_finite_floats(value: Any) -> None:
    with pytest.raises(ValueError, match="NaN or infinity"):
        encode(value)


def test_atom_length_limit_both_sides() -> None:
    assert decode(encode(Atom("é" * 255))) == Atom("é" * 255)
    with pytest.raises(ValueError, match="255"):
        encode(Atom("a" * 256))


def test_improper_list_and_bit_binary_validate() -> None:
    with pytest.raises(ValueError):
        ImproperList([], 1)
    with pytest.raises(ValueError):
        ImproperList([1], [2])
    with pytest.raises(ValueError):
        BitBinary(b"\x00", 0)
    with pytest.raises(ValueError):
        BitBinary(b"", 3)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        encode(1, compressed=10)


# --- compression --------------------------------------------------------------------------


def test_compressed_round_trip_and_only_when_it_shrinks() -> None:
    value = {"text": "x" * 10_000, "items": list(range(500))}
    packed = encode(value, compressed=6)
    assert packed[:2] == b"\x83P"
    assert struct.unpack(">I", packed[2:6])[0] == len(encode(value)) - 1
    assert len(packed) < len(encode(value)) // 5
    assert same(decode(packed), value)
    assert encode(Atom("ok"), compressed=9) == encode(Atom("ok"))  # would grow: left plain


def compressed_term(body: bytes, declared: int | None = None) -> bytes:
    size = len(body) if declared is None else declared
    return b"\x83P" + struct.pack(">I", size) + zlib.compress(body)


def test_compressed_size_limit_both_sides() -> None:
    body = encode("y" * 5000)[1:]
    assert decode(compressed_term(body), max_size=len(body)) == "y" * 5000
    with pytest.raises(ETFDecodeError, match="max_size"):
        decode(compressed_term(body), max_size=len(body) - 1)


def test_zip_bomb_stops_at_declared_size() -> None:
    # 64 MiB of zeros in a 64 KiB stream that claims to inflate to 10 bytes.
    bomb = compressed_term(b"m" + struct.pack(">I", 64 << 20) + bytes(64 << 20), declared=10)
    assert len(bomb) < 100_000
    with pytest.raises(ETFDecodeError, match="past its declared size"):
        decode(bomb)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (compressed_term(b"a\x01", declared=3), "not its declared 3"),
        (compressed_term(b"a\x01")[:-2], "truncated"),
        (compressed_term(b"a\x01") + b"\x00", "trailing"),
        (b"\x83P\x00\x00\x00\x02garbage", "zlib"),
        (b"\x83P\x00\x00", "header"),
        (compressed_term(b"P\x00\x00\x00\x01" + zlib.compress(b"j")), "top level"),
    ],
)
def test_bad_compressed_terms(data: bytes, message: str) -> None:
    with pytest.raises(ETFDecodeError, match=message):
        decode(data)


# --- limits -------------------------------------------------------------------------------


def nested_lists(depth: int) -> bytes:
    return b"\x83" + b"l\x00\x00\x00\x01" * depth + b"j" * (depth + 1)


@pytest.mark.parametrize("limit", [1, 10, etf.DEFAULT_MAX_DEPTH])
def test_depth_limit_both_sides(limit: int) -> None:
    value = decode(nested_lists(limit - 1) if limit > 1 else b"\x83j", max_depth=limit)
    assert isinstance(value, list)
    assert decode(nested_lists(limit), max_depth=limit) is not None
    with pytest.raises(ETFDecodeError, match=f"max_depth={limit}"):
        decode(nested_lists(limit + 1), max_depth=limit)


@pytest.mark.parametrize("opener", [b"h\x01", b"i\x00\x00\x00\x01", b"t\x00\x00\x00\x01a\x00"])
def test_depth_counts_tuples_and_maps(opener: bytes) -> None:
    data = b"\x83" + opener * 5 + b"j"
    assert decode(data, max_depth=5) is not None
    with pytest.raises(ETFDecodeError, match="max_depth=4"):
        decode(data, max_depth=4)


def test_nesting_past_the_python_stack_is_a_decode_error() -> None:
    with pytest.raises(ETFDecodeError, match="nested"):
        decode(nested_lists(200_000), max_depth=10**9)


@pytest.mark.parametrize(
    "body",
    [
        b"m\xff\xff\xff\xffabc",  # binary
        b"l\xff\xff\xff\xffa\x01",  # list
        b"i\xff\xff\xff\xff",  # tuple
        b"t\xff\xff\xff\xff",  # map
        b"o\xff\xff\xff\xff\x00",  # bignum
        b"k\xff\xffab",  # string
        b"M\xff\xff\xff\xff\x01",  # bit binary
        b"Z\x00\x05" + NODE + b"\x00\x00\x00\x00",  # reference ids
        b"p\xff\xff\xff\xff\x01",  # fun
    ],
)
def test_lying_lengths_fail_without_allocating(body: bytes) -> None:
    with pytest.raises(ETFDecodeError, match=r"truncated|exceeds|does not fit"):
        decode(b"\x83" + body)


def test_list_length_exactly_fits() -> None:
    # 5 bytes follow the length: room for at most 4 elements and a tail.
    assert decode(b"\x83l\x00\x00\x00\x02a\x01a\x02j") == [1, 2]
    with pytest.raises(ETFDecodeError, match="truncated"):
        decode(b"\x83l\x00\x00\x00\x04a\x01a\x02j")
    with pytest.raises(ETFDecodeError, match="exceeds"):
        decode(b"\x83l\x00\x00\x00\x05a\x01a\x02j")


# --- errors name the byte at fault ----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"", 0, "empty"),
        (b"\x82a\x01", 0, "version byte"),
        (b"\x83h\x02a\x01\xff", 5, "unsupported term tag 255"),
        (b"\x83a\x01a\x02", 3, "2 trailing bytes"),
        (b"\x83w\x02\xff\xfe", 1, "UTF-8"),
        (b"\x83n\x01\x02\x05", 3, "sign"),
        (b"\x83X" + b"a\x01" + bytes(12), 2, "pid node must be an atom"),
        (b"\x83M\x00\x00\x00\x01\x09\x00", 1, "bit binary"),
        (b"\x83c" + b"one point five".ljust(31, b"\x00"), 2, "old float"),
    ],
)
def test_error_offsets(data: bytes, offset: int, message: str) -> None:
    with pytest.raises(ETFDecodeError, match=message) as info:
        decode(data)
    assert info.value.offset == offset
    assert f"at byte {offset}" in str(info.value)
    assert isinstance(info.value, ProtocolError)


def test_unhashable_map_keys_are_rejected() -> None:
    for key in (b"j", b"l\x00\x00\x00\x01a\x01j", b"t\x00\x00\x00\x00", b"h\x01j"):
        data = b"\x83t\x00\x00\x00\x01" + key + b"a\x01"
        with pytest.raises(ETFDecodeError, match="unsupported map key") as info:
            decode(data)
        assert info.value.offset == 6


@pytest.mark.parametrize(
    ("k1", "k2"),
    [
        (b"a\x01", b"F" + struct.pack(">d", 1.0)),  # 1 and 1.0 are different keys in Erlang
        (b"w\x01a", b"m\x00\x00\x00\x01a"),  # atom a and <<"a">>
        (b"w\x04true", b"a\x01"),  # true and 1
    ],
)
def test_map_keys_colliding_in_python_are_rejected(k1: bytes, k2: bytes) -> None:
    with pytest.raises(ETFDecodeError, match="collides"):
        decode(b"\x83t\x00\x00\x00\x02" + k1 + b"a\x00" + k2 + b"a\x00")


# --- round trips ----------------------------------------------------------------------------


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
        lambda n, a, b, c: Pid.from_bytes(b"X" + n + struct.pack(">III", a, b, c)), nodes, u32, u32, u32
    )
    refs = st.builds(
        lambda n, c, ids: Reference.from_bytes(
            b"Z"
            + struct.pack(">H", len(ids))
            + n
            + struct.pack(">I", c)
            + b"".join(struct.pack(">I", i) for i in ids)
        ),
        nodes,
        u32,
        st.lists(u32, min_size=1, max_size=5),
    )
    ports = st.builds(
        lambda n, i, c: ErlangPort.from_bytes(b"x" + n + struct.pack(">QI", i, c)),
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


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms, st.sampled_from([0, 0, 1, 9]))
def test_round_trip(value: Any, level: int) -> None:
    data = encode(value, compressed=level)
    decoded = decode(data)
    expected = normal(value)
    if isinstance(expected, dict) and len(expected) != len(value):
        return  # keys like "a" and Atom("a") are one key in Python already
    assert same(decoded, expected), (value, decoded)
    assert encode(decoded) == encode(expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms)
def test_every_truncation_is_a_decode_error(value: Any) -> None:
    data = encode(value)
    for cut in range(len(data)):
        with pytest.raises(ETFDecodeError):
            decode(data[:cut])


ALL_FIXTURE_BODIES = [body for body, _ in DECODE_FIXTURES] + [raw for raw, _, _ in OPAQUE_FIXTURES]


@pytest.mark.parametrize("body", ALL_FIXTURE_BODIES)
def test_fixture_truncations(body: bytes) -> None:
    data = b"\x83" + body
    for cut in range(len(data)):
        with pytest.raises(ETFDecodeError):
            decode(data[:cut])


# --- fuzz: whatever the bytes, only ETFDecodeError ------------------------------------------


def decode_or_protocol_error(data: bytes) -> None:
    try:
        decode(data, max_depth=64, max_size=1 << 20)
    except ETFDecodeError as exc:
        assert 0 <= exc.offset <= len(data) + 64 * 1024 * 1024, exc


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(tail: bytes) -> None:
    decode_or_protocol_error(b"\x83" + tail)
    decode_or_protocol_error(tail)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms, st.data())
def test_fuzz_mutated_encodings(value: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(value, compressed=data.draw(st.sampled_from([0, 0, 6]))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "insert":
            raw[at:at] = bytes([data.draw(st.integers(0, 255))])
        elif at < len(raw) and op == "delete":
            del raw[at]
        elif at < len(raw) and op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif at < len(raw):
            raw[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 106, 108, 116, 80, 131]))
    decode_or_protocol_error(bytes(raw))


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


def test_fuzz_mutated_encodings_seeded() -> None:
    rng = random.Random(1234)
    seeds = [b"\x83" + body for body in ALL_FIXTURE_BODIES]
    seeds += [encode(random_term(rng), compressed=rng.choice([0, 0, 0, 6])) for _ in range(300)]
    for _ in range(30_000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            op = rng.randrange(4)
            if op == 0:
                raw[at] = rng.randrange(256)
            elif op == 1:
                raw[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 106, 108, 116, 80, 131])
            elif op == 2 and len(raw) > 1:
                del raw[at]
            else:
                raw[at:at] = bytes([rng.randrange(256)])
        decode_or_protocol_error(bytes(raw))
