"""A token bucket shared by every worker: we pace ourselves instead of learning the limit by 429s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Grant = Callable[[int], Awaitable[tuple[int, float]]]  # (tokens wanted) -> (granted, wait when none)
GRANT_TTL = 1.0  # seconds granted tokens may be kept unspent; older ones go back unused


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate <= 0`` disables pacing.

    Waiters are served in arrival order (one lock), so no worker starves.  ``pause()`` stops
    everyone until a deadline: a 429's ``Retry-After`` slows the whole pool, not one worker.
    """

    def __init__(self, rate: float, burst: int, grant: Grant | None = None) -> None:
        """With ``grant``, tokens come from a bucket shared with other processes (a few at a
        time, see ``state.postgres.PgState.grant``) instead of this one's clock."""
        self.rate = rate
        self.burst = max(1, burst)
        self.grant = grant
        self._granted_at = 0.0
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        until = time.monotonic() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._tokens = 0.0  # resume gently after a 429, with no saved-up burst

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    self._last = time.monotonic()
                    continue
                if self.rate <= 0:
                    return
                if self.grant is not None:
                    await self._take_shared(now)
                    return
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)

    async def _take_shared(self, now: float) -> None:
        """One token from what the shared bucket granted us, asking it for a few more when
        none is left (or what we hold is older than ``GRANT_TTL``: unspent, it lapses)."""
        assert self.grant is not None
        if now - self._granted_at > GRANT_TTL:
            self._tokens = 0.0
        while self._tokens < 1.0:
            got, wait = await self.grant(max(1, min(self.burst, round(self.rate / 4))))
            if got:
                self._tokens, self._granted_at = float(got), time.monotonic()
            else:
                await asyncio.sleep(wait)
        self._tokens -= 1.0
