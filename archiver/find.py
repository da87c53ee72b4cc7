"""``voipbin-archiver find`` (and ``export``'s filters): the archive answers from the state alone,
never the API or the archive, so it works while the service runs and on a copy of the database.

Each filter narrows the answer: ``--since``/``--until`` on the recording's ``tm_start`` (its
``tm_create`` when it never started), ``--number`` on the call's source or destination (the
same E.164 number however it is written), ``--call``, ``--recording``, ``--direction``,
``--account``, ``--state``, ``--flagged``.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from typing import Any

from .calls import DIRECTIONS, normalize_number
from .config import ACCOUNT_NAME
from .errors import ConfigError, InvalidRecording
from .model import check_id
from .state import STATES, FindQuery

_MONTH = re.compile(r"\d{4}-\d{2}")


def parse_time(text: str) -> datetime:
    """A date (``2026-03-01``), a month (``2026-03``: its first day) or an ISO 8601 time, UTC
    unless it says otherwise."""
    value = text.strip()
    if _MONTH.fullmatch(value):
        value += "-01"
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date or time: {text[:40]!r} (use YYYY-MM, YYYY-MM-DD or an ISO 8601 time)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _number(text: str) -> str:
    try:
        return normalize_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _uuid(text: str) -> str:
    try:
        return check_id(text.strip().lower())
    except InvalidRecording as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _account(text: str) -> str:
    if not ACCOUNT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not an account name: {text[:40]!r}")
    return text


def add_filters(p: argparse.ArgumentParser) -> None:
    """The filters ``find`` and ``export`` share."""
    p.add_argument("--since", type=parse_time, help="recordings that started at or after this (UTC)")
    p.add_argument("--until", type=parse_time, help="recordings that started before this (UTC)")
    p.add_argument("--number", type=_number,
                   help="the call's source or destination: +4930123, 004930123 and 4930123 are one number")
    p.add_argument("--call", type=_uuid, help="the recordings of this call id")
    p.add_argument("--recording", type=_uuid, help="this recording id")
    p.add_argument("--direction", choices=DIRECTIONS)
    p.add_argument("--account", type=_account, help="one [[accounts]] name")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--flagged", action="store_true", help="only recordings archived incomplete or damaged")


def query_of(args: argparse.Namespace, limit: int = 0) -> FindQuery:
    """The ``FindQuery`` of parsed filters; ``--since`` after ``--until`` is an error naming both."""
    if args.since and args.until and args.since >= args.until:
        raise ConfigError("--since must be before --until")
    return FindQuery(
        since=args.since.timestamp() if args.since else None, until=args.until.timestamp() if args.until else None,
        number=args.number or "", call=args.call or "", recording=args.recording or "",
        direction=args.direction or "", account=args.account or "", state=args.state or "",
        flagged=args.flagged, limit=limit,
    )


def filters_of(args: argparse.Namespace) -> dict[str, Any]:
    """The filters as given, for ``export.json``."""
    out: dict[str, Any] = {}
    for name in ("since", "until", "number", "call", "recording", "direction", "account", "state", "flagged"):
        value = getattr(args, name)
        if value:
            out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def table(records: list[dict[str, Any]]) -> str:
    """The records as a table for a terminal, one line each."""
    accounts = len({r["account"] for r in records}) > 1
    head = ["started (UTC)", "recording", *(["account"] if accounts else []), "direction", "from", "to", "state",
            "size"]
    lines = [head]
    for r in records:
        state = r["state"] + (f" ({r['flag']})" if r["flag"] else "")
        lines.append([
            (r["tm_start"] or "")[:19].replace("T", " "), r["recording_id"], *([r["account"]] if accounts else []),
            r["direction"] or "-", r["source"] or ("-" if r["call_note"] is None else r["call_note"][:24]),
            r["destination"] or "-", state, str(r["size"]) if r["size"] is not None else "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


