"""The listener's request pacing: a token bucket that reserves ahead (a client over the
rate waits its turn, up to a bound), and per-address buckets that keep one address to
half the rate, in a table of bounded size."""

from __future__ import annotations

import asyncio
import time

import pytest

from maildaemon.http.pacing import RequestPacer, TokenBucket


def test_the_bucket_gives_its_burst_then_schedules_ahead_up_to_the_bound() -> None:
    bucket = TokenBucket(rate=10.0, capacity=3.0, now=0.0)
    assert [bucket.reserve(0.0, 1.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    waits = [bucket.reserve(0.0, 1.0) for _ in range(10)]
    assert waits == pytest.approx([0.1 * n for n in range(1, 11)])
    assert bucket.reserve(0.0, 1.0) is None  # 1.1 s ahead: refused, nothing taken
    assert bucket.reserve(0.5, 1.0) == pytest.approx(0.6)  # time paid part of the debt
    assert TokenBucket(10.0, 3.0, 0.0).reserve(100.0, 1.0) == 0.0  # refilled, capped


async def test_a_client_over_the_rate_waits_and_another_address_does_not() -> None:
    pacer = RequestPacer(rate=40.0, burst=4, max_wait=1.0)  # each address: 20/s, burst 2
    started = time.monotonic()
    outcomes = await asyncio.gather(*(pacer.admit("10.0.0.1") for _ in range(12)))
    flooder_took = time.monotonic() - started
    assert outcomes[:2] == [None, None]
    assert all(p is not None and not p.refused and p.limit == "peer" for p in outcomes[2:])
    # Paced to its 20/s: never faster than 10 waits of 1/20 s; the upper bound is loose
    # because a loaded machine only delays the event loop further.
    assert 10 / 20 - 0.05 <= flooder_took < 10 / 20 + 1.0
    started = time.monotonic()
    assert await pacer.admit("10.0.0.2") is None  # the listener's bucket has room: no pacing
    assert time.monotonic() - started < 0.5


async def test_beyond_the_wait_bound_a_request_is_refused_after_waiting() -> None:
    pacer = RequestPacer(rate=20.0, burst=2, max_wait=0.3)  # each address: 10/s, burst 1
    started = time.monotonic()
    outcomes = await asyncio.gather(*(pacer.admit("10.0.0.1") for _ in range(8)))
    refused = [p for p in outcomes if p is not None and p.refused]
    assert len(refused) == 4 and {p.limit for p in refused} == {"peer"}  # 1 + 3 in 0.3 s
    assert time.monotonic() - started >= 0.3  # a refusal is no faster than the bound
    # Many addresses at once: the listener's bucket refuses what its own wait exceeds.
    outcomes = await asyncio.gather(*(pacer.admit(f"10.1.0.{n}") for n in range(20)))
    assert {p.limit for p in outcomes if p is not None and p.refused} == {"listener"}


async def test_the_table_of_addresses_is_bounded() -> None:
    pacer = RequestPacer(rate=1000.0, burst=100, max_wait=1.0, max_peers=8)
    for n in range(100):
        await pacer.admit(f"10.2.0.{n}")
    assert pacer.addresses == tuple(f"10.2.0.{n}" for n in range(92, 100))
