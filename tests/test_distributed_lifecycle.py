"""A torchrun job's ends: cancel (then resume), a killed rank, and stdin EOF on the worker.

Every test learns the agent's and the ranks' pids from the launcher's log events and checks
in /proc that none of them outlives the job.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import PAST_PREVIEW
from finetune_worker.testing import HarnessEvent, WorkerHarness
from finetune_worker.training.checkpoints import is_complete
from test_distributed import alive, ddp_config, job_pids

pytestmark = pytest.mark.slow


def long_config(model: Path, out: Path) -> dict[str, Any]:
    cfg = ddp_config(
        model, out, ranks=2, validation_split=0, max_steps=400, checkpoint={"every_steps": 200, "keep": 2}
    )
    return cfg


def start(w: WorkerHarness, cfg: dict[str, Any]) -> tuple[str, list[HarnessEvent]]:
    result = w.call("submit", json.dumps(cfg), w.pid)
    assert str(result[0]) == "ok", result
    job = str(result[1])
    seen = w.wait_for(job, "progress", timeout=300)
    while seen[-1].payload["step"] < 3:
        seen += w.wait_for(job, "progress", timeout=60)
    return job, seen


def rank_pids(events: list[HarnessEvent]) -> dict[int, int]:
    return {
        int(e.payload["rank"]): int(e.payload["pid"])
        for e in events
        if e.type == "log" and "rank" in e.payload
    }


def assert_all_gone(pids: list[int], within: float = 20, count: int = 3) -> None:
    assert len(pids) == count, pids  # agent + 2 ranks
    deadline = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "processes of the job are still alive"


def test_cancel_stops_every_rank_with_a_checkpoint_and_resume_continues(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = long_config(tiny_model_dir, out)
    with WorkerHarness() as w:
        job, seen = start(w, cfg)
        assert w.call("cancel", job) == "ok"
        seen += w.wait_for(job, "terminal", timeout=120)
        end = seen[-1]
        assert end.type == "cancelled", end.payload
        step = end.payload["step"]
        assert step >= 3 and end.payload["checkpoint"] == str(out / f"checkpoint-{step}")
        assert is_complete(out / f"checkpoint-{step}")
        assert sorted(p.name for p in (out / f"checkpoint-{step}").glob("rng_state*")) == [
            "rng_state_0.pth",
            "rng_state_1.pth",
        ]
        progress = [e.payload["step"] for e in seen if e.type == "progress"]
        assert progress == list(range(1, step + 1))
        assert_all_gone(job_pids(seen))

        # The same config resumes from that checkpoint (resume "auto").
        cfg["max_steps"] = step + 3
        resumed = w.submit_and_wait(json.dumps(cfg), timeout=300)
        assert resumed[-1].type == "completed", resumed[-1].payload
        assert resumed[-1].payload["summary"]["resumed_from"] == str(out / f"checkpoint-{step}")
        assert [e.payload["step"] for e in resumed if e.type == "progress"] == [step + 1, step + 2, step + 3]
        assert_all_gone(job_pids(resumed))


def test_a_killed_rank_fails_the_job_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    with WorkerHarness() as w:
        job, seen = start(w, long_config(tiny_model_dir, tmp_path / "run"))
        victim = rank_pids(seen)[1]
        os.kill(victim, signal.SIGKILL)
        seen += w.wait_for(job, "terminal", timeout=120)
        end = seen[-1]
        assert end.type == "failed", end.payload
        assert end.payload["error"] == "distributed_failure"
        assert end.payload["message"] == f"rank 1 (pid {victim}) exited with signal 9 (SIGKILL)"
        assert end.payload["details"] == {"rank": 1}
        assert_all_gone(job_pids(seen))
        assert w.call("info")["queue_length"] == 0  # the worker lives on


def test_stdin_eof_leaves_no_process_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    with WorkerHarness() as w:
        _, seen = start(w, long_config(tiny_model_dir, tmp_path / "run"))
        pids = job_pids(seen)
        w.close_stdin()
        assert w.wait(30) == 0
    assert_all_gone(pids)


def test_a_sigkilled_worker_takes_the_group_with_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    with WorkerHarness() as w:
        _, seen = start(w, long_config(tiny_model_dir, tmp_path / "run"))
        pids = job_pids(seen)
        w.kill()
        w.wait(10)
    assert_all_gone(pids)


def host_address() -> str | None:
    """A non-loopback IPv4 address of this machine (multi-node configs refuse loopback)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = str(s.getsockname()[0])
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_two_nodes_on_one_machine(tiny_model_dir: Path, tmp_path: Path) -> None:
    """nnodes 2 x 1 process, each node a worker of its own, as two machines would run it."""
    from test_distributed import free_port

    addr = host_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address")
    cfg = ddp_config(tiny_model_dir, tmp_path / "run", ranks=2, max_steps=6)
    cfg["distributed"] = {
        "nproc_per_node": 1,
        "nnodes": 2,
        "master_addr": addr,
        "master_port": free_port(),
        "backend": "gloo",
    }
    with WorkerHarness() as node0, WorkerHarness() as node1:
        jobs = []
        for rank, w in ((0, node0), (1, node1)):
            cfg["distributed"]["node_rank"] = rank
            result = w.call("submit", json.dumps(cfg), w.pid)
            assert str(result[0]) == "ok", result
            jobs.append(str(result[1]))
        first = node0.wait_for(jobs[0], "terminal", timeout=300)
        second = node1.wait_for(jobs[1], "terminal", timeout=120)
    assert first[-1].type == "completed", first[-1].payload
    assert second[-1].type == "completed", second[-1].payload
    assert [e.payload["step"] for e in first if e.type == "progress"] == list(range(1, 7))
    assert not [e for e in second if e.type == "progress"]  # rank 0's node reports the steps
    assert second[-1].payload["summary"] == {"ranks": [1]}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6
    assert_all_gone(job_pids(first) + job_pids(second), count=4)  # two agents, two ranks


def test_a_rank_error_keeps_its_code_and_names_the_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Both ranks hit the same broken row; the first report wins, with its own error code."""
    data = tmp_path / "broken.jsonl"
    # Past the rows validate reads (PAST_PREVIEW), so the ranks meet it while preparing the data.
    data.write_text('{"text": "fine row"}\n' * (PAST_PREVIEW - 1) + '{"text": oops}\n')
    cfg = ddp_config(tiny_model_dir, tmp_path / "run", ranks=2, validation_split=0)
    cfg["dataset"] = {"path": str(data), "validation_split": 0}
    with WorkerHarness() as w:
        events = w.submit_and_wait(json.dumps(cfg), timeout=300)
        assert w.call("info")["queue_length"] == 0
    end = events[-1]
    assert end.type == "failed", end.payload
    assert end.payload["error"] == "bad_dataset_row", end.payload
    assert end.payload["message"].startswith(("rank 0: ", "rank 1: ")), end.payload["message"]
    assert f"row {PAST_PREVIEW}" in end.payload["message"], end.payload["message"]
    assert end.payload["details"]["rank"] in (0, 1)
    assert_all_gone(job_pids(events))
