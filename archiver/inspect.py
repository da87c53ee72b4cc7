"""Checks on downloaded bytes: server hashes, RIFF/WAVE structure, ZIP members (with limits).

Everything here streams: a body or member is never held in memory whole.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
from zlib_ng import zlib_ng

from .errors import ArchiverError, InvalidRecording, LocalStorageError, VerificationError
from .layout import sanitize_member_name, unique_member_name

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# Reads of a body or member go 256 kB at a time: glibc serves a buffer that size from its heap,
# where a 1 MB one is mapped afresh each time and its pages faulted in (5,384 faults and twice
# the CPU for one 22 MB ZIP's member check, measured).
CHUNK = 1 << 18

# zipfile's CRC-32 of every member it reads or writes, from zlib-ng: the same function, 5 times
# as fast as the system zlib's (22 GB/s against 4.1 here; it was a tenth of the CPU of a backfill
# of large listed files, which computes it twice: once writing our ZIP, once checking it).
setattr(zipfile, "crc32", zlib_ng.crc32)  # noqa: B010 - typeshed does not declare zipfile.crc32


def body_kind(head: bytes) -> str:
    """``zip`` or ``wav`` from the first bytes; never from the URL or the ``format`` field."""
    if head[:4] in ZIP_MAGICS:
        return "zip"
    if head[:4] == b"RIFF":
        return "wav"
    raise VerificationError(f"body is neither a ZIP nor a WAV (starts with {head[:8]!r})")


def parse_goog_hash(values: list[str]) -> dict[str, str]:
    """``x-goog-hash: crc32c=<b64>,md5=<b64>`` (one header or several) -> {"crc32c": .., "md5": ..}."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, sep, digest = part.strip().partition("=")
            if sep and name.strip().lower() in ("crc32c", "md5"):
                out[name.strip().lower()] = digest.strip()
    return out


class RiffChecker:
    """Streaming RIFF/WAVE validator: header, every chunk size, ``fmt `` then ``data``."""

    def __init__(self, name: str = "body") -> None:
        self.name = name
        self.total = 0
        self._head = bytearray()
        self._hdr = bytearray()
        self._remaining = 0
        self._fmt = bytearray()
        self._in_fmt = False
        self.chunks: list[tuple[bytes, int]] = []

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i, n = 0, len(data)
        self.total += n
        while i < n:
            if len(self._head) < 12:
                take = min(12 - len(self._head), n - i)
                self._head += view[i : i + take]
                i += take
                if len(self._head) == 12 and (self._head[:4] != b"RIFF" or self._head[8:12] != b"WAVE"):
                    raise VerificationError(f"{self.name}: not a RIFF/WAVE file")
                continue
            if self._remaining:
                take = min(self._remaining, n - i)
                if self._in_fmt and len(self._fmt) < 16:
                    self._fmt += view[i : i + min(take, 16 - len(self._fmt))]
                self._remaining -= take
                i += take
                continue
            take = min(8 - len(self._hdr), n - i)
            self._hdr += view[i : i + take]
            i += take
            if len(self._hdr) == 8:
                chunk_id = bytes(self._hdr[:4])
                size = int.from_bytes(self._hdr[4:], "little")
                self.chunks.append((chunk_id, size))
                self._remaining = size + (size & 1)
                self._in_fmt = chunk_id == b"fmt "
                self._hdr.clear()

    @property
    def data_bytes(self) -> int:
        return sum(size for cid, size in self.chunks if cid == b"data")

    def finish(self) -> None:
        """Raise ``VerificationError`` unless the bytes fed were one complete WAV file."""
        if len(self._head) < 12:
            raise VerificationError(f"{self.name}: too short for a WAV header ({self.total} bytes)")
        riff_size = int.from_bytes(self._head[4:8], "little")
        if riff_size + 8 != self.total:
            raise VerificationError(f"{self.name}: RIFF size says {riff_size + 8} bytes, got {self.total}")
        last_odd_unpadded = self._remaining == 1 and self.chunks and self.chunks[-1][1] & 1
        if self._hdr or (self._remaining and not last_odd_unpadded):
            raise VerificationError(f"{self.name}: last chunk is cut short")
        ids = [cid for cid, _ in self.chunks]
        if b"fmt " not in ids or b"data" not in ids or ids.index(b"fmt ") > ids.index(b"data"):
            raise VerificationError(f"{self.name}: WAV lacks a 'fmt ' chunk before 'data'")
        if len(self._fmt) < 16:
            raise VerificationError(f"{self.name}: 'fmt ' chunk too short")
        _fmt_tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", self._fmt[:16])
        if not channels or not rate or not bits:
            raise VerificationError(f"{self.name}: 'fmt ' has zero channels, rate or sample size")


_NO_SHA256 = hashlib.sha256(b"")  # BodyDigest(sha256=False): a listed file, whose SHA-256 nobody keeps


class BodyDigest:
    """Size, SHA-256, MD5 and CRC32C of a body, fed chunk by chunk as it streams to disk."""

    def __init__(self, md5: bool = True, sha256: bool = True) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256() if sha256 else _NO_SHA256
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.crc32c = 0

    def update(self, data: bytes) -> None:
        self.size += len(data)
        if self.sha256 is not _NO_SHA256:
            self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.crc32c = google_crc32c.extend(self.crc32c, data)

    def check(self, expected_length: int | None, server_hashes: dict[str, str]) -> dict[str, str]:
        """Compare with ``Content-Length`` and every offered hash; return the hashes checked."""
        if expected_length is not None and expected_length != self.size:
            raise VerificationError(f"length mismatch: Content-Length {expected_length}, got {self.size}")
        ours = {"crc32c": base64.b64encode(self.crc32c.to_bytes(4, "big")).decode()}
        if self.md5 is not None:
            ours["md5"] = base64.b64encode(self.md5.digest()).decode()
        checked = {}
        for name, theirs in server_hashes.items():
            if ours.get(name) != theirs:
                raise VerificationError(f"{name} mismatch: server {theirs}, body {ours[name]}")
            checked[name] = theirs
        return checked


@dataclass(frozen=True)
class ZipLimits:
    max_members: int = 1000
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 1000.0


@dataclass
class Member:
    """A recording file: a ZIP member, or the single WAV. Every ZIP member has its verified
    ``crc32``; ``sha256`` is computed only for a file stored on its own (a WAV, an unpacked
    member): the ZIP's SHA-256 covers the bytes of a member kept inside it."""

    name: str
    size: int
    sha256: str | None
    audio_bytes: int
    stored_as: str | None = None
    crc32: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "audio_bytes": self.audio_bytes}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.crc32 is not None:
            out["crc32"] = f"{self.crc32:08x}"
        if self.stored_as is not None:
            out["stored_as"] = self.stored_as
        return out


def hostile_name(name: str) -> str | None:
    if not name:
        return "an empty name"
    if "\x00" in name:
        return "a NUL byte"
    if "/" in name or "\\" in name:
        return "a path separator"
    if name in (".", ".."):
        return "a relative path"
    return None


def inspect_zip(path: Path | BinaryIO, limits: ZipLimits, extract_to: Path | None = None) -> list[Member]:
    """Verify every member (CRC, size, WAV structure) of the ZIP at ``path`` (or in a file object).

    Hostile archives (unsafe names, too many members, zip bombs, encryption) raise
    ``InvalidRecording``; damaged ones raise ``VerificationError``.  With ``extract_to`` (an
    existing, empty directory) members are written there under sanitised names and fsynced.
    Runs in a thread: it is CPU and disk work.
    """
    try:
        archive = zipfile.ZipFile(path)
    except OSError as exc:
        if _bad_offset(exc):
            raise VerificationError(f"not a readable ZIP: {_describe(exc)}") from None
        raise LocalStorageError(f"cannot read {getattr(path, 'name', 'the body')}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - zipfile raises many kinds on hostile bytes (fuzzing found them)
        raise VerificationError(f"not a readable ZIP: {_describe(exc)}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise InvalidRecording(f"ZIP has {len(infos)} members, more than max_members={limits.max_members}")
        total = 0
        taken: set[str] = set()
        stored_as: list[str] = []  # each member's name on disk when extracted: safe and unique
        for info in infos:
            problem = hostile_name(info.filename)
            if problem or info.is_dir():
                raise InvalidRecording(f"ZIP member name {info.filename[:80]!r} has {problem or 'a directory'}")
            if info.flag_bits & 0x1:
                raise InvalidRecording(f"ZIP member {info.filename[:80]!r} is encrypted")
            if info.file_size > limits.max_member_bytes:
                raise InvalidRecording(f"ZIP member {info.filename[:80]!r} declares {info.file_size} bytes")
            ratio = info.file_size / max(1, info.compress_size)
            if ratio > limits.max_ratio and info.file_size > 1024 * 1024:
                raise InvalidRecording(f"ZIP member {info.filename[:80]!r} expands {ratio:.0f}x: a zip bomb")
            total += info.file_size
            stored_as.append(unique_member_name(sanitize_member_name(info.filename), taken))
        if total > limits.max_total_bytes:
            raise InvalidRecording(f"ZIP members declare {total} bytes, more than max_total_bytes")
        return [_read_member(archive, info, extract_to, name) for info, name in zip(infos, stored_as, strict=True)]


def list_zip_members(source: BinaryIO) -> list[Member]:
    """What a damaged ZIP's central directory declares (names, sizes, CRCs), unverified; an
    empty list when even that cannot be read. Only for describing a kept damaged body."""
    try:
        with zipfile.ZipFile(source) as archive:
            return [Member(i.filename[:200], i.file_size, None, 0, None, i.CRC) for i in archive.infolist()[:1000]]
    except Exception:  # noqa: BLE001 - whatever zipfile raises on these bytes: nothing to describe
        return []


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, extract_to: Path | None, name: str) -> Member:
    riff = RiffChecker(f"member {info.filename[:80]!r}")
    # zipfile checks the CRC-32 once the member is read to its end; a SHA-256 of a member is
    # only worth its CPU (about 6 % of a backfill's, measured) when the member is stored alone
    digest = hashlib.sha256() if extract_to is not None else None
    size = 0
    out_fd = None
    stored_as = None
    if extract_to is not None:
        stored_as = name
        try:
            out_fd = os.open(extract_to / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise LocalStorageError(f"cannot unpack {name[:80]!r}: {exc.strerror}") from None
    try:
        with archive.open(info) as member:
            while chunk := member.read(CHUNK):
                size += len(chunk)
                if size > info.file_size:
                    raise VerificationError(f"member {info.filename[:80]!r} is longer than declared")
                if digest is not None:
                    digest.update(chunk)
                riff.feed(chunk)
                if out_fd is not None:
                    write_all(out_fd, chunk)
        if out_fd is not None:
            _fsync(out_fd)
    except ArchiverError:
        raise
    except OSError as exc:  # reading our own file (or writing the unpacked copy) failed
        if _bad_offset(exc):
            raise VerificationError(f"member {info.filename[:80]!r}: {_describe(exc)}") from None
        raise LocalStorageError(f"cannot read or unpack member {info.filename[:80]!r}: {exc.strerror}") from None
    except (NotImplementedError, RuntimeError) as exc:  # an unsupported method, encryption
        raise InvalidRecording(f"member {info.filename[:80]!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, ...: damaged bytes
        raise VerificationError(f"member {info.filename[:80]!r}: {_describe(exc)}") from None
    finally:
        if out_fd is not None:
            os.close(out_fd)
    if size != info.file_size:
        raise VerificationError(f"member {info.filename[:80]!r}: {size} bytes, declared {info.file_size}")
    riff.finish()
    sha = digest.hexdigest() if digest is not None else None
    return Member(info.filename, size, sha, riff.data_bytes, stored_as, info.CRC)


def _bad_offset(exc: OSError) -> bool:
    """A seek the ZIP's own offsets asked for that the file refuses (negative, past any size):
    the bytes are wrong, not the disk."""
    return exc.errno in (errno.EINVAL, errno.EOVERFLOW, errno.ESPIPE)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written; a failure is the archive's (LocalStorageError)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise LocalStorageError(f"cannot write to the archive: {exc.strerror}") from None


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise LocalStorageError(f"cannot fsync in the archive: {exc.strerror}") from None


def hash_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()
