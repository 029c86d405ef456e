"""Admission: how many requests generate at once and how many may wait."""
from __future__ import annotations

import asyncio
from typing import Optional


class Gate:
    """At most `running` requests hold a slot and `waiting` wait for one; beyond that: turned away.

    Used from the event loop only, so plain counters are safe.
    """

    def __init__(self, running: int, waiting: int):
        self.max_running, self.max_total = running, running + waiting
        self.admitted = 0   # running + waiting
        self.running = 0
        self._sem: Optional[asyncio.Semaphore] = None  # made in the serving loop (Python 3.9 binds at creation)

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def try_admit(self) -> bool:
        if self.admitted >= self.max_total:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    async def acquire(self, gone: asyncio.Event) -> bool:
        """Wait for a running slot; False (and no slot) if the client went away first."""
        if gone.is_set():
            return False
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_running)
        if not self._sem.locked():
            await self._sem.acquire()  # a free slot: no wait
        else:
            acq = asyncio.ensure_future(self._sem.acquire())
            waiter = asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait({acq, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if acq.done() and not acq.cancelled() and acq.exception() is None:
                    self._sem.release()
                else:
                    acq.cancel()  # Semaphore.acquire hands a slot it was woken for to the next waiter
                raise
            finally:
                waiter.cancel()
            if not acq.done():
                acq.cancel()
                try:
                    await acq
                except asyncio.CancelledError:
                    pass
            if acq.cancelled() or acq.exception() is not None:
                return False
        self.running += 1
        if gone.is_set():
            self.release()
            return False
        return True

    def release(self) -> None:
        self.running -= 1
        self._sem.release()


