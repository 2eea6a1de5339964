"""ETF codec: byte fixtures per tag, exact encodings, compression, limits on both sides, error offsets."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import pytest

from etf_samples import (
    DECODE_FIXTURES,
    ENCODE_FIXTURES,
    FUN_RAW,
    NODE,
    OLD_PID_RAW,
    OPAQUE_FIXTURES,
    PID_RAW,
    REF_RAW,
    same,
)
from finetune_worker import wire as etf
from finetune_worker.errors import ProtocolError
from finetune_worker.wire import (
    Atom,
    BitBinary,
    ETFDecodeError,
    ImproperList,
    OpaqueTerm,
    Pid,
    decode,
    decode_opaque,
    encode,
)


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
    assert decode_opaque(cls, raw) == term
    assert hash(term) == hash(decode_opaque(cls, raw))
    assert {term: 1}[decode(b"\x83" + raw)] == 1  # usable as a dict key
    assert decode(encode((term, [term]))) == (term, [term])


def test_opaque_equality_is_by_type_and_bytes() -> None:
    assert decode_opaque(Pid, PID_RAW) != decode_opaque(Pid, OLD_PID_RAW)
    with pytest.raises(ETFDecodeError, match="not Pid"):
        decode_opaque(Pid, REF_RAW)


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


def test_numpy_scalars_encode_as_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert encode(np.int64(2**40)) == encode(2**40)
    assert encode(np.float32(0.5)) == encode(0.5)
    assert encode({"loss": np.float64(1.25)}) == encode({"loss": 1.25})
    with pytest.raises(ValueError, match="NaN"):
        encode(np.float64("nan"))


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
