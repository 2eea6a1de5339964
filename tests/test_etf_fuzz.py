"""ETF round trips and fuzzing: what we encode decodes back, and garbage only ever raises ETFDecodeError."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etf_samples import ALL_FIXTURE_BODIES, normal, random_term, same, terms
from finetune_worker.wire import ETFDecodeError, decode, encode


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms, st.sampled_from([0, 0, 1, 9]))
def test_round_trip(value: Any, level: int) -> None:
    data = encode(value, compressed=level)
    decoded = decode(data)
    expected = normal(value)
    if isinstance(expected, dict) and len(expected) != len(value):
        return  # keys like "a" and Atom("a") are one key in Python already
    assert same(decoded, expected), (value, decoded)
    assert encode(decoded) == encode(expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms)
def test_every_truncation_is_a_decode_error(value: Any) -> None:
    data = encode(value)
    for cut in range(len(data)):
        with pytest.raises(ETFDecodeError):
            decode(data[:cut])


@pytest.mark.parametrize("body", ALL_FIXTURE_BODIES)
def test_fixture_truncations(body: bytes) -> None:
    data = b"\x83" + body
    for cut in range(len(data)):
        with pytest.raises(ETFDecodeError):
            decode(data[:cut])


# --- fuzz: whatever the bytes, only ETFDecodeError ------------------------------------------


def decode_or_protocol_error(data: bytes) -> None:
    try:
        decode(data, max_depth=64, max_size=1 << 20)
    except ETFDecodeError as exc:
        assert 0 <= exc.offset <= len(data) + 64 * 1024 * 1024, exc


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(tail: bytes) -> None:
    decode_or_protocol_error(b"\x83" + tail)
    decode_or_protocol_error(tail)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(terms, st.data())
def test_fuzz_mutated_encodings(value: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(value, compressed=data.draw(st.sampled_from([0, 0, 6]))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "insert":
            raw[at:at] = bytes([data.draw(st.integers(0, 255))])
        elif at < len(raw) and op == "delete":
            del raw[at]
        elif at < len(raw) and op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif at < len(raw):
            raw[at] = data.draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 106, 108, 116, 80, 131]))
    decode_or_protocol_error(bytes(raw))


def test_fuzz_mutated_encodings_seeded() -> None:
    rng = random.Random(1234)
    seeds = [b"\x83" + body for body in ALL_FIXTURE_BODIES]
    seeds += [encode(random_term(rng), compressed=rng.choice([0, 0, 0, 6])) for _ in range(300)]
    for _ in range(30_000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw))
            op = rng.randrange(4)
            if op == 0:
                raw[at] = rng.randrange(256)
            elif op == 1:
                raw[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 106, 108, 116, 80, 131])
            elif op == 2 and len(raw) > 1:
                del raw[at]
            else:
                raw[at:at] = bytes([rng.randrange(256)])
        decode_or_protocol_error(bytes(raw))
