"""``with server:`` for the servers the dev stack and the tests start: started on entry,
stopped on exit, and stopped as well when the start fails half-way (no process left)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Managed(ABC):
    """A server with ``start()`` and an idempotent ``stop()`` as a context manager."""

    @abstractmethod
    def start(self) -> object:
        """Start the server (what it returns is the subclass's: its address, its env)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop whatever runs; safe to call when nothing does, or only part of it."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
