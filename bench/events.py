"""Event stream: how many events a second the worker delivers, and what a slow reader does to it.

Here the BEAM's side is played by :class:`finetune_worker.wire.port.Port` on the worker's pipes, not
by the harness, because the point is to control exactly when the worker's output is read. The
job is the test-only ``test_steps`` kind (``FINETUNE_WORKER_TEST_JOBS=1``) with no sleep per
step: each step emits a ``progress`` and a ``metrics`` event, so the writer, not the job, is the
limit. Frames are kept raw while timing (a BEAM decodes in C, far faster than Python would) and
decoded afterwards to check them.

The slow reader reads nothing for a few seconds while such a job runs. The pipe holds about
500 events; after that the worker's writes must block, so the job takes at least as long as
the reader sleeps, and once reading resumes every event must arrive, in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO, Options, Row, worker_env

PART = "events"


class RawPeer:
    """A worker process and the BEAM end of its port, read only when the caller says so."""

    def __init__(self) -> None:
        from finetune_worker.testing import make_pid
        from finetune_worker.wire.port import Port

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_worker", "port"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=worker_env(test_jobs=True),
            cwd=REPO,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.port = Port(os.dup(self.proc.stdout.fileno()), os.dup(self.proc.stdin.fileno()))
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.pid = make_pid()
        self.pending: list[bytes] = []  # frames read while waiting for a reply

    def submit(self, config: dict[str, Any]) -> str:
        from finetune_worker import wire as etf
        from finetune_worker.wire import Atom

        self.port.send(
            (Atom("C"), 1, Atom("finetune_worker"), Atom("submit"), [json.dumps(config), self.pid])
        )
        while True:
            frame = self.port.read_frame()
            if frame is None:
                raise ConnectionError("the worker closed its output before answering submit")
            term = etf.decode(frame)
            if isinstance(term, tuple) and term[0] == "r" and term[1] == 1:
                result = term[2]
                if not (isinstance(result, tuple) and result[0] == "ok"):
                    raise RuntimeError(f"submit refused: {result!r}")
                return str(result[1])
            self.pending.append(frame)

    def read_until_terminal(self) -> tuple[list[bytes], float, float]:
        """Every frame up to the job's terminal event: ``(frames, first_at, last_at)`` (perf_counter)."""
        frames = list(self.pending)
        self.pending.clear()
        first_at = time.perf_counter()
        while True:
            frame = self.port.read_frame()
            if frame is None:
                raise ConnectionError("the worker closed its output before the job ended")
            frames.append(frame)
            # Terminal events are the only frames naming these atoms; no need to decode them all.
            if b"completed" in frame or b"failed" in frame or b"cancelled" in frame:
                return frames, first_at, time.perf_counter()

    def close(self) -> None:
        self.port.close()  # EOF on its stdin: the worker exits by itself
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def check_stream(frames: list[bytes], steps: int) -> tuple[bool, str, dict[str, Any]]:
    """Decode a job's frames; every step's progress and metrics, strictly increasing, then completed."""
    from finetune_worker import wire as etf

    progress: list[int] = []
    metrics: list[int] = []
    kinds: list[str] = []
    for frame in frames:
        term = etf.decode(frame)
        if not (isinstance(term, tuple) and len(term) == 3 and term[0] == "M"):
            continue
        _, _, event_type, payload = term[2]
        kinds.append(str(event_type))
        if event_type == "progress":
            progress.append(int(payload["step"]))
        elif event_type == "metrics":
            metrics.append(int(payload["step"]))
    expected = list(range(1, steps + 1))
    problems = []
    if progress != expected:
        problems.append(f"progress steps {_describe_gap(progress, expected)}")
    if metrics != expected:
        problems.append(f"metrics steps {_describe_gap(metrics, expected)}")
    if not kinds or kinds[-1] != "completed":
        problems.append(f"last event is {kinds[-1] if kinds else None!r}, not completed")
    stats = {"events": len(kinds), "progress": len(progress), "metrics": len(metrics)}
    return not problems, "; ".join(problems) or "all in order, none lost", stats


def _describe_gap(got: list[int], expected: list[int]) -> str:
    if len(got) != len(expected):
        return f"count {len(got)} != {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b:
            return f"out of order at position {i}: {a} where {b} belongs"
    return "ok"


def _job(steps: int) -> dict[str, Any]:
    return {"job": "test_steps", "steps": steps, "step_seconds": 0}


def run(opts: Options) -> list[Row]:
    rows: list[Row] = []
    steps = 500 if opts.quick else 20000
    peer = RawPeer()
    try:
        peer.submit(_job(steps))
        frames, t0, t1 = peer.read_until_terminal()
    finally:
        peer.close()
    ok, verdict, stats = check_stream(frames, steps)
    rate = stats["events"] / (t1 - t0)
    rows.append(
        Row(
            PART,
            f"events delivered to a reader that keeps up ({stats['events']:,} events)",
            f"{rate:,.0f} events/s",
            verdict,
            note="test_steps job, no sleep per step; frames decoded after timing",
            data={"events_per_s": rate, **stats},
        )
    )
    if not ok:
        rows[-1].met = False

    slow_steps = 1000 if opts.quick else 4000
    pause = 1.0 if opts.quick else 4.0
    peer = RawPeer()
    try:
        peer.submit(_job(slow_steps))
        time.sleep(pause)  # the BEAM not reading: the pipe fills, the worker's writes block
        frames, _, _ = peer.read_until_terminal()
    finally:
        peer.close()
    ok, verdict, stats = check_stream(frames, slow_steps)
    runtime = _completed_runtime(frames)
    unthrottled = stats["events"] / rate
    # It waited if it took about as long as the pause, which the job alone could not have filled.
    waited = runtime is not None and runtime >= 0.8 * pause and unthrottled < 0.5 * pause
    rows.append(
        Row(
            PART,
            f"slow reader: nothing read for {pause:.0f} s during a {slow_steps:,}-step job",
            verdict,
            f"job took {runtime:.2f} s vs ~{unthrottled:.2f} s unthrottled: the writer "
            + ("waited" if waited else "did NOT wait"),
            target="writer waits; no event lost or reordered",
            met=ok and waited,
            data={"runtime_s": runtime, "unthrottled_s": unthrottled, "pause_s": pause, **stats},
        )
    )
    return rows


def _completed_runtime(frames: list[bytes]) -> float | None:
    from finetune_worker import wire as etf

    term = etf.decode(frames[-1])
    try:
        return float(term[2][3]["summary"]["runtime_s"])
    except (KeyError, TypeError, IndexError):
        return None
