"""One download: signed URL -> storage stream -> a store helper verifies and stores it.

The body streams into memory (or, beyond ``WRITE_BUFFER``, to a temporary file in the
destination directory); a store helper process (``storepool``) then writes the rest, fsyncs,
checks and renames it (``store``). Retries of a broken stream or a stale URL happen here.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp
import structlog

from .client import ApiClient
from .config import ArchiveConfig
from .errors import LocalStorageError, NotReady, TransientError, VerificationError
from .inspect import CHUNK, RiffChecker, body_kind, hash_file, inspect_zip, parse_goog_hash
from .layout import EXTENSIONS, Layout, sidecar_path, temp_path
from .state import Row
from .store import Archived, StoreJob, create_exclusive, limits, make_dirs, remove_quietly
from .storepool import StorePool

log = structlog.get_logger("archiver.download")

TRIES_PER_ATTEMPT = 3  # low-level tries (fresh URL, re-stream) before the attempt counts as failed
WRITE_BUFFER = 1 << 20  # bodies up to this size go to the store helper whole, in memory


def remove_temporaries(layout: Layout, row: Row) -> None:
    """Remove what an interrupted download of ``row`` may have left (start-up recovery)."""
    try:
        directory = layout.directory_for(row.id, row.tm_create, row.raw.get("reference_type", ""))
    except Exception:  # noqa: BLE001 - a row we cannot place has no temporaries either
        return
    remove_quietly(
        temp_path(directory, row.id, "download"),
        temp_path(directory, row.id, "unpack"),
        directory / f".{row.id}.json.partial",  # see store.write_file_atomic
    )


class Downloader:
    """Archives one recording at a time; shared by all workers (it holds no per-call state)."""

    def __init__(self, client: ApiClient, cfg: ArchiveConfig, store: StorePool) -> None:
        self.client = client
        self.cfg = cfg
        self.store = store
        self.layout = Layout(cfg.directory, cfg.layout)
        self.limits = limits(cfg)
        self._made_dirs: set[Path] = set()
        self._empty_at_start: dict[Path, asyncio.Future[bool]] = {}

    def directory(self, row: Row) -> Path:
        return self.layout.directory_for(row.id, row.tm_create, row.raw.get("reference_type", "") or "")

    async def adopt(self, row: Row, directory: Path) -> Archived | None:
        """A file already under the final name (a crash after the rename, before the database
        commit; or an archive whose database was lost) is re-verified and adopted, or removed;
        None when there is none."""
        if await asyncio.shield(self._started_empty(directory)):  # shared: a cancel must not reach it
            return None  # the common case: no stat per recording, no thread hop
        return await asyncio.to_thread(self._adopt_existing, row, directory)

    def _started_empty(self, directory: Path) -> asyncio.Future[bool]:
        """Whether ``directory`` was missing or empty when this process first looked at it.
        If so, every file in it is this process's own, already recorded (or to be replaced by
        the same verified bytes), and there is nothing to adopt. One listing per directory,
        shared by concurrent callers; a stat per recording on the event loop could wait on the
        directory's lock while other threads create files in it."""
        known = self._empty_at_start.get(directory)
        if known is None:
            known = self._empty_at_start[directory] = asyncio.ensure_future(asyncio.to_thread(_is_empty, directory))
        return known

    async def archive(self, row: Row, directory: Path, url: str | None = None) -> Archived:
        """Download (from ``url`` if already resolved), verify and store ``row`` in ``directory``
        (from ``self.directory(row)``); raise an ``archiver.errors`` class otherwise."""
        if directory not in self._made_dirs:  # created once per process, not checked per file
            await asyncio.to_thread(make_dirs, self.layout.root, directory)
            self._made_dirs.add(directory)
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
                body.expected_length, body.hashes,
            )
            archived = await self.store.store(job)
        except BaseException:
            await asyncio.to_thread(remove_quietly, tmp, temp_path(directory, row.id, "unpack"))
            raise
        if archived.flag:
            (log.error if archived.flag == "damaged" else log.warning)(
                f"archived_{archived.flag}", recording_id=row.id, members=archived.members, reason=archived.flag_reason
            )
        return archived

    async def _stream(self, tmp: Path, url: str) -> _Body:
        try:
            async with self.client.storage_get(url) as resp:
                if resp.status in (400, 401, 403):
                    raise _StaleUrl(f"storage answered HTTP {resp.status} (signed URL expired or invalid)")
                if resp.status != 200:
                    raise TransientError(f"storage answered HTTP {resp.status}")
                hashes = parse_goog_hash(resp.headers.getall("x-goog-hash", []))
                body = _Body(tmp, resp.content_length, hashes)
                pace = TransferPace(self.client.cfg.min_transfer_rate, self.client.cfg.transfer_rate_window)
                limit = asyncio.timeout(pace.deadline(resp.content_length))
                try:
                    async with limit:
                        async for chunk in resp.content.iter_chunked(CHUNK):
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

    def _adopt_existing(self, row: Row, directory: Path) -> Archived | None:
        """A final file from an interrupted run (renamed, not yet recorded): re-verify it against
        its sidecar and structure; keep it if it passes, remove it otherwise. A ``no_audio``
        sidecar (no body) is adopted as it is. A disk that cannot be read (EIO) is the archive's
        trouble (``LocalStorageError``), not a reason to distrust and remove the file."""
        try:
            return self._adopt_existing_file(row, directory)
        except OSError as exc:
            raise LocalStorageError(f"cannot read the archive: {exc.strerror} ({directory})") from None

    def _adopt_existing_file(self, row: Row, directory: Path) -> Archived | None:
        for ext in EXTENSIONS:
            final = directory / f"{row.id}.{ext}"
            side = sidecar_path(final)
            if final.is_symlink() or side.is_symlink():  # planted: never read or trust through a link
                log.warning("existing_file_rejected", recording_id=row.id, file=final.name, reason="a symlink")
                remove_quietly(final if final.is_symlink() else side)
                continue
            if not final.exists():
                adopted = self._adopt_no_audio(row, side) if ext == EXTENSIONS[0] else None
                if adopted is not None:
                    return adopted
                continue
            try:
                meta = json.loads(side.read_text())["archive"]
                size, sha = hash_file(final)
                if size != meta["size"] or sha != meta["sha256"]:
                    raise VerificationError("differs from its sidecar")
                if meta.get("flag") != "damaged":  # a damaged body was kept knowing it fails these
                    if ext == "zip":
                        inspect_zip(final, self.limits)
                    else:
                        _check_wav_file(final)
            except Exception as exc:  # any doubt means: do not trust it (the disk's errors excepted)
                if isinstance(exc, LocalStorageError) or (
                    isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
                ):
                    raise  # the disk failed us (EIO), not the file: keep it, pause
                log.warning("existing_file_rejected", recording_id=row.id, file=final.name, reason=str(exc))
                final.unlink(missing_ok=True)
                continue
            rel = str(final.relative_to(self.layout.root))
            log.info("existing_file_adopted", recording_id=row.id, file=rel)
            return Archived(
                rel, size, sha, meta.get("server_hashes_checked", {}), len(meta.get("members", [])), True,
                flag=meta.get("flag") or "", flag_reason=meta.get("flag_reason") or "",
            )
        return None

    def _adopt_no_audio(self, row: Row, side: Path) -> Archived | None:
        """The sidecar of a recording settled without audio (it has no body of its own)."""
        try:
            meta = json.loads(side.read_text())["archive"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(meta, dict) or meta.get("state") != "no_audio" or meta.get("file") is not None:
            return None
        rel = str(side.relative_to(self.layout.root))
        log.info("existing_file_adopted", recording_id=row.id, file=rel, state="no_audio")
        return Archived(
            rel, int(meta.get("size", 0)), str(meta.get("sha256", "")), meta.get("server_hashes_checked", {}),
            len(meta.get("members", [])), True, state="no_audio", flag_reason=meta.get("flag_reason") or "",
        )


class _Body:
    """A body on its way to a store helper. Up to ``WRITE_BUFFER`` bytes stay in memory and go
    to the helper whole; a larger body spills to the temporary file through aiofiles as it
    streams, and only its tail goes. Memory stays bounded per transfer."""

    def __init__(self, tmp: Path, expected_length: int | None, hashes: dict[str, str]) -> None:
        self.tmp = tmp
        self.expected_length = expected_length
        self.hashes = hashes
        self.kind = ""
        self._pending: list[bytes] = []
        self.buffered = 0
        self._file: Any = None
        self.spilled = False

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
        if self._file is None:
            self._file = await aiofiles.open(self.tmp, "wb", opener=_opener)
            self.spilled = True
        await self._file.write(self.take())

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None


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


def _opener(path: str, flags: int) -> int:
    return create_exclusive(Path(path))


def _is_empty(directory: Path) -> bool:
    """True if ``directory`` is missing or has no entries (an unreadable one is not empty)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except OSError:
        return False  # let the per-file check find out what is wrong


def _check_wav_file(path: Path) -> None:
    riff = RiffChecker(path.name)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            riff.feed(chunk)
    riff.finish()
