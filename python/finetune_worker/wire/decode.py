"""External Term Format bytes to Python terms (:func:`decode`): bounds-checked, depth-limited, no IO.

Every length field is checked against the bytes that remain before anything is allocated, and
every failure surfaces as :class:`~finetune_worker.wire.ETFDecodeError` with the byte offset.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Literal

from finetune_worker.errors import brief
from finetune_worker.wire.terms import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_TERMS,
    VERSION,
    Atom,
    BitBinary,
    ErlangPort,
    ETFDecodeError,
    ImproperList,
    OpaqueTerm,
    Pid,
    RawTerm,
    Reference,
)

_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_u32 = struct.Struct(">I").unpack_from
_unpack_i32 = struct.Struct(">i").unpack_from
_unpack_u64 = struct.Struct(">Q").unpack_from
_unpack_double = struct.Struct(">d").unpack_from


class _Decoder:
    __slots__ = ("base", "binaries_as_str", "data", "depth", "end", "max_depth", "max_terms", "pos", "terms")

    def __init__(
        self,
        data: bytes,
        base: int,
        max_depth: int,
        binaries_as_str: bool,
        start: int = 0,
        max_terms: int = DEFAULT_MAX_TERMS,
    ):
        self.data = data
        self.base = base
        self.pos = start
        self.end = len(data)
        self.depth = 0
        self.max_depth = max_depth
        self.binaries_as_str = binaries_as_str
        # Every decoded term costs a Python object (an empty list from one byte is ~56 bytes):
        # the count bounds what a small (compressed) frame can make the decoder build.
        self.max_terms = self.terms = max_terms

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
        self.terms -= 1
        if self.terms < 0:
            raise self.fail(f"term has more than max_terms={self.max_terms} elements")
        start = self.pos
        # The tag and small integers are read inline: they are most of what a message holds.
        if start + 1 >= self.end:
            if start >= self.end:
                raise self.fail("truncated term tag: needs 1 bytes, 0 left")
            self.pos = start + 1
            tag = self.data[start]
        else:
            tag = self.data[start]
            if tag == 97:  # SMALL_INTEGER_EXT
                self.pos = start + 2
                return self.data[start + 1]
            self.pos = start + 1
        if tag == 97:
            return self.u8("small integer")
        if tag == 98:  # INTEGER_EXT
            return int(_unpack_i32(self.data, self.take(4, "integer"))[0])
        if tag in _ATOM_TAGS:
            return self.atom(tag, start)
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
            self.terms -= n
            if self.terms < 0:
                raise self.fail(f"term has more than max_terms={self.max_terms} elements", start)
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
        if arity > self.terms:
            raise self.fail(f"term has more than max_terms={self.max_terms} elements", start)
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
        if n > self.terms:
            raise self.fail(f"term has more than max_terms={self.max_terms} elements", start)
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
        if 2 * n > self.terms:
            raise self.fail(f"term has more than max_terms={self.max_terms} elements", start)
        self.enter(start)
        out: dict[Any, Any] = {}
        for _ in range(n):
            key_at = self.pos
            key = self.term()
            value = self.term()
            try:
                if key in out:
                    raise self.fail(f"map key {_short_repr(key)} collides with another key in Python", key_at)
                out[key] = value
            except TypeError:
                raise self.fail(
                    f"unsupported map key of type {type(key).__name__} (unhashable in Python)", key_at
                ) from None
        self.depth -= 1
        return out

    def atom(self, tag: int, start: int) -> Any:
        if tag == 119 and start + 2 < self.end:  # the common case, inline
            n = self.data[start + 1]
            at = start + 2
            if n > self.end - at:
                raise self.fail(f"truncated atom: needs {n} bytes, {self.end - at} left", at)
            self.pos = at + n
        else:
            n = self.u16("atom length") if tag in (100, 118) else self.u8("atom length")
            at = self.take(n, "atom")
        key = (tag in (118, 119), self.data[at : at + n])
        value = _ATOM_CACHE.get(key, _MISSING)
        if value is _MISSING:
            self.pos = start + 1
            value = _atom_value(self.atom_text(tag, start))
            if len(_ATOM_CACHE) < _ATOM_CACHE_SIZE:
                _ATOM_CACHE[key] = value
        return value

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
# Messages repeat the same few atoms; the bound keeps a peer minting atoms from growing memory.
_ATOM_CACHE: dict[tuple[bool, bytes], Any] = {}
_ATOM_CACHE_SIZE = 4096
_MISSING = object()
_SPECIAL_ATOMS: dict[str, Any] = {"true": True, "false": False, "nil": None, "undefined": None}


def _atom_value(text: str) -> Any:
    if text in _SPECIAL_ATOMS:
        return _SPECIAL_ATOMS[text]
    return Atom(text)


def _short_repr(value: Any, limit: int = 80) -> str:
    return brief(value, limit)


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


def decode_term(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int,
    max_size: int,
    binaries: Literal["auto", "bytes"],
    max_terms: int = DEFAULT_MAX_TERMS,
) -> Any:
    """See :func:`decode`."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if not buf:
        raise ETFDecodeError("empty input", 0)
    if buf[0] != VERSION:
        raise ETFDecodeError(f"version byte must be {VERSION}, got {buf[0]}", 0)
    # Offsets count from the version byte; inside a compressed term they count as if the
    # inflated body followed the version byte directly.
    if len(buf) > 1 and buf[1] == 80:
        base, start = 1, 0
        buf = _inflate(buf[2:], max_size)
    else:
        # Decode in place after the version byte: slicing it off would copy the whole frame.
        base, start = 0, 1
    decoder = _Decoder(buf, base, max_depth, binaries == "auto", start, max_terms)
    try:
        term = decoder.term()
    except RecursionError:
        raise ETFDecodeError("term nested too deeply for the Python stack", decoder.pos + base) from None
    except MemoryError:
        raise ETFDecodeError("term too large to decode in memory", decoder.pos + base) from None
    if decoder.pos != decoder.end:
        raise ETFDecodeError(f"{decoder.end - decoder.pos} trailing bytes after the term", decoder.pos + base)
    return term


def call_id_bytes(data: bytes | bytearray | memoryview, *, max_size: int) -> bytes | None:
    """See :func:`recover_call_id`: the encoded ``Id`` of a call frame, or None."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if len(buf) < 2 or buf[0] != VERSION:
        return None
    start = 1
    if buf[1] == 80:
        try:
            buf, start = _inflate(buf[2:], max_size), 0
        except ETFDecodeError:
            return None
    decoder = _Decoder(buf, 0, 8, True, start)
    try:
        tag = decoder.u8("tuple tag")
        arity = decoder.u8("tuple arity") if tag == 104 else decoder.u32("tuple arity") if tag == 105 else 0
        if arity < 2:
            return None
        first = decoder.term()
        if not (isinstance(first, Atom) and first == "C"):
            return None
        at = decoder.pos
        decoder.term()  # an Id nested deeper than 8 levels is no Id anyone sends
        return buf[at : decoder.pos]
    except (ETFDecodeError, RecursionError, MemoryError):
        return None


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
    return decode_term(data, max_depth=max_depth, max_size=max_size, binaries=binaries, max_terms=max_terms)


def recover_call_id(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE
) -> RawTerm | None:
    """The ``Id`` of a ``{'C', Id, ...}`` frame as its encoded bytes, read without decoding the rest.

    For a frame that :func:`decode` refused (map keys that collide in Python, a bad term deep in
    the arguments): the worker can still answer the call, and the caller does not wait forever.
    ``None`` when the frame is not a call or its ``Id`` itself does not decode.
    """
    raw = call_id_bytes(data, max_size=max_size)
    return RawTerm(raw) if raw is not None else None


def decode_opaque(cls: type[Any], raw: bytes) -> Any:
    """Parse ``raw`` (one encoded pid, reference, port or fun, without the version byte) as ``cls``."""
    term = decode(bytes([VERSION]) + bytes(raw))
    if not isinstance(term, cls):
        raise ETFDecodeError(f"bytes encode {type(term).__name__}, not {cls.__name__}", 0)
    return term
