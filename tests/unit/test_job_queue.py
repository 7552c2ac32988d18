"""The job queue between the scheduler and the attempt workers: a job wakes one waiting
worker, not every one; a stop wakes them all; a wake-up is never lost to a cancellation."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from maildaemon.pipeline.jobs import Job, JobQueue


def _job(n: int) -> Job:
    return Job(claim=cast(Any, f"claim-{n}"), message=b"", recipients=(), suppressed={})


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_job_wakes_one_waiting_worker() -> None:
    queue = JobQueue(slots=16)
    woken: list[int] = []
    loops = 0
    original = queue.get

    async def worker(i: int) -> None:
        nonlocal loops
        while (job := await original()) is not None:
            loops += 1
            woken.append(i)
            del job

    tasks = [asyncio.create_task(worker(i)) for i in range(8)]
    await _settle()
    before = list(queue._waiters)
    assert len(before) == 8
    queue.put([_job(1)])
    await _settle()
    # One worker took the job and waits again; the other seven never woke (the very
    # futures they waited on are still pending).
    assert len(woken) == 1
    assert sum(not f.done() for f in before) == 7
    queue.put([_job(2), _job(3)])
    await _settle()
    assert len(woken) == 3
    assert sum(not f.done() for f in before) == 5
    queue.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert loops == 3 and not queue._waiters


async def test_a_woken_worker_cancelled_passes_its_job_on() -> None:
    queue = JobQueue(slots=4)
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await _settle()
    queue.put([_job(1)])  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    got = await asyncio.wait_for(second, 1)
    assert got is not None and got.claim == "claim-1"
    assert first.cancelled()


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    queue = JobQueue(slots=4)
    waiting = asyncio.create_task(queue.get())
    await _settle()
    waiting.cancel()
    await _settle()
    assert not queue._waiters
    queue.put([_job(1)])
    assert queue.get_nowait() is not None
