"""The storage listing as a download path: ``GET /storage_files`` walked into the state beside
the recordings (each recording's channel files with their signed URLs), and the choice, per
recording, between its listed files (no API budget) and ``GET /recordingfiles/{id}``.

A listed URL is valid 7 days from the file's creation, so the walk goes no further back than
that: about one request per 50 recordings of the last week. A recording older than its URLs,
one whose files are not listed, are listed ambiguously or failed verification goes through
``/recordingfiles`` exactly as before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from ..errors import AuthRefused, LocalStorageError, NotReady
from ..logs import redact
from ..paginate import walk_pages
from ..state import Row
from ..storagefiles import URL_MARGIN, URL_VALIDITY, Route, StorageFile, parse_storage_file, storage_route
from .base import EngineParts

log = structlog.get_logger("archiver.engine")

STORAGE_WALK = "storage"  # the first walk's checkpoint name
STORAGE_WAIT = 30.0  # seconds a recording waits at most for the storage walk to reach its files
FILE_HEADROOM = 60.0  # seconds a file may seem registered before its recording ended (clocks differ)
FIRST_FILE_WAIT = 600.0  # seconds after its end a recording with none of its files listed waits for them
REWALK_SPACING = (2.0, 60.0)  # extra walks while recordings wait for files: 2 s apart, doubling to 60 s
STRANGER_BATCH = 100


class StorageWalker(EngineParts):
    """Walks ``GET /storage_files`` (the first walk checkpointed, later ones stop at files
    already stored) and routes each recording to its listed files or ``/recordingfiles``."""

    async def _listed_files(self, row: Row) -> tuple[dict[str, Any], ...]:
        """The channel files to fetch ``row`` from, or () for ``/recordingfiles``. While the walk
        has not yet passed the recording's end its files may be on a page to come: wait for
        them (at most ``STORAGE_WAIT``). Before the settle window, a recording with only some
        of its files listed waits (``NotReady``: no request spent), as the ZIP path would."""
        if not self.client.cfg.storage_listing or row.id in self.downloader.listing_failed:
            return ()
        ended = row.tm_end if row.tm_end is not None else row.tm_create
        now = time.time()
        if ended is None or ended < now - URL_VALIDITY + URL_MARGIN:
            return ()  # its files' URLs have expired: one /recordingfiles request is the cheapest way
        ref_type = str(row.raw.get("reference_type") or "")

        async def route_now() -> Route:
            return storage_route(await self.state.storage_files_of(row.id), ref_type, time.time())

        route = await self.files_progress.until(route_now, lambda r: r.way not in ("wait", "absent"),
                                                ended - FILE_HEADROOM, STORAGE_WAIT, self.stop)
        if route.way == "storage":
            return route.files
        if route.way == "fallback":
            if row.id not in self._route_logged:
                self._route_logged.add(row.id)
                self._fell_back("listing")
                log.warning("storage_listing_unusable", recording_id=row.id, reason=route.reason,
                            hint="fetched through GET /recordingfiles instead")
            return ()
        # one channel file listed: the other may follow until the settle window, as a ZIP's would;
        # none: files are registered minutes after the end, so past FIRST_FILE_WAIT the listing
        # is not waited for (a server that lists no recordings' files must not hold them an hour)
        patience = self.cfg.archive.settle_window
        if route.way == "absent":  # and a listing that lists no recording's files at all: no wait
            patience = min(patience, FIRST_FILE_WAIT) if self.files_seen else 0.0
        if not self.files_walk_ok or now >= ended + patience:
            return ()  # no listing to wait for, or settled: the ZIP path decides (incomplete, no audio)
        self.files_wanted.set()
        raise NotReady(f"storage lists {route.reason} (registered after the call ends); no request spent")

    async def _walk_files_guarded(self) -> int:
        """``_walk_files`` whose failure never fails the run: every recording then goes through
        ``/recordingfiles``. A refused credential still stops it. Returns how many files were new."""
        if not self.client.cfg.storage_listing or self.stop.is_set():
            return 0
        try:
            return await self._until_stopped(self._walk_files()) or 0
        except (AuthRefused, LocalStorageError):
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the recordings go through /recordingfiles
            self.files_walk_ok = False
            self.result.stats["files_walk_failed"] += 1
            log.error("storage_walk_failed", error=redact(str(exc)),
                      hint="recordings are fetched through GET /recordingfiles until a walk succeeds")
            return 0

    async def _walk_files(self) -> int:
        """The walk under this account's lock; returns how many files were new (0 when another
        daemon walks it now). Within this process one walk at a time: a cycle's and an extra
        one asked for by a waiting recording take turns."""
        async with self._files_walking, self.state.walk_lock("storage") as mine:
            if not mine:
                return 0
            with self.files_progress.walking():
                new = await self._walk_file_pages()
        self.files_walk_ok = True
        return new

    async def _walk_file_pages(self) -> int:
        """Pages of ``GET /storage_files``, each stored whole, until files older than any
        usable URL, or (once a first walk is done) files already stored."""
        first = await self.state.get_meta("walk_done:storage") is None
        start = await self.state.walk_checkpoint(STORAGE_WALK) or ""
        first = first or bool(start)
        horizon = time.time() - URL_VALIDITY + URL_MARGIN
        new_total = 0
        async for page in walk_pages(self.client, self.cfg.api.page_size, start,
                                     fetch=self.client.list_storage_files, parse_item=parse_storage_file):
            for raw_id, reason in page.rejected:
                self.result.stats["files_rejected"] += 1
                log.warning("storage_file_rejected", file_id=redact(raw_id), reason=reason)
            files: list[StorageFile] = page.items
            times = [f.tm_create.timestamp() for f in files if f.tm_create is not None]
            past = bool(times) and min(times) < horizon
            token = "" if past else page.next_token
            new, known = await asyncio.shield(
                self.state.store_storage_files(files, STORAGE_WALK if first else None, token))
            new_total += new
            if times:
                self.files_progress.moved_to(min(times))
            self.result.stats["file_pages"] += 1
            self.result.stats["files_listed"] += new
            ours = sum(1 for f in files if f.recording_id is not None)
            self.files_seen = self.files_seen or ours > 0
            if past:
                break
            if not first and ours and (known >= self.workers_cfg.overlap or known == ours):
                break
        if first:
            await self.state.end_walk(STORAGE_WALK)
            await self.state.set_meta("walk_done:storage", str(time.time()))
        return new_total

    async def _note_strangers(self, walked_since: float) -> None:
        """Each listed file that names no recording of this account, logged once: its bytes are
        never used for any recording. Only files listed before this walk of the recordings began
        (``walked_since``, less a minute): a newer one's recording may be on a page still to come."""
        if not self.client.cfg.storage_listing:
            return
        for f in await self.state.storage_strangers(STRANGER_BATCH, walked_since - FILE_HEADROOM):
            self.result.stats["files_strangers"] += 1
            log.warning("storage_file_of_no_recording", file_id=f["id"], reference_id=redact(f["recording_id"]),
                        hint="listed for a recording this account does not list; never used for another")

    async def _rewalk_files(self) -> None:
        """Between cycles: one more walk when a recording waits for files not listed yet (they
        are registered after the call ends). Walks that find nothing new come ever further
        apart (``REWALK_SPACING``): a recording whose files never come (a full store) waits out
        its settle window at about one request a minute, not one a second."""
        low, high = REWALK_SPACING
        spacing = low
        while not self.stop.is_set():
            await self.files_wanted.wait()
            self.files_wanted.clear()
            try:
                new = await self._walk_files_guarded()
            except (AuthRefused, LocalStorageError) as exc:
                await self._halt(exc)
                new = 0
            self.wake.set()
            spacing = low if new else min(high, spacing * 2)
            await self._sleep_unless_stopped(spacing)
