"""Erlang External Term Format (ETF) codec: bytes in, Python terms out, and back. No IO.

Type map (see docs/protocol.md, "Wire format"):

=======================  ==============================================================
Erlang                   Python
=======================  ==============================================================
binary                   ``str`` when it is valid UTF-8, else ``bytes`` (``binaries="bytes"``
                         always gives ``bytes``); ``str``/``bytes``/``bytearray``/``memoryview``
                         all encode to a binary
bit binary               :class:`BitBinary`
atom                     :class:`Atom`; ``true``/``false`` <-> ``bool``; ``nil`` and
                         ``undefined`` decode to ``None``, ``None`` encodes to ``nil``
integer                  ``int`` (any size)
float                    ``float`` (NaN and infinities cannot be encoded: Erlang has none)
list / string (107)      ``list`` (a charlist stays a list of ints, as in Erlang);
                         improper lists are :class:`ImproperList`
tuple                    ``tuple``
map                      ``dict`` (see the map key rule below)
pid, reference, port     :class:`Pid`, :class:`Reference`, :class:`ErlangPort`: opaque, hashable,
                         re-encode to the exact bytes they were decoded from
fun, export, local       :class:`OpaqueTerm`, same guarantees
=======================  ==============================================================

Map keys: a key that decodes to an unhashable value (a list, a map, or a tuple holding one) is
rejected with :class:`ETFDecodeError` ("unsupported map key"), and so are two keys that are
distinct in Erlang but equal in Python (``1`` and ``1.0``, the atom ``abc`` and the binary
``<<"abc">>``): silently merging them would lose data.

:func:`decode` raises :class:`ETFDecodeError` and nothing else on malformed input, whatever
the bytes; :func:`encode` raises ``TypeError`` for values it has no mapping for and
``ValueError`` for values Erlang cannot represent.
"""

from __future__ import annotations

import math
import numbers
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_worker.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_TERMS",
    "Atom",
    "BitBinary",
    "ETFDecodeError",
    "ErlangPort",
    "ImproperList",
    "OpaqueTerm",
    "Pid",
    "RawTerm",
    "Reference",
    "decode",
    "encode",
    "recover_call_id",
]

#: Deepest nesting :func:`decode` accepts (a tuple in a list in a map... counts one per level).
#: Real messages nest a handful of levels; the bound keeps hostile input off the C stack.
DEFAULT_MAX_DEPTH = 256
#: Largest uncompressed size, in bytes, a compressed term (tag 80) may inflate to. Uncompressed
#: input is already in memory, so its size is bounded by the frame limit of the port instead.
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
#: Most terms (elements of any kind, nested ones included) :func:`decode` builds from one input.
#: Each is a Python object of tens of bytes: an 8 KiB compressed frame of ``[]``s would
#: otherwise build hundreds of MiB of empty lists. A job config is a few hundred terms.
DEFAULT_MAX_TERMS = 1_000_000

VERSION = 131
MAX_ATOM_CHARS = 255  # OTP refuses longer atoms

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

_pack_tag_u16 = struct.Struct(">BH").pack
_pack_tag_u32 = struct.Struct(">BI").pack
_pack_tag_i32 = struct.Struct(">Bi").pack
_pack_tag_u8 = struct.Struct(">BB").pack
_pack_tag_u8_u8 = struct.Struct(">BBB").pack
_pack_tag_u32_u8 = struct.Struct(">BIB").pack
_pack_tag_double = struct.Struct(">Bd").pack


class Atom(str):
    """An Erlang atom. A ``str`` subclass so it compares equal to its text, but encodes as an atom."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


class ETFDecodeError(ProtocolError):
    """The bytes are not a valid External Term Format term; ``offset`` is where decoding failed."""

    def __init__(self, message: str, offset: int):
        self.offset = offset
        super().__init__(f"{message} (at byte {offset})")


@dataclass(frozen=True)
class _Opaque:
    """A term kept as its exact encoded bytes (tag included, version byte excluded).

    Equality and hashing use the bytes only; the other fields are decoded for display.
    """

    raw: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Any:
        """Parse ``raw`` (one encoded term, without the version byte) into this type."""
        term = decode(bytes([VERSION]) + bytes(raw))
        if not isinstance(term, cls):
            raise ETFDecodeError(f"bytes encode {type(term).__name__}, not {cls.__name__}", 0)
        return term


@dataclass(frozen=True)
class Pid(_Opaque):
    """An Erlang pid (NEW_PID_EXT 88 or PID_EXT 103)."""

    node: str = field(default="", compare=False)
    id: int = field(default=0, compare=False)
    serial: int = field(default=0, compare=False)
    creation: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Reference(_Opaque):
    """An Erlang reference (NEWER_REFERENCE_EXT 90, NEW_REFERENCE_EXT 114 or REFERENCE_EXT 101)."""

    node: str = field(default="", compare=False)
    creation: int = field(default=0, compare=False)
    ids: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ErlangPort(_Opaque):
    """An Erlang port identifier (V4_PORT_EXT 120, NEW_PORT_EXT 89 or PORT_EXT 102)."""

    node: str = field(default="", compare=False)
    id: int = field(default=0, compare=False)
    creation: int = field(default=0, compare=False)


@dataclass(frozen=True)
class OpaqueTerm(_Opaque):
    """A fun (NEW_FUN_EXT 112), an export ``fun M:F/A`` (113) or a LOCAL_EXT (121) term."""

    kind: str = field(default="", compare=False)
    module: str = field(default="", compare=False)
    function: str = field(default="", compare=False)
    arity: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class RawTerm(_Opaque):
    """Any term kept as its exact encoded bytes, to be sent back unchanged (a call's ``Id`` that
    came in a frame whose other parts did not decode, or that Python cannot re-encode: NaN)."""


@dataclass(frozen=True)
class ImproperList:
    """``[items... | tail]`` with a tail that is not a list."""

    items: list[Any]
    tail: Any

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("ImproperList needs at least one item")
        if isinstance(self.tail, (list, ImproperList)):
            raise ValueError("ImproperList tail must not be a list")

    def __hash__(self) -> int:
        raise TypeError("unhashable type: 'ImproperList'")


@dataclass(frozen=True)
class BitBinary:
    """A bitstring whose length is not a whole number of bytes: ``bits`` (1-8) of the last byte count."""

    data: bytes
    bits: int

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("BitBinary needs at least one byte")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"BitBinary bits must be 1..8, got {self.bits}")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_SIZE,
    binaries: Literal["auto", "bytes"] = "auto",
    max_terms: int = DEFAULT_MAX_TERMS,
) -> Any:
    """Decode one whole term (version byte 131 first); any malformed input raises :class:`ETFDecodeError`.

    ``max_depth`` bounds nesting (tuples, lists, maps, funs), ``max_size`` the inflated size of a
    compressed term, ``max_terms`` how many terms (of any kind) the decoder may build, and so
    the memory and time one input can cost. ``binaries="bytes"`` keeps every binary as ``bytes``
    instead of turning UTF-8 ones into ``str``.
    """
    # Imported here, not at the top: the decoder needs this module's types.
    from finetune_worker.etf_decode import decode_term

    return decode_term(data, max_depth=max_depth, max_size=max_size, binaries=binaries, max_terms=max_terms)


def recover_call_id(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE
) -> RawTerm | None:
    """The ``Id`` of a ``{'C', Id, ...}`` frame as its encoded bytes, read without decoding the rest.

    For a frame that :func:`decode` refused (map keys that collide in Python, a bad term deep in
    the arguments): the worker can still answer the call, and the caller does not wait forever.
    ``None`` when the frame is not a call or its ``Id`` itself does not decode.
    """
    from finetune_worker.etf_decode import call_id_bytes

    raw = call_id_bytes(data, max_size=max_size)
    return RawTerm(raw) if raw is not None else None


# ---------------------------------------------------------------------------------------------
# encoding


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
    elif isinstance(term, _Opaque):
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
