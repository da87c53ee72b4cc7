"""One download: signed URL -> storage stream -> a store helper verifies it -> the destination.

The body streams into memory (or, beyond ``WRITE_BUFFER``, to a temporary file in the
destination's staging directory); a store helper process (``storepool``) then writes the rest,
checks it and, for a directory, fsyncs and renames it (``store``); the destination commits it
(``destinations``: for a bucket, the upload). Retries of a broken stream or a stale URL happen here.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiofiles.os
import aiohttp
import structlog

from .client import ApiClient
from .config import ArchiveConfig
from .destinations import Destination
from .errors import InvalidRecording, LocalStorageError, NotReady, TransientError, VerificationError
from .inspect import body_kind, parse_goog_hash
from .layout import Layout, temp_path
from .logs import redact
from .state import Row
from .store import (
    Archived,
    ListedFile,
    Staged,
    StoreJob,
    create_exclusive,
    listed_offsets,
    make_dirs,
    remove_quietly,
)
from .storepool import StorePool

log = structlog.get_logger("archiver.download")
T = TypeVar("T")

TRIES_PER_ATTEMPT = 3  # low-level tries (fresh URL, re-stream) before the attempt counts as failed
LISTING_TRIES = 2  # tries of a recording's listed files before it goes through /recordingfiles instead
WRITE_BUFFER = 1 << 20  # bodies up to this size go to the store helper whole, in memory
IOV_MAX = 1024  # buffers per writev (Linux's limit)


def remove_temporaries(destination: Destination, row: Row) -> None:
    """Remove what an interrupted download of ``row`` may have left (start-up recovery)."""
    try:
        directory = destination.staging_directory(row)
    except Exception:  # noqa: BLE001 - a row we cannot place has no temporaries either
        return
    try:  # ours and any other daemon's (a shared state: each marks its own names)
        left = [p for p in directory.iterdir() if p.name.startswith(f".{row.id}.") and p.name.endswith(".partial")]
    except OSError:
        return
    remove_quietly(*left)


class Downloader:
    """Archives one recording at a time; shared by all workers (it holds no per-call state)."""

    def __init__(self, client: ApiClient, cfg: ArchiveConfig, store: StorePool, destination: Destination) -> None:
        self.client = client
        self.cfg = cfg
        self.store = store
        self.destination = destination
        self.layout = Layout(cfg.directory, cfg.layout)
        self._made_dirs: set[Path] = set()
        # recordings whose listed files failed (this process): /recordingfiles from now on
        self.listing_failed: set[str] = set()

    def directory(self, row: Row) -> Path:
        return self.destination.staging_directory(row)

    async def adopt(self, row: Row, directory: Path) -> Archived | None:
        return await self.destination.adopt(row, directory)

    async def archive(
        self, row: Row, directory: Path, url: str | None = None, listed: tuple[dict[str, Any], ...] = ()
    ) -> Archived:
        """Download (from ``url`` if already resolved, or from its ``listed`` channel files),
        verify and store ``row`` in ``directory`` (from ``self.directory(row)``); raise an
        ``archiver.errors`` class otherwise. Listed files that fail (refused, expired, failing
        verification twice) leave the recording to ``/recordingfiles``, in the same attempt."""
        self.store.warm()  # the helpers start while this transfers
        if directory not in self._made_dirs:  # created once per process, not checked per file
            await asyncio.to_thread(make_dirs, self.layout.root, directory)
            self._made_dirs.add(directory)
        if listed:
            try:
                return await self._from_listing(row, directory, listed)
            except _ListingFailed as exc:
                self.listing_failed.add(row.id)
                log.warning("storage_listing_fallback", recording_id=row.id, reason=redact(str(exc)),
                            hint="fetched through GET /recordingfiles instead (one API request)")
        return await self._from_recordingfiles(row, directory, url)

    async def _from_listing(self, row: Row, directory: Path, listed: tuple[dict[str, Any], ...]) -> Archived:
        last: Exception | None = None
        for _ in range(LISTING_TRIES):
            try:
                return await self._fetch_listed(row, directory, listed)
            except _StaleUrl as exc:
                raise _ListingFailed(str(exc)) from None
            except (VerificationError, TransientError, InvalidRecording) as exc:
                last = exc
                log.info("download_retry", recording_id=row.id, reason=str(exc), path="storage_files")
            except LocalStorageError:
                self._made_dirs.clear()
                raise
        raise _ListingFailed(f"listed files failed {LISTING_TRIES} times: {last}")

    async def _fetch_listed(self, row: Row, directory: Path, listed: tuple[dict[str, Any], ...]) -> Archived:
        """A recording's listed files, side by side, then stored as one ZIP. Files that will
        spill are spilled where their bytes lie in that ZIP (``listed_offsets``), so the store
        helper writes only the headers around them instead of copying every byte again."""
        tmp = temp_path(directory, row.id, "download")
        sizes = [(str(f["filename"]), int(f["filesize"])) for f in listed]
        offsets = listed_offsets(sizes) if any(size >= WRITE_BUFFER for _, size in sizes) else None
        shared: int | None = None
        places: list[_Place | None] = [None] * len(listed)
        try:
            if offsets is not None:
                shared = await _create(tmp)
                places = [_Place(tmp, shared, offset) for offset in offsets]
            files = await _all_or_none([
                self._stream_listed(temp_path(directory, row.id, f"file{i}"), f, place)
                for i, (f, place) in enumerate(zip(listed, places, strict=True))])
            if shared is not None:
                fd, shared = shared, None
                await _close(fd)
            job = StoreJob(
                row.id, row.raw, row.tm_create, row.tm_end, directory, tmp, b"", False, None, {}, row.account,
                row.call, files=tuple(files),
            )
            stored = await self.store.store(job, row.account)
            archived = await self.destination.commit(job, stored)
        except BaseException:
            if shared is not None:
                os.close(shared)
            await asyncio.to_thread(remove_quietly, tmp, temp_path(directory, row.id, "unpack"),
                                    *(temp_path(directory, row.id, f"file{i}") for i in range(len(listed))))
            raise
        if isinstance(stored, Staged) and stored.body is not None:
            await asyncio.to_thread(remove_quietly, stored.body)
        return archived

    async def _stream_listed(self, part: Path, f: dict[str, Any], place: _Place | None) -> ListedFile:
        """One listed channel file, streamed like a body (into ``part``, or in ``place``);
        checked by the store helper."""
        name = f"listed file {f['filename'][:80]!r}"
        try:
            body = await self._stream(part, f["url"], place, int(f["filesize"]), name)
        except NotReady:  # listed, but storage has no bytes for it
            raise _ListingFailed(f"{name} is empty in storage") from None
        if body.kind != "wav":
            raise VerificationError(f"{name} is not a WAV")
        return ListedFile(f["id"], f["filename"], body.tmp, body.take(), body.spilled, body.expected_length,
                          int(f["filesize"]), body.hashes, body.written, None if place is None else place.offset)

    async def _from_recordingfiles(self, row: Row, directory: Path, url: str | None) -> Archived:
        last: Exception | None = None
        for _ in range(TRIES_PER_ATTEMPT):
            try:
                if url is None:
                    url = await self.client.recordingfile_url(row.id)
                return await self._fetch(row, directory, url)
            except _StaleUrl as exc:
                url, last = None, exc
            except (VerificationError, TransientError) as exc:
                url, last = None, exc
                log.info("download_retry", recording_id=row.id, reason=str(exc))
            except LocalStorageError:
                self._made_dirs.clear()  # a directory may have been removed under us: make it again
                raise
        assert last is not None
        if isinstance(last, _StaleUrl):
            raise TransientError(str(last))
        raise last

    async def _fetch(self, row: Row, directory: Path, url: str) -> Archived:
        tmp = temp_path(directory, row.id, "download")
        try:
            body = await self._stream(tmp, url)
            job = StoreJob(
                row.id, row.raw, row.tm_create, row.tm_end, directory, tmp, body.take(), body.spilled,
                body.expected_length, body.hashes, row.account, row.call,
            )
            stored = await self.store.store(job, row.account)
            archived = await self.destination.commit(job, stored)
        except BaseException:
            await asyncio.to_thread(remove_quietly, tmp, temp_path(directory, row.id, "unpack"))
            raise
        if isinstance(stored, Staged) and stored.body is not None:  # uploaded: the staged copy goes
            await asyncio.to_thread(remove_quietly, stored.body)
        if archived.flag:
            (log.error if archived.flag == "damaged" else log.warning)(
                f"archived_{archived.flag}", recording_id=row.id, members=archived.members, reason=archived.flag_reason
            )
        return archived

    async def _stream(
        self, tmp: Path, url: str, place: _Place | None = None, max_bytes: int | None = None, name: str = "the body"
    ) -> _Body:
        """The body at ``url``, spilled to ``tmp`` (or in ``place``) past ``WRITE_BUFFER``; with
        ``max_bytes`` (a listed ``filesize``), no more than that is spilled."""
        try:
            async with self.client.storage_get(url) as resp:
                if resp.status in (400, 401, 403):
                    raise _StaleUrl(f"storage answered HTTP {resp.status} (signed URL expired or invalid)")
                if resp.status != 200:
                    raise TransientError(f"storage answered HTTP {resp.status}")
                hashes = parse_goog_hash(resp.headers.getall("x-goog-hash", []))
                body = _Body(tmp, resp.content_length, hashes, place, max_bytes, name)
                pace = TransferPace(self.client.cfg.min_transfer_rate, self.client.cfg.transfer_rate_window)
                limit = asyncio.timeout(pace.deadline(resp.content_length))
                try:
                    async with limit:
                        async for chunk in resp.content.iter_any():  # as it arrived: no re-chunking copy
                            pace.feed(len(chunk))
                            body.add(chunk)
                            if body.buffered >= WRITE_BUFFER:
                                await body.spill()
                except TimeoutError:
                    if limit.expired():  # ours, not the read timeout's
                        raise TransientError(f"storage transfer past its deadline ({pace.describe()})") from None
                    raise
                finally:
                    await body.close()
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            # before OSError: aiohttp's connection errors are OSErrors too
            raise TransientError(f"storage transfer broke: {type(exc).__name__}") from None
        except OSError as exc:
            raise LocalStorageError(f"cannot write into the archive: {exc.strerror} ({tmp.parent})") from None
        if not body.kind:
            if body.buffered:
                body.detect_kind()  # fewer than 4 bytes: raises "neither a ZIP nor a WAV"
            raise NotReady("storage answered an empty body")
        return body

class _Body:
    """A body on its way to a store helper. Up to ``WRITE_BUFFER`` bytes stay in memory and go
    to the helper whole; a larger body spills to the temporary file as it streams (the chunks
    as they arrived, in one ``writev`` per spill: no joined copy), and only its tail goes. A
    listed file with a ``_Place`` spills into the recording's ZIP at its offset instead, never
    past its listed size (``max_bytes``): the bytes beyond would land on the next file's.
    Memory stays bounded per transfer.

    The ``writev`` runs on the event loop, not in a thread: the chunks were just received there
    and are still in that core's cache, where a thread on the other core copied them from afar
    (the kernel's copy into the page cache was 28 % of a large backfill's CPU in a thread;
    inline, the run took 9 % less CPU and 5 % less time, measured pair by pair with
    ``bench/ab.py``). A buffered write of 1 MB to the page cache takes about a millisecond; a
    disk that cannot keep up throttles every writer alike, threads included."""

    def __init__(
        self, tmp: Path, expected_length: int | None, hashes: dict[str, str], place: _Place | None = None,
        max_bytes: int | None = None, name: str = "the body",
    ) -> None:
        self.tmp = tmp if place is None else place.path
        self.expected_length = expected_length
        self.hashes = hashes
        self.kind = ""
        self._pending: list[bytes] = []
        self.buffered = 0
        self._fd: int | None = None
        self._place = place
        self._max_bytes = max_bytes
        self._name = name
        self.spilled = False
        self.written = 0  # bytes spilled so far

    def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self.buffered += len(chunk)
        if not self.kind and self.buffered >= 4:  # always before the first spill (at 1 MB)
            self.detect_kind()

    def detect_kind(self) -> None:
        """From the first bytes, to stop a transfer early that is neither a ZIP nor a WAV."""
        self.kind = body_kind(b"".join(self._pending)[:4])  # all still here: spills start at 1 MB

    def take(self) -> bytes:
        data = b"".join(self._pending)
        self._pending, self.buffered = [], 0
        return data

    async def spill(self) -> None:
        if self._max_bytes is not None and self.written + self.buffered > self._max_bytes:
            # in place, the bytes past it would land on the next file's: not one is written
            raise VerificationError(f"{self._name}: storage sent more than its listed filesize {self._max_bytes}")
        pending, self._pending, n, self.buffered = self._pending, [], self.buffered, 0
        if self._place is not None:
            _writev_all(self._place.fd, pending, self._place.offset + self.written)
        else:
            if self._fd is None:
                self._fd = await _create(self.tmp)
            _writev_all(self._fd, pending)
        self.spilled = True
        self.written += n

    async def close(self) -> None:
        if self._fd is not None:  # not a place's: the one who made it closes it
            fd, self._fd = self._fd, None
            await _close(fd)


class _Place:
    """Where a listed file's bytes go: ``offset`` in the recording's ZIP being made at ``path``
    (open as ``fd``, shared by the recording's files)."""

    def __init__(self, path: Path, fd: int, offset: int) -> None:
        self.path = path
        self.fd = fd
        self.offset = offset


class TransferPace:
    """A storage answer that drips bytes keeps a read timeout happy forever: a transfer must
    move at least ``min_rate`` bytes/s over each ``window`` seconds, and finish within a
    deadline derived from its size. ``min_rate`` 0 turns both off."""

    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self._since = time.monotonic()
        self._bytes = 0
        self.total = 0

    def deadline(self, length: int | None) -> float | None:
        """Seconds the whole transfer may take: twice what ``min_rate`` needs, plus a window."""
        if not self.min_rate or length is None:
            return None
        return self.window + 2 * length / self.min_rate

    def feed(self, n: int) -> None:
        self._bytes += n
        self.total += n
        now = time.monotonic()
        elapsed = now - self._since
        if self.min_rate and elapsed >= self.window:
            if self._bytes / elapsed < self.min_rate:
                raise TransientError(f"storage transfer too slow: {self.describe(now)}")
            self._since, self._bytes = now, 0

    def describe(self, now: float | None = None) -> str:
        elapsed = max(1e-3, (now or time.monotonic()) - self._since)
        return (f"{self._bytes / elapsed:.0f} B/s over the last {elapsed:.0f} s, {self.total} bytes in all; "
                f"min_transfer_rate {self.min_rate:.0f} B/s")


class _StaleUrl(Exception):
    """Storage refused the signed URL: ask ``/recordingfiles`` for a fresh one."""


class _ListingFailed(Exception):
    """A recording's listed files cannot be used: it goes through ``/recordingfiles``."""


async def _all_or_none(works: list[Coroutine[Any, Any, T]]) -> list[T]:
    """A recording's channel files side by side (one round trip, as its ZIP would be): every
    result, or the first failure with the others cancelled (none streams on unseen)."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failed is not None:
        raise failed
    return [t.result() for t in tasks]


def _writev_all(fd: int, chunks: list[bytes], offset: int | None = None) -> None:
    """Every byte of ``chunks``, in order, with as few ``writev`` calls as the kernel allows: at
    the file's position, or from ``offset`` on (``pwritev``, which leaves the position alone)."""
    views = [memoryview(c) for c in chunks]
    while views:
        if offset is None:
            written = os.writev(fd, views[:IOV_MAX])
        else:
            written = os.pwritev(fd, views[:IOV_MAX], offset)
            offset += written
        while written and views:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0], written = views[0][written:], 0


_create = aiofiles.os.wrap(create_exclusive)  # in aiofiles' thread pool: a create can wait on the directory
_close = aiofiles.os.wrap(os.close)
