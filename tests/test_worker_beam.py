"""The real BEAM drives the worker: an escript opens it as a port, calls, subscribes, shuts it down.

Every frame the worker sends is decoded with ``binary_to_term(Bin, [safe])`` after declaring
only the worker's atom vocabulary (``events.atom_vocabulary()``), as the Elixir bridge does: a reply or
event carrying any other atom fails the test. Events must be addressed to the escript's real
pid (``self()``), which proves pids survive the round trip byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_worker.wire.vocabulary import atom_vocabulary

pytestmark = [pytest.mark.erl, pytest.mark.skipif(shutil.which("escript") is None, reason="needs Erlang/OTP")]

ESCRIPT = r"""#!/usr/bin/env escript
%%! -noshell
main([Python, Marker | Vocabulary]) ->
    _ = [list_to_atom(A) || A <- Vocabulary],
    Port = open_port({spawn_executable, Python},
                     [{args, ["-m", "finetune_worker", "port", "--grace", "1"]},
                      {packet, 4}, binary, exit_status, use_stdio]),
    {ok, Info} = call(Port, 1, finetune_worker, info, []),
    #{version := _, queue_length := 0, devices := [_ | _]} = Info,
    out("INFO", maps:get(pid, Info)),
    {error, {python, Class, Msg, Trace}} = call(Port, 2, os, system, [list_to_binary("touch " ++ Marker)]),
    true = is_binary(Msg) andalso is_binary(Trace),
    out("REFUSED", Class),
    {ok, {error, Issues}} = call(Port, 3, finetune_worker, validate, [#{job => test_steps, steps => -1}]),
    out("ISSUES", [maps:get(path, I) || I <- Issues]),
    Config = <<"{\"job\": \"test_steps\", \"steps\": 3, \"step_seconds\": 0}">>,
    {ok, {ok, JobId}} = call(Port, 4, finetune_worker, submit, [Config, self()]),
    Events = collect(Port, JobId, []),
    out("EVENTS", [T || {T, _} <- Events]),
    {completed, #{summary := #{steps := 3}}} = lists:last(Events),
    {ok, #{state := <<"completed">>, step := 3}} = call(Port, 5, finetune_worker, status, [JobId]),
    {ok, ok} = call(Port, 6, finetune_worker, shutdown, []),
    receive {Port, {exit_status, Status}} -> out("EXIT", Status)
    after 10000 -> out("EXIT", timeout)
    end.

out(Tag, Term) -> io:format("~s ~0p~n", [Tag, Term]).

call(Port, Id, Mod, Fun, Args) ->
    true = port_command(Port, term_to_binary({'C', Id, Mod, Fun, Args}, [{minor_version, 1}])),
    reply(Port, Id).

reply(Port, Id) ->
    receive
        {Port, {data, Bin}} ->
            case binary_to_term(Bin, [safe]) of
                {'r', Id, Result} -> {ok, Result};
                {'e', Id, Error} -> {error, Error};
                {'M', _, _} = Event -> self() ! {stashed, Event}, reply(Port, Id)
            end
    after 30000 -> exit({no_reply, Id})
    end.

collect(Port, JobId, Acc) ->
    Me = self(),
    % Events stashed while waiting for a reply came first: take them before newer frames.
    Next = receive
        {stashed, M} -> M
    after 0 ->
        receive
            {Port, {data, Bin}} -> binary_to_term(Bin, [safe])
        after 30000 -> exit({no_event, lists:reverse(Acc)})
        end
    end,
    {'M', Me, {fine_tuning, JobId, Type, Payload}} = Next,
    true = is_map(Payload),
    case lists:member(Type, [completed, failed, cancelled]) of
        true -> lists:reverse([{Type, Payload} | Acc]);
        false -> collect(Port, JobId, [{Type, Payload} | Acc])
    end.
"""


def test_the_beam_drives_the_worker(tmp_path: Path) -> None:
    script = tmp_path / "drive.escript"
    script.write_text(ESCRIPT)
    marker = tmp_path / "refused-call-ran"
    vocabulary = atom_vocabulary()
    env = dict(os.environ, FINETUNE_WORKER_TEST_JOBS="1")
    out = subprocess.run(
        ["escript", str(script), sys.executable, str(marker), *vocabulary],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["REFUSED"] == "'finetune_worker.errors.CallError'"
    assert not marker.exists()
    assert lines["ISSUES"] == '[<<"steps">>]'
    events = lines["EVENTS"].strip("[]").split(",")
    assert events[:3] == ["queued", "started", "phase"]
    assert events.count("progress") == 3 and events[-1] == "completed"
    assert lines["EXIT"] == "0"
