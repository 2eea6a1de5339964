"""External Term Format codec (placeholder: the full codec is being written; keep ``Atom`` as is)."""

from __future__ import annotations


class Atom(str):
    """An Erlang atom. A ``str`` subclass so it compares equal to its text, but encodes as an atom."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"
