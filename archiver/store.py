"""Verify and store a downloaded body: the half of a download that touches the disk.

It runs in the store helper processes (``storeproc``), never on the event loop, and imports
nothing of the network side. A file visible under its final name is complete and verified: the
body is in a temporary file in the destination directory; it is fsynced, checked (length, every
``x-goog-hash``, ZIP member CRCs and sizes, RIFF structure), its sidecar is written (temporary
name, fsync, rename) and only then is it renamed. The caller fsyncs the directory afterwards.

After the settle window, what the server has is the only copy there will ever be, so it is kept
and described rather than retried: fewer files than expected (flag ``incomplete``), a body whose
structure is broken although it matches every server hash (flag ``damaged``), or no audio at all
(state ``no_audio``: only the sidecar is kept, as proof that the call was recorded).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from . import __version__
from .config import DEFAULT_ACCOUNT, ArchiveConfig
from .errors import LocalStorageError, NotReady, VerificationError
from .inspect import (
    CHUNK,
    BodyDigest,
    Member,
    RiffChecker,
    ZipLimits,
    body_kind,
    inspect_zip,
    list_zip_members,
    write_all,
)
from .layout import Layout, sidecar_path, temp_name, temp_path
from .model import FETCH_PATHS, expected_members
from .seal import SUFFIX as SEAL_SUFFIX
from .seal import encrypt, encrypt_file, recipients_of, seal_json

NO_AUDIO_CAUSE = (
    "the server holds no audio for this recording and never will (it stores a recording's files once, "
    "after the call ends). Likely cause: the customer's 10 GB store on the server was full when the call "
    "ended, or that one upload failed"
)


@dataclass(frozen=True)
class Archived:
    """A stored recording: ``state`` ``archived`` (``rel_path`` is the body) or ``no_audio``
    (``rel_path`` is the sidecar, the only file kept); ``flag`` marks a kept-but-imperfect body."""

    rel_path: str
    size: int
    sha256: str
    server_hashes: dict[str, str]
    members: int
    adopted: bool = False
    state: str = "archived"  # or "no_audio"
    flag: str = ""  # "", "incomplete" (fewer files than expected) or "damaged" (broken structure)
    flag_reason: str = ""
    via: str = ""  # "storage_files" or "recordingfiles": how it was fetched ("" when adopted)
    plain_sha256: str = ""  # encrypted (``[archive] encrypt_to``): the plaintext's; size and sha256 are the file's


@dataclass(frozen=True)
class Staged:
    """A verified body for a destination other than a directory (a bucket): nothing was renamed.
    ``archived`` says what to record once the destination holds it; ``body`` is the staging file
    of a spilled body (None when the daemon still holds the bytes, and for ``no_audio``)."""

    archived: Archived
    sidecar: bytes
    md5: str  # base64 of the body's MD5 (Content-MD5)
    body: Path | None


@dataclass(frozen=True)
class ListedFile:
    """One channel file of a recording fetched from the storage listing (``storagefiles``):
    streamed like a body, to be checked against its listed ``filesize``, ``Content-Length`` and
    ``x-goog-hash``, then put into the recording's ZIP. When ``spilled``, its first
    ``spilled_bytes`` are on disk: in ``tmp``, or with an ``offset`` already in place in the
    recording's ZIP (the job's ``tmp``, see ``listed_offsets``), so they are not copied again."""

    file_id: str
    name: str  # the listed file name (checked: a plain name), the member's name in the ZIP
    tmp: Path
    tail: bytes
    spilled: bool
    expected_length: int | None
    listed_size: int
    hashes: dict[str, str]
    spilled_bytes: int = 0
    offset: int | None = None  # where its bytes start in the job's ZIP, if spilled in place


PLACE_LIMIT = 1 << 30  # a recording's listed files are spilled in place up to this in all (far from zip64)


def listed_member(name: str, size: int) -> zipfile.ZipInfo:
    """A listed file's entry in the ZIP we write: stored, fixed times (the same files always
    make the same bytes)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    return info


def listed_offsets(files: list[tuple[str, int]]) -> list[int] | None:
    """Where each listed file's bytes will start in the ZIP ``Store`` writes of them (after the
    local headers before it), from the listed names and sizes, so the daemon can spill them in
    place; None past ``PLACE_LIMIT``. The store checks each offset before it trusts it."""
    if sum(size for _, size in files) > PLACE_LIMIT:
        return None
    offsets, position = [], 0
    for name, size in files:
        info = listed_member(name, size)
        info.CRC = info.compress_size = 0  # as zipfile writes it first: only the length counts
        position += len(info.FileHeader(False))
        offsets.append(position)
        position += size
    return offsets


@dataclass(frozen=True)
class StoreJob:
    """A streamed body to verify and store (plain data: it crosses to a helper process)."""

    rec_id: str
    raw: dict[str, Any]  # the recording's JSON, for the sidecar
    tm_create: float | None
    tm_end: float | None
    directory: Path
    tmp: Path  # the temporary file; holds the body's start when ``spilled``
    tail: bytes  # the rest of the body (all of it unless spilled)
    spilled: bool
    expected_length: int | None  # Content-Length
    hashes: dict[str, str]  # x-goog-hash
    account: str = DEFAULT_ACCOUNT  # whose recording ({account} in the layout)
    call: dict[str, Any] | None = None  # the sidecar's "call" block; None: call metadata is off
    files: tuple[ListedFile, ...] = ()  # fetched from the storage listing: the channel files, no body yet
    listed: tuple[dict[str, Any], ...] = ()  # what the sidecar says of those files once checked

    @property
    def ref_type(self) -> str:
        return str(self.raw.get("reference_type", "") or "")

    @property
    def body_bytes(self) -> int:
        """How large the body is, as far as the daemon knows: what the helper will read."""
        listed = sum(f.listed_size for f in self.files)
        return listed + (self.expected_length if self.expected_length is not None else len(self.tail))


def limits(cfg: ArchiveConfig) -> ZipLimits:
    return ZipLimits(cfg.max_members, cfg.max_member_bytes, cfg.max_total_bytes, cfg.max_ratio)


def make_dirs(root: Path, directory: Path) -> None:
    """Create ``directory`` (inside ``root``) level by level with mode 0750, refusing any level
    that is a symlink or not a directory: a link planted inside the archive must not lead our
    writes elsewhere. (``root`` itself is the operator's choice and may be a link.) Each level
    created is made durable in its parent (fsync), or a power cut could take the directory, and
    every file in it, away after the database committed them."""
    try:
        mkdir_durable(root)
        current = root
        for part in directory.relative_to(root).parts:
            current = current / part
            _mkdir_durable_level(current)
            mode = os.lstat(current).st_mode
            if not stat.S_ISDIR(mode):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
                raise LocalStorageError(f"{current} is {kind}: refusing to write through it (it must be a directory)")
    except OSError as exc:
        raise LocalStorageError(f"cannot create {directory}: {exc.strerror}") from None


def mkdir_durable(path: Path) -> None:
    """``mkdir -p`` whose every new level is fsynced into its parent (0750)."""
    for level in [*reversed(path.parents), path]:
        if not level.is_dir():
            _mkdir_durable_level(level)


def _mkdir_durable_level(path: Path) -> None:
    try:
        path.mkdir(mode=0o750)
    except FileExistsError:
        return
    fsync_path(path.parent)


def create_exclusive(path: Path, mode: int = 0o640) -> int:
    """A new file at ``path`` for writing: whatever is there (a leftover, a planted symlink) is
    removed, never followed (``O_EXCL | O_NOFOLLOW``). The create is tried first: there is
    almost never anything to remove, and a failed unlink per file cost a system call."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)
    return os.open(path, flags, mode)


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`` where libc has it (Linux): starts
    writing a file's dirty pages without waiting. Only a head start for the fsync that follows,
    which reports any error: where the call is missing or fails, nothing is lost but the overlap."""
    call = _sync_file_range()
    if call is not None:
        call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes  # here, not at import: only a store helper needs it

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


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


def write_file_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, rename (no directory fsync)."""
    tmp = path.with_name(temp_name(path.name))
    try:
        fd = create_exclusive(tmp, mode)
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


class Store:
    """Verifies and stores bodies for one archive directory (one per helper process)."""

    def __init__(self, cfg: ArchiveConfig) -> None:
        self.cfg = cfg
        self.layout = Layout(cfg.directory, cfg.layout)
        self.limits = limits(cfg)
        # another destination (a bucket) commits the verified body itself: verify and stage only.
        # A staged copy needs no fsync (a crash loses it, and the recording is fetched again).
        self.stage_only = cfg.destination != "directory"
        self.recipients = recipients_of(cfg.encrypt_to) if cfg.encrypt_to else None

    def store_batch(self, jobs: list[StoreJob]) -> list[Archived | Staged | Exception]:
        """Store each job, then fsync each directory once for all the renames into it (group
        commit); a job's result is an ``Archived`` only once its rename is durable."""
        results: list[Archived | Staged | Exception] = []
        for job in jobs:
            try:
                results.append(self.store(job))
            except Exception as exc:  # noqa: BLE001 - handed back to that job's caller
                results.append(exc)
                remove_quietly(job.tmp, temp_path(job.directory, job.rec_id, "unpack"), *(f.tmp for f in job.files))
        for directory in {job.directory for job, r in zip(jobs, results, strict=True) if isinstance(r, Archived)}:
            try:
                fsync_path(directory)
            except LocalStorageError as exc:
                results = [
                    exc if job.directory == directory and isinstance(r, Archived) else r
                    for job, r in zip(jobs, results, strict=True)
                ]
        return results

    def store(self, job: StoreJob) -> Archived | Staged:
        """Write the rest of the body, fsync, verify, write the sidecar, rename (no directory
        fsync), or with ``stage_only`` verify and stage; raise an ``archiver.errors`` class otherwise."""
        if job.files:
            job = self._assemble(job)
        digest, source = self._finish(job)  # the bytes are what storage holds (length, hashes)
        unpack_tmp = temp_path(job.directory, job.rec_id, "unpack")
        settled = time.time() >= (job.tm_end or job.tm_create or 0) + self.cfg.settle_window
        with source:
            if not digest.size:
                if not settled:
                    raise NotReady("storage answered an empty body")
                return self._commit_no_audio(job, "empty", digest, [], "storage answered an empty body")
            kind = body_kind(source.read(4))
            source.seek(0)
            try:
                members = self._inspect(job, kind, digest, source, unpack_tmp)
            except VerificationError as exc:
                if not job.hashes:  # nothing says storage holds these bytes: a transfer fault, retry
                    raise
                if not settled:
                    raise NotReady(f"{exc} (matches the server's hashes; not uploaded completely yet?)") from None
                remove_quietly(unpack_tmp)
                source.seek(0)
                members = list_zip_members(source) if kind == "zip" else []
                reason = f"{exc}; it matches every server hash, so it is the server's only copy: kept as served"
                return self._commit(job, kind, digest, members, None, "damaged", reason)
        flag, reason = self._check_ready(job, kind, members, settled)
        if flag == "no_audio":
            remove_quietly(unpack_tmp)
            return self._commit_no_audio(job, kind, digest, members, reason)
        return self._commit(job, kind, digest, members, unpack_tmp if self.cfg.unpack else None, flag, reason)

    def _inspect(
        self, job: StoreJob, kind: str, digest: BodyDigest, source: BinaryIO, unpack_tmp: Path
    ) -> list[Member]:
        """The structure checks: every ZIP member (CRC, size, WAV) or the single WAV."""
        if kind == "wav":
            riff = RiffChecker()
            while chunk := source.read(CHUNK):
                riff.feed(chunk)
            riff.finish()
            return [Member(f"{job.rec_id}.wav", digest.size, digest.sha256.hexdigest(), riff.data_bytes)]
        extract_to = None
        if self.cfg.unpack:
            _fresh_dir(unpack_tmp)
            extract_to = unpack_tmp
        return inspect_zip(source, self.limits, extract_to)

    def _finish(self, job: StoreJob) -> tuple[BodyDigest, BinaryIO]:
        """The whole body on disk and fsynced; its digest checked against the server's hashes.
        Returns what the checks read: the bytes in memory unless the body spilled to disk.

        The disk writes the body while it is hashed: its writeback is started first
        (``start_writeback``) and the fsync comes after the digest, so it mostly finds the
        pages written already (a tree with no fsync in the helpers ran a large-body backfill in
        0.87 of the time: the wait for the disk, not its CPU, was what the fsync cost)."""
        fd: int | None = None
        try:  # a spilled body was created by ``create_exclusive`` in the daemon
            # a staged body in memory stays there, and so does one to encrypt: no plaintext at rest
            durable = not (self.stage_only or self.recipients)  # a plaintext to encrypt is never kept
            if job.spilled or durable:
                if job.spilled:
                    fd = os.open(job.tmp, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                else:
                    fd = create_exclusive(job.tmp)
                write_all(fd, job.tail)
                if durable:
                    start_writeback(fd)
            # MD5 only when there is one to compare, or for a bucket's Content-MD5
            digest = BodyDigest(md5="md5" in job.hashes or self.stage_only)
            source: BinaryIO = open(job.tmp, "rb") if job.spilled else io.BytesIO(job.tail)  # closed by store()
            try:
                if job.spilled:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                    source.seek(0)
                else:
                    digest.update(job.tail)
                if durable and fd is not None:
                    os.fsync(fd)
            except BaseException:
                source.close()
                raise
        except OSError as exc:
            raise LocalStorageError(f"cannot write into the archive: {exc.strerror} ({job.tmp.parent})") from None
        finally:
            if fd is not None:
                os.close(fd)
        try:
            digest.check(job.expected_length, job.hashes)
        except VerificationError:
            source.close()
            raise
        return digest, source

    def _assemble(self, job: StoreJob) -> StoreJob:
        """The channel files of a recording fetched from the storage listing, each checked
        (its listed ``filesize``, ``Content-Length``, every ``x-goog-hash``, the RIFF structure),
        written into one ZIP the archiver makes itself (stored, not compressed, fixed times: the
        same files always make the same bytes). That ZIP then goes through every check of a
        served one, so ``verify``, adoption, unpacking and ``export`` treat both alike."""
        in_place = bool(job.files) and job.files[0].offset is not None  # the daemon made job.tmp
        try:
            fd = os.open(job.tmp, os.O_RDWR | os.O_NOFOLLOW) if in_place else create_exclusive(job.tmp)
            with open(fd, "r+b" if in_place else "wb") as raw:
                listed = self._write_listed_zip(job, _AroundPlaced(raw))
        except OSError as exc:
            raise LocalStorageError(f"cannot write into the archive: {exc.strerror} ({job.tmp.parent})") from None
        finally:
            remove_quietly(*(f.tmp for f in job.files if f.offset is None))
        return replace(job, files=(), listed=tuple(listed), tail=b"", spilled=True, expected_length=None, hashes={})

    def _write_listed_zip(self, job: StoreJob, out: _AroundPlaced) -> list[dict[str, Any]]:
        """One pass over each listed file: its storage hashes, its RIFF structure and its copy
        into the ZIP (whose SHA-256 covers it: a member's own is not kept); bytes spilled in
        place are read, not written again. Returns what the sidecar says of each file."""
        listed = []
        with zipfile.ZipFile(cast(BinaryIO, out), "w", zipfile.ZIP_STORED) as zf:
            for f in job.files:
                name = f"listed file {f.name[:80]!r}"
                digest, riff = BodyDigest(md5="md5" in f.hashes, sha256=False), RiffChecker(name)
                size = len(f.tail) + f.spilled_bytes
                if size != f.listed_size:  # before a byte is copied: the member's size is declared
                    raise VerificationError(
                        f"{name}: the listing says filesize {f.listed_size}, storage sent {size} bytes")
                with zf.open(listed_member(f.name, size), "w") as member:
                    if f.offset is not None:
                        if out.tell() != f.offset:  # a header of a size the daemon did not expect
                            raise LocalStorageError(
                                f"{name}: its bytes lie at {f.offset}, its header ends at {out.tell()}")
                        out.skip = f.spilled_bytes
                    for chunk in self._listed_chunks(f, job.tmp, name):
                        digest.update(chunk)
                        riff.feed(chunk)
                        member.write(chunk)
                checked = digest.check(f.expected_length, f.hashes)
                riff.finish()
                listed.append({"id": f.file_id, "name": f.name, "size": digest.size,
                               "server_hashes_checked": dict(sorted(checked.items()))})
        return listed

    @staticmethod
    def _listed_chunks(f: ListedFile, zip_tmp: Path, name: str) -> Iterator[bytes]:
        """A listed file's bytes: its spilled start (in its own temporary file, or in place in
        the recording's ZIP at ``zip_tmp``), then its tail from memory."""
        if f.spilled:
            with open(f.tmp if f.offset is None else zip_tmp, "rb") as source:
                source.seek(f.offset or 0)
                left = f.spilled_bytes
                while left and (chunk := source.read(min(CHUNK, left))):
                    left -= len(chunk)
                    yield chunk
            if left:
                raise LocalStorageError(f"{name}: {left} of its spilled bytes are missing on disk")
        if f.tail:
            yield f.tail


    def _check_ready(self, job: StoreJob, kind: str, members: list[Member], settled: bool) -> tuple[str, str]:
        """Before the settle window, an empty or short answer means "not uploaded yet"; after
        it, what the server has is kept: (flag, reason) says how it falls short, if it does."""
        expected = expected_members(job.ref_type)
        short = kind == "zip" and len(members) < expected
        silent = not any(m.audio_bytes for m in members)
        if not settled:
            if short:
                raise NotReady(f"ZIP has {len(members)} of {expected} expected files (not uploaded yet)")
            if silent:
                raise NotReady(f"{kind.upper()} has no audio yet")
            return "", ""
        if silent:
            return "no_audio", f"{len(members)} of {expected} expected files, none with audio"
        if short:
            return "incomplete", f"{len(members)} of {expected} expected files; settled, keeping what the server has"
        return "", ""

    def _sidecar(
        self, job: StoreJob, kind: str, digest: BodyDigest, members: list[Member], file: str | None,
        state: str, flag: str, reason: str, unpacked: bool, cipher: dict[str, Any] | None = None,
    ) -> bytes:
        """The sidecar; encrypted (``cipher``: the ciphertext's part of the clear ``archive``
        block), the recording's JSON and its call go into ``sealed``, the rest stays clear so the
        archive can be checked without the private key."""
        meta = {
            "account": job.account,
            "file": file,
            "kind": kind,
            "state": state,
            "flag": flag or None,
            "flag_reason": reason or None,
            "size": digest.size,
            "sha256": digest.sha256.hexdigest(),
            "server_hashes_checked": {k: job.hashes[k] for k in sorted(job.hashes)},
            "members": [m.as_dict() for m in members],
            "members_expected": expected_members(job.ref_type),
            "unpacked_to": f"{job.rec_id}/" if unpacked else None,
            "fetched_from": _via(job),
            "archived_at": datetime.now(UTC).isoformat(),
            "archiver": f"voipbin-archiver/{__version__}",
        }
        if job.listed:  # the ZIP is ours; what storage served, and was checked, is each file
            meta["storage_files"] = list(job.listed)
        if self.stage_only and digest.md5 is not None:  # a bucket's HEAD shows it as the ETag
            meta["md5"] = base64.b64encode(digest.md5.digest()).decode()
        doc: dict[str, Any] = {"recording": job.raw, "archive": meta}
        if job.call is not None:
            doc["call"] = job.call
        if self.recipients and cipher is not None:
            meta.update(cipher)
            private = {k: doc.pop(k) for k in ("recording", "call") if k in doc}
            doc["sealed"] = seal_json(private, self.recipients)  # who called whom: personal data
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    def _commit_no_audio(
        self, job: StoreJob, kind: str, digest: BodyDigest, members: list[Member], reason: str
    ) -> Archived | Staged:
        """No audio, for good: the sidecar alone is kept (the recording's metadata proves that
        the call was recorded); the served body is described in it, not stored."""
        rel = self.layout.relative(job.rec_id, "zip" if kind == "empty" else kind, job.tm_create, job.ref_type,
                                   job.account)
        side = sidecar_path(self.layout.path(rel))
        reason = f"{reason}: {NO_AUDIO_CAUSE}"
        data = self._sidecar(job, kind, digest, members, None, "no_audio", "", reason, False,
                             {"encrypted_to": list(self.cfg.encrypt_to)} if self.recipients else None)
        try:
            if not self.stage_only:
                write_file_atomic(side, data)
        finally:
            remove_quietly(job.tmp)
        checked = {k: job.hashes[k] for k in sorted(job.hashes)}
        archived = Archived(
            str(side.relative_to(self.layout.root)), digest.size, digest.sha256.hexdigest(), checked, len(members),
            state="no_audio", flag_reason=reason, via=_via(job),
        )
        return Staged(archived, data, "", None) if self.stage_only else archived

    def _commit(
        self, job: StoreJob, kind: str, digest: BodyDigest, members: list[Member], unpack_tmp: Path | None,
        flag: str, reason: str,
    ) -> Archived | Staged:
        """Sidecar, then unpacked members (``unpack_tmp``, when unpacking), then the body: each
        renamed into place only once written and fsynced. With ``stage_only``, handed back."""
        rel = self.layout.relative(job.rec_id, kind, job.tm_create, job.ref_type, job.account)
        final = self.layout.path(rel)
        if self.recipients:
            return self._commit_encrypted(job, kind, digest, members, flag, reason, rel, final)
        unpack = kind == "zip" and unpack_tmp is not None
        sidecar = self._sidecar(job, kind, digest, members, final.name, "archived", flag, reason, unpack)
        checked = {k: job.hashes[k] for k in sorted(job.hashes)}
        if self.stage_only:
            assert digest.md5 is not None
            archived = Archived(
                rel, digest.size, digest.sha256.hexdigest(), checked, len(members), flag=flag, flag_reason=reason,
                via=_via(job),
            )
            md5 = base64.b64encode(digest.md5.digest()).decode()
            return Staged(archived, sidecar, md5, job.tmp if job.spilled else None)
        try:
            write_file_atomic(sidecar_path(final), sidecar)
            if unpack and unpack_tmp is not None:
                target = job.directory / job.rec_id
                remove_quietly(target)
                os.chmod(unpack_tmp, 0o750)
                fsync_path(unpack_tmp)
                os.replace(unpack_tmp, target)
            os.replace(job.tmp, final)
        except OSError as exc:
            raise LocalStorageError(f"cannot store {final.name}: {exc.strerror}") from None
        return Archived(
            rel, digest.size, digest.sha256.hexdigest(), checked, len(members), flag=flag, flag_reason=reason,
            via=_via(job),
        )

    def _commit_encrypted(
        self, job: StoreJob, kind: str, digest: BodyDigest, members: list[Member], flag: str, reason: str,
        rel: str, final: Path,
    ) -> Archived | Staged:
        """The verified plaintext encrypted to ``encrypt_to`` into ``<id>.<ext>.age`` (from memory,
        or streamed from the spilled plaintext, which is removed at once), fsynced, then the
        sidecar and the rename; a bucket gets the ciphertext staged. The file's size and SHA-256
        are the ciphertext's; the plaintext's go beside them."""
        assert self.recipients is not None
        enc_final = final.with_name(f"{final.name}.{SEAL_SUFFIX}")
        enc_tmp = temp_path(job.directory, job.rec_id, SEAL_SUFFIX)
        try:
            if job.spilled:
                try:
                    encrypt_file(job.tmp, enc_tmp, self.recipients)
                finally:
                    remove_quietly(job.tmp)  # the plaintext is never kept
            else:
                fd = create_exclusive(enc_tmp)
                try:
                    write_all(fd, encrypt(job.tail, self.recipients))
                finally:
                    os.close(fd)
            cipher = BodyDigest(md5=self.stage_only)
            with open(enc_tmp, "rb") as f:
                while chunk := f.read(CHUNK):
                    cipher.update(chunk)
                if not self.stage_only:
                    os.fsync(f.fileno())
        except OSError as exc:
            remove_quietly(enc_tmp)
            raise LocalStorageError(f"cannot store {enc_final.name}: {exc.strerror}") from None
        except LocalStorageError:
            remove_quietly(enc_tmp)
            raise
        extra = {"encrypted_to": list(self.cfg.encrypt_to), "plaintext": {"size": digest.size,
                 "sha256": digest.sha256.hexdigest()}}
        sidecar = self._sidecar(job, kind, cipher, members, enc_final.name, "archived", flag, reason, False, extra)
        checked = {k: job.hashes[k] for k in sorted(job.hashes)}
        archived = Archived(f"{rel}.{SEAL_SUFFIX}", cipher.size, cipher.sha256.hexdigest(), checked, len(members),
                            flag=flag, flag_reason=reason, via=_via(job), plain_sha256=digest.sha256.hexdigest())
        if self.stage_only:
            assert cipher.md5 is not None
            return Staged(archived, sidecar, base64.b64encode(cipher.md5.digest()).decode(), enc_tmp)
        try:
            write_file_atomic(sidecar_path(final), sidecar)
            os.replace(enc_tmp, enc_final)
        except OSError as exc:
            remove_quietly(enc_tmp)
            raise LocalStorageError(f"cannot store {enc_final.name}: {exc.strerror}") from None
        return archived


class _AroundPlaced:
    """The file ``zipfile`` writes a ZIP into, around bytes already in place: the next ``skip``
    bytes it writes are on disk already (the daemon spilled them there), so they are passed over,
    not written again; everything else (headers, the rest of a member, the central directory)
    is written as ``zipfile`` made it, so the ZIP's bytes are the same either way."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.skip = 0

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.skip:
            passed = min(self.skip, n)
            self.skip -= passed
            self._out.seek(passed, os.SEEK_CUR)
            data = data[passed:]
        if data:
            self._out.write(data)
        return n

    def tell(self) -> int:
        return self._out.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._out.seek(offset, whence)

    def flush(self) -> None:
        self._out.flush()


def _via(job: StoreJob) -> str:
    return FETCH_PATHS[0] if job.listed else FETCH_PATHS[1]


def _fresh_dir(path: Path) -> None:
    remove_quietly(path)
    path.mkdir(mode=0o750)


def remove_quietly(*paths: Path) -> None:
    """Remove files or directory trees; missing ones are fine. A symlink is removed itself,
    never what it points to. Best effort: a disk that answers EIO must not turn a cleanup into
    a crash (a store helper once exited on it); start-up recovery removes what is left."""
    for path in paths:
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue
