"""Port framing over real pipes: byte-by-byte and bulk input, every limit from both sides, EOF/EPIPE,
concurrent writers. Real processes (stdio hygiene, a real BEAM) are in test_port_process.py."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_worker.errors import ProtocolError
from finetune_worker.wire import Atom, ETFDecodeError, decode, encode
from finetune_worker.wire.port import DEFAULT_MAX_FRAME, FrameTooLarge, Port, PortClosed


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose ends the test may close; whatever is left open is closed afterwards."""
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def frame(payload: bytes, packet: int = 4) -> bytes:
    return len(payload).to_bytes(packet, "big") + payload


def write_in_thread(fd: int, data: bytes, chunk: int | None = None, close: bool = False) -> threading.Thread:
    """Write ``data`` to ``fd`` from another thread (``chunk`` bytes per write), so big frames don't deadlock."""

    def run() -> None:
        view = memoryview(data)
        step = chunk or len(view) or 1
        for at in range(0, len(view), step):
            part = view[at : at + step]
            while part:
                part = part[os.write(fd, part) :]
        if close:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def read_all(port: Port) -> list[bytes]:
    frames = []
    while (payload := port.read_frame()) is not None:
        frames.append(payload)
    return frames


PAYLOADS = [b"", b"x", encode((Atom("ok"), 1)), os.urandom(1000), os.urandom(70_000), b"\x00" * 255]


@pytest.mark.parametrize("packet", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["byte-by-byte", "7-bytes", "all-at-once"])
@pytest.mark.parametrize("buffer_size", [1, 16, 65536])
def test_frames_arrive_intact_however_they_are_split(
    pipe: tuple[int, int], packet: int, chunk: int | None, buffer_size: int
) -> None:
    r, w = pipe
    payloads = [p for p in PAYLOADS if len(p) < 2 ** (8 * packet)]
    if chunk == 1:
        payloads = [p for p in payloads if len(p) < 5000]  # byte-by-byte big frames just burn CPU
    writer = write_in_thread(w, b"".join(frame(p, packet) for p in payloads), chunk, close=True)
    port = Port(r, -1, packet=packet, buffer_size=buffer_size)
    assert read_all(port) == payloads
    assert port.read_frame() is None  # EOF stays EOF
    writer.join()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=20),
    buffer_size=st.integers(1, 64),
    packet=st.sampled_from([1, 2, 4]),
)
def test_any_split_of_the_stream_reads_the_same(
    payloads: list[bytes], cuts: list[int], buffer_size: int, packet: int
) -> None:
    data = b"".join(frame(p, packet) for p in payloads)
    r, w = os.pipe()
    try:

        def write() -> None:
            at, i = 0, 0
            while at < len(data):
                step = cuts[i % len(cuts)]
                os.write(w, data[at : at + step])
                at, i = at + step, i + 1
            os.close(w)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        assert read_all(Port(r, -1, packet=packet, buffer_size=buffer_size)) == payloads
        writer.join()
    finally:
        os.close(r)


@pytest.mark.parametrize("packet", [1, 2, 4])
def test_send_receive_round_trip(pipe: tuple[int, int], packet: int) -> None:
    r, w = pipe
    port = Port(r, w, packet=packet)
    term = {Atom("step"): 3, "loss": [1.5, 2.25], "nested": (Atom("a"), [None, True])}
    port.send(term)
    assert port.receive() == term


def test_compressed_send(pipe: tuple[int, int]) -> None:
    r, w = pipe
    port = Port(r, w, compressed=6)
    port.send(["abc"] * 2000)
    payload = port.read_frame()
    assert payload is not None and payload[:2] == b"\x83P" and len(payload) < 1000
    assert decode(payload) == ["abc"] * 2000


@pytest.mark.parametrize(("packet", "limit"), [(1, 255), (2, 65535)])
def test_packet_size_limits_on_write(pipe: tuple[int, int], packet: int, limit: int) -> None:
    r, w = pipe
    port = Port(r, w, packet=packet)
    writer_done = threading.Event()

    def write() -> None:
        port.write_frame(b"a" * limit)
        writer_done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    assert port.read_frame() == b"a" * limit
    thread.join()
    assert writer_done.is_set()
    with pytest.raises(ValueError, match=f"{packet}-byte length prefix"):
        port.write_frame(b"a" * (limit + 1))


@pytest.mark.parametrize("buffer_size", [4, 65536])
def test_max_frame_size_both_sides_and_stream_stays_in_sync(pipe: tuple[int, int], buffer_size: int) -> None:
    r, w = pipe
    limit = 1000
    data = frame(b"a" * limit) + frame(b"b" * (limit + 1)) + frame(b"c" * 10) + frame(b"d" * 5000)
    writer = write_in_thread(w, data, close=True)
    port = Port(r, -1, max_frame_size=limit, buffer_size=buffer_size)
    assert port.read_frame() == b"a" * limit
    with pytest.raises(FrameTooLarge, match="1001 bytes exceeds max_frame_size=1000") as info:
        port.read_frame()
    assert (info.value.size, info.value.limit) == (limit + 1, limit)
    assert isinstance(info.value, ProtocolError)
    assert port.read_frame() == b"c" * 10  # the oversized frame was skipped, not misread
    with pytest.raises(FrameTooLarge):
        port.read_frame()
    assert port.read_frame() is None
    writer.join()


def test_64_mib_round_trip(pipe: tuple[int, int]) -> None:
    r, w = pipe
    big = os.urandom(64 * 1024 * 1024)
    sender = Port(-1, w)
    thread = threading.Thread(target=sender.write_frame, args=(big,), daemon=True)
    thread.start()
    got = Port(r, -1).read_frame()
    thread.join()
    assert got == big


def test_64_mib_term_round_trip(pipe: tuple[int, int]) -> None:
    r, w = pipe
    term = (Atom("blob"), os.urandom(64 * 1024 * 1024))
    sender, receiver = Port(-1, w), Port(r, -1)
    thread = threading.Thread(target=sender.send, args=(term,), daemon=True)
    thread.start()
    got = receiver.receive(binaries="bytes")
    thread.join()
    assert got == term


def test_concurrent_writers_never_interleave(pipe: tuple[int, int]) -> None:
    r, w = pipe
    port = Port(r, w)
    threads, per_thread = 8, 60
    sizes = [10, 100, 5000, 100_000]  # the big ones force partial writes into a 64 KiB pipe
    received: list[Any] = []
    reader = threading.Thread(
        target=lambda: received.extend(port.receive() for _ in range(threads * per_thread))
    )
    reader.start()

    def send(tid: int) -> None:
        for seq in range(per_thread):
            port.send((tid, seq, "x" * sizes[(tid + seq) % len(sizes)]))

    writers = [threading.Thread(target=send, args=(tid,)) for tid in range(threads)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    reader.join()
    assert len(received) == threads * per_thread
    for tid in range(threads):
        mine = [term for term in received if term[0] == tid]
        assert [term[1] for term in mine] == list(range(per_thread))  # every frame whole and in order
        assert all(term[2] == "x" * sizes[(tid + term[1]) % len(sizes)] for term in mine)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(b"hello")[:-2], "EOF after 3 of 5 payload bytes"),
        (b"\x00\x00", "EOF after 2 of 4 length-prefix bytes"),
        (frame(b"ok") + b"\x00\x00\x01\x00" + b"z" * 10, "EOF after 10 of 256 payload bytes"),
    ],
)
def test_eof_inside_a_frame(pipe: tuple[int, int], data: bytes, message: str) -> None:
    r, w = pipe
    write_in_thread(w, data, close=True).join()
    port = Port(r, -1)
    if data.startswith(frame(b"ok")):
        assert port.read_frame() == b"ok"
    with pytest.raises(ProtocolError, match=f"truncated frame: {message}"):
        port.read_frame()
    assert port.read_frame() is None


def test_eof_while_skipping_an_oversized_frame(pipe: tuple[int, int]) -> None:
    r, w = pipe
    write_in_thread(w, b"\x00\x00\x10\x00" + b"z" * 100, close=True).join()
    port = Port(r, -1, max_frame_size=10)
    with pytest.raises(ProtocolError, match="truncated frame"):
        port.read_frame()
    assert port.read_frame() is None


def test_clean_eof(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(w)
    assert Port(r, -1).read_frame() is None
    assert Port(r, -1).receive() is None


def test_epipe_when_the_reader_is_gone(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    port = Port(-1, w)
    with pytest.raises(PortClosed, match="closed"):
        port.send(Atom("hello"))
    with pytest.raises(PortClosed):  # and it stays closed without touching the fd again
        port.write_frame(b"x")


def test_writes_after_close_raise_port_closed(pipe: tuple[int, int]) -> None:
    r, w = pipe
    port = Port(r, w)
    port.close()
    port.close()  # idempotent
    with pytest.raises(PortClosed):
        port.send(1)
    assert port.read_frame() is None


def test_bad_term_in_a_frame_does_not_break_the_stream(pipe: tuple[int, int]) -> None:
    r, w = pipe
    port = Port(r, w)
    port.write_frame(b"\x83h\x02a\x01")  # a tuple missing its second element
    port.send(Atom("next"))
    with pytest.raises(ETFDecodeError, match="truncated"):
        port.receive()
    assert port.receive() == Atom("next")


def test_decode_limits_pass_through(pipe: tuple[int, int]) -> None:
    r, w = pipe
    port = Port(r, w)
    port.send([[[1]]])
    port.send([[[1]]])
    with pytest.raises(ETFDecodeError, match="max_depth=2"):
        port.receive(max_depth=2)
    assert port.receive(max_depth=3) == [[[1]]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"packet": 3}, "packet"),
        ({"compressed": 10}, "compressed"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"max_frame_size": -1}, "max_frame_size"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Port(0, 1, **kwargs)


def test_default_max_frame_is_documented_value() -> None:
    assert DEFAULT_MAX_FRAME == 512 * 1024 * 1024
