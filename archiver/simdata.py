"""The simulator's data: its switches (``SimConfig``), a recording (``SimRecording``), the
server's timestamp and page-token styles and the bodies storage holds (WAVs, Go-style ZIPs).
Shared by ``simulator`` and ``simfiles`` (the storage listing)."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EMPTY_ZIP = b"PK\x05\x06" + b"\x00" * 18
CUSTOMER_ID = "5e4a0680-804e-11ec-8477-2fea5968d85b"
FILE_URL_TTL = 7 * 86400.0  # a listed file's uri_download is signed for this long from its creation


@dataclass
class SimConfig:
    recordings: int = 250
    seed: int = 1
    mode: str = "zip"  # "zip" (today) or "wav" (the tutorial's server)
    timestamps: str = "rfc3339"  # or "tutorial"
    audio_bytes: int = 169_920  # 10.62 s of 8 kHz 16-bit mono
    latency: float = 0.0
    rate_limit: bool = True
    rate: float = 16.7
    burst: int = 33
    pending: int = 0  # recordings still "recording", ending end_after seconds after start
    end_after: float = 2.0
    late_files: int = 0  # ended recordings whose files arrive files_after seconds after the end
    files_after: float = 2.0
    deleted: int = 0
    conference_every: int = 7  # every Nth recording is a confbridge (one file)
    transcribed_every: int = 3  # every Nth recording has a transcription session (GET /transcribes)
    faults: dict[str, float] = field(default_factory=dict)
    accesskey: str = ""
    username: str = "demo"
    password: str = "demo-password"
    signed_url_ttl: float = 86400.0
    stall_seconds: float = 5.0
    storage_base: str = ""  # redirect to this origin instead of ourselves (e.g. to test http refusal)
    no_audio: int = 0  # ended recordings whose files never arrive (the store was full, the upload failed)
    missing_member: int = 0  # calls whose cached ZIP lacks one leg, for good
    slow_builds: int = 0  # recordings whose ZIP takes build_seconds to build before the 307
    build_seconds: float = 5.0
    build_timeout: float = 300.0  # the server's own limit: past it, 503 REQUEST_TIMEOUT
    background_rps: float = 0.0  # "someone else" of the same customer, taking from the same bucket
    refusal: str = ""  # "", or a 403 reason every API request gets (ACCOUNT_FROZEN, ...)
    login_rate: float = 10.0  # /auth/* per IP
    login_burst: int = 20
    login_429: int = 0  # the first N logins answer 429
    accesskey_ttl: float = 365 * 86400.0  # the access key expires this long after the start
    accesskeys_denied: bool = False  # GET /accesskeys answers 403 PERMISSION_DENIED
    store_capacity: int = 0  # bytes of files the customer may keep (the server's is 10 GB); 0 = no cap
    delete_stall: str = ""  # "before" or "after": DELETE hangs before (or after) it deletes
    spacing: float = 97.0  # seconds between two generated recordings (newest 5 minutes ago)
    rag_files: int = 3  # knowledge-base uploads listed by GET /storage_files beside the recordings
    file_url_ttl: float = FILE_URL_TTL  # a listed file's uri_download is valid this long from its creation


@dataclass
class SimRecording:
    id: str
    tm_create: datetime
    reference_type: str
    reference_id: str
    duration: float
    ends_at: float | None = None  # epoch; None: ended before the simulator started
    files_at: float = 0.0  # epoch the files are complete in storage
    deleted_at: float | None = None
    raw_overrides: dict[str, Any] = field(default_factory=dict)
    body_override: bytes | None = None
    files_never: bool = False  # the upload failed (or the store was full): storage only ever has an empty ZIP
    deleted_via_api: bool = False  # deleted by a client's DELETE (after it archived the recording)
    member_missing: bool = False  # the cached ZIP lacks its last member, for good
    build_seconds: float = 0.0
    call_listed: bool = True  # its call (reference_type "call") is listed by GET /calls; False: deleted
    call_overrides: dict[str, Any] = field(default_factory=dict)  # fields of its call's JSON
    transcribing: bool = False  # its transcription is still "progressing"


def sim_time(value: datetime | None, style: str) -> str | None:
    """A timestamp in the server's style; ``None`` (omitted) for an unset one today."""
    if value is None:
        return "9999-01-01 00:00:00.000000" if style == "tutorial" else None
    if style == "tutorial":
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if style == "token":  # today's page token: always six fractional digits
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    frac = f"{value.microsecond:06d}".rstrip("0")
    return value.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def page_token(value: datetime, style: str) -> str:
    """A page token: the last item's ``tm_create``, which is always set."""
    return sim_time(value, style) or ""


def parse_token(token: str) -> datetime | None:
    text = token.strip().replace(" ", "T").rstrip("Z")
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        return None


def make_wav(audio: bytes, rate: int = 8000) -> bytes:
    header = b"RIFF" + struct.pack("<I", 36 + len(audio)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + fmt + b"data" + struct.pack("<I", len(audio)) + audio


def make_zip(members: list[tuple[str, bytes]], level: int = 1) -> bytes:
    """A ZIP as Go's ``archive/zip`` writes it (the server's): deflate, flag bit 3 with the CRC
    and sizes in a data descriptor after each member, zero DOS time and date, no extra fields."""
    if not members:
        return EMPTY_ZIP
    out = io.BytesIO()
    central = io.BytesIO()
    for name, data in members:
        encoded = name.encode("utf-8")
        flags = 0x8 | (0x800 if not encoded.isascii() else 0)
        packer = zlib.compressobj(level, zlib.DEFLATED, -15)
        packed = packer.compress(data) + packer.flush()
        crc = zlib.crc32(data)
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 8, 0, 0, 0, 0, 0, len(encoded), 0))
        out.write(encoded)
        out.write(packed)
        out.write(struct.pack("<IIII", 0x08074B50, crc, len(packed), len(data)))
        central.write(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, 8, 0, 0, crc, len(packed), len(data),
            len(encoded), 0, 0, 0, 0, 0, offset,
        ))
        central.write(encoded)
    directory, start = central.getvalue(), out.tell()
    out.write(directory)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), start, 0))
    return out.getvalue()
