"""The calls: ``GET /calls`` walked into the state beside the recordings (who spoke to whom, for
the sidecar and ``find``), and the call noted beside a recording archived before it was listed."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

import structlog

from ..calls import call_block, parse_call
from ..errors import AuthRefused, LocalStorageError
from ..logs import redact
from ..paginate import walk_pages
from ..state import Row
from .base import EngineParts

log = structlog.get_logger("archiver.engine")

CALLS_WALK = "calls"  # the full walk's checkpoint name
CALL_WAIT = 30.0  # seconds a sidecar waits at most for the calls walk to reach its call
CALL_HEADROOM = 3600.0  # seconds a call may have begun before its recording (a recording started mid-call)
CALL_LEAD = timedelta(days=1)  # a backfill --since walks calls this much further back (a call starts first)
NOTE_BATCH = 200


class CallWalker(EngineParts):
    """Walks ``GET /calls`` (full walks checkpointed, incremental ones stop at calls already
    stored unchanged) and writes each late call beside its archived recording."""

    async def _call_block(self, row: Row) -> dict[str, Any]:
        """The sidecar's ``call`` block: the call as the state knows it, or why there is none.
        While the calls walk has not yet passed the recording's time, the call may be on a page
        still to come: wait for it (at most ``CALL_WAIT``)."""
        ref_type = str(row.raw.get("reference_type") or "")
        ref_id = row.raw.get("reference_id")
        if ref_type != "call" or not isinstance(ref_id, str):
            return call_block(None, ref_type)
        created = row.tm_create if row.tm_create is not None else time.time()
        call = await self.calls_progress.until(lambda: self.state.call_of(ref_id), lambda c: c is not None,
                                               created - CALL_HEADROOM, CALL_WAIT, self.stop)
        return call_block(call, ref_type)

    async def _walk_calls_guarded(self, full: bool, since: datetime | None = None) -> None:
        """``_walk_calls`` whose failure never fails the run: a call is metadata, a recording
        archived without it gets it on a later cycle. A refused credential still stops it."""
        if not self.cfg.archive.call_metadata or self.stop.is_set():
            return
        try:  # cancelled when the recordings walk fails: this one ends with it, never after
            await self._until_stopped(self._walk_calls(full, since))
        except (AuthRefused, LocalStorageError):
            raise
        except Exception as exc:  # noqa: BLE001 - logged; recordings go on without their calls
            self.result.stats["calls_walk_failed"] += 1
            log.error("calls_walk_failed", error=redact(str(exc)),
                      hint="recordings are archived without their call; the next cycle resumes the walk")

    async def _walk_calls(self, full: bool, since: datetime | None = None) -> None:
        async with self.state.walk_lock("calls") as mine:
            if not mine:
                return
            if not full and await self.state.get_meta("walk_done:calls") is None:
                full = True  # never walked whole: the first walk goes all the way back
            with self.calls_progress.walking():
                new_total = await self._walk_call_pages(full, since)
        if new_total:
            await self._note_calls()

    async def _walk_call_pages(self, full: bool, since: datetime | None) -> int:
        """The calls walk's pages, each stored whole; returns how many calls were new."""
        start = (await self.state.walk_checkpoint(CALLS_WALK) or "") if full else ""
        stop_before = since - CALL_LEAD if since is not None else None
        new_total = 0
        async for page in walk_pages(self.client, self.cfg.api.page_size, start,
                                     fetch=self.client.list_calls, parse_item=parse_call):
            for raw_id, reason in page.rejected:
                self.result.stats["calls_rejected"] += 1
                log.warning("call_rejected", call_id=redact(raw_id), reason=reason)
            reached = stop_before is not None and any(c.tm_create and c.tm_create < stop_before
                                                      for c in page.items)
            token = "" if reached else page.next_token
            new, known = await asyncio.shield(
                self.state.store_calls(page.items, CALLS_WALK if full else None, token))
            new_total += new
            times = [c.tm_create.timestamp() for c in page.items if c.tm_create is not None]
            if times:
                self.calls_progress.moved_to(min(times))
            self.result.stats["call_pages"] += 1
            self.result.stats["calls"] += new
            if reached:
                break
            if not full and (known >= self.workers_cfg.overlap or (page.raw_count and known == len(page.items))):
                break
        if full:
            await self.state.end_walk(CALLS_WALK)
            if stop_before is None:
                await self.state.set_meta("walk_done:calls", str(time.time()))
        log.debug("calls_walk_done", full=full, new=new_total)
        return new_total

    async def _note_calls(self) -> None:
        """Each stored recording whose call was listed only after its sidecar was written gets
        it now: in a directory the sidecar is rewritten with it, in a bucket ``<id>.call.json``
        goes beside the (locked, never rewritten) sidecar."""
        while not self.stop.is_set():
            rows = await self.state.calls_to_note(NOTE_BATCH)
            if not rows:
                return
            noted = []
            for row in rows:
                try:
                    await self.destination.note_call(row, call_block(row["call"], "call"))
                except LocalStorageError as exc:
                    log.warning("call_not_noted", recording_id=row["id"], error=str(exc),
                                hint="tried again after the next calls walk that finds a new call")
                    return
                noted.append(row["id"])
            await self.state.mark_call_noted(noted)
            self.result.stats["calls_noted"] += len(noted)
