"""One verified download: redirect -> storage stream -> checks -> fsync -> rename.

A file visible under its final name is complete and verified: the body streams to a
temporary name in the destination directory, is checked (length, every ``x-goog-hash``,
ZIP member CRCs and sizes, RIFF structure), fsynced and only then renamed.  The sidecar is
written before the data file, so a data file under its final name always has one.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import aiofiles
import aiohttp
import structlog

from . import __version__
from .client import ApiClient
from .config import ArchiveConfig
from .errors import LocalStorageError, NotReady, TransientError, VerificationError
from .inspect import (
    CHUNK,
    BodyDigest,
    Member,
    RiffChecker,
    ZipLimits,
    body_kind,
    hash_file,
    inspect_zip,
    parse_goog_hash,
    write_all,
)
from .layout import EXTENSIONS, Layout, sidecar_path, temp_path
from .model import expected_members
from .state import Row

log = structlog.get_logger("archiver.download")

TRIES_PER_ATTEMPT = 3  # low-level tries (fresh URL, re-stream) before the attempt counts as failed
WRITE_BUFFER = 1 << 20  # bodies up to this size are written in one go by the commit thread


@dataclass(frozen=True)
class Archived:
    rel_path: str
    size: int
    sha256: str
    server_hashes: dict[str, str]
    members: int
    adopted: bool = False


def _limits(cfg: ArchiveConfig) -> ZipLimits:
    return ZipLimits(cfg.max_members, cfg.max_member_bytes, cfg.max_total_bytes, cfg.max_ratio)


def make_dirs(root: Path, directory: Path) -> None:
    """Create ``directory`` (inside ``root``) level by level with mode 0750."""
    try:
        root.mkdir(mode=0o750, parents=True, exist_ok=True)
        current = root
        for part in directory.relative_to(root).parts:
            current = current / part
            current.mkdir(mode=0o750, exist_ok=True)
    except OSError as exc:
        raise LocalStorageError(f"cannot create {directory}: {exc.strerror}") from None


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (Linux flushes the inode whatever the descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LocalStorageError(f"cannot fsync {path.name}: {exc.strerror}") from None


class DirectorySync:
    """fsync of a directory after a rename into it, shared between threads: a caller waits for
    an fsync that started after its own rename, and one fsync serves every caller that asked
    while the previous one ran (group commit for directory entries)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._asked: dict[Path, int] = {}  # per directory: requests so far
        self._synced: dict[Path, int] = {}  # per directory: requests covered by a finished fsync
        self._running: set[Path] = set()

    def sync(self, directory: Path) -> None:
        with self._cond:
            mine = self._asked[directory] = self._asked.get(directory, 0) + 1
            while self._synced.get(directory, 0) < mine:
                if directory in self._running:
                    self._cond.wait()
                    continue
                self._running.add(directory)
                covers = self._asked[directory]  # everyone who renamed before this fsync starts
                self._cond.release()
                try:
                    fsync_path(directory)  # on failure the waiters wake and try for themselves
                finally:
                    self._cond.acquire()
                    self._running.discard(directory)
                    self._cond.notify_all()  # they run once this thread releases the lock
                self._synced[directory] = max(self._synced.get(directory, 0), covers)


def write_file_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, rename (no directory fsync)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LocalStorageError(f"cannot write {path.name}: {exc.strerror}") from None
    except LocalStorageError:  # from write_all
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(layout: Layout, row: Row) -> None:
    """Remove what an interrupted download of ``row`` may have left (start-up recovery)."""
    try:
        directory = layout.directory_for(row.id, row.tm_create, row.raw.get("reference_type", ""))
    except Exception:  # noqa: BLE001 - a row we cannot place has no temporaries either
        return
    for what in ("download", "unpack"):
        tmp = temp_path(directory, row.id, what)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    (directory / f".{row.id}.json.partial").unlink(missing_ok=True)  # see write_file_atomic


class Downloader:
    """Archives one recording at a time; shared by all workers (it holds no per-call state)."""

    def __init__(self, client: ApiClient, cfg: ArchiveConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.layout = Layout(cfg.directory, cfg.layout)
        self.limits = _limits(cfg)
        self._made_dirs: set[Path] = set()
        self.dir_sync = DirectorySync()
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
        ref_type = row.raw.get("reference_type", "") or ""
        if directory not in self._made_dirs:  # created once per process, not checked per file
            await asyncio.to_thread(make_dirs, self.layout.root, directory)
            self._made_dirs.add(directory)
        last: Exception | None = None
        for _ in range(TRIES_PER_ATTEMPT):
            try:
                if url is None:
                    url = await self.client.recordingfile_url(row.id)
                return await self._fetch(row, directory, url, ref_type)
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

    async def _fetch(self, row: Row, directory: Path, url: str, ref_type: str) -> Archived:
        tmp = temp_path(directory, row.id, "download")
        unpack_tmp = temp_path(directory, row.id, "unpack")
        try:
            body = await self._stream(tmp, url)
            # hashing, writing, checks and commit in one executor hop: off the event loop
            return await asyncio.to_thread(self._verify_and_commit, row, directory, body, unpack_tmp, ref_type)
        except BaseException:
            await asyncio.to_thread(_remove_quietly, tmp, unpack_tmp)
            raise

    def _verify_and_commit(self, row: Row, directory: Path, body: _Body, unpack_tmp: Path, ref_type: str) -> Archived:
        source = body.finish()
        members = self._check_structure(row, source, body, unpack_tmp)
        self._check_ready(row, body.kind, members, ref_type)
        return self._commit(row, directory, body, unpack_tmp, members, ref_type)

    async def _stream(self, tmp: Path, url: str) -> _Body:
        try:
            async with self.client.storage_get(url) as resp:
                if resp.status in (400, 401, 403):
                    raise _StaleUrl(f"storage answered HTTP {resp.status} (signed URL expired or invalid)")
                if resp.status != 200:
                    raise TransientError(f"storage answered HTTP {resp.status}")
                hashes = parse_goog_hash(resp.headers.getall("x-goog-hash", []))
                body = _Body(tmp, resp.content_length, hashes)
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        body.add(chunk)
                        if body.buffered >= WRITE_BUFFER:
                            await body.spill()
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

    def _check_structure(self, row: Row, source: Path | BinaryIO, body: _Body, unpack_tmp: Path) -> list[Member]:
        if body.kind == "wav":
            assert body.riff is not None
            body.riff.finish()
            return [Member(f"{row.id}.wav", body.digest.size, body.digest.sha256.hexdigest(), body.riff.data_bytes)]
        extract_to = None
        if self.cfg.unpack:
            _fresh_dir(unpack_tmp)
            extract_to = unpack_tmp
        return inspect_zip(source, self.limits, extract_to)

    def _check_ready(self, row: Row, kind: str, members: list[Member], ref_type: str) -> None:
        """Before the settle window, an empty or short answer means "not uploaded yet"."""
        expected = expected_members(ref_type)
        settled_at = (row.tm_end or row.tm_create or 0) + self.cfg.settle_window
        if time.time() >= settled_at:
            if (kind == "zip" and len(members) < expected) or not any(m.audio_bytes for m in members):
                log.warning(
                    "archived_incomplete", recording_id=row.id, members=len(members), expected=expected,
                    reason="settle window passed; keeping what the server has",
                )
            return
        if kind == "zip" and len(members) < expected:
            raise NotReady(f"ZIP has {len(members)} of {expected} expected files (not uploaded yet)")
        if kind == "wav" and not members[0].audio_bytes:
            raise NotReady("WAV has no audio yet")

    def _commit(
        self, row: Row, directory: Path, body: _Body, unpack_tmp: Path, members: list[Member], ref_type: str
    ) -> Archived:
        kind, digest, tmp, hashes = body.kind, body.digest, body.tmp, body.hashes
        rel = self.layout.relative(row.id, kind, row.tm_create, ref_type)
        final = self.layout.path(rel)
        sha = digest.sha256.hexdigest()
        checked = {k: hashes[k] for k in sorted(hashes)}
        sidecar = {
            "recording": row.raw,
            "archive": {
                "file": final.name,
                "kind": kind,
                "size": digest.size,
                "sha256": sha,
                "server_hashes_checked": checked,
                "members": [m.as_dict() for m in members],
                "members_expected": expected_members(ref_type),
                "unpacked_to": f"{row.id}/" if kind == "zip" and self.cfg.unpack else None,
                "archived_at": datetime.now(UTC).isoformat(),
                "archiver": f"voipbin-archiver/{__version__}",
            },
        }
        try:
            write_file_atomic(sidecar_path(final), json.dumps(sidecar, indent=2, sort_keys=True).encode())
            if kind == "zip" and self.cfg.unpack:
                target = directory / row.id
                if target.exists():
                    shutil.rmtree(target)
                os.chmod(unpack_tmp, 0o750)
                fsync_path(unpack_tmp)
                os.replace(unpack_tmp, target)
            os.replace(tmp, final)
            self.dir_sync.sync(directory)
        except OSError as exc:
            raise LocalStorageError(f"cannot store {final.name}: {exc.strerror}") from None
        return Archived(rel, digest.size, sha, checked, len(members))

    def _adopt_existing(self, row: Row, directory: Path) -> Archived | None:
        """A final file from an interrupted run (renamed, not yet recorded): re-verify it against
        its sidecar and structure; keep it if it passes, remove it otherwise."""
        for ext in EXTENSIONS:
            final = directory / f"{row.id}.{ext}"
            if not final.exists():
                continue
            side = sidecar_path(final)
            try:
                meta = json.loads(side.read_text())["archive"]
                size, sha = hash_file(final)
                if size != meta["size"] or sha != meta["sha256"]:
                    raise VerificationError("differs from its sidecar")
                if ext == "zip":
                    inspect_zip(final, self.limits)
                else:
                    _check_wav_file(final)
            except Exception as exc:  # noqa: BLE001 - any doubt means: do not trust it
                log.warning("existing_file_rejected", recording_id=row.id, file=final.name, reason=str(exc))
                final.unlink(missing_ok=True)
                continue
            rel = str(final.relative_to(self.layout.root))
            log.info("existing_file_adopted", recording_id=row.id, file=rel)
            return Archived(rel, size, sha, meta.get("server_hashes_checked", {}), len(meta.get("members", [])), True)
        return None


class _Body:
    """A body on its way to disk. Up to ``WRITE_BUFFER`` bytes stay in memory and are hashed,
    written and fsynced by ``finish()`` in the commit thread (one executor hop for a typical
    recording); a larger body spills to the temporary file through aiofiles as it streams,
    hashed in a thread alongside the write. Memory stays bounded per transfer."""

    def __init__(self, tmp: Path, expected_length: int | None, hashes: dict[str, str]) -> None:
        self.tmp = tmp
        self.expected_length = expected_length
        self.hashes = hashes
        self.digest = BodyDigest(md5="md5" in hashes)  # MD5 only when there is one to compare
        self.kind = ""
        self.riff: RiffChecker | None = None
        self._pending: list[bytes] = []
        self.buffered = 0
        self._file: Any = None
        self._spilled = False

    def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self.buffered += len(chunk)
        if not self.kind and (self.buffered >= 4 or self._spilled):
            self.detect_kind()

    def detect_kind(self) -> None:
        """From the first bytes (which may arrive a few at a time); raises on unknown ones."""
        head = b"".join(self._pending)[:4]
        self.kind = body_kind(head)
        self.riff = RiffChecker() if self.kind == "wav" else None

    def _take(self) -> bytes:
        data = b"".join(self._pending)
        self._pending, self.buffered = [], 0
        return data

    def _absorb(self, data: bytes) -> None:
        self.digest.update(data)
        if self.riff is not None:
            self.riff.feed(data)

    async def spill(self) -> None:
        if self._file is None:
            self._file = await aiofiles.open(self.tmp, "wb", opener=_opener)
            self._spilled = True
        data = self._take()
        await asyncio.gather(self._file.write(data), asyncio.to_thread(self._absorb, data))

    async def close(self) -> None:
        if self._file is not None:
            await self._file.close()
            self._file = None

    def finish(self) -> Path | BinaryIO:
        """(In a thread.) Write the rest, fsync, check length and server hashes. Returns what the
        structure check should read: the bytes in memory when the body never spilled."""
        data = self._take()
        self._absorb(data)
        flags = os.O_WRONLY | (os.O_APPEND if self._spilled else os.O_CREAT | os.O_TRUNC)
        try:
            fd = os.open(self.tmp, flags, 0o640)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise LocalStorageError(f"cannot write into the archive: {exc.strerror} ({self.tmp.parent})") from None
        self.digest.check(self.expected_length, self.hashes)
        return self.tmp if self._spilled else io.BytesIO(data)


class _StaleUrl(Exception):
    """Storage refused the signed URL: ask ``/recordingfiles`` for a fresh one."""


def _opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o640)


def _is_empty(directory: Path) -> bool:
    """True if ``directory`` is missing or has no entries (an unreadable one is not empty)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True
    except OSError:
        return False  # let the per-file check find out what is wrong


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(mode=0o750)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _check_wav_file(path: Path) -> None:
    riff = RiffChecker(path.name)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            riff.feed(chunk)
    riff.finish()
