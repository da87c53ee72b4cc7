"""The walk: listing pages stored in the state, checkpointed, one walker per account."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import structlog

from ..logs import redact
from ..paginate import walk_pages
from .base import WALKED_ELSEWHERE, EngineParts

log = structlog.get_logger("archiver.engine")


class Walker(EngineParts):
    """Walks ``GET /recordings`` into the state (full walks checkpointed, incremental ones stop at known recordings)."""

    async def _full_walk_due(self) -> bool:
        if await self.state.walk_checkpoint("full") is not None:
            return True
        done = await self.state.get_meta("walk_done:full")
        interval = self.workers_cfg.full_rewalk_interval
        return done is None or (interval > 0 and time.time() - float(done) > interval)

    async def _walk_unless_stopped(
        self, full: bool, since: datetime | None = None, until: datetime | None = None
    ) -> int | None:
        """``_walk``, abandoned at once when ``stop`` is set (SIGTERM must not wait for a slow
        listing); None then. Each page is stored whole before the next is asked for."""
        walked = await self._until_stopped(self._walk(full, since, until))
        if walked is None:
            log.info("walk_interrupted", hint="the next run resumes from the checkpoint")
        return walked

    async def _walk(self, full: bool, since: datetime | None = None, until: datetime | None = None) -> int:
        """``_walk_pages`` unless another daemon walks this account now (a shared state): one
        walker per account; the others only download."""
        async with self.state.walk_lock() as mine:
            if not mine:
                log.debug("walk_skipped", reason="another daemon walks this account now")
                return WALKED_ELSEWHERE
            return await self._walk_pages(full, since, until)

    async def _walk_pages(self, full: bool, since: datetime | None = None, until: datetime | None = None) -> int:
        """Store listed recordings. Full walks checkpoint each page; incremental ones stop at
        known recordings (after ``overlap`` of them). Returns how many were new."""
        name = None
        start = ""
        if full:
            name = "full" if since is None and until is None else f"range:{since}:{until}"
            start = await self.state.walk_checkpoint(name) or ""
            if start:
                log.info("walk_resumed", walk=name)
        new_total = 0
        known_total = 0
        pages = 0
        async for page in walk_pages(self.client, self.cfg.api.page_size, start):
            pages += 1
            for raw_id, reason in page.rejected:
                self.result.stats["rejected"] += 1
                log.error("listing_item_rejected", recording_id=redact(raw_id), reason=reason)
            recs = page.recordings
            reached_since = since is not None and any(r.tm_create and r.tm_create < since for r in recs)
            if since is not None:
                recs = [r for r in recs if r.tm_create is None or r.tm_create >= since]
            if until is not None:
                recs = [r for r in recs if r.tm_create is None or r.tm_create < until]
            token = "" if reached_since else page.next_token
            # shielded: a stop mid-walk must not cut a page's transaction in two
            new, known = await asyncio.shield(self.state.store_page(recs, name, token))
            new_total += new
            self.result.stats["pages"] += 1
            self.result.stats["discovered"] += new
            if new:
                self.wake.set()
            if reached_since:
                break
            if not full:
                known_total += known
                if known_total >= self.workers_cfg.overlap or (page.raw_count and known == len(page.recordings)):
                    break
        if name is not None:
            await self.state.end_walk(name)
        log.debug("walk_done", full=full, pages=pages, new=new_total)
        return new_total
