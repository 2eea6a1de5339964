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
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from finetune_worker.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "Atom",
    "BitBinary",
    "ETFDecodeError",
    "ErlangPort",
    "ImproperList",
    "OpaqueTerm",
    "Pid",
    "Reference",
    "decode",
    "encode",
]

#: Deepest nesting :func:`decode` accepts (a tuple in a list in a map... counts one per level).
#: Real messages nest a handful of levels; the bound keeps hostile input off the C stack.
DEFAULT_MAX_DEPTH = 256
#: Largest uncompressed size, in bytes, a compressed term (tag 80) may inflate to. Uncompressed
#: input is already in memory, so its size is bounded by the frame limit of the port instead.
DEFAULT_MAX_SIZE = 256 * 1024 * 1024

VERSION = 131
MAX_ATOM_CHARS = 255  # OTP refuses longer atoms

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

_pack_u8 = struct.Struct(">B").pack
_pack_tag_u16 = struct.Struct(">BH").pack
_pack_tag_u32 = struct.Struct(">BI").pack
_pack_tag_i32 = struct.Struct(">Bi").pack
_pack_tag_u8 = struct.Struct(">BB").pack
_pack_tag_u8_u8 = struct.Struct(">BBB").pack
_pack_tag_u32_u8 = struct.Struct(">BIB").pack
_pack_tag_double = struct.Struct(">Bd").pack
_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_u32 = struct.Struct(">I").unpack_from
_unpack_i32 = struct.Struct(">i").unpack_from
_unpack_u64 = struct.Struct(">Q").unpack_from
_unpack_double = struct.Struct(">d").unpack_from


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


# ---------------------------------------------------------------------------------------------
# decoding


class _Decoder:
    __slots__ = ("base", "binaries_as_str", "data", "depth", "end", "max_depth", "pos")

    def __init__(self, data: bytes, base: int, max_depth: int, binaries_as_str: bool):
        self.data = data
        self.base = base
        self.pos = 0
        self.end = len(data)
        self.depth = 0
        self.max_depth = max_depth
        self.binaries_as_str = binaries_as_str

    def fail(self, message: str, offset: int | None = None) -> ETFDecodeError:
        return ETFDecodeError(message, self.base + (self.pos if offset is None else offset))

    def take(self, n: int, what: str) -> int:
        """Reserve ``n`` bytes and return where they start; checks before anything is allocated."""
        start = self.pos
        if n > self.end - start:
            raise self.fail(f"truncated {what}: needs {n} bytes, {self.end - start} left")
        self.pos = start + n
        return start

    def u8(self, what: str) -> int:
        return self.data[self.take(1, what)]

    def u16(self, what: str) -> int:
        return int(_unpack_u16(self.data, self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(_unpack_u32(self.data, self.take(4, what))[0])

    def term(self) -> Any:
        start = self.pos
        tag = self.u8("term tag")
        if tag == 97:  # SMALL_INTEGER_EXT
            return self.u8("small integer")
        if tag == 98:  # INTEGER_EXT
            return int(_unpack_i32(self.data, self.take(4, "integer"))[0])
        if tag in _ATOM_TAGS:
            return _atom_value(self.atom_text(tag, start))
        if tag == 109:  # BINARY_EXT
            n = self.u32("binary length")
            at = self.take(n, "binary")
            chunk = self.data[at : at + n]
            if self.binaries_as_str:
                try:
                    return chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return chunk
            return chunk
        if tag == 104:  # SMALL_TUPLE_EXT
            return self.tuple(self.u8("tuple arity"), start)
        if tag == 105:  # LARGE_TUPLE_EXT
            return self.tuple(self.u32("tuple arity"), start)
        if tag == 106:  # NIL_EXT
            return []
        if tag == 108:  # LIST_EXT
            return self.list(start)
        if tag == 116:  # MAP_EXT
            return self.map(start)
        if tag == 70:  # NEW_FLOAT_EXT
            return float(_unpack_double(self.data, self.take(8, "float"))[0])
        if tag == 107:  # STRING_EXT: bytes as a list of small ints, like Erlang
            n = self.u16("string length")
            at = self.take(n, "string")
            return list(self.data[at : at + n])
        if tag in (110, 111):  # SMALL_BIG_EXT, LARGE_BIG_EXT
            n = self.u8("bignum size") if tag == 110 else self.u32("bignum size")
            sign = self.u8("bignum sign")
            if sign > 1:
                raise self.fail(f"bignum sign byte must be 0 or 1, got {sign}", self.pos - 1)
            at = self.take(n, "bignum digits")
            value = int.from_bytes(self.data[at : at + n], "little")
            return -value if sign else value
        if tag == 77:  # BIT_BINARY_EXT
            n = self.u32("bit binary length")
            bits = self.u8("bit binary bits")
            if n == 0 or not 1 <= bits <= 8:
                raise self.fail(f"bad bit binary: {n} bytes with {bits} bits in the last", start)
            at = self.take(n, "bit binary")
            return BitBinary(self.data[at : at + n], bits)
        if tag == 99:  # FLOAT_EXT: "%.20e" text, NUL padded
            at = self.take(31, "old float")
            text = self.data[at : at + 31].split(b"\0", 1)[0]
            try:
                return float(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise self.fail("bad old float text", at) from None
        if tag in (88, 103):
            return self.pid(tag, start)
        if tag in (90, 114, 101):
            return self.reference(tag, start)
        if tag in (120, 89, 102):
            return self.port(tag, start)
        if tag == 112:
            return self.fun(start)
        if tag == 113:  # EXPORT_EXT
            module = self.node_atom("export module")
            function = self.node_atom("export function")
            if self.u8("export arity tag") != 97:
                raise self.fail("export arity must be a small integer", self.pos - 1)
            arity = self.u8("export arity")
            return OpaqueTerm(self.data[start : self.pos], "export", module, function, arity)
        if tag == 121:
            # LOCAL_EXT: node-local encoding of the rest; only the node that made it can read it.
            self.pos = self.end
            return OpaqueTerm(self.data[start : self.end], "local")
        if tag == 80:
            raise self.fail("compressed term (tag 80) is only allowed at the top level", start)
        raise self.fail(f"unsupported term tag {tag}", start)

    def enter(self, start: int) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise self.fail(f"term nested deeper than max_depth={self.max_depth}", start)

    def tuple(self, arity: int, start: int) -> tuple[Any, ...]:
        if arity > self.end - self.pos:  # every element takes at least one byte
            raise self.fail(f"tuple arity {arity} exceeds the {self.end - self.pos} bytes left", start)
        self.enter(start)
        # Plain loops, not comprehensions: each comprehension is one more Python frame per level.
        items = []
        for _ in range(arity):
            items.append(self.term())
        self.depth -= 1
        return tuple(items)

    def list(self, start: int) -> Any:
        n = self.u32("list length")
        if n >= self.end - self.pos:  # n elements plus a tail, one byte each at least
            raise self.fail(f"list length {n} exceeds the {self.end - self.pos} bytes left", start)
        self.enter(start)
        items = []
        for _ in range(n):
            items.append(self.term())
        if self.pos < self.end and self.data[self.pos] == 106:
            self.pos += 1
            self.depth -= 1
            return items
        tail = self.term()
        self.depth -= 1
        # A list tail makes the whole thing a longer list, as binary_to_term reads it.
        if isinstance(tail, list):
            return items + tail
        if isinstance(tail, ImproperList):
            return ImproperList(items + tail.items, tail.tail)
        if not items:
            return tail
        return ImproperList(items, tail)

    def map(self, start: int) -> dict[Any, Any]:
        n = self.u32("map arity")
        if n > (self.end - self.pos) // 2:
            raise self.fail(f"map arity {n} exceeds the {self.end - self.pos} bytes left", start)
        self.enter(start)
        out: dict[Any, Any] = {}
        for _ in range(n):
            key_at = self.pos
            key = self.term()
            value = self.term()
            try:
                if key in out:
                    raise self.fail(f"map key {key!r} collides with another key in Python", key_at)
                out[key] = value
            except TypeError:
                raise self.fail(
                    f"unsupported map key of type {type(key).__name__} (unhashable in Python)", key_at
                ) from None
        self.depth -= 1
        return out

    def atom_text(self, tag: int, start: int) -> str:
        n = self.u16("atom length") if tag in (100, 118) else self.u8("atom length")
        at = self.take(n, "atom")
        raw = self.data[at : at + n]
        try:
            return raw.decode("utf-8") if tag in (118, 119) else raw.decode("latin-1")
        except UnicodeDecodeError:
            raise self.fail("atom is not valid UTF-8", start) from None

    def node_atom(self, what: str) -> str:
        start = self.pos
        tag = self.u8(what)
        if tag not in _ATOM_TAGS:
            raise self.fail(f"{what} must be an atom, got tag {tag}", start)
        return self.atom_text(tag, start)

    def pid(self, tag: int, start: int) -> Pid:
        node = self.node_atom("pid node")
        at = self.take(12 if tag == 88 else 9, "pid")
        pid_id, serial = struct.unpack_from(">II", self.data, at)
        creation = _unpack_u32(self.data, at + 8)[0] if tag == 88 else self.data[at + 8]
        return Pid(self.data[start : self.pos], node, pid_id, serial, creation)

    def reference(self, tag: int, start: int) -> Reference:
        if tag == 101:  # REFERENCE_EXT: node, one id word, one creation byte
            node = self.node_atom("reference node")
            at = self.take(5, "reference")
            ids: tuple[int, ...] = (int(_unpack_u32(self.data, at)[0]),)
            return Reference(self.data[start : self.pos], node, self.data[at + 4], ids)
        count = self.u16("reference id count")
        if not 1 <= count <= 5:
            raise self.fail(f"reference id count must be 1..5, got {count}", start)
        node = self.node_atom("reference node")
        creation = self.u32("reference creation") if tag == 90 else self.u8("reference creation")
        at = self.take(4 * count, "reference ids")
        ids = struct.unpack_from(f">{count}I", self.data, at)
        return Reference(self.data[start : self.pos], node, creation, ids)

    def port(self, tag: int, start: int) -> ErlangPort:
        node = self.node_atom("port node")
        if tag == 120:  # V4_PORT_EXT: 64-bit id
            port_id = int(_unpack_u64(self.data, self.take(8, "port id"))[0])
        else:
            port_id = self.u32("port id")
        creation = self.u32("port creation") if tag in (120, 89) else self.u8("port creation")
        return ErlangPort(self.data[start : self.pos], node, port_id, creation)

    def fun(self, start: int) -> OpaqueTerm:
        size = self.u32("fun size")
        # Size counts itself; check it first so a lying size fails before we walk the fields.
        if size < 4 or size - 4 > self.end - self.pos:
            raise self.fail(f"fun size {size} does not fit the {self.end - self.pos + 4} bytes left", start)
        stop = start + 1 + size
        arity = self.u8("fun arity")
        self.take(16 + 4, "fun uniq and index")
        num_free = self.u32("fun free variable count")
        module = self.node_atom("fun module")
        self.enter(start)
        for what in ("fun old index", "fun old uniq"):
            at = self.pos
            if not isinstance(self.term(), int):
                raise self.fail(f"{what} must be an integer", at)
        at = self.pos
        if not isinstance(self.term(), Pid):
            raise self.fail("fun creator must be a pid", at)
        for _ in range(num_free):
            if self.pos >= stop:
                raise self.fail(f"fun declares {num_free} free variables that do not fit its size", start)
            self.term()
        self.depth -= 1
        if self.pos != stop:
            raise self.fail(f"fun size {size} does not match its content ({self.pos - start - 1})", start)
        return OpaqueTerm(self.data[start:stop], "fun", module, "", arity)


_ATOM_TAGS = frozenset((100, 115, 118, 119))
_SPECIAL_ATOMS: dict[str, Any] = {"true": True, "false": False, "nil": None, "undefined": None}


def _atom_value(text: str) -> Any:
    if text in _SPECIAL_ATOMS:
        return _SPECIAL_ATOMS[text]
    return Atom(text)


def _inflate(data: bytes, max_size: int) -> bytes:
    """The body of a compressed term (after ``131, 80``), inflated to exactly its declared size."""
    if len(data) < 4:
        raise ETFDecodeError("truncated compressed term header", 2)
    size = int(_unpack_u32(data, 0)[0])
    if size > max_size:
        raise ETFDecodeError(f"compressed term declares {size} bytes, over max_size={max_size}", 2)
    inflater = zlib.decompressobj()
    try:
        # max_length caps the allocation: a zip bomb stops at size + 1 bytes.
        body = inflater.decompress(data[4:], size + 1)
    except zlib.error as exc:
        raise ETFDecodeError(f"bad zlib data in compressed term: {exc}", 6) from None
    if len(body) > size:
        raise ETFDecodeError(f"compressed term inflates past its declared size {size}", 6)
    if not inflater.eof:
        raise ETFDecodeError("compressed term's zlib stream is truncated", len(data) + 2)
    if len(body) < size:
        raise ETFDecodeError(f"compressed term inflates to {len(body)} bytes, not its declared {size}", 6)
    if inflater.unused_data:
        offset = len(data) + 2 - len(inflater.unused_data)
        raise ETFDecodeError("trailing bytes after the compressed term", offset)
    return body


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_SIZE,
    binaries: Literal["auto", "bytes"] = "auto",
) -> Any:
    """Decode one whole term (version byte 131 first); any malformed input raises :class:`ETFDecodeError`.

    ``binaries="bytes"`` keeps every binary as ``bytes`` instead of turning UTF-8 ones into ``str``.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    if not buf:
        raise ETFDecodeError("empty input", 0)
    if buf[0] != VERSION:
        raise ETFDecodeError(f"version byte must be {VERSION}, got {buf[0]}", 0)
    # Offsets count from the version byte; inside a compressed term they count as if the
    # inflated body followed the version byte directly.
    base = 1
    buf = _inflate(buf[2:], max_size) if len(buf) > 1 and buf[1] == 80 else buf[1:]
    decoder = _Decoder(buf, base, max_depth, binaries == "auto")
    try:
        term = decoder.term()
    except RecursionError:
        raise ETFDecodeError("term nested too deeply for the Python stack", decoder.pos + base) from None
    except MemoryError:
        raise ETFDecodeError("term too large to decode in memory", decoder.pos + base) from None
    if decoder.pos != decoder.end:
        raise ETFDecodeError(f"{decoder.end - decoder.pos} trailing bytes after the term", decoder.pos + base)
    return term


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


def _encode_atom(text: str, out: list[bytes]) -> None:
    if len(text) > MAX_ATOM_CHARS:
        raise ValueError(f"atom longer than {MAX_ATOM_CHARS} characters: {text[:40]!r}...")
    raw = text.encode("utf-8")
    out.append(_pack_tag_u8(119, len(raw)) if len(raw) < 256 else _pack_tag_u16(118, len(raw)))
    out.append(raw)


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
