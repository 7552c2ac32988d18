"""Claimed deliveries waiting for an attempt worker, and the bounded queue that holds them."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from maildaemon.delivery import ClaimedDelivery, RecipientOutcome


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
    so claims never run ahead of what the workers and the writer can absorb.
    """

    def __init__(self, slots: int) -> None:
        self._jobs: deque[Job | None] = deque()
        self._has_jobs = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._free = slots
        self.slots = slots

    async def wait_for_slots(self, enough: int) -> int:
        """Wait until ``enough`` slots are free, or any slot while the workers starve."""
        while self._free <= 0 or (self._free < enough and self._jobs):
            self._has_space.clear()
            await self._has_space.wait()
        return self._free

    def put(self, jobs: list[Job]) -> None:
        self._free -= len(jobs)
        self._jobs.extend(jobs)
        if self._jobs:
            self._has_jobs.set()

    async def get(self) -> Job | None:
        while not self._jobs:
            self._has_jobs.clear()
            await self._has_jobs.wait()
        return self._jobs.popleft()

    def release(self) -> None:
        """A job is finished with (its result committed): its slot is free again."""
        self._free += 1
        self._has_space.set()

    def release_after(self, _: asyncio.Future[bool]) -> None:
        self.release()

    def close(self, workers: int) -> list[Job]:
        """Take back every job not yet started and tell each worker to stop."""
        left = [j for j in self._jobs if j is not None]
        self._jobs.clear()
        self._jobs.extend([None] * workers)
        self._has_jobs.set()
        return left
