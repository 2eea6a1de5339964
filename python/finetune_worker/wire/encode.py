"""Python terms to External Term Format bytes (:func:`encode`). No IO."""

from __future__ import annotations

import math
import numbers
import struct
import zlib
from typing import Any

from finetune_worker.wire.terms import MAX_ATOM_CHARS, Atom, BitBinary, ImproperList, Opaque

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

_pack_tag_u16 = struct.Struct(">BH").pack
_pack_tag_u32 = struct.Struct(">BI").pack
_pack_tag_i32 = struct.Struct(">Bi").pack
_pack_tag_u8 = struct.Struct(">BB").pack
_pack_tag_u8_u8 = struct.Struct(">BBB").pack
_pack_tag_u32_u8 = struct.Struct(">BIB").pack
_pack_tag_double = struct.Struct(">Bd").pack


def _encode_int(value: int, out: list[bytes]) -> None:
    if 0 <= value <= 255:
        out.append(_pack_tag_u8(97, value))
    elif _INT32_MIN <= value <= _INT32_MAX:
        out.append(_pack_tag_i32(98, value))
    else:
        magnitude = -value if value < 0 else value
        n = (magnitude.bit_length() + 7) // 8
        digits = magnitude.to_bytes(n, "little")
        sign = 1 if value < 0 else 0
        out.append(_pack_tag_u8_u8(110, n, sign) if n < 256 else _pack_tag_u32_u8(111, n, sign))
        out.append(digits)


# Events repeat the same few atoms; caching their encodings is the cheapest speedup there is.
_ATOM_CACHE: dict[str, bytes] = {}
_ATOM_CACHE_SIZE = 4096


def _encode_atom(text: str, out: list[bytes]) -> None:
    cached = _ATOM_CACHE.get(text)
    if cached is not None:
        out.append(cached)
        return
    if len(text) > MAX_ATOM_CHARS:
        raise ValueError(f"atom longer than {MAX_ATOM_CHARS} characters: {text[:40]!r}...")
    raw = text.encode("utf-8")
    head = _pack_tag_u8(119, len(raw)) if len(raw) < 256 else _pack_tag_u16(118, len(raw))
    if len(_ATOM_CACHE) < _ATOM_CACHE_SIZE:
        _ATOM_CACHE[str(text)] = head + raw
    out.append(head + raw)


def _encode_binary(raw: bytes, out: list[bytes]) -> None:
    out.append(_pack_tag_u32(109, len(raw)))
    out.append(raw)


_TRUE = b"\x77\x04true"
_FALSE = b"\x77\x05false"
_NIL = b"\x77\x03nil"


def _encode(term: Any, out: list[bytes]) -> None:
    t = type(term)
    if t is str:
        _encode_binary(term.encode("utf-8"), out)
    elif t is Atom:
        _encode_atom(term, out)
    elif t is int:
        _encode_int(term, out)
    elif t is dict:
        out.append(_pack_tag_u32(116, len(term)))
        for key, value in term.items():
            _encode(key, out)
            _encode(value, out)
    elif t is tuple:
        n = len(term)
        out.append(_pack_tag_u8(104, n) if n < 256 else _pack_tag_u32(105, n))
        for item in term:
            _encode(item, out)
    elif t is list:
        if term:
            out.append(_pack_tag_u32(108, len(term)))
            for item in term:
                _encode(item, out)
        out.append(b"\x6a")
    elif term is True:
        out.append(_TRUE)
    elif term is False:
        out.append(_FALSE)
    elif term is None:
        out.append(_NIL)
    elif t is float:
        if not math.isfinite(term):
            raise ValueError(f"cannot encode {term!r}: Erlang floats have no NaN or infinity")
        out.append(_pack_tag_double(70, term))
    elif t is bytes:
        _encode_binary(term, out)
    elif isinstance(term, Opaque):
        out.append(term.raw)
    elif t is ImproperList:
        out.append(_pack_tag_u32(108, len(term.items)))
        for item in term.items:
            _encode(item, out)
        _encode(term.tail, out)
    elif t is BitBinary:
        out.append(_pack_tag_u32_u8(77, len(term.data), term.bits))
        out.append(bytes(term.data))
    elif isinstance(term, (bytearray, memoryview)):
        _encode_binary(bytes(term), out)
    # Subclasses (IntEnum, str enums, OrderedDict...) take the slow path, by their base type.
    elif isinstance(term, Atom):
        _encode_atom(term, out)
    elif isinstance(term, str):
        _encode_binary(term.encode("utf-8"), out)
    elif isinstance(term, int):
        _encode_int(int(term), out)
    elif isinstance(term, float):
        _encode(float(term), out)
    elif isinstance(term, bytes):
        _encode_binary(bytes(term), out)
    elif isinstance(term, dict):
        _encode(dict(term), out)
    elif isinstance(term, tuple):
        _encode(tuple(term), out)
    elif isinstance(term, list):
        _encode(list(term), out)
    # numpy scalars (a loss read off a metric array) register as numbers but subclass nothing.
    elif isinstance(term, numbers.Integral):
        _encode_int(int(term), out)
    elif isinstance(term, numbers.Real):
        _encode(float(term), out)
    else:
        raise TypeError(f"cannot encode a value of type {t.__module__}.{t.__qualname__} as an Erlang term")


def encode(term: Any, *, compressed: int = 0) -> bytes:
    """Encode ``term`` with version byte 131; ``compressed`` 1-9 is the zlib level, used only if it shrinks."""
    if not 0 <= compressed <= 9:
        raise ValueError(f"compressed must be 0..9, got {compressed}")
    out: list[bytes] = []
    try:
        _encode(term, out)
    except RecursionError:
        raise ValueError("term nested too deeply to encode") from None
    body = b"".join(out)
    if compressed:
        packed = zlib.compress(body, compressed)
        if len(packed) + 5 < len(body):
            return b"\x83\x50" + struct.pack(">I", len(body)) + packed
    return b"\x83" + body
