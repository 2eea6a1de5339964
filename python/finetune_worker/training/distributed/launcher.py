"""Run a train job as a torchrun process group, supervised from the worker's runner thread.

The runner thread prepares the output_dir once, writes the validated config to a private temp
dir, opens the event relay, and starts ``python -m torch.distributed.run ... -m
finetune_worker.training.distributed.rank_main`` in a session of its own, so that one ``killpg`` reaches
the agent and every rank. It then relays rank 0's events to ``ctx.emit`` (the BEAM sees the
stream of a single-process job), turns a cancel into a stop file the ranks agree on, and
ends the job as the ranks report it, or as torchrun's exit shows it when a rank died silently.

No orphans: the agent gets SIGKILL from Linux if the runner thread dies (parent-death signal),
the ranks get it if the agent dies, and the launcher kills the group itself once a cancel or a
failure has had ``stop_timeout_s`` to end by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from finetune_worker.context import JobContext
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.training import checkpoints as ckpt
from finetune_worker.training.distributed.relay import RelayServer

log = logging.getLogger("finetune_worker.training.distributed")

POLL_S = 0.2
#: After SIGTERM to the group, how long before SIGKILL.
TERM_GRACE_S = 5.0
#: Events the ranks may relay; anything else from a rank is logged and dropped.
RELAYED = frozenset({"phase", "progress", "metrics", "eval", "checkpoint", "log"})
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(dist: Any, master_port: int, launch: Path, relay: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={dist.nproc_per_node}",
        f"--nnodes={dist.nnodes}",
        f"--node-rank={dist.node_rank}",
        f"--master-addr={dist.master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",  # a failed rank fails the job; resume is ours, from checkpoints
        "--monitor-interval=0.5",  # notice a dead rank (and stop its peers) within half a second
        "-m",
        "finetune_worker.training.distributed.rank_main",
        f"--launch={launch}",
        f"--relay={relay}",
    ]


def _arm_parent_death() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class _StderrTee(threading.Thread):
    """Copies torchrun's output to the worker's stderr and keeps the tail to explain a failure."""

    def __init__(self, stream: Any):
        super().__init__(name="torchrun-stderr", daemon=True)
        self._stream = stream
        self.tail: deque[str] = deque(maxlen=400)

    def run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()
        self._stream.close()

    def exits(self) -> list[tuple[int, int]]:
        """(rank, exitcode) of every failure torchrun's agent listed, its root cause first.

        The agent's "root cause" is the first exit it observed, which need not be the first
        failure: a peer that lost its connection may exit before the agent notices a SIGKILL.
        """
        lines = list(self.tail)
        found: list[tuple[int, int]] = []
        rank: int | None = None
        for line in lines:
            if m := _ROOT_RANK.match(line):
                rank = int(m.group(1))
            elif rank is not None and (m := _ROOT_EXIT.match(line)):
                entry = (rank, int(m.group(1)))
                if entry not in found:
                    found.append(entry)
                rank = None
        roots = [i for i, line in enumerate(lines) if "Root Cause" in line]
        if roots:
            after = "\n".join(lines[roots[-1] :])
            m = re.search(r"^\s*rank\s*:\s*(\d+)", after, re.MULTILINE)
            if m:
                found.sort(key=lambda e: e[0] != int(m.group(1)))
        return found


class Group:
    """The torchrun process group of one job, and what its ranks have said so far."""

    def __init__(self, ctx: JobContext, proc: subprocess.Popen[bytes], server: RelayServer, tee: _StderrTee):
        self.ctx = ctx
        self.proc = proc
        self.server = server
        self.tee = tee
        self.pids: dict[int, int] = {}  # rank -> pid (from each rank's hello)
        self.gone: dict[int, bool] = {}
        self.failures: list[dict[str, Any]] = []  # in arrival order
        self.ended: set[int] = set()  # ranks that reported a clean end
        #: Signs of trouble in the order seen: ("failed", report) or ("died", rank); see culprit().
        self.signs: list[tuple[str, Any]] = []
        #: How the job ended here: rank 0's completed/cancelled frame, or on a node without
        #: rank 0 (multi-node) the first one of its own ranks.
        self.outcome: dict[str, Any] | None = None
        self.step = 0
        #: rank -> the silent ranks first seen dead in the same poll as it (itself included).
        self.seen_with: dict[int, list[int]] = {}

    def pump(self, timeout: float) -> None:
        for frame in self.server.poll(timeout):
            self._handle(frame)
        self._watch_pids()

    def _handle(self, frame: dict[str, Any]) -> None:
        kind, rank, payload = frame["type"], frame.get("rank"), frame.get("payload") or {}
        if not isinstance(rank, int) or not isinstance(payload, dict):
            log.warning("dropped relay frame %r without a rank and a payload map", kind)
            return
        if kind == "hello":
            self.pids[int(rank)] = int(payload["pid"])
            self.ctx.emit(
                "log",
                level="info",
                message=f"rank {rank} of {payload.get('world_size')} running as pid {payload['pid']}",
                rank=rank,
                pid=payload["pid"],
            )
        elif kind == "failed":
            # A SIGKILLed peer shows up in the others as a broken connection: remember which
            # ranks were already dead when this report came, for culprit() to weigh.
            dead = [r for r, pid in self.pids.items() if r != rank and not _alive(pid)]
            report = {"rank": rank, **payload, "dead_before": dead}
            self.failures.append(report)
            self.signs.append(("failed", report))
        elif kind in ("completed", "cancelled"):
            self.ended.add(rank)
            if rank == 0 or self.outcome is None:
                self.outcome = {"type": kind, "rank": rank, **payload}
        elif kind in RELAYED and rank == 0:
            if kind == "progress":
                self.step = int(payload.get("step") or self.step)
            self.ctx.emit(kind, **payload)
        else:
            log.warning("dropped relay frame %r from rank %s", kind, rank)

    def _watch_pids(self) -> None:
        dead = [r for r, pid in self.pids.items() if not self.gone.get(r) and not _alive(pid)]
        if not dead:
            return
        for rank in dead:
            self.gone[rank] = True
        # A rank writes its last frame before it exits: read what is buffered before judging.
        while frames := self.server.poll(0):
            for frame in frames:
                self._handle(frame)
        silent = [rank for rank in dead if not self._reported(rank)]
        for rank in silent:
            self.signs.append(("died", rank))
            self.seen_with[rank] = silent

    def _reported(self, rank: int) -> bool:
        return rank in self.ended or any(f["rank"] == rank for f in self.failures)

    def culprit(self) -> tuple[str, Any] | None:
        """The first failure: a report, unless a rank had already died without a word.

        Judged from everything read so far, so a dying rank's last frame (read after its
        death was seen) still counts as its report.
        """
        for kind, what in self.signs:
            if kind == "failed":
                silent = [r for r in what["dead_before"] if not self._reported(r)]
                return ("died", silent[0]) if silent else ("failed", what)
            if not self._reported(what):
                return ("died", what)
        return None

    def kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the whole group, SIGKILL what is left, then reap the agent."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(POLL_S)
        self.kill(signal.SIGKILL)  # ranks the agent did not take with it, too
        self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def run_distributed(ctx: JobContext) -> dict[str, Any]:
    """The train job's handler when ``distributed`` is set (see ``training.job.run``)."""

    cfg = ctx.config
    out = cfg.paths.output
    resume_from = ckpt.prepare_output_dir(cfg, out)
    if resume_from is not None:
        ctx.log(f"resuming from {resume_from}")
    ctx.check_cancelled()

    # The relay is a Unix socket in there, and socket paths are limited to ~107 bytes.
    base = None if len(tempfile.gettempdir()) <= 64 else "/tmp"
    tmp = Path(tempfile.mkdtemp(prefix="ftw-dist-", dir=base))
    try:
        return _launch_and_supervise(ctx, cfg, tmp, resume_from)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _launch_and_supervise(ctx: JobContext, cfg: Any, tmp: Path, resume_from: Path | None) -> dict[str, Any]:
    dist = cfg.distributed
    launch = tmp / "launch.json"
    stop_file = tmp / "stop"
    launch.write_text(
        json.dumps(
            {
                "job_id": ctx.job_id,
                "config": cfg.model_dump(mode="json"),
                "resume_from": str(resume_from) if resume_from else None,
                "stop_file": str(stop_file),
            }
        )
    )
    port = dist.master_port or free_port()
    server = RelayServer(tmp / "relay.sock")
    ctx.phase("launching")
    proc = subprocess.Popen(
        torchrun_command(dist, port, launch, server.path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one killpg reaches the agent and every rank
        preexec_fn=_arm_parent_death,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # The agent's pid (and each rank's, from its hello) go out in log events: the supervisor can
    # see, and tests can check, that no process of the job outlives it.
    ctx.emit(
        "log",
        level="info",
        message=f"torchrun (pid {proc.pid}): {dist.nproc_per_node} process(es) on node {dist.node_rank} "
        f"of {dist.nnodes}, {dist.strategy}, rendezvous at {dist.master_addr}:{port}",
        pid=proc.pid,
    )
    tee = _StderrTee(proc.stdout)
    tee.start()
    group = Group(ctx, proc, server, tee)
    try:
        return _supervise(ctx, group, stop_file, dist.stop_timeout_s, out=cfg.paths.output)
    finally:
        if proc.poll() is None:
            group.stop()
        tee.join(timeout=5)
        server.close()


def _supervise(
    ctx: JobContext, group: Group, stop_file: Path, stop_timeout: float, out: Path
) -> dict[str, Any]:
    stop_sent: float | None = None
    failed_at: float | None = None
    while group.proc.poll() is None:
        group.pump(POLL_S)
        now = time.monotonic()
        if ctx.cancel_event.is_set() and stop_sent is None:
            stop_file.write_text("stop\n")
            stop_sent = now
            ctx.log("cancel: every rank stops at the next step boundary")
        if group.signs and failed_at is None:
            failed_at = now
        started = min(t for t in (stop_sent, failed_at, float("inf")) if t is not None)
        if now - started > stop_timeout:
            why = "cancel" if stop_sent is not None else "failure"
            log.warning("process group still running %.0f s after the %s; killing it", stop_timeout, why)
            ctx.log(
                f"the ranks did not stop within {stop_timeout:.0f} s of the {why}; killed", level="warning"
            )
            group.stop()
    group.pump(0)  # frames sent just before the exit
    code = group.proc.returncode

    if group.outcome is not None and group.outcome["type"] == "completed" and code == 0:
        if group.outcome["rank"] != 0:  # another node's worker: node 0 reports the outputs
            return {"outputs": {"output_dir": str(out)}, "summary": {"ranks": sorted(group.ended)}}
        result: dict[str, Any] = group.outcome.get("result") or {}
        return result
    cancelled = group.outcome is not None and group.outcome["type"] == "cancelled"
    culprit = group.culprit()
    if (stop_sent is not None or cancelled) and culprit is None:
        # A cancel on another node reaches these ranks through the agreed stop flag as well.
        if group.outcome is not None and group.outcome["type"] == "cancelled":
            raise JobCancelled(
                step=group.outcome.get("step") or 0, checkpoint=group.outcome.get("checkpoint")
            )
        from finetune_worker.training.checkpoints import latest_checkpoint

        last = latest_checkpoint(out)
        raise JobCancelled(step=group.step, checkpoint=str(last) if last else None)
    raise _failure(group, culprit, code)


def _failure(group: Group, culprit: tuple[str, Any] | None, code: int) -> JobFailed:
    """Name the rank that failed first: its own report, else torchrun's root cause, else a pid."""
    hint = "See the worker's stderr log for every rank's output; the job can resume from its last checkpoint."
    exits = group.tee.exits()
    if culprit is not None and culprit[0] == "died":
        rank = culprit[1]
        # Ranks first seen dead in the same poll died in an order this process cannot tell (a
        # SIGKILLed rank, then the peers torchrun's agent SIGTERMs at once). The agent lists the
        # first exit it observed first; a rank it ended with SIGTERM is a survivor, not the cause.
        together = group.seen_with.get(rank, [rank])
        candidates = sorted(
            ((r, c) for r, c in exits if r in together), key=lambda e: e[1] == -signal.SIGTERM
        )
        if candidates:
            rank = candidates[0][0]
        codes = [code for r, code in exits if r == rank]
        how = _describe_exit(codes[0]) if codes else "died without reporting an error"
        return JobFailed(
            "distributed_failure",
            f"rank {rank} (pid {group.pids[rank]}) {how}",
            hint=hint,
            details={"rank": rank},
        )
    if culprit is not None:
        first = culprit[1]
        rank = first.get("rank")
        error = first.get("error") or "distributed_failure"
        return JobFailed(
            error if error != "internal_error" else "distributed_failure",
            f"rank {rank}: {first.get('message')}",
            hint=first.get("hint") or hint,
            details={"rank": rank},
        )
    if exits:
        rank, exitcode = exits[0]
        return JobFailed(
            "distributed_failure",
            f"rank {rank} {_describe_exit(exitcode)}",
            hint=hint,
            details={"rank": rank},
        )
    return JobFailed(
        "distributed_failure",
        f"torchrun {_describe_exit(code)} before any rank reported a result",
        hint=hint,
    )


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"exited with signal {-code} ({name})"
    return f"exited with status {code}"
