"""Claimed deliveries waiting for an attempt worker, and the bounded queue that holds them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from maildaemon.delivery import ClaimedDelivery, RecipientOutcome

READY_PER_CONNECTION = 4  # claimed jobs waiting per connection, besides the result window


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery ready to send: the pinned bytes and who still needs them."""

    claim: ClaimedDelivery
    message: bytes
    recipients: tuple[str, ...]
    suppressed: dict[str, RecipientOutcome]


class JobQueue:
    """Claimed jobs waiting for a worker; bounded by the number of open slots.

    A slot is taken when a job is claimed and given back when its result is committed,
    so claims never run ahead of what the workers and the writer can absorb — and a crash
    leaves at most ``slots`` claims whose outcome is open (see ``for_connections``).
    ``stop()`` (SIGTERM) ends the hand-out at once: no worker gets another job and no new
    SMTP transaction begins (``accepting`` turns False); jobs not begun are taken back with
    ``take_unstarted()``.
    """

    @classmethod
    def for_connections(cls, connections: int, window: int) -> JobQueue:
        """Per connection: the result window (sent, result not yet committed) and a few
        jobs ready, so claims come in useful batches and a worker finds its next job at
        hand (to pipeline it behind the current one); a claim is due, however small, once
        fewer jobs than connections are ready."""
        return cls((window + READY_PER_CONNECTION) * connections, low_water=connections)

    def __init__(self, slots: int, low_water: int = 0) -> None:
        self._jobs: deque[Job] = deque()
        self._returned: list[Job] = []  # taken by a worker that did not begin it
        # Workers waiting for a job, oldest first: a put wakes one per job, not all of them
        # (with an Event every waiting worker woke for each job, and all but one waited
        # again: some 30 wake-ups per message at a low rate with 8 connections).
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._free = slots
        self.slots = slots
        self._low_water = low_water  # ready jobs below which a claim is due, however small
        self.accepting = True
        self.stopped = asyncio.Event()

    async def wait_for_slots(self, enough: int) -> int:
        """Wait until ``enough`` slots are free, or any slot once no more than ``low_water``
        jobs are ready (so the workers never run dry: each finds its next job at hand).

        Returns 0 at once when the queue is stopped."""
        while self.accepting and (
            self._free <= 0 or (self._free < enough and len(self._jobs) > self._low_water)
        ):
            self._has_space.clear()
            await self._has_space.wait()
        return self._free if self.accepting else 0

    def put(self, jobs: list[Job]) -> None:
        """Jobs claimed (each takes a slot)."""
        self._free -= len(jobs)
        self._jobs.extend(jobs)
        self._wake(len(self._jobs))

    async def get(self) -> Job | None:
        """The next job; None once the queue is stopped (the worker then exits)."""
        while self.accepting and not self._jobs:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(len(self._jobs))  # woken, then cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        if not self.accepting:
            return None
        return self._take()

    def _wake(self, jobs: int) -> None:
        """Wake up to ``jobs`` waiting workers (each finds its job, or waits again when a
        busy worker took it first)."""
        while jobs > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                jobs -= 1

    def get_nowait(self) -> Job | None:
        """The next job if one is waiting (and the queue is not stopped), else None."""
        if not self.accepting or not self._jobs:
            return None
        return self._take()

    def _take(self) -> Job:
        job = self._jobs.popleft()
        if len(self._jobs) <= self._low_water:
            self._has_space.set()  # the scheduler may be waiting for the low-water mark
        return job

    def give_back(self, job: Job) -> None:
        """A worker took ``job`` but began no SMTP transaction for it."""
        self._returned.append(job)

    def release(self) -> None:
        """A job is finished with (its result committed): its slot is free again."""
        self._free += 1
        self._has_space.set()

    def release_after(self, _: asyncio.Future[bool]) -> None:
        self.release()

    def stop(self) -> None:
        """Hand out nothing more: waiting workers get None, a waiting scheduler wakes."""
        self.accepting = False
        self.stopped.set()
        self._wake(len(self._waiters))
        self._has_space.set()

    def take_unstarted(self) -> list[Job]:
        """Take back every job no worker began (their claims go back to the store)."""
        left = [*self._jobs, *self._returned]
        self._jobs.clear()
        self._returned.clear()
        self._free += len(left)
        if left:
            self._has_space.set()
        return left
