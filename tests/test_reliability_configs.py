"""Bad configs are refused before anything loads; unwritable output directories that really are.

The cases themselves (invalid JSON, unknown keys, wrong types, out-of-range values, missing
paths, an output_dir holding another run, ...) live in ``test_errors_doc.py``, which runs each
one and checks docs/errors.md against the real message. Tests here run as root in CI, where
permission bits do not stop writes: an unwritable directory is shown with a read-only mount
and with a process that dropped to an unprivileged user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from finetune_worker.testing import WorkerHarness

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "mergekit", "bitsandbytes", "accelerate")


def test_every_rejection_happens_before_anything_heavy_loads(tiny_model_dir: Path) -> None:
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_errors_doc import CONFIG_CASES, run_config_case, scratch_dir
from pathlib import Path
with scratch_dir(Path({str(tiny_model_dir)!r})):
    for case in CONFIG_CASES:
        issues = run_config_case(case)
        assert any(i.path == case.path for i in issues), (case.name, issues)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
print(len(CONFIG_CASES))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, count = out.stdout.strip().splitlines()
    assert loaded == "[]", f"validation imported {loaded}"
    assert int(count) >= 20


def test_the_worker_answers_every_issue_and_stays_idle(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = {
        "model_name": str(tmp_path / "no-model"),
        "training_parameters": {"learning_rate": -1, "batch_size": "x", "lr": 1},
        "dataset": {"path": str(tmp_path / "none.jsonl"), "validation_split": 1.5},
        "quantization": {"bits": 5},
        "output_dir": str(tmp_path / "out"),
    }
    with WorkerHarness() as w:
        for call in ("validate", "submit"):
            result = w.call(call, json.dumps(cfg), *([w.pid] if call == "submit" else []), timeout=60)
            assert str(result[0]) == "error"
            paths = {i["path"] for i in result[1]}
            assert {
                "training_parameters.learning_rate",
                "training_parameters.batch_size",
                "training_parameters.lr",
                "dataset.validation_split",
                "quantization.bits",
            } <= paths, paths
        assert w.call("jobs") == [] and w.call("info")["queue_length"] == 0
        assert w.event_log == []
        assert not (tmp_path / "out").exists()


def _train_config(model: Path, data: Path, out: Path) -> str:
    return json.dumps(
        {"model_name": str(model), "dataset": {"path": str(data)}, "output_dir": str(out), "max_steps": 1}
    )


def test_read_only_file_system_output_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    from finetune_worker.config import parse_job_config
    from finetune_worker.errors import ConfigError

    mnt = tmp_path / "ro"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError):  # really unwritable, even for root
            (mnt / "probe").write_text("x")
        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "hello"}\n')
        with pytest.raises(ConfigError) as err:
            parse_job_config(_train_config(tiny_model_dir, data, mnt / "run"))
        issues = {i.path: i.message for i in err.value.issues}
        assert list(issues) == ["output_dir"] and "not writable" in issues["output_dir"], issues
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unprivileged_user_and_a_0500_directory(tiny_model_dir: Path) -> None:
    """As uid 65534, a root-owned 0500 folder is unwritable: validate refuses output_dir."""
    base = Path(tempfile.mkdtemp(prefix="fw-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        model = base / "model"
        subprocess.run(["cp", "-r", str(tiny_model_dir), str(model)], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
        data = base / "train.jsonl"
        data.write_text('{"text": "hello"}\n')
        data.chmod(0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o500)
        locked.chmod(0o500)
        # Import first: the interpreter's own files need not be readable by uid 65534 here.
        code = (
            "import os, sys, json, argparse, logging; from finetune_worker.cli import main;"
            "from finetune_worker.config import parse_job_config;"
            "import finetune_worker.config.train, finetune_worker.training.checkpoints;"
            "parse_job_config(open(sys.argv[2]).read());"
            "os.setgid(65534); os.setuid(65534); sys.exit(main(['validate', sys.argv[1]]))"
        )
        (base / "warmup.json").write_text(_train_config(model, data, base / "warm"))
        results = {}
        for name, out in (("locked", locked / "run"), ("writable", base / "free")):
            cfg = base / f"{name}.json"
            cfg.write_text(_train_config(model, data, out))
            cfg.chmod(0o644)
            if name == "writable":
                (base / "free").mkdir(mode=0o777)
                (base / "free").chmod(0o777)
            results[name] = subprocess.run(
                [sys.executable, "-c", code, str(cfg), str(base / "warmup.json")],
                capture_output=True,
                text=True,
                timeout=120,
            )
        locked_run = results["locked"]
        assert locked_run.returncode == 2, locked_run.stdout + locked_run.stderr
        assert "output_dir" in locked_run.stdout + locked_run.stderr
        assert "not writable" in locked_run.stdout + locked_run.stderr
        assert results["writable"].returncode == 0, results["writable"].stdout + results["writable"].stderr

        # a model this user may not even look at: a config error, not a crash
        hidden = base / "hidden.json"
        hidden.write_text(_train_config(locked / "model", data, base / "free"))
        hidden.chmod(0o644)
        run = subprocess.run(
            [sys.executable, "-c", code, str(hidden), str(base / "warmup.json")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stdout + run.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
