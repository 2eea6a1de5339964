"""Cross-check the codec against OTP itself: ``term_to_binary`` -> our decode, our encode -> ``binary_to_term``.

One escript process serves the whole module (starting the VM costs up to a second): it prints
a corpus of encoded terms, reads back what Python encoded, and compares in Erlang with ``=:=``.
Pids, refs, ports and funs make the full trip Erlang -> Python -> Erlang and must come back
as the very same terms.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.wire import (
    Atom,
    BitBinary,
    ErlangPort,
    ImproperList,
    OpaqueTerm,
    Pid,
    Reference,
    decode,
    encode,
)

pytestmark = [
    pytest.mark.erl,
    pytest.mark.skipif(shutil.which("escript") is None, reason="needs Erlang/OTP (escript) on PATH"),
]

ESCRIPT = r"""%% -*- coding: utf-8 -*-
main(_) ->
    io:setopts(standard_io, [binary, {encoding, latin1}]),
    Port = hd(erlang:ports()),
    Fun = fun(X) -> X + 1 end,
    Opaque = [{pid, self()}, {ref, make_ref()}, {port, Port}, {'fun', Fun},
              {export, fun lists:map/2}],
    Corpus = [
        {atom_latin1, hello, []},
        {atom_latin1_accent, 'café', []},
        {atom_utf8_emoji, '😀', []},
        {atom_minor2, 'café', [{minor_version, 2}]},
        {atom_true, true, []}, {atom_false, false, []},
        {atom_nil, nil, []}, {atom_undefined, undefined, []},
        {int_0, 0, []}, {int_255, 255, []}, {int_256, 256, []}, {int_neg, -1, []},
        {int32_max, 2147483647, []}, {int32_min, -2147483648, []},
        {int_2_31, 2147483648, []},
        {big_2_64, 1 bsl 64, []}, {big_neg_2_200, -(1 bsl 200), []},
        {big_2_2000, 1 bsl 2000, []}, {big_large, -(1 bsl 2100), []},
        {float, 1.5, []}, {float_big, 1.0e300, []}, {float_tiny, -5.0e-324, []},
        {float_minor0, 0.1, [{minor_version, 0}]},
        {bin_utf8, <<"héllo"/utf8>>, []}, {bin_raw, <<255, 0>>, []}, {bin_empty, <<>>, []},
        {bits, <<1:3>>, []}, {bits_long, <<255, 7:5>>, []},
        {string, "abc", []}, {string_latin1, "héllo", []}, {charlist_unicode, "日本", []},
        {list_ints, [1, 2, 300], []}, {nil, [], []},
        {improper, [1 | 2], []}, {improper_long, [a, <<"b">> | c], []},
        {nested, {a, [{b, #{c => [d]}}]}, []},
        {tuple_empty, {}, []},
        {tuple_large, list_to_tuple(lists:seq(1, 300)), []},
        {map_small, #{a => 1, <<"k">> => 2}, []},
        {map_large, maps:from_list([{I, I * I} || I <- lists:seq(1, 40)]), []},
        {compressed, lists:duplicate(1000, <<"abc">>), [compressed]},
        {compressed_9, {ok, lists:seq(1, 2000)}, [{compressed, 9}]}
    ] ++ [{N, T, []} || {N, T} <- Opaque],
    [io:format("~s ~s~n", [N, binary:encode_hex(term_to_binary(T, Opts))]) || {N, T, Opts} <- Corpus],
    io:format("END~n"),
    Expected = maps:from_list(
        [{atom_to_binary(N), T} || {N, T} <- Opaque] ++
        [{<<"py_int_small">>, 5}, {<<"py_int_neg">>, -5}, {<<"py_int32">>, -2147483648},
         {<<"py_big">>, 1 bsl 64}, {<<"py_big_neg">>, -(1 bsl 200)}, {<<"py_huge">>, 1 bsl 2100},
         {<<"py_float">>, 1.5}, {<<"py_float_neg">>, -2.5e-300},
         {<<"py_str">>, <<"héllo"/utf8>>}, {<<"py_bytes">>, <<0, 255>>},
         {<<"py_atom">>, ok}, {<<"py_atom_utf8">>, 'héllo'}, {<<"py_atom_long">>, list_to_atom(lists:duplicate(255, $é))},
         {<<"py_true">>, true}, {<<"py_false">>, false}, {<<"py_none">>, nil},
         {<<"py_tuple">>, {1, <<"a">>}}, {<<"py_tuple_large">>, list_to_tuple(lists:seq(1, 300))},
         {<<"py_list">>, [1, <<"a">>, [ok]]}, {<<"py_empty">>, []},
         {<<"py_improper">>, [1, 2 | t]}, {<<"py_bits">>, <<1:3>>},
         {<<"py_map">>, #{a => 1, <<"b">> => [], {x, 1} => #{}}},
         {<<"py_map_large">>, maps:from_list([{I, <<"v">>} || I <- lists:seq(1, 40)])},
         {<<"py_compressed">>, {ok, lists:duplicate(500, <<"abc">>)}},
         {<<"py_event">>, {fine_tuning, <<"job-1">>, progress, #{step => 3, percent => 37.5}}}]),
    check(Expected),
    io:format("DONE~n"),
    halt(0).

check(Expected) ->
    case io:get_line(standard_io, "") of
        <<"END\n">> -> ok;
        eof -> ok;
        Line ->
            [Name, Hex] = binary:split(string:trim(Line), <<" ">>),
            Got = binary_to_term(binary:decode_hex(Hex)),
            case maps:find(Name, Expected) of
                {ok, Got} -> io:format("~s ok~n", [Name]);
                {ok, Want} -> io:format("~s mismatch ~w (wanted ~w)~n", [Name, Got, Want]);
                error -> io:format("~s unknown~n", [Name])
            end,
            check(Expected)
    end.
"""

# What our decoder must make of each Erlang corpus entry.
EXPECTED_FROM_ERL: dict[str, Any] = {
    "atom_latin1": Atom("hello"),
    "atom_latin1_accent": Atom("café"),
    "atom_utf8_emoji": Atom("😀"),
    "atom_minor2": Atom("café"),
    "atom_true": True,
    "atom_false": False,
    "atom_nil": None,
    "atom_undefined": None,
    "int_0": 0,
    "int_255": 255,
    "int_256": 256,
    "int_neg": -1,
    "int32_max": 2**31 - 1,
    "int32_min": -(2**31),
    "int_2_31": 2**31,
    "big_2_64": 2**64,
    "big_neg_2_200": -(2**200),
    "big_2_2000": 2**2000,
    "big_large": -(2**2100),
    "float": 1.5,
    "float_big": 1.0e300,
    "float_tiny": -5.0e-324,
    "float_minor0": 0.1,
    "bin_utf8": "héllo",
    "bin_raw": b"\xff\x00",
    "bin_empty": "",
    "bits": BitBinary(b"\x20", 3),
    "bits_long": BitBinary(b"\xff\x38", 5),
    "string": [97, 98, 99],
    "string_latin1": [104, 233, 108, 108, 111],
    "charlist_unicode": [0x65E5, 0x672C],
    "list_ints": [1, 2, 300],
    "nil": [],
    "improper": ImproperList([1], 2),
    "improper_long": ImproperList([Atom("a"), "b"], Atom("c")),
    "nested": (Atom("a"), [(Atom("b"), {Atom("c"): [Atom("d")]})]),
    "tuple_empty": (),
    "tuple_large": tuple(range(1, 301)),
    "map_small": {Atom("a"): 1, "k": 2},
    "map_large": {i: i * i for i in range(1, 41)},
    "compressed": ["abc"] * 1000,
    "compressed_9": (Atom("ok"), list(range(1, 2001))),
}
OPAQUE_TYPES = {"pid": Pid, "ref": Reference, "port": ErlangPort, "fun": OpaqueTerm, "export": OpaqueTerm}

# What Python sends; the escript holds the Erlang term each must become.
PY_CORPUS: dict[str, Any] = {
    "py_int_small": 5,
    "py_int_neg": -5,
    "py_int32": -(2**31),
    "py_big": 2**64,
    "py_big_neg": -(2**200),
    "py_huge": 2**2100,
    "py_float": 1.5,
    "py_float_neg": -2.5e-300,
    "py_str": "héllo",
    "py_bytes": b"\x00\xff",
    "py_atom": Atom("ok"),
    "py_atom_utf8": Atom("héllo"),
    "py_atom_long": Atom("é" * 255),
    "py_true": True,
    "py_false": False,
    "py_none": None,
    "py_tuple": (1, "a"),
    "py_tuple_large": tuple(range(1, 301)),
    "py_list": [1, b"a", [Atom("ok")]],
    "py_empty": [],
    "py_improper": ImproperList([1, 2], Atom("t")),
    "py_bits": BitBinary(b"\x20", 3),
    "py_map": {Atom("a"): 1, "b": [], (Atom("x"), 1): {}},
    "py_map_large": {i: "v" for i in range(1, 41)},
    "py_event": (Atom("fine_tuning"), "job-1", Atom("progress"), {Atom("step"): 3, Atom("percent"): 37.5}),
}


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, ImproperList):
        return same(a.items, b.items) and same(a.tail, b.tail)
    return bool(a == b)


class ErlSession:
    """The escript's two halves: its corpus (read at start) and its verdicts on what we send."""

    def __init__(self, script: Path):
        self.proc = subprocess.Popen(
            ["escript", str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="latin-1",
        )
        assert self.proc.stdout is not None
        self.corpus: dict[str, bytes] = {}
        for line in self.proc.stdout:
            if line.strip() == "END":
                break
            name, hexed = line.split()
            self.corpus[name] = bytes.fromhex(hexed)
        else:
            raise RuntimeError(f"escript ended early: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.verdicts: dict[str, str] | None = None

    def check(self, encoded: dict[str, bytes]) -> dict[str, str]:
        """Send every encoding at once (the escript reads until END) and collect its verdicts."""
        if self.verdicts is None:
            lines = "".join(f"{name} {data.hex()}\n" for name, data in encoded.items()) + "END\n"
            out, err = self.proc.communicate(lines, timeout=60)
            assert "DONE" in out, f"escript failed:\n{out}\n{err}"
            self.verdicts = {}
            for line in out.splitlines():
                name, _, verdict = line.partition(" ")
                if name != "DONE":
                    self.verdicts[name] = verdict
        return self.verdicts


@pytest.fixture(scope="module")
def erl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    script = tmp_path_factory.mktemp("erl") / "etf_check.escript"
    script.write_text(ESCRIPT, encoding="utf-8")
    session = ErlSession(script)
    yield session
    if session.proc.poll() is None:
        session.proc.kill()
        session.proc.wait()


def python_side(erl: ErlSession) -> dict[str, bytes]:
    """Everything Python sends back: its own corpus, plus Erlang's opaque terms re-encoded."""
    out = {name: encode(value) for name, value in PY_CORPUS.items()}
    out["py_compressed"] = encode((Atom("ok"), ["abc"] * 500), compressed=6)
    for name in OPAQUE_TYPES:
        out[name] = encode(decode(erl.corpus[name]))
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED_FROM_ERL))
def test_decode_what_erlang_encodes(erl: ErlSession, name: str) -> None:
    got = decode(erl.corpus[name])
    assert same(got, EXPECTED_FROM_ERL[name]), (name, got)


def test_erlang_compressed_terms_are_compressed(erl: ErlSession) -> None:
    assert erl.corpus["compressed"][:2] == b"\x83P"
    assert erl.corpus["compressed_9"][:2] == b"\x83P"


@pytest.mark.parametrize(("name", "cls"), sorted(OPAQUE_TYPES.items()))
def test_opaque_terms_from_erlang_are_byte_exact(erl: ErlSession, name: str, cls: type) -> None:
    data = erl.corpus[name]
    term = decode(data)
    assert type(term) is cls
    assert encode(term) == data
    assert getattr(term, "node", "nonode@nohost") == "nonode@nohost"


def test_opaque_display_fields(erl: ErlSession) -> None:
    assert decode(erl.corpus["export"]).module == "lists"
    assert decode(erl.corpus["export"]).function == "map"
    assert decode(erl.corpus["export"]).arity == 2
    assert decode(erl.corpus["fun"]).kind == "fun"
    assert decode(erl.corpus["fun"]).arity == 1


@pytest.mark.parametrize("name", [*sorted(PY_CORPUS), "py_compressed", *sorted(OPAQUE_TYPES)])
def test_erlang_decodes_what_python_encodes(erl: ErlSession, name: str) -> None:
    verdicts = erl.check(python_side(erl))
    assert verdicts.get(name) == "ok", verdicts.get(name)
