"""Framing part: throughput of one large binary through ``finetune_worker.wire.port.Port``, both directions.

A pipe stands for the port, as in the worker (``{packet, 4}``); the frame holds the binary as
an ETF term, encoded once beforehand (the codec part times the codec). Outbound,
``Port.write_frame`` writes while a thread drains the pipe the way the BEAM would; inbound, a
thread writes the frame and ``Port.read_frame`` reads it. Reading must stay linear in the
frame size (a preallocated buffer, not ``buffer += chunk``), so MiB/s at 64 MiB has to be
within 2x of MiB/s at 1 MiB.
"""

from __future__ import annotations

import os
import threading
import time

from bench.common import Options, Row, median

PART = "framing"
SIZES_MIB = (1, 8, 64)
LINEAR_FACTOR = 2.0


def _plan(size_mib: int, quick: bool) -> tuple[int, int]:
    """``(frames per timing, timings)``: each timing moves 64 MiB (8 quick), so rates are sustained ones."""
    frames = max(1, (8 if quick else 64) // size_mib)
    return frames, 1 if quick else 5


def _drain(fd: int, total: int) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    while got < total:
        n = os.readv(fd, [view[: min(len(buf), total - got)]])
        if n == 0:
            raise EOFError(f"pipe closed after {got} of {total} bytes")
        got += n


def _write_all(fd: int, data: bytes, count: int, gate: threading.Event) -> None:
    gate.wait()
    for _ in range(count):
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]


def time_send(body: bytes, count: int) -> float:
    """Seconds for ``count`` calls of ``Port.write_frame(body)`` until the reader has every byte."""
    from finetune_worker.wire.port import Port

    r, w = os.pipe()
    dummy_r, dummy_w = os.pipe()
    port = Port(dummy_r, w)
    # Started before the clock: it blocks in read until the first bytes arrive.
    reader = threading.Thread(target=_drain, args=(r, count * (4 + len(body))))
    reader.start()
    try:
        start = time.perf_counter()
        for _ in range(count):
            port.write_frame(body)
        reader.join()
        return time.perf_counter() - start
    finally:
        port.close()
        for fd in (r, dummy_w):
            os.close(fd)


def time_receive(body: bytes, count: int) -> float:
    """Seconds for ``count`` calls of ``Port.read_frame()`` of frames holding ``body``, written by a thread."""
    from finetune_worker.wire.port import Port

    frame = len(body).to_bytes(4, "big") + body
    r, w = os.pipe()
    dummy_r, dummy_w = os.pipe()
    port = Port(r, dummy_w)
    gate = threading.Event()
    writer = threading.Thread(target=_write_all, args=(w, frame, count, gate))
    writer.start()
    try:
        start = time.perf_counter()
        gate.set()
        for _ in range(count):
            got = port.read_frame()
            if got is None or len(got) != len(body):
                raise AssertionError(
                    f"read_frame returned {0 if got is None else len(got)} of {len(body)} bytes"
                )
        elapsed = time.perf_counter() - start
        writer.join()
        return elapsed
    finally:
        port.close()
        for fd in (w, dummy_r):
            os.close(fd)


def run(opts: Options) -> list[Row]:
    from finetune_worker import wire as etf

    rows: list[Row] = []
    rates: dict[tuple[str, int], float] = {}
    directions = {
        "write_frame (worker -> BEAM)": time_send,
        "read_frame (BEAM -> worker)": time_receive,
    }
    for size in SIZES_MIB:
        body = etf.encode(os.urandom(size << 20))
        frames, timings = _plan(size, opts.quick)
        for direction, timer in directions.items():
            seconds = median([timer(body, frames) for _ in range(timings)])
            rates[(direction, size)] = size * frames / seconds
        del body
    for direction in directions:
        base = rates[(direction, SIZES_MIB[0])]
        for size in SIZES_MIB:
            rate = rates[(direction, size)]
            ratio = rate / base
            is_last = size == SIZES_MIB[-1]
            rows.append(
                Row(
                    PART,
                    f"{direction}, {size} MiB binary",
                    f"{rate:,.0f} MiB/s",
                    f"{ratio:.2f}x the 1 MiB rate" if size != SIZES_MIB[0] else "",
                    target=f"64 MiB within {LINEAR_FACTOR:.0f}x of 1 MiB" if is_last else "",
                    met=(ratio >= 1 / LINEAR_FACTOR) if is_last else None,
                    data={"mib_per_s": rate, "ratio_to_1mib": ratio},
                )
            )
    rows.append(_memory_row(opts.quick))
    return rows


def _memory_row(quick: bool) -> Row:
    """Context for the 64 MiB rows: how fast this machine hands out and touches fresh memory.

    A 64 MiB buffer is always a fresh mmap (above glibc's largest mmap threshold), so every
    4 KiB page faults on first touch; in some VMs that alone runs at a few hundred MiB/s.
    """
    size = 64 << 20
    seconds = median([_touch_fresh(size) for _ in range(1 if quick else 5)])
    return Row(
        PART,
        "calibration: allocate and zero a fresh 64 MiB buffer",
        f"{size / 2**20 / seconds:,.0f} MiB/s",
        note="a read_frame of a large frame touches fresh memory twice (buffer, then bytes)",
        data={"mib_per_s": size / 2**20 / seconds},
    )


def _touch_fresh(size: int) -> float:
    start = time.perf_counter()
    buf = bytearray(size)
    elapsed = time.perf_counter() - start
    del buf
    return elapsed
