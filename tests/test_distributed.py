"""Multi-process training: the ``distributed`` config, the relay channel, and a 2-rank DDP job.

The DDP test runs real torchrun process groups (gloo on CPU) through the real worker; it
compares them with a single-process run of the same global batch (see the test's docstring
for exactly what is compared and why the tolerance is what it is).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_worker.config import parse_job_config
from finetune_worker.config.distributed import DistributedConfig
from finetune_worker.config.train import TrainConfig
from finetune_worker.errors import ConfigError
from finetune_worker.testing import HarnessEvent, WorkerHarness
from finetune_worker.training.distributed.relay import (
    FrameReader,
    RelayClient,
    RelayError,
    RelayServer,
    encode_frame,
)
from test_train_helpers import DATA, tiny_config


def issue_paths(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_job_config(json.dumps(raw))
    return {i["path"]: i["message"] for i in info.value.to_terms()}


# ---- config ------------------------------------------------------------------------------------


def test_promised_block_validates_as_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    for backend in ("gloo", "nccl"):
        raw = tiny_config(tiny_model_dir, tmp_path / backend)
        raw["distributed"] = {"nproc_per_node": 2, "backend": backend}
        kind, cfg = parse_job_config(json.dumps(raw))
        assert kind == "train" and cfg.distributed is not None
        assert (cfg.distributed.nproc_per_node, cfg.distributed.backend) == (2, backend)
        assert cfg.distributed.strategy == "ddp" and cfg.distributed.world_size == 2


def test_bad_distributed_blocks_name_their_fields(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "out")
    raw["distributed"] = {"nproc_per_node": 0, "backend": "mpi", "gpus": 2}
    found = issue_paths(raw)
    assert set(found) >= {"distributed.nproc_per_node", "distributed.backend", "distributed.gpus"}

    raw["distributed"] = {"nproc_per_node": 2, "nnodes": 2, "node_rank": 2}
    found = issue_paths(raw)
    assert "below nnodes" in found["distributed.node_rank"]
    assert "explicit master_port" in found["distributed.master_port"]
    assert "not loopback" in found["distributed.master_addr"]


def test_deepspeed_needs_the_package(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "out")
    raw["distributed"] = {"nproc_per_node": 2, "strategy": "deepspeed"}
    found = issue_paths(raw)
    if importlib_missing("deepspeed"):
        assert "deepspeed is not installed" in found["distributed.strategy"]
    assert "needs deepspeed_config" in found["distributed.deepspeed_config"]


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_rendezvous_settings_do_not_change_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "out")
    raw["distributed"] = {"nproc_per_node": 2}
    a = TrainConfig.model_validate(raw)
    raw["distributed"] = {"nproc_per_node": 2, "master_port": 29555, "master_addr": "10.0.0.1"}
    b = TrainConfig.model_validate(raw)
    raw["distributed"] = {"nproc_per_node": 4}
    c = TrainConfig.model_validate(raw)
    assert a.run_fingerprint() == b.run_fingerprint() != c.run_fingerprint()


def test_strategy_arguments() -> None:
    assert DistributedConfig(backend="gloo").trainer_arguments() == {
        "ddp_backend": "gloo",
        "ddp_find_unused_parameters": False,
    }
    assert DistributedConfig(strategy="fsdp").trainer_arguments() == {"fsdp": "full_shard auto_wrap"}


# ---- relay -------------------------------------------------------------------------------------


def test_frames_survive_any_split() -> None:
    frames = [
        {"rank": 0, "type": "progress", "payload": {"step": i, "loss": 1.5 / (i + 1), "x": None}}
        for i in range(5)
    ]
    data = b"".join(encode_frame(f) for f in frames)
    reader = FrameReader()
    got = [f for byte in range(len(data)) for f in reader.feed(data[byte : byte + 1])]
    assert got == frames and reader.pending == 0
    assert FrameReader().feed(data) == frames


def test_bad_frames_are_errors() -> None:
    with pytest.raises(RelayError, match="exceeds"):
        FrameReader().feed(b"\xff\xff\xff\xff")
    with pytest.raises(RelayError, match="'type'"):
        FrameReader().feed(encode_frame({"rank": 0}))


def test_socket_roundtrip_and_close_order(tmp_path: Path) -> None:
    server = RelayServer(tmp_path / "relay.sock")
    try:
        clients = [RelayClient(str(server.path), rank) for rank in (0, 1)]
        senders = [
            threading.Thread(target=lambda c=c: [c.send("log", message=f"m{i}") for i in range(200)])
            for c in clients
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        clients[1].close()
        got: list[dict[str, Any]] = []
        for _ in range(200):
            got.extend(server.poll(0.05))
            if len(got) == 400 and server.closed:
                break
        by_rank = {r: [f["payload"]["message"] for f in got if f["rank"] == r] for r in (0, 1)}
        assert by_rank[0] == by_rank[1] == [f"m{i}" for i in range(200)]
        assert server.closed == [1]
        clients[0].close()
    finally:
        server.close()
    assert not server.path.exists()


# ---- a 2-rank DDP job through the real worker ------------------------------------------------


def ddp_config(
    model: Path, out: Path, *, ranks: int, validation_split: float = 0.15, **over: Any
) -> dict[str, Any]:
    """Global batch 8: 2 ranks x 4, or 1 process x 8."""
    settings: dict[str, Any] = {
        "dataset": {"path": str(DATA / "conversations.jsonl"), "validation_split": validation_split},
        "training_parameters": {
            "epochs": 1,
            "batch_size": 8 // ranks,
            "learning_rate": 5e-3,
            "logging_steps": 1,
        },
        "max_steps": 8,
        "checkpoint": {"every_steps": 4, "keep": 2},
    }
    cfg = tiny_config(model, out, **{**settings, **over})
    if ranks > 1:
        cfg["distributed"] = {"nproc_per_node": ranks, "backend": "gloo"}
    return cfg


def free_port() -> int:
    from finetune_worker.training.distributed.launcher import free_port as pick

    return pick()


def job_pids(events: list[HarnessEvent]) -> list[int]:
    """The agent's and every rank's pid, from the launcher's log events."""
    return [int(e.payload["pid"]) for e in events if e.type == "log" and "pid" in e.payload]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_job(cfg: dict[str, Any], timeout: float = 400) -> list[HarnessEvent]:
    with WorkerHarness() as w:
        events = w.submit_and_wait(json.dumps(cfg), timeout=timeout)
        assert w.call("info")["queue_length"] == 0
    return events


def test_two_rank_ddp_equals_one_process_with_the_same_global_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """2 ranks x batch 4 against 1 process x batch 8, same seed, 8 steps, LoRA dropout 0.

    Same data order: HF Trainer's seeded sampler permutes the rows the same way in both runs
    and accelerate deals the batches of 4 round robin to the ranks, so each optimizer step sees
    the same 8 rows (``tokens_seen`` per step proves it). DDP averages gradients of losses
    that transformers already scaled by the global token count, so the update is the same sum
    computed in a different order: only float32 rounding differs. Compared: every step's
    logged loss (rel. 1e-4) and every adapter tensor (abs. 1e-4; the tensors are ~1e-2).
    The held-out split matters: an evaluation before training used to leave the model without
    its DDP wrapper (ranks stepping on unsynchronized gradients: same step-1 loss, then drift).
    """
    single = run_job(ddp_config(tiny_model_dir, tmp_path / "single", ranks=1))
    ddp = run_job(ddp_config(tiny_model_dir, tmp_path / "ddp", ranks=2))
    assert single[-1].type == "completed", single[-1].payload
    assert ddp[-1].type == "completed", ddp[-1].payload

    progress = [e.payload["step"] for e in ddp if e.type == "progress"]
    assert progress == list(range(1, 9))  # once per step, not once per rank
    metrics = {e.payload["step"]: e.payload["metrics"] for e in ddp if e.type == "metrics"}
    reference = {e.payload["step"]: e.payload["metrics"] for e in single if e.type == "metrics"}
    assert sorted(metrics) == sorted(reference) == list(range(1, 9))
    assert [m["tokens_seen"] for m in metrics.values()] == [r["tokens_seen"] for r in reference.values()]
    torch.testing.assert_close(
        torch.tensor([metrics[s]["loss"] for s in range(1, 9)]),
        torch.tensor([reference[s]["loss"] for s in range(1, 9)]),
        rtol=1e-4,
        atol=0,
    )
    assert metrics[8]["loss"] < metrics[1]["loss"] - 0.5  # it learns
    evals = [e.payload["metrics"]["eval_loss"] for e in ddp if e.type == "eval"]
    assert len(evals) >= 2 and evals[-1] < evals[0]  # before and after training, from rank 0 only

    checkpoints = [e.payload["step"] for e in ddp if e.type == "checkpoint"]
    assert checkpoints == [4, 8]
    ranks = [e for e in ddp if e.type == "log" and "rank" in e.payload]
    assert sorted(e.payload["rank"] for e in ranks) == [0, 1]
    out = tmp_path / "ddp"
    # Saved once: one adapter file, one summary, checkpoints with every rank's RNG state.
    assert sorted(p.name for p in out.glob("adapter_model*")) == ["adapter_model.safetensors"]
    assert sorted(p.name for p in (out / "checkpoint-8").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert not (out / ".staging").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["config"]["distributed"]["nproc_per_node"] == 2
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4, msg=key)

    for pid in job_pids(ddp):
        assert not alive(pid), f"pid {pid} of the finished job is still alive"
    assert os.path.isdir(out)


@pytest.mark.slow
def test_fsdp_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """strategy fsdp (full_shard, CPU/gloo): same per-step losses and adapter as one process."""
    single = run_job(ddp_config(tiny_model_dir, tmp_path / "single", ranks=1, max_steps=4))
    cfg = ddp_config(tiny_model_dir, tmp_path / "fsdp", ranks=2, max_steps=4)
    cfg["distributed"]["strategy"] = "fsdp"
    fsdp = run_job(cfg)
    assert fsdp[-1].type == "completed", fsdp[-1].payload
    got = [e.payload["metrics"]["loss"] for e in fsdp if e.type == "metrics"]
    want = [e.payload["metrics"]["loss"] for e in single if e.type == "metrics"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    a = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


AGENT_REPORT = b"""torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
finetune_worker.training.distributed.rank_main FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-23_13:47:50
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 26878)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 26878
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-23_13:47:50
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 26877)
  error_file: <N/A>
============================================================
"""


def test_agent_report_lists_every_failed_rank() -> None:
    """torchrun's "root cause" is the first exit it saw; the SIGKILLed rank is listed too."""
    import io

    from finetune_worker.training.distributed.launcher import _describe_exit, _StderrTee

    tee = _StderrTee(io.BytesIO(b"[rank 0] noise\n" + AGENT_REPORT))
    tee.run()
    assert tee.exits() == [(0, 1), (1, -9)]
    assert _describe_exit(-9) == "exited with signal 9 (SIGKILL)"
    assert _describe_exit(3) == "exited with status 3"


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def emit(self, type: str, **payload: Any) -> None:
        self.seen.append((type, payload))


def test_the_first_failure_is_judged_from_real_process_deaths(tmp_path: Path) -> None:
    """A report that follows a silent death blames the dead rank, unless that rank's own last
    frame turns up after all (read after its death was seen): then the first report stands."""
    import subprocess

    from finetune_worker.training.distributed.launcher import Group

    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    server = RelayServer(tmp_path / "relay.sock")
    try:
        events = _Events()
        group = Group(events, procs[0], server, None)  # type: ignore[arg-type]
        for rank, proc in enumerate(procs):
            group._handle({"type": "hello", "rank": rank, "payload": {"pid": proc.pid, "world_size": 2}})
        assert [p["pid"] for _, p in events.seen] == [procs[0].pid, procs[1].pid]

        procs[1].kill()
        procs[1].wait()
        report = {"error": "internal_error", "message": "Connection closed by peer"}
        group._handle({"type": "failed", "rank": 0, "payload": report})
        assert group.culprit() == ("died", 1)
        group._handle({"type": "failed", "rank": 1, "payload": {"error": "out_of_memory", "message": "OOM"}})
        kind, first = group.culprit()
        assert kind == "failed" and first["rank"] == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.close()


def test_ranks_seen_dead_together_blame_the_one_not_ended_by_the_agent(tmp_path: Path) -> None:
    """A SIGKILLed rank and the peer torchrun's agent then SIGTERMs can both be gone by the next
    poll: which died first cannot be told from here, so the one the agent did not end is named
    (the agent's own "root cause" may be either)."""
    import io
    import signal
    import subprocess

    from finetune_worker.training.distributed.launcher import Group, _failure, _StderrTee

    report = AGENT_REPORT.replace(b"exitcode  : 1 (pid: 26877)", b"exitcode  : -15 (pid: 26877)")
    tee = _StderrTee(io.BytesIO(report))
    tee.run()
    assert tee.exits() == [(0, -15), (1, -9)]  # the agent saw rank 0 first
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    server = RelayServer(tmp_path / "relay.sock")
    try:
        group = Group(_Events(), procs[0], server, tee)  # type: ignore[arg-type]
        for rank, proc in enumerate(procs):
            group._handle({"type": "hello", "rank": rank, "payload": {"pid": proc.pid, "world_size": 2}})
        procs[1].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()
        group._watch_pids()
        failure = _failure(group, group.culprit(), -15)
        assert failure.message == f"rank 1 (pid {procs[1].pid}) exited with signal 9 (SIGKILL)"
        assert failure.details == {"rank": 1}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.close()
