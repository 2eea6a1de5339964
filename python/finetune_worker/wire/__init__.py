"""The wire layer: Erlang External Term Format (ETF) codec and port framing. The codec does no IO.

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

from finetune_worker.wire.decode import decode, decode_opaque, recover_call_id
from finetune_worker.wire.encode import encode
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

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_TERMS",
    "VERSION",
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
    "decode_opaque",
    "encode",
    "recover_call_id",
]
