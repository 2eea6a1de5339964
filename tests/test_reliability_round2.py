"""Reliability and security, round 2: what an outside red team broke, each case replayed.

(Huge integers in any peer term and NaN call ids: ``test_worker_answers.py``; config wire forms,
FIFOs and BOMs: ``test_config_forms.py``; secrets in tracking URIs: ``test_security_secrets.py``
and ``test_tracking.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from conftest import PAST_PREVIEW, rows_with_bad_row
from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.security import ENV_ROOTS
from finetune_worker.testing import WorkerHarness
from finetune_worker.wire import ETFDecodeError, decode
from test_train_helpers import DATA, run_job, tiny_config


def _issues(config: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_job_config(config if isinstance(config, str) else json.dumps(config))
    return {i.path: i.message for i in err.value.issues}


# ---- 2. decoder amplification --------------------------------------------------------------


def _compressed(body: bytes) -> bytes:
    return b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body, 9)


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_a_small_compressed_frame_cannot_make_the_decoder_build_gigabytes(shape: str) -> None:
    if shape == "flat":  # [[], [], ...]: 8 million empty lists
        n = 8_000_000
        body = b"l" + struct.pack(">I", n) + b"j" * n + b"j"
    else:  # [[[]], [[]], ...]: each element two terms, no length that gives it away up front
        n = 1_500_000
        body = b"l" + struct.pack(">I", n) + b"l\x00\x00\x00\x01jj" * n + b"j"
    frame = _compressed(body)
    assert len(frame) < 64 * 1024
    started = time.monotonic()
    with pytest.raises(ETFDecodeError, match="max_terms"):
        decode(frame)
    assert time.monotonic() - started < 5  # the main thread is back to answering calls
    tracemalloc.start()
    try:
        with pytest.raises(ETFDecodeError, match="max_terms"):
            decode(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"  # before the bound: 634 MiB for an 8 KiB frame


def test_the_worker_answers_right_after_a_decoder_bomb() -> None:
    n = 8_000_000
    with WorkerHarness() as w:
        w.send_frame(_compressed(b"l" + struct.pack(">I", n) + b"j" * n + b"j"))
        started = time.monotonic()
        assert w.call("ping", timeout=10) == "pong"
        assert time.monotonic() - started < 5
        assert "max_terms" in w.stderr_text()


# ---- 3. a MergeKit YAML alias bomb ------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {tiny_model_dir}\n"
        "    parameters:\n      weight:\n" + "".join(f"        {line}\n" for line in lines)
    )
    assert bomb.stat().st_size < 1000
    started = time.monotonic()
    got = _issues({"yaml_config_path": str(bomb), "output_dir": str(tmp_path / "out")})
    assert time.monotonic() - started < 2
    assert "expands to more than" in got["yaml_config_path"]


# ---- 4, 5. outputs never overlap inputs; foreign folders are not ours to fill -----------------


@pytest.fixture
def root(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An allowed root holding a base model, an adapter trained on it, and a dataset."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, root / "base")
    shutil.copy(DATA / "qa.jsonl", root / "data" / "qa.jsonl")
    run = run_job(
        tiny_config(
            root / "base",
            root / "runs" / "lora",
            "qa.jsonl",
            max_steps=1,
            dataset={"path": str(root / "data" / "qa.jsonl"), "validation_split": 0},
        )
    )
    assert run.terminal.type == "completed", run.terminal.payload
    monkeypatch.setenv(ENV_ROOTS, str(root))
    return root


def test_a_merge_may_not_replace_a_folder_holding_its_inputs(root: Path) -> None:
    base, adapter = root / "base", root / "runs" / "lora"
    for output, why in (
        (root, "is an allowed root itself"),
        (root / "runs", "contains the job's input adapter_path"),
        (adapter, "is the job's input adapter_path"),
        (base / "merged", "lies inside the job's input base_model_path"),
    ):
        got = _issues(
            {
                "base_model_path": str(base),
                "adapter_path": str(adapter),
                "output_path": str(output),
                "overwrite": True,
            }
        )
        assert why in got["output_path"], (output, got)
    yaml_path = root / "linear.yaml"
    yaml_path.write_text(
        f"models:\n  - model: {base}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\ndtype: float32\n"
    )
    got = _issues({"yaml_config_path": str(yaml_path), "output_dir": str(root), "overwrite": True})
    assert "contains the job's input" in got["output_dir"] or "allowed root" in got["output_dir"]
    # Nothing was touched.
    assert (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file()
    assert (root / "data" / "qa.jsonl").is_file()


def test_a_merge_checks_again_when_it_starts(root: Path) -> None:
    from finetune_worker.errors import JobFailed
    from finetune_worker.outputs import check_destination

    with pytest.raises(JobFailed, match="contains the job's input"):
        check_destination(
            root / "runs",
            overwrite=True,
            key="output_path",
            inputs=[("adapter_path", root / "runs" / "lora")],
        )


def test_training_never_writes_into_its_model_or_a_foreign_folder(root: Path) -> None:
    base = root / "base"
    data = {"path": str(root / "data" / "qa.jsonl"), "validation_split": 0}
    for output in (base, base / "run"):
        got = _issues(tiny_config(base, output, dataset=data, overwrite=True))
        assert "the job's input model_name" in got["output_dir"], got
    foreign = root / "notes"
    foreign.mkdir()
    (foreign / "README.md").write_text("my notes")
    got = _issues(tiny_config(base, foreign, dataset=data))
    assert "not a run of this worker (README.md" in got["output_dir"], got
    assert (
        parse_job_config(json.dumps(tiny_config(base, foreign, dataset=data, overwrite=True)))[0] == "train"
    )


# ---- 6. one job per output folder -------------------------------------------------------------


def test_two_workers_on_one_output_dir_the_second_fails_naming_the_first(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shared-run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=400, checkpoint={"every_steps": 1000}, resume="auto")
    with WorkerHarness() as a, WorkerHarness() as b:
        _, first = a.call("submit", json.dumps(cfg), a.pid, timeout=60)
        a.wait_for(first, "progress", timeout=120)
        _, second = b.call("submit", json.dumps(cfg), b.pid, timeout=60)
        end = b.wait_for(second, "terminal", timeout=60)[-1]
        assert end.type == "failed" and end.payload["error"] == "output_dir_conflict", end.payload
        assert f"pid {a.proc.pid}" in end.payload["message"], end.payload
        a.call("cancel", first)
        assert a.wait_for(first, "terminal", timeout=120)[-1].type == "cancelled"
    # The lock went with the job: a third run takes the folder (and resumes the cancelled one).
    done = run_job(dict(cfg, max_steps=1 + max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))))
    assert done.terminal.type == "completed", done.terminal.payload


def test_a_merge_lock_frees_a_dead_merges_staging_even_with_its_pid_alive(root: Path) -> None:
    from finetune_worker.outputs import StagedOutput

    dest = root / "merged"
    # A folder a dead worker left, named after a pid that is alive (ours: a container reuses pids).
    stale = root / f".merged.merging-{os.getpid()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with StagedOutput(dest, overwrite=False, key="output_path") as stage:
        assert not stale.exists()
        assert stage.path is not None
        (stage.path / "x").write_text("1")
        with pytest.raises(Exception, match="another merge is writing"):
            StagedOutput(dest, overwrite=False, key="output_path").__enter__()
        stage.publish()
    assert (dest / "x").is_file()


# ---- 7. a checkpoint re-saved at an existing step -------------------------------------------


def test_resaving_a_checkpoint_never_leaves_a_half_deleted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_worker.training import checkpoints as ckpt

    out = tmp_path / "run"
    for step in (4, 8):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"old weights")
    staged = ckpt.staging_dir(out) / "checkpoint-8"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("{}")
    (staged / "adapter_model.safetensors").write_bytes(b"new weights")

    real_replace, calls = os.replace, []

    def dies_after_the_first_rename(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        real_replace(src, dst)
        if len(calls) == 1:
            raise SystemExit("SIGKILL")  # the process is gone right after moving the old one out

    monkeypatch.setattr(ckpt.os, "replace", dies_after_the_first_rename)
    with pytest.raises(SystemExit):
        ckpt.publish(staged, out)
    monkeypatch.undo()
    old = out / "checkpoint-8"
    assert not old.exists() or (old / "adapter_model.safetensors").read_bytes() in (
        b"old weights",
        b"new weights",
    )
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-4"  # never a checkpoint-8 without its weights


# ---- 8. a link swapped between submit and start -----------------------------------------------


def test_a_symlink_swapped_while_queued_cannot_lead_out_of_the_root(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    shutil.copytree(tiny_model_dir, root / "model")
    link = root / "out"
    link.symlink_to(root / "real")
    cfg = tiny_config(
        root / "model", link, max_steps=1, dataset={"path": str(DATA / "qa.jsonl"), "validation_split": 0}
    )
    shutil.copy(DATA / "qa.jsonl", root / "qa.jsonl")
    cfg["dataset"]["path"] = str(root / "qa.jsonl")
    env = {k: v for k, v in os.environ.items() if k != ENV_ROOTS}
    with WorkerHarness(["--allowed-root", str(root)], env=env, test_jobs=True) as w:
        _, blocker = w.call(
            "submit", json.dumps({"job": "test_steps", "steps": 30, "step_seconds": 0.1}), w.pid
        )
        ok, job = w.call("submit", json.dumps(cfg), w.pid, timeout=60)
        assert ok == "ok"
        link.unlink()
        link.symlink_to(outside)
        end = w.wait_for(job, "terminal", timeout=120)[-1]
        w.wait_for(blocker, "terminal", timeout=60)
    assert end.type == "failed" and end.payload["error"] == "invalid_config", end.payload
    assert "since submit" in end.payload["message"] and "output_dir" in end.payload["message"]
    assert list(outside.iterdir()) == []


# ---- 9. one enormous dataset row ------------------------------------------------------------


def test_an_enormous_chat_row_is_a_named_bad_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    huge = {"question": "x" * 2_000_000, "answer": "a"}
    early = rows_with_bad_row(tmp_path / "early.jsonl", huge, at=2, rows=3)
    with pytest.raises(ConfigError, match=r"row 2: its messages hold 2,000,\d{3} characters"):
        parse_job_config(tiny_config(tiny_model_dir, tmp_path / "o", dataset={"path": str(early)}))
    data = rows_with_bad_row(tmp_path / "huge.jsonl", huge)  # past what validate reads
    run = run_job(
        tiny_config(
            tiny_model_dir, tmp_path / "o", dataset={"path": str(data), "validation_split": 0}, max_steps=1
        )
    )
    assert run.terminal.type == "failed" and run.terminal.payload["error"] == "bad_dataset_row"
    assert f"row {PAST_PREVIEW}" in run.terminal.payload["message"]
    assert "characters" in run.terminal.payload["message"]


def test_a_long_raw_text_row_is_tokenized_in_pieces(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from finetune_worker.config.data import DataConfig
    from finetune_worker.training.data import ChatEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = ("The cat sat on the mat. " * 60_000)[:1_400_000]
    encoder = ChatEncoder(tokenizer, DataConfig(max_seq_length=128))
    (pieces,) = encoder._tokenize_texts([text])
    (whole,) = [list(ids) for ids in tokenizer([text])["input_ids"]]
    # Cut at whitespace: the same tokens, give or take the one word at the cut.
    assert (
        abs(len(pieces) - len(whole)) <= 2
        and pieces[:1000] == whole[:1000]
        and pieces[-1000:] == whole[-1000:]
    )


# ---- 11. numbers that break the job ------------------------------------------------------------


def test_non_finite_and_out_of_range_numbers_are_config_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "o")
    text = json.dumps(raw).replace('"learning_rate": 0.005', '"learning_rate": Infinity')
    text = text.replace('"epochs": 1', '"epochs": NaN').replace('"seed": 7', f'"seed": {2**64}')
    raw2 = dict(raw, training_parameters={**raw["training_parameters"], "warmup_steps": float("inf")})
    got = _issues(text)
    assert {"training_parameters.learning_rate", "training_parameters.epochs", "seed"} <= set(got), got
    assert "finite" in got["training_parameters.learning_rate"]
    assert "finite" in _issues(json.dumps(raw2))["training_parameters.warmup_steps"]


def test_a_loss_that_turns_nan_fails_the_job_and_saves_nothing_nan(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nan"
    tp = {"epochs": 1, "batch_size": 8, "learning_rate": 1e6, "logging_steps": 5, "max_grad_norm": 0}
    run = run_job(
        tiny_config(
            tiny_model_dir,
            out,
            max_steps=20,
            training_parameters=tp,
            checkpoint={"every_steps": 1, "keep": 50},
        )
    )
    assert run.terminal.type == "failed" and run.terminal.payload["error"] == "training_diverged", (
        run.terminal.payload
    )
    assert not (out / "adapter_model.safetensors").exists()
    import torch
    from safetensors.torch import load_file

    for ckpt in out.glob("checkpoint-*"):
        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), ckpt


# ---- 12. smaller ones ------------------------------------------------------------------------


def test_no_queued_event_after_a_jobs_terminal_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner re-sends queue positions from a snapshot; a cancel landing meanwhile must end the job last."""
    monkeypatch.setenv("FINETUNE_WORKER_TEST_JOBS", "1")
    from finetune_worker.server.jobs import JobManager
    from finetune_worker.testing.testjobs import TestStepsConfig

    events: list[tuple[str, str]] = []
    jobs: dict[str, str] = {}
    cancelling: list[threading.Thread] = []

    def sink(record: Any, event: Any) -> None:
        events.append((event.job_id, event.type))
        # When the runner re-sends the second waiting job's position, cancel the third from another
        # thread, as a BEAM call would, and give it time to finish before the runner goes on.
        if event.type == "queued" and event.payload.get("position") == 2 and not cancelling and "c" in jobs:
            t = threading.Thread(target=manager.cancel, args=(jobs["c"],))
            cancelling.append(t)
            t.start()
            t.join(0.5)

    manager = JobManager(sink, job_prefix="t")
    try:
        jobs["a"] = manager.submit("test_steps", TestStepsConfig(job="test_steps", steps=3, step_seconds=0.2))
        jobs["b"] = manager.submit("test_steps", TestStepsConfig(job="test_steps", steps=1, step_seconds=0))
        jobs["c"] = manager.submit("test_steps", TestStepsConfig(job="test_steps", steps=1, step_seconds=0))
        deadline = time.monotonic() + 30
        while not all(
            any(j == job and t in ("completed", "cancelled") for j, t in events) for job in jobs.values()
        ):
            assert time.monotonic() < deadline, events
            time.sleep(0.05)
    finally:
        manager.close(5)
    assert cancelling, "the race was not set up"
    for job in jobs.values():
        mine = [t for j, t in events if j == job]
        ends = [i for i, t in enumerate(mine) if t in ("completed", "failed", "cancelled")]
        assert len(ends) == 1 and ends[0] == len(mine) - 1, (job, mine)


def test_malformed_input_gets_config_errors_not_internal_errors(tmp_path: Path) -> None:
    base = {
        "job": "train",
        "model_name": "/m",
        "output_dir": str(tmp_path / "o"),
        "dataset": {"path": "/d.jsonl"},
    }
    cases = {
        "deep JSON": "[" * 100_000 + "]" * 100_000,
        "a 5,000-digit number": '{"job": "train", "seed": ' + "9" * 5000 + "}",
        "a 5,000-character path": json.dumps({**base, "model_name": "/" + "m" * 5000}),
        "a NUL byte in a path": json.dumps({**base, "output_dir": "/tmp/a\u0000b"}),
        "a million unknown keys": json.dumps({**base, **{f"k{i}": 1 for i in range(1_000_000)}}),
        # One per line: the lines of a big multi-line document are looked up within the bound.
        "18,000 unknown keys, one per line": json.dumps(
            {**base, **{f"k{i}": 1 for i in range(18_000)}}, indent=1
        ),
    }
    with WorkerHarness() as w:
        for what, text in cases.items():
            started = time.monotonic()
            reply = w.call("validate", text, timeout=60)
            assert isinstance(reply, tuple) and reply[0] == "error", (what, reply)
            assert time.monotonic() - started < 10, what
        assert w.call("ping") == "pong"


def test_pickle_only_weights_are_an_unsupported_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import pickle

    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model / name)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    run = run_job(tiny_config(model, tmp_path / "o", max_steps=1), timeout=120)
    assert run.terminal.type == "failed" and run.terminal.payload["error"] == "unsupported_model", (
        run.terminal.payload
    )
    assert not marker.exists()


def test_a_full_disk_during_merge_lora_is_disk_full(
    root: Path, tmpfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmpfs("1m")
    monkeypatch.setenv(ENV_ROOTS, f"{root}{os.pathsep}{small}")
    run = run_job(
        {
            "base_model_path": str(root / "base"),
            "adapter_path": str(root / "runs" / "lora"),
            "output_path": str(small / "merged"),
        }
    )
    assert run.terminal.type == "failed" and run.terminal.payload["error"] == "disk_full", (
        run.terminal.payload
    )
    assert (
        not (small / "merged").exists()
        and [p.name for p in small.iterdir() if not p.name.endswith(".lock")] == []
    )


def test_the_job_table_keeps_a_bounded_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_WORKER_TEST_JOBS", "1")
    from finetune_worker.server import jobs as jobs_module
    from finetune_worker.testing.testjobs import TestStepsConfig

    monkeypatch.setattr(jobs_module, "MAX_FINISHED_JOBS", 5)
    done = threading.Event()
    ends: list[str] = []

    def sink(record: Any, event: Any) -> None:
        if event.terminal:
            ends.append(event.job_id)
            if len(ends) == 12:
                done.set()

    manager = jobs_module.JobManager(sink, job_prefix="t")
    try:
        ids = [manager.submit("test_steps", TestStepsConfig(job="test_steps", steps=0)) for _ in range(12)]
        assert done.wait(30)
        last = manager.submit("test_steps", TestStepsConfig(job="test_steps", steps=0))
        kept = [s["job_id"] for s in manager.jobs()]
    finally:
        manager.close(5)
    assert kept[-1] == last and len(kept) <= 6 and kept[:-1] == ids[-len(kept) + 1 :]
