"""The storage listing as a download path: ``GET /storage_files`` items, and which recordings
can be fetched from their listed channel files instead of ``GET /recordingfiles/{id}``.

Each recording's audio is listed as one file per channel (``<name>_in.wav`` and ``<name>_out.wav``
for a call, ``<name>_in.wav`` for a conference), each with ``filesize`` and a signed URL valid 7
days from the file's creation. Downloading them costs no API budget: one listing request serves
up to 100 files. Listed items are hostile input like any other: only a file whose
``reference_id`` is the recording's own id is ever used for it, and a set that is ambiguous,
unsigned, about to expire or of unexpected names sends the recording down ``/recordingfiles``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import is_loopback_host
from .errors import InvalidRecording
from .inspect import hostile_name
from .model import check_id, parse_timestamp

URL_VALIDITY = 7 * 86400.0  # the server signs a listed file's URL for this long, from its creation
URL_MARGIN = 3600.0  # a listed URL is used only while it stays valid at least this much longer
MAX_FILENAME = 255
CHANNELS = {"call": ("in", "out"), "confbridge": ("in",)}


@dataclass(frozen=True)
class StorageFile:
    """One item of ``GET /storage_files``; ``recording_id`` None for files of no recording."""

    id: str
    recording_id: str | None
    filename: str
    filesize: int | None
    url: str
    expires_at: float | None
    tm_create: Any  # datetime | None: the page token's time

    @property
    def channel(self) -> str:
        """``in`` or ``out`` from the name the call manager gives a channel's file; "" otherwise."""
        for channel in ("in", "out"):
            if self.filename.endswith(f"_{channel}.wav"):
                return channel
        return ""


def parse_storage_file(item: Any) -> StorageFile:
    """Validate one listed file; ``InvalidRecording`` (the page rejects that item) otherwise."""
    if not isinstance(item, dict):
        raise InvalidRecording(f"listed file is a {type(item).__name__}, not an object")
    file_id = check_id(item.get("id"))
    ours = item.get("reference_type") == "recording" and item.get("type", "recording") == "recording"
    recording_id = check_id(item.get("reference_id")) if ours else None
    name = item.get("filename") or item.get("name") or ""
    if not isinstance(name, str) or len(name) > MAX_FILENAME or (ours and hostile_name(name)):
        raise InvalidRecording(f"listed file name {str(name)[:80]!r} is not a plain file name")
    size = item.get("filesize")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        size = None
    url = item.get("uri_download") or ""
    if not isinstance(url, str) or len(url) > 8192:
        raise InvalidRecording("listed file's uri_download is not a string")
    try:
        expires = parse_timestamp(item.get("tm_download_expire"))
        created = parse_timestamp(item.get("tm_create"))
    except ValueError as exc:
        raise InvalidRecording(f"listed file has a malformed time: {exc}") from None
    return StorageFile(file_id, recording_id, name, size, url, expires.timestamp() if expires else None, created)


@dataclass(frozen=True)
class Route:
    """How one recording is fetched: ``storage`` (``files``, one per channel, in channel order),
    ``absent`` (none of its files is listed yet), ``wait`` (some are) or ``fallback``
    (``/recordingfiles``)."""

    way: str
    reason: str = ""
    files: tuple[dict[str, Any], ...] = ()


def storage_route(files: list[dict[str, Any]], ref_type: str, now: float) -> Route:
    """The route for a recording whose listed files (state rows: id, filename, filesize, url,
    expires_at) are ``files``. Pure: the engine decides when to wait and what to log."""
    channels = CHANNELS.get(ref_type)
    if channels is None:
        return Route("fallback", f"reference_type {ref_type[:40]!r} has no known channel files")
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        channel = StorageFile(f["id"], None, f["filename"], None, "", None, None).channel
        if channel not in channels:
            return Route("fallback", f"an unexpected file is listed for it ({str(f['filename'])[:80]!r})")
        by_channel.setdefault(channel, []).append(f)
    twice = [c for c, fs in by_channel.items() if len(fs) > 1]
    if twice:
        return Route("fallback", f"two different files are listed for its {twice[0]!r} channel")
    missing = [c for c in channels if c not in by_channel]
    if missing:
        return Route("wait" if by_channel else "absent", f"{len(by_channel)} of {len(channels)} channel files listed")
    chosen = tuple(by_channel[c][0] for c in channels)
    for f in chosen:
        if not f["url"]:
            return Route("fallback", "a listed file has no signed URL (signing failed on the server)")
        if f["filesize"] is None:
            return Route("fallback", "a listed file has no filesize to check it against")
        if f["expires_at"] is None or f["expires_at"] < now + URL_MARGIN:
            return Route("fallback", "a listed file's signed URL has expired or is about to")
        parts = urlsplit(f["url"])
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname)):
            return Route("fallback", f"a listed file's URL is not HTTPS ({parts.scheme}://)")
    return Route("storage", files=chosen)
