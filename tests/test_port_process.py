"""The port in real processes: stdio hygiene in a child worker, and a real BEAM (escript) driving
an echo worker over use_stdio/nouse_stdio with {packet, 1|2|4}."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from finetune_worker.wire import Atom, encode
from finetune_worker.wire.port import Port

REPO = Path(__file__).resolve().parents[1]


def frame(payload: bytes, packet: int = 4) -> bytes:
    return len(payload).to_bytes(packet, "big") + payload


def drain(data: bytes, packet: int) -> list[object]:
    """Decode every frame of ``data`` through a real Port on a pipe."""
    r, w = os.pipe()

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
        os.close(w)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    port = Port(r, -1, packet=packet)
    terms = []
    while (term := port.receive()) is not None:
        terms.append(term)
    writer.join()
    os.close(r)
    return terms


# --- stdio hygiene in a real child process ------------------------------------------------

NOISY_CHILD = textwrap.dedent(
    """
    import ctypes, os, subprocess, sys
    from finetune_worker.wire.port import open_port

    port = open_port(packet={packet})
    print("print() output")
    os.write(1, b"os.write(1) output\\n")
    libc = ctypes.CDLL(None)
    libc.printf(b"C printf output\\n")
    libc.fflush(None)
    subprocess.run(["echo", "child process output"], check=True)
    subprocess.run(["cat"], check=True)  # would swallow our frames if it inherited the real stdin
    assert not os.get_inheritable(port.in_fd) and not os.get_inheritable(port.out_fd)
    # A grandchild lists the inodes behind its fds: the frame pipes must not be among them.
    frame_pipes = {{os.fstat(port.in_fd).st_ino, os.fstat(port.out_fd).st_ino}}
    lister = "import os, contextlib\\nfor fd in os.listdir('/proc/self/fd'):\\n    with contextlib.suppress(OSError): print(os.fstat(int(fd)).st_ino)"
    seen = subprocess.run([sys.executable, "-c", lister], close_fds=False, capture_output=True, text=True)
    assert seen.stdout.split() and frame_pipes.isdisjoint(map(int, seen.stdout.split())), seen
    while (term := port.receive()) is not None:
        print("got", term)
        port.send(("echo", term))
    """
)


@pytest.mark.parametrize("packet", [1, 4])
def test_stdio_is_protected_in_a_real_worker_process(packet: int) -> None:
    frames = b"".join(frame(encode(t), packet) for t in (1, "two", (Atom("three"),)))
    proc = subprocess.run(
        [sys.executable, "-c", NOISY_CHILD.format(packet=packet)],
        input=frames,
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    replies = drain(proc.stdout, packet)
    assert replies == [("echo", 1), ("echo", "two"), ("echo", (Atom("three"),))]
    noise = proc.stderr.decode()
    for text in (
        "print() output",
        "os.write(1) output",
        "C printf output",
        "child process output",
        "got two",
    ):
        assert text in noise


# --- a real BEAM on the other end -----------------------------------------------------------

BEAM_SCRIPT = r"""
main([Python, Script]) ->
    Terms = [ok, 1, -(1 bsl 100), 1.5, <<"héllo"/utf8>>, [1, 2 | t], {a, #{b => [c]}},
             list_to_tuple(lists:seq(1, 300)), self(), make_ref(), binary:copy(<<"z">>, 200000)],
    Variants = [{use_stdio, 4}, {use_stdio, 2}, {use_stdio, 1}, {nouse_stdio, 4}],
    [run(Python, Script, Stdio, Packet, Terms) || {Stdio, Packet} <- Variants],
    halt(0).

run(Python, Script, Stdio, Packet, Terms0) ->
    Terms = [T || T <- Terms0, byte_size(term_to_binary(T)) < (1 bsl (8 * Packet))],
    Args = [Script, atom_to_list(Stdio), integer_to_list(Packet)],
    Port = open_port({spawn_executable, Python},
                     [{args, Args}, {packet, Packet}, binary, exit_status, Stdio]),
    Results = [begin
                   Port ! {self(), {command, term_to_binary(T)}},
                   receive
                       {Port, {data, Bin}} -> binary_to_term(Bin) =:= {echo, T};
                       {Port, {exit_status, S}} -> {exited, S}
                   after 20000 -> timeout
                   end
               end || T <- Terms],
    port_close(Port),
    Status = case lists:all(fun(R) -> R =:= true end, Results) of
                 true -> ok;
                 false -> io_lib:format("~w", [Results])
             end,
    io:format("~s_~w ~s~n", [Stdio, Packet, Status]).
"""

ECHO_WORKER = """
import sys
from finetune_worker.wire import Atom
from finetune_worker.wire.port import open_port

port = open_port(use_stdio=sys.argv[1] == "use_stdio", packet=int(sys.argv[2]))
print("noise on stdout")  # must not reach the BEAM as a frame
while (term := port.receive()) is not None:
    port.send((Atom("echo"), term))
"""


@pytest.mark.erl
@pytest.mark.skipif(shutil.which("escript") is None, reason="needs Erlang/OTP (escript) on PATH")
def test_real_beam_talks_to_the_port(tmp_path: Path) -> None:
    script = tmp_path / "beam.escript"
    script.write_text(BEAM_SCRIPT, encoding="utf-8")
    worker = tmp_path / "echo_worker.py"
    worker.write_text(ECHO_WORKER)
    proc = subprocess.run(
        ["escript", str(script), sys.executable, str(worker)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # With nouse_stdio fd 1 carries no frames, so the worker's print() lands on the escript's stdout.
    verdicts = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("use_", "nouse_"))
    )
    assert proc.stderr.count("noise on stdout") == 3  # the use_stdio workers: print() went to stderr
    assert verdicts == {v: "ok" for v in ("use_stdio_4", "use_stdio_2", "use_stdio_1", "nouse_stdio_4")}, (
        proc.stdout + proc.stderr
    )
