"""The feeder: the only reader of due work, handing it to the workers' bounded queue."""

from __future__ import annotations

import asyncio
import time

from ..errors import LocalStorageError
from .base import EngineParts


class Feeder(EngineParts):
    """Hands due recordings to the resolvers; in a backfill, says when nothing is left to wait for."""

    async def _feed(self) -> None:
        """Hand due recordings to the workers; in backfill, finish when nothing is left to wait for.
        A state database that cannot be written pauses the run; the feeder waits it out."""
        while not self.stop.is_set():
            try:
                if await self._feed_once():
                    return
            except LocalStorageError as exc:
                self._fatal(str(exc))
                await self._sleep_unless_stopped(max(0.1, self.paused_until - time.time()))

    async def _feed_once(self) -> bool:
        """One round of the feeder; True when a backfill has nothing left to wait for."""
        self.wake.clear()
        now = time.time()
        free = self.queue.maxsize - self.queue.qsize()
        # refill in batches, not row by row: one query and one commit serve many rows; a
        # queue still three-quarters full is refilled when a worker finishes (self.wake)
        can_refill = free >= max(1, self.queue.maxsize // 4) and now >= self.paused_until
        if can_refill:
            rows = await self.state.due(now, free, self.in_flight)
            if rows:
                await self.state.claim([r.id for r in rows if r.state == "pending"])
                for row in rows:
                    self.in_flight.add(row.id)
                    self.queue.put_nowait(row)
                return False
        timeout = 1.0
        if can_refill:
            next_due = await self.state.next_due_time()
            if self.mode == "backfill" and self.walk_done:
                if not self.in_flight and (next_due is None or next_due > self.deadline):
                    return True
                if now >= self.deadline and self.queue.empty() and self.downloads.empty():
                    # --wait is over and nothing due is left to start: what is still running
                    # (a slow ZIP build, a dripping transfer) gets the shutdown grace
                    return True
            if next_due is not None:
                timeout = min(max(next_due - now, 0.01), 5.0)
        elif now < self.paused_until:
            timeout = min(self.paused_until - now, 5.0)
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass
        return False
