"""The console script's launch forms and subcommands, run as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_worker.testing import WorkerHarness

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("finetune-worker")
FW = [sys.executable, "-m", "finetune_worker"]
TEST_ENV = dict(os.environ, FINETUNE_WORKER_TEST_JOBS="1")


def fw(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FW, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def write(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


def test_dash_v_prints_a_python_version_line() -> None:
    out = fw("-V")
    assert out.returncode == 0
    assert re.fullmatch(r"Python \d+\.\d+\.\d+\n", out.stdout)


def test_erlport_launch_form_serves_the_port() -> None:
    """What ErlPort's python:start([{python, Path}]) runs, through the installed console script."""
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else FW
    args = ["-u", "-m", "erlport.cli", "--packet=4", "--use_stdio", "--compressed=0", "--buffer_size=65536"]
    with WorkerHarness(command=[*command, *args]) as w:
        info = w.call("info", timeout=30)
        assert info["pid"] == w.proc.pid
        w.close_stdin()
        assert w.wait(10) == 0


@pytest.mark.parametrize("packet", [1, 2])
def test_erlport_form_with_other_packet_sizes_and_compression(packet: int) -> None:
    args = [
        "-u",
        "-m",
        "erlport.cli",
        f"--packet={packet}",
        "--use_stdio",
        "--compressed=6",
        "--buffer_size=16",
    ]
    with WorkerHarness(command=[*FW, *args], packet=packet) as w:
        assert w.call("ping", timeout=30) == "pong"
        assert w.call("info")["queue_length"] == 0  # a reply big enough to be compressed


def test_nouse_stdio_serves_fds_3_and_4() -> None:
    """``--nouse_stdio``: frames on fds 3 (in) and 4 (out); stdout stays free for logs."""
    from finetune_worker.wire import Atom, decode, encode

    to_worker_r, to_worker_w = os.pipe()
    from_worker_r, from_worker_w = os.pipe()
    proc = subprocess.Popen(
        [*FW, "port", "--nouse_stdio"],
        pass_fds=(3, 4),
        preexec_fn=lambda: (os.dup2(to_worker_r, 3), os.dup2(from_worker_w, 4)),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_worker_r)
    os.close(from_worker_w)
    try:
        payload = encode((Atom("C"), 1, Atom("finetune_worker"), Atom("ping"), []))
        os.write(to_worker_w, len(payload).to_bytes(4, "big") + payload)
        with os.fdopen(from_worker_r, "rb") as f:
            size = int.from_bytes(f.read(4), "big")
            assert decode(f.read(size)) == (Atom("r"), 1, Atom("pong"))
            os.close(to_worker_w)
            assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_schema_prints_json() -> None:
    out = fw("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["oneOf"] and "test_steps" not in out.stdout


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`finetune-worker schema | head`: the closed pipe ends the program quietly."""
    proc = subprocess.Popen([*FW, "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)
    proc.stdout.close()  # as `head -c 10` does
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_validate_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", {"job": "test_steps", "steps": 2})
    bad = write(tmp_path / "bad.json", {"job": "test_steps", "steps": -2, "oops": True})
    ok = fw("validate", good, env=TEST_ENV)
    assert ok.returncode == 0 and "valid test_steps config" in ok.stdout
    fail = fw("validate", bad, env=TEST_ENV)
    assert fail.returncode == 2
    assert "steps:" in fail.stdout and "oops:" in fail.stdout
    missing = fw("validate", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and "cannot read config file" in missing.stdout


def test_run_json_completes(tmp_path: Path) -> None:
    config = write(
        tmp_path / "job.json",
        {
            "job": "test_steps",
            "steps": 3,
            "step_seconds": 0.0,
            "write_stdout": True,
            "output_dir": str(tmp_path / "o"),
        },
    )
    out = fw("run", config, "--json", env=TEST_ENV)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]  # only JSON lines: junk went to stderr
    types = [e["type"] for e in events]
    assert types[0] == "queued" and types[-1] == "completed"
    assert types.count("progress") == 3
    assert events[-1]["payload"]["outputs"]["path"].endswith("result.json")
    assert "via printf" in out.stderr and "via echo" in out.stderr


def test_run_json_failure_exits_1(tmp_path: Path) -> None:
    config = write(
        tmp_path / "job.json", {"job": "test_steps", "steps": 4, "step_seconds": 0, "fail_at_step": 2}
    )
    out = fw("run", config, "--json", env=TEST_ENV)
    assert out.returncode == 1
    last = json.loads(out.stdout.splitlines()[-1])
    assert last["type"] == "failed" and last["payload"]["error"] == "internal_error"


def test_run_invalid_config_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path / "job.json", {"job": "test_steps", "steps": "many"})
    out = fw("run", config, env=TEST_ENV)
    assert out.returncode == 2 and "steps" in out.stderr


def test_run_rich_display_shows_summary(tmp_path: Path) -> None:
    config = write(tmp_path / "job.json", {"job": "test_steps", "steps": 2, "step_seconds": 0})
    out = fw("run", config, env=TEST_ENV)
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout and "steps" in out.stdout


def test_run_ctrl_c_cancels_then_exits_130(tmp_path: Path) -> None:
    config = write(tmp_path / "job.json", {"job": "test_steps", "steps": 100000, "step_seconds": 0.02})
    proc = subprocess.Popen(
        [*FW, "run", config, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=TEST_ENV,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["type"] == "progress":
                break
        proc.send_signal(signal.SIGINT)
        rest = [json.loads(line) for line in proc.stdout]
        assert proc.wait(20) == 130
        assert rest[-1]["type"] == "cancelled" and rest[-1]["payload"]["step"] >= 1
    finally:
        proc.kill()
        proc.wait()


def test_port_subcommand_help_lists_the_options() -> None:
    out = fw("port", "--help")
    assert out.returncode == 0
    for flag in ("--packet", "--use_stdio", "--nouse_stdio", "--compressed", "--buffer_size", "--grace"):
        assert flag in out.stdout
    assert fw("--help").returncode == 0


def test_make_tiny_model(tmp_path: Path) -> None:
    out = fw("make-tiny-model", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("tiny")
    assert (tmp_path / "tiny" / "config.json").is_file()
