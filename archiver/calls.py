"""What a call from ``GET /calls`` is, validated once at the edge, and phone numbers as ``find``
compares them.

A recording names its call (``reference_type = "call"``, ``reference_id`` = the call's id); the
call carries who spoke to whom. The call's JSON is kept whole (``raw``); only what ``find``
filters on is taken out of it: direction, status and the two addresses, a ``tel`` address as
its E.164 digits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidRecording
from .model import check_id, parse_timestamp

MAX_CALL_BYTES = 256 * 1024  # one call's JSON; a real one is about 2 kB
DIRECTIONS = ("incoming", "outgoing")
_DIGITS = re.compile(r"\d{3,15}")  # E.164: at most 15 digits
_NUMBER_PUNCTUATION = re.compile(r"[\s\-().]")


def normalize_number(text: str) -> str:
    """The E.164 digits of a phone number: ``+4930123``, ``004930123`` and ``4930123`` (with
    spaces, dashes, dots or brackets) are all ``4930123``. Raises ``ValueError`` otherwise."""
    value = _NUMBER_PUNCTUATION.sub("", text.strip())
    if value.startswith("+"):
        value = value[1:]
    elif value.startswith("00"):
        value = value[2:]
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"{text[:40]!r} is not a phone number (E.164: + and 3 to 15 digits)")
    return value


def address_key(address: Any) -> str:
    """What ``find --number`` matches an address on: a telephone number's E.164 digits, another
    address (SIP, an agent, an extension) as its target, lower case; "" for none."""
    if not isinstance(address, dict):
        return ""
    target = address.get("target")
    if not isinstance(target, str) or not target or len(target) > 256:
        return ""
    try:
        return normalize_number(target)
    except ValueError:
        return target.strip().lower() if address.get("type") != "tel" else ""


@dataclass(frozen=True)
class Call:
    id: str
    direction: str  # "incoming", "outgoing", or "" when the server says something else
    status: str
    source: str  # address_key() of the source
    destination: str
    source_target: str | None  # the addresses as the server wrote them, for find's output
    destination_target: str | None
    hangup_reason: str | None
    recording_ids: tuple[str, ...]
    tm_create: datetime | None
    raw: dict[str, Any]


def parse_call(raw: Any) -> Call:
    """Validate one call object from the API; raise ``InvalidRecording`` with a reason (the
    walk logs it and goes on: a bad call never stops the archive)."""
    if not isinstance(raw, dict):
        raise InvalidRecording(f"call is not an object: {type(raw).__name__}")
    call_id = check_id(raw.get("id"))
    size = len(json.dumps(raw))
    if size > MAX_CALL_BYTES:
        raise InvalidRecording(f"call object of {size} bytes, more than {MAX_CALL_BYTES}")
    direction = raw.get("direction")
    status = raw.get("status")
    ids = raw.get("recording_ids") or []
    if not isinstance(ids, list):
        raise InvalidRecording("recording_ids is not a list")
    recording_ids = []
    for value in ids[:1000]:
        try:
            recording_ids.append(check_id(value))
        except InvalidRecording:
            continue  # a malformed id names nothing we could have archived
    try:
        tm_create = parse_timestamp(raw.get("tm_create"))
    except ValueError as exc:
        raise InvalidRecording(str(exc)) from None
    return Call(
        id=call_id,
        direction=direction if direction in DIRECTIONS else "",
        status=status if isinstance(status, str) and len(status) <= 32 else "",
        source=address_key(raw.get("source")),
        destination=address_key(raw.get("destination")),
        source_target=_text(raw.get("source"), "target"),
        destination_target=_text(raw.get("destination"), "target"),
        hangup_reason=_text(raw, "hangup_reason"),
        recording_ids=tuple(recording_ids),
        tm_create=tm_create,
        raw=raw,
    )


def _text(value: Any, key: str) -> str | None:
    """``value[key]`` when it is a short string (what ``find`` prints), else None."""
    text = value.get(key) if isinstance(value, dict) else None
    return text if isinstance(text, str) and len(text) <= 256 else None


CALL_FIELDS = ("direction", "status", "source", "destination", "hangup_by", "hangup_reason",
               "tm_ringing", "tm_progressing", "tm_hangup", "tm_create")


def call_block(raw: dict[str, Any] | None, reference_type: str) -> dict[str, Any]:
    """The sidecar's (and ``<id>.call.json``'s) ``call`` part: what the call says of who spoke
    to whom, or why there is none."""
    if reference_type != "call":
        return {"none": f"a {reference_type or 'recording without a reference'} has no call"}
    if raw is None:
        return {"none": "the call is not listed (deleted on the server, or not walked yet)"}
    return {"id": raw.get("id"), **{k: raw[k] for k in CALL_FIELDS if k in raw}}
