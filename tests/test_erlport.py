"""The worker through clients nobody here wrote: ErlPort's own Erlang client, on OTP 25 and OTP 28.

``tests/erlang/erlport_suite.erl`` is an ErlPort user's code: ``python:start([{python, Worker}])``,
``submit(Cfg, self())`` with the pid ErlPort wraps as ``{'$erlport.opaque', erlang, Bin}``, a real
tiny training run whose every event must reach the caller in order, cancel by call and by
``python:cast/2`` (each ends ``cancelled`` with a checkpoint on disk), a bad config, call
arguments Python cannot hold (an error reply, not a hang), and ``python:stop/1`` leaving no OS
process. ``tests/erlang/safe_decode.erl`` is a plain Erlang client on a fresh node: one
``file:consult/1`` of ``docs/finetune_worker_atoms.eterm`` must let it decode every frame of a
training job with ``binary_to_term(B, [safe])`` (and the same frames must be refused before).

ErlPort (``../shared/vendor/erlport``, BSD-3, third-party) and the OTP 28 runtime
(``../shared/tools/otp28.sh``) come from ``../shared``; without it these tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO

SHARED = REPO.parent / "shared"
ERLANG_TESTS = REPO / "tests" / "erlang"
ATOMS_FILE = REPO / "docs" / "finetune_worker_atoms.eterm"
WORKER = str(Path(sys.executable).parent / "finetune-worker")

pytestmark = [
    pytest.mark.erl,
    pytest.mark.skipif(shutil.which("erlc") is None, reason="needs Erlang/OTP (apt-get install erlang-dev)"),
    pytest.mark.skipif(
        not (SHARED / "vendor" / "erlport").is_dir(),
        reason=f"needs ../shared (ErlPort's Erlang client and the OTP 28 runtime); {SHARED} is absent",
    ),
]


@pytest.fixture(scope="module")
def ebin(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(ErlPort's ebin, our test modules' ebin), both compiled by this machine's erlc (OTP 25)."""
    out = tmp_path_factory.mktemp("erlport")
    built = subprocess.run(
        ["bash", str(SHARED / "vendor" / "build-erlport.sh"), str(out / "erlport")],
        capture_output=True,
        text=True,
        check=True,
    )
    ours = out / "suite"
    ours.mkdir()
    subprocess.run(["erlc", "-o", str(ours), *map(str, ERLANG_TESTS.glob("*.erl"))], check=True)
    return built.stdout.strip().splitlines()[-1], str(ours)


@pytest.fixture(scope="module")
def otp28() -> str:
    """The root of an OTP 28 runtime (downloaded from the package registry once, then cached)."""
    done = subprocess.run(
        ["bash", str(SHARED / "tools" / "otp28.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "FTW_PYTHON": sys.executable},
        timeout=600,
    )
    assert done.returncode == 0, f"otp28.sh failed:\n{done.stderr[-2000:]}"
    return done.stdout.strip().splitlines()[-1]


def _erl(otp: str, otp28_root: str) -> str:
    return "erl" if otp == "25" else str(Path(otp28_root) / "bin" / "erl")


def _erl_command(otp: str, otp28_root: str, *ebins: str) -> list[str]:
    return [_erl(otp, otp28_root), "-noshell", *(arg for ebin in ebins for arg in ("-pa", ebin))]


def _train_config(model: Path, out: Path, **over: object) -> dict[str, object]:
    config: dict[str, object] = {
        "job": "train",
        "model_name": str(model),
        "output_dir": str(out),
        "dataset": {"path": str(DATA / "conversations.jsonl"), "validation_split": 0.1},
        "data": {"max_seq_length": 128},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "training_parameters": {"batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
        "max_steps": 4,
        "checkpoint": {"every_steps": 2, "keep": 1},
        "overwrite": True,
        "seed": 7,
    }
    config.update(over)
    return config


def _write(path: Path, config: dict[str, object]) -> str:
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FINETUNE_WORKER_LOG_LEVEL": "WARNING",
        "FINETUNE_WORKER_GRACE": "5",
        "ERL_CRASH_DUMP_SECONDS": "0",  # a failing run must not leave erl_crash.dump in the repo
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.mark.parametrize("otp", ["25", "28"])
def test_erlport_client_end_to_end(
    otp: str, otp28: str, ebin: tuple[str, str], tiny_model_dir: Path, tmp_path: Path
):
    erlport_ebin, suite_ebin = ebin
    train = _write(tmp_path / "train.json", _train_config(tiny_model_dir, tmp_path / "short"))
    long = _write(
        tmp_path / "long.json",
        _train_config(tiny_model_dir, tmp_path / "long", max_steps=400, checkpoint={"every_steps": 1000}),
    )
    grpo_config = _train_config(
        tiny_model_dir,
        tmp_path / "grpo",
        dataset={"path": str(DATA / "qa.jsonl"), "validation_split": 0},
        preference={
            "method": "grpo",
            "max_completion_length": 6,
            "rewards": [{"type": "beam", "timeout_s": 60}],
        },
        max_steps=2,
    )
    grpo = _write(tmp_path / "grpo.json", grpo_config)
    done = _run(
        [
            *_erl_command(otp, otp28, erlport_ebin, suite_ebin),
            "-run",
            "erlport_suite",
            "main",
            WORKER,
            train,
            long,
            grpo,
        ],
        timeout=600,
    )
    report = done.stdout + done.stderr
    failures = [line for line in report.splitlines() if line.startswith("FAIL")]
    assert not failures, report[-6000:]
    assert re.search(rf"^DONE (\d+)/\1 on OTP {otp}$", done.stdout, re.M), report[-6000:]
    assert done.returncode == 0, report[-6000:]


def _results(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^RESULT (\w+) (.*)$", stdout, re.M))


@pytest.mark.parametrize("otp", ["28", "25"])
def test_fresh_node_decodes_every_frame_safely_after_one_consult(
    otp: str, otp28: str, ebin: tuple[str, str], tiny_model_dir: Path, tmp_path: Path
):
    _, suite_ebin = ebin
    config = _train_config(
        tiny_model_dir,
        tmp_path / "run",
        evaluation={"max_rows": 2, "samples": 1, "generation": {"max_new_tokens": 4}},
    )
    train = _write(tmp_path / "train.json", config)
    done = _run(
        [
            _erl(otp, otp28),
            "-noshell",
            "-pa",
            suite_ebin,
            "-run",
            "safe_decode",
            "main",
            WORKER,
            str(ATOMS_FILE),
            train,
        ],
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    got = _results(done.stdout)
    assert got["before_consult"] == "refused", (
        "the frames must need the declared atoms, or this proves nothing"
    )
    assert got["failures"] == "0", done.stdout
    assert int(got["frames"]) > 20
    types = set(re.findall(r'"(\w+)"', got["event_types"]))
    assert {
        "queued",
        "started",
        "phase",
        "progress",
        "metrics",
        "eval",
        "checkpoint",
        "log",
        "completed",
    } <= types
    assert set(re.findall(r'"(\w+)"', got["reply_tags"])) == {"r", "e"}


def test_atoms_file_is_current():
    """docs/finetune_worker_atoms.eterm is what `finetune-worker atoms` prints today."""
    from finetune_worker.cli import atoms_file

    assert ATOMS_FILE.read_text(encoding="utf-8") == atoms_file(), (
        "regenerate it: .venv/bin/finetune-worker atoms > docs/finetune_worker_atoms.eterm"
    )
