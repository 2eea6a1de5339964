"""Codec part: encode/decode cost of the worker's ETF codec vs erlang_py vs OTP itself, on the same terms.

Two terms stand for the traffic: a ``metrics`` event as the worker sends it (``{'M', Pid,
{fine_tuning, JobId, metrics, #{...}}}``) and the reply to a ``status`` call (``{'r', Id,
#{...}}``). All three codecs encode and decode the very same bytes: erlang_py's view of a term
is what it decodes from our bytes, and it re-encodes them byte for byte (checked), and the BEAM
reads the bytes from a file. The Erlang loop is compiled with ``erlc`` (an ``-eval`` loop would
time the interpreter, not the BIF).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Options, Row, fmt_ns, ns_per_op

PART = "codec"

_ERL_MODULE = r"""
-module(bench_etf).
-export([main/1]).

main([NStr | Paths]) ->
    N = list_to_integer(NStr),
    lists:foreach(fun(P) -> bench(N, P) end, Paths),
    halt(0).

bench(N, Path) ->
    {ok, Bin} = file:read_file(Path),
    Term = binary_to_term(Bin),
    Enc = median([time_ns(fun() -> enc(N, Term, 0) end) / N || _ <- lists:seq(1, 5)]),
    Dec = median([time_ns(fun() -> dec(N, Bin, 0) end) / N || _ <- lists:seq(1, 5)]),
    io:format("~s ~.3f ~.3f~n", [filename:basename(Path), Enc, Dec]).

time_ns(F) ->
    T0 = erlang:monotonic_time(nanosecond),
    _ = F(),
    erlang:monotonic_time(nanosecond) - T0.

median(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)).

%% The accumulators keep the compiler from dropping calls whose results go unused.
enc(0, _, Acc) -> Acc;
enc(K, T, Acc) -> enc(K - 1, T, Acc + byte_size(term_to_binary(T))).

dec(0, _, Acc) -> Acc;
dec(K, B, Acc) -> dec(K - 1, B, Acc + tuple_size(binary_to_term(B))).
"""


def sample_terms() -> dict[str, Any]:
    """The two terms, built with the worker's own event and status code."""
    from finetune_worker.server.jobs import JobRecord
    from finetune_worker.testing import make_pid
    from finetune_worker.wire import Atom
    from finetune_worker.wire.vocabulary import Event, payload_term

    event = Event(
        "job-48211-51234-3",
        "metrics",
        {
            "step": 120,
            "epoch": 0.48,
            "metrics": {
                "loss": 1.2345,
                "learning_rate": 0.0002,
                "grad_norm": 0.51,
                "tokens_per_second": 2875.5,
                "tokens_seen": 345600,
            },
        },
    )
    record = JobRecord(job_id="job-48211-51234-3", kind="train", config=None, state="running")
    record.step, record.total_steps, record.phase = 120, 250, "training"
    record.started_at, record.submitted_at = 1795000000.25, 1795000000.125
    record.last_metrics = {"loss": 1.2345, "learning_rate": 0.0002, "grad_norm": 0.51, "tokens_seen": 345600}
    record.outputs = {"last_checkpoint": "/srv/runs/tiny-lora/checkpoint-100"}
    return {
        "event": (Atom("M"), make_pid(), event.to_term()),
        "status": (Atom("r"), 4711, payload_term(record.to_status())),
    }


def run(opts: Options) -> list[Row]:
    import erlang
    from finetune_worker import wire as etf

    number = 300 if opts.quick else 5000
    rows: list[Row] = []
    terms = sample_terms()
    encoded = {name: etf.encode(term) for name, term in terms.items()}
    otp = _otp_times(encoded, 2000 if opts.quick else 200000, opts)
    for name, term in terms.items():
        data = encoded[name]
        theirs = erlang.binary_to_term(data)
        if erlang.term_to_binary(theirs) != data:
            raise AssertionError(f"erlang_py does not re-encode the {name} term byte for byte")
        if etf.decode(data) != term:
            raise AssertionError(f"the {name} term does not survive an etf round trip")
        results = {
            ("encode", "etf"): ns_per_op(lambda t=term: etf.encode(t), number),
            ("encode", "erlang_py"): ns_per_op(lambda t=theirs: erlang.term_to_binary(t), number),
            ("decode", "etf"): ns_per_op(lambda d=data: etf.decode(d), number),
            ("decode", "erlang_py"): ns_per_op(lambda d=data: erlang.binary_to_term(d), number),
        }
        for op in ("encode", "decode"):
            ours, py = results[(op, "etf")], results[(op, "erlang_py")]
            beam = otp.get((name, op))
            what = f"{op} {name} ({len(data)} B)"
            rows.append(
                Row(PART, f"{what}: finetune_worker.wire", fmt_ns(ours), f"{py / ours:.2f}x erlang_py's speed",
                    data={"ns": ours})
            )  # fmt: skip
            rows.append(Row(PART, f"{what}: erlang_py", fmt_ns(py), data={"ns": py}))
            rows.append(
                Row(
                    PART,
                    f"{what}: OTP {'term_to_binary' if op == 'encode' else 'binary_to_term'}",
                    fmt_ns(beam) if beam is not None else "n/a",
                    f"etf takes {ours / beam:.1f}x as long" if beam else "",
                    note="" if beam is not None else "erl/erlc not found",
                    data={"ns": beam},
                )
            )
    return rows


def _otp_times(encoded: dict[str, bytes], number: int, opts: Options) -> dict[tuple[str, str], float]:
    if not (shutil.which("erl") and shutil.which("erlc")):
        opts.log("codec: erl/erlc not on PATH, skipping the OTP comparison")
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-etf-") as tmp:
        d = Path(tmp)
        (d / "bench_etf.erl").write_text(_ERL_MODULE)
        subprocess.run(["erlc", "-o", str(d), str(d / "bench_etf.erl")], check=True, capture_output=True)
        paths = []
        for name, data in encoded.items():
            (d / name).write_bytes(data)
            paths.append(str(d / name))
        out = subprocess.run(
            ["erl", "-noshell", "-pa", str(d), "-run", "bench_etf", "main", str(number), *paths],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    times: dict[tuple[str, str], float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            times[(parts[0], "encode")] = float(parts[1])
            times[(parts[0], "decode")] = float(parts[2])
    return times
