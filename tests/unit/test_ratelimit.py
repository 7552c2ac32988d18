"""Send-rate limits: token buckets and the back-off on "slow down" replies."""

from __future__ import annotations

import time

from maildaemon.sending.ratelimit import RateLimiter, TokenBucket
from maildaemon.sending.reply import Reply, SendReport


def test_bucket_allows_a_burst_then_spaces_tokens() -> None:
    bucket = TokenBucket(10.0, burst=2)
    assert bucket.delay() == 0.0 and bucket.delay() == 0.0
    assert 0.05 < bucket.delay() <= 0.1


async def test_domain_rate_limit_paces_one_domain_only() -> None:
    limiter = RateLimiter(0.0, 20.0, backoff=60.0)
    start = time.monotonic()
    for _ in range(25):
        await limiter.acquire(["a@slow.example"])
    assert time.monotonic() - start >= 0.2  # 5 beyond the burst of 20, at 20/s
    start = time.monotonic()
    await limiter.acquire(["b@other.example"])
    assert time.monotonic() - start < 0.05


async def test_slow_down_reply_backs_the_domain_off() -> None:
    limiter = RateLimiter(0.0, 1000.0, backoff=0.3)
    limiter.observe(SendReport(deferred={"x@busy.example": Reply(421, "4.7.0 rate limited")}))
    start = time.monotonic()
    await limiter.acquire(["y@busy.example"])
    assert time.monotonic() - start >= 0.25


async def test_off_by_default() -> None:
    limiter = RateLimiter(0.0, 0.0, backoff=60.0)
    limiter.observe(SendReport(deferred={"x@busy.example": Reply(421, "slow down")}))
    assert not limiter.enabled
    start = time.monotonic()
    await limiter.acquire(["y@busy.example"])
    assert time.monotonic() - start < 0.05
