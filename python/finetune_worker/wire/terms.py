"""The Python side of Erlang's terms: atoms, pids, references, ports, funs, improper lists and
bitstrings, the codec's limits, and its one error type. No IO, no codec logic
(:mod:`finetune_worker.wire.encode`, :mod:`finetune_worker.wire.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_worker.errors import ProtocolError

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
class Opaque:
    """A term kept as its exact encoded bytes (tag included, version byte excluded).

    Equality and hashing use the bytes only; the other fields are decoded for display.
    """

    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Pid(Opaque):
    """An Erlang pid (NEW_PID_EXT 88 or PID_EXT 103)."""

    node: str = field(default="", compare=False)
    id: int = field(default=0, compare=False)
    serial: int = field(default=0, compare=False)
    creation: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Reference(Opaque):
    """An Erlang reference (NEWER_REFERENCE_EXT 90, NEW_REFERENCE_EXT 114 or REFERENCE_EXT 101)."""

    node: str = field(default="", compare=False)
    creation: int = field(default=0, compare=False)
    ids: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ErlangPort(Opaque):
    """An Erlang port identifier (V4_PORT_EXT 120, NEW_PORT_EXT 89 or PORT_EXT 102)."""

    node: str = field(default="", compare=False)
    id: int = field(default=0, compare=False)
    creation: int = field(default=0, compare=False)


@dataclass(frozen=True)
class OpaqueTerm(Opaque):
    """A fun (NEW_FUN_EXT 112), an export ``fun M:F/A`` (113) or a LOCAL_EXT (121) term."""

    kind: str = field(default="", compare=False)
    module: str = field(default="", compare=False)
    function: str = field(default="", compare=False)
    arity: int = field(default=-1, compare=False)


@dataclass(frozen=True)
class RawTerm(Opaque):
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
