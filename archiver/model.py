"""What a recording from the API is, validated once at the edge.

The server's JSON is kept whole (``raw``) so fields we do not know survive into the sidecar;
only the few fields the archiver acts on are checked here.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidRecording

KNOWN_STATUSES = ("initiating", "recording", "stopping", "ended")
# How a recording's audio was fetched (the sidecar's ``fetched_from``, the metrics' ``path``):
# its channel files from the storage listing, or the server's ZIP from /recordingfiles
FETCH_PATHS = ("storage_files", "recordingfiles")
_FORMAT_RE = re.compile(r"^[a-z0-9]{1,10}$")
_TUTORIAL_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})(\.\d{1,9})?$")
MAX_RECORDING_BYTES = 256 * 1024  # one recording's JSON; a real one is about 600 bytes
_SENTINEL_YEAR = 9000  # older servers wrote "9999-01-01 00:00:00.000000" for "unset"


def parse_timestamp(value: Any) -> datetime | None:
    """Parse both timestamp styles the API has used; unset/sentinel values give ``None``.

    Tutorial style ``2021-01-28 09:17:11.883000`` (UTC, no zone) and RFC 3339 with 0-9
    fractional digits (``2021-01-28T09:17:11.88Z``).  Raises ``ValueError`` on anything else.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"timestamp is not a string: {value!r:.80}")
    text = value.strip()
    m = _TUTORIAL_RE.match(text)
    if m:
        frac = (m.group(3) or ".0")[1:7].ljust(6, "0")
        text = f"{m.group(1)}T{m.group(2)}.{frac}+00:00"
    elif text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python accepts at most 6 fractional digits before 3.12 in some forms: trim to microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised timestamp {value!r:.80}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    try:
        ts = ts.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one (fuzzing)
        raise ValueError(f"timestamp out of range {value!r:.80}") from None
    if ts.year >= _SENTINEL_YEAR:
        return None
    return ts


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_id(value: Any) -> str:
    """Return the canonical lowercase UUID string, or raise ``InvalidRecording``."""
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return value  # the common case, checked on every path built: a regex, not a parse
    if not isinstance(value, str) or len(value) != 36:
        raise InvalidRecording(f"id is not a UUID: {str(value)[:80]!r}")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise InvalidRecording(f"id is not a UUID: {value[:80]!r}") from None
    if canonical != value.lower():
        raise InvalidRecording(f"id is not a canonical UUID: {value[:80]!r}")
    return canonical


def expected_members(reference_type: str) -> int:
    """How many files a complete recording usually has: two legs for a call, one otherwise."""
    return 2 if reference_type == "call" else 1


@dataclass(frozen=True)
class Recording:
    id: str
    status: str
    reference_type: str
    tm_create: datetime | None
    tm_end: datetime | None
    deleted: bool
    raw: dict[str, Any]

    @property
    def ended(self) -> bool:
        return self.status == "ended"


def parse_recording(raw: Any) -> Recording:
    """Validate one recording object from the API; raise ``InvalidRecording`` with a reason."""
    if not isinstance(raw, dict):
        raise InvalidRecording(f"recording is not an object: {type(raw).__name__}")
    rec_id = check_id(raw.get("id"))
    size = len(json.dumps(raw))  # it is kept whole: in SQLite, in the sidecar
    if size > MAX_RECORDING_BYTES:
        raise InvalidRecording(f"recording object of {size} bytes, more than {MAX_RECORDING_BYTES}")
    status = raw.get("status")
    if not isinstance(status, str):
        raise InvalidRecording("status missing or not a string")
    fmt = raw.get("format", "")
    if fmt not in ("", None) and (not isinstance(fmt, str) or not _FORMAT_RE.match(fmt)):
        raise InvalidRecording(f"format is not a plain extension: {str(fmt)[:40]!r}")
    ref_type = raw.get("reference_type") or ""
    if not isinstance(ref_type, str) or not re.fullmatch(r"[a-z_]{0,32}", ref_type):
        raise InvalidRecording(f"reference_type is invalid: {str(ref_type)[:40]!r}")
    try:
        tm_create = parse_timestamp(raw.get("tm_create"))
        tm_end = parse_timestamp(raw.get("tm_end"))
        tm_delete = parse_timestamp(raw.get("tm_delete"))
    except ValueError as exc:
        raise InvalidRecording(str(exc)) from None
    deleted = tm_delete is not None and tm_delete <= datetime.now(UTC)
    return Recording(
        id=rec_id,
        status=status,
        reference_type=ref_type,
        tm_create=tm_create,
        tm_end=tm_end,
        deleted=deleted,
        raw=raw,
    )
