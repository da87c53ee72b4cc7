"""What both state backends share: the recording states, the row the engine works on, and the
summary assembled from either database's rows. Nothing here talks to a database."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..calls import Call
from ..config import DEFAULT_ACCOUNT
from ..model import Recording, parse_timestamp
from ..storagefiles import StorageFile

STATES = ("discovered", "pending", "downloading", "archived", "no_audio", "failed", "skipped", "expired", "erased")
FLAGS = ("incomplete", "damaged")  # how an archived recording falls short, if it does
STORED = ("archived", "no_audio")  # states with files in the archive (``verify``)
STORED_SQL = ", ".join(f"'{state}'" for state in STORED)
WAITING = ("discovered", "pending", "downloading")  # not archived, failed or skipped yet
REMOVED = ("expired", "erased")  # archived once, then removed from the archive by policy (policy.py)
REMOVED_SQL = ", ".join(f"'{state}'" for state in REMOVED)


def waiting_count(counts: dict[str, int]) -> int:
    """Recordings still to be archived, from counts per state."""
    return sum(counts[s] for s in WAITING)


DELETABLE_COLUMNS = "id, state, path, size, sha256, delete_intent_at"  # what retention.Pruner reads
# what manifestwriter reads of a recording due in the manifest, and the meta key of the chain's head
MANIFEST_COLUMNS = ("id, state, path, size, sha256, flag, archived_at, server_deleted_at, delete_request_id,"
                    " manifest_seq, removed_at, removed_reason, plain_sha256")
MANIFEST_HEAD = "manifest_head"
# what policy.py reads of a recording to remove, and whether it is held
REMOVAL_COLUMNS = ("id, state, path, size, sha256, tm_start, tm_create, remove_intent, removed_reason, members,"
                   " EXISTS (SELECT 1 FROM holds h WHERE h.account = r.account AND h.recording_id = r.id) AS held")


@dataclass(frozen=True)
class ManifestDue:
    """What no manifest segment lists yet (``State.manifest_due``), with ``MANIFEST_COLUMNS``."""

    archived: list[dict[str, Any]]  # stored recordings
    deleted: list[dict[str, Any]]  # server copies deleted
    removed: list[dict[str, Any]]  # recordings expired or erased from the archive
    holds: list[dict[str, Any]]  # holds placed or released (seq, recording_id, action, reason, at)


@dataclass(frozen=True)
class Row:
    """A recording as the worker pool needs it."""

    id: str
    state: str
    raw: dict[str, Any]
    attempts: int
    polls: int
    tm_create: float | None
    tm_end: float | None
    account: str = DEFAULT_ACCOUNT
    call: dict[str, Any] | None = None  # the sidecar's "call" block (``calls.call_block``); None: none kept


ROW_COLUMNS = "id, state, raw, attempts, polls, tm_create, tm_end, account"  # what row_from() reads


def row_from(r: Any) -> Row:
    """A ``Row`` from a result row selected with ``ROW_COLUMNS``."""
    return Row(r["id"], r["state"], json.loads(r["raw"]), r["attempts"], r["polls"], r["tm_create"], r["tm_end"],
               r["account"])


def epoch(ts: Any) -> float | None:
    return ts.timestamp() if ts is not None else None


def catalog_columns(raw: dict[str, Any]) -> tuple[float | None, str | None]:
    """What ``find`` filters a recording on, from its JSON: (``tm_start``, or ``tm_create`` for
    one that never started, as epoch; ``reference_id``, the call's id for a call's recording).
    Kept beside ``raw`` in the same statement wherever ``raw`` is written."""
    start = None
    for key in ("tm_start", "tm_create"):
        try:
            start = parse_timestamp(raw.get(key))
        except ValueError:
            start = None
        if start is not None:
            break
    ref = raw.get("reference_id")
    return epoch(start), ref if isinstance(ref, str) and 0 < len(ref) <= 64 else None


def tm_start_fills(rows: Any) -> list[tuple[float, str, str]]:
    """(``tm_start``, account, id) for each row of (account, id, raw) whose JSON has a start: the
    one-off fill of an older state's recordings when the column arrives (a migration)."""
    fills = []
    for r in rows:
        try:
            start, _ = catalog_columns(json.loads(r["raw"]))
        except (ValueError, AttributeError):
            continue
        if start is not None:
            fills.append((start, r["account"], r["id"]))
    return fills


def storage_file_rows(files: list[StorageFile], account: str, now: float) -> list[tuple[Any, ...]]:
    """The rows (``FILE_COLUMNS``) of a page of the storage listing: a recording's files only
    (a knowledge-base upload is of no recording), each listed id once."""
    rows: dict[str, tuple[Any, ...]] = {}
    for f in files:
        if f.recording_id is not None:
            rows[f.id] = (account, f.id, f.recording_id, f.filename, f.filesize, f.url, f.expires_at,
                          epoch(f.tm_create), now)
    return list(rows.values())


def call_rows(calls: list[Call], stored: dict[str, str], account: str, now: float) -> tuple[list[tuple[Any, ...]], int]:
    """The rows (``CALL_COLUMNS``) to insert or update for a page of calls, and how many of them
    are new; ``stored``: the JSON the state holds of each already known. A call stored with
    the same JSON is left alone; one listed twice in the page is written once."""
    stored = dict(stored)
    new = 0
    rows = []
    for call in calls:
        raw = json.dumps(call.raw)
        if stored.get(call.id) == raw:
            continue
        new += call.id not in stored
        stored[call.id] = raw
        rows.append((account, call.id, raw, call.direction, call.status, call.source, call.destination,
                     call.source_target, call.destination_target, call.hangup_reason, epoch(call.tm_create), now, now))
    return rows, new


@dataclass(frozen=True)
class FindQuery:
    """``find``'s and ``export``'s filters; each one set narrows the answer (all of them: AND)."""

    since: float | None = None  # tm_start >= (epoch)
    until: float | None = None  # tm_start <
    number: str = ""  # calls.address_key(): E.164 digits, or a SIP/agent target; source or destination
    call: str = ""
    recording: str = ""
    direction: str = ""
    account: str = ""
    state: str = ""
    flagged: bool = False
    limit: int = 0  # 0: every match

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause (``?`` placeholders, recordings as ``r``, calls as ``c``) and its
        parameters. A number is looked up in the calls' two address indexes first."""
        clauses: list[str] = []
        params: list[Any] = []
        for sql, value, wanted in (
            ("r.tm_start >= ?", self.since, self.since is not None),
            ("r.tm_start < ?", self.until, self.until is not None),
            ("r.id = ?", self.recording, bool(self.recording)),
            ("r.reference_type = 'call' AND r.reference_id = ?", self.call, bool(self.call)),
            ("c.direction = ?", self.direction, bool(self.direction)),
            ("r.account = ?", self.account, bool(self.account)),
            ("r.state = ?", self.state, bool(self.state)),
        ):
            if wanted:
                clauses.append(sql)
                params.append(value)
        if self.flagged:
            clauses.append("r.flag IS NOT NULL")
        if self.number:
            clauses.append("r.reference_id IN (SELECT id FROM calls WHERE source = ? UNION"
                           " SELECT id FROM calls WHERE destination = ?) AND (c.source = ? OR c.destination = ?)")
            params += [self.number] * 4
        return (" AND ".join(clauses) or "1=1"), params


FILE_COLUMNS = "account, id, recording_id, filename, filesize, url, expires_at, tm_create, listed_at"
FILE_UPDATES = ", ".join(f"{c}=excluded.{c}" for c in ("filename", "filesize", "url", "expires_at", "tm_create"))
FILE_FORGET_AFTER = 86400.0  # a listed file's row is dropped this long after its URL expired
CALL_COLUMNS = ("account, id, raw, direction, status, source, destination, source_target, destination_target,"
                " hangup_reason, tm_create, discovered_at, updated_at")  # store_calls' INSERT
CALL_UPDATES = ", ".join(f"{c}=excluded.{c}" for c in (
    "raw", "direction", "status", "source", "destination", "source_target", "destination_target", "hangup_reason",
    "updated_at"))  # what a call listed again with other content changes
FIND_FROM = "recordings r LEFT JOIN calls c ON c.account = r.account AND c.id = r.reference_id"


@dataclass(frozen=True)
class Dialect:
    """The SQL a backend writes its own way for ``find``: an epoch as an ISO 8601 UTC string, a
    JSON object of (key, expression) pairs, a boolean as JSON ``true``/``false``."""

    iso: Callable[[str], str]
    json_object: Callable[[list[tuple[str, str]]], str]
    json_bool: Callable[[str], str]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def find_columns(dialect: Dialect, key_prefix: str = "") -> list[tuple[str, str]]:
    """What ``find`` prints of each recording, as (name, SQL expression) pairs: every value made
    by the database, so a month of a million-recording archive needs no per-row work in Python."""
    no_ref = "CASE WHEN r.reference_type = '' THEN 'recording without a reference' ELSE r.reference_type END"
    return [
        ("recording_id", "r.id"), ("account", "r.account"), ("tm_start", dialect.iso("r.tm_start")),
        ("tm_end", dialect.iso("r.tm_end")), ("reference_type", "r.reference_type"),
        ("call_id", "CASE WHEN r.reference_type = 'call' THEN r.reference_id END"),
        ("call_listed", dialect.json_bool("c.id IS NOT NULL")),
        ("call_note", f"CASE WHEN r.reference_type <> 'call' THEN 'no call (a ' || {no_ref} || ')'"
                      " WHEN c.id IS NULL THEN 'call not listed (deleted on the server, or not walked yet)' END"),
        ("direction", "c.direction"), ("source", "c.source_target"), ("destination", "c.destination_target"),
        ("hangup_reason", "c.hangup_reason"), ("state", "r.state"), ("flag", "r.flag"),
        ("flag_reason", "r.flag_reason"), ("path", "r.path"),
        ("key", f"CASE WHEN r.path IS NOT NULL THEN {_literal(key_prefix)} || r.path END" if key_prefix else "NULL"),
        ("size", "r.size"), ("sha256", "r.sha256"),
        ("server_deleted", dialect.json_bool("r.server_deleted_at IS NOT NULL")),
    ]


def find_sql(query: FindQuery, dialect: Dialect, as_json: bool = False, key_prefix: str = "") -> tuple[str, list[Any]]:
    """The one SELECT of ``find`` (``?`` placeholders), oldest first: the ``find_columns``, or
    with ``as_json`` each row as one JSON object (the line ``find --json`` prints)."""
    where, params = query.where()
    columns = find_columns(dialect, key_prefix)
    select = (f"{dialect.json_object(columns)} AS line" if as_json else
              ", ".join(f"{expr} AS {name}" for name, expr in columns))
    sql = f"SELECT {select} FROM {FIND_FROM} WHERE {where} ORDER BY r.tm_start, r.account, r.id"
    if query.limit:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


def initial_state(rec: Recording) -> tuple[str, str | None]:
    if rec.deleted:
        return "skipped", "deleted (tm_delete is set)"
    return ("pending" if rec.ended else "discovered"), None


SUMMARY_META = ("last_cycle", "api_refused", "accesskey_expires")  # the meta keys ``summary`` reports


def summary_meta(rows: Any, account: str | None) -> dict[str, Any]:
    """``summary``'s part from meta (rows of account, key, value for ``SUMMARY_META``): the
    oldest last cycle; each account's refusal and key expiry, and for one account (a view, or
    a database of one) its own, as before v5, else the first refusal and the first expiry."""
    meta: dict[str, dict[str, str]] = {}
    for acct, key, value in rows:
        meta.setdefault(str(acct), {})[str(key)] = value
    cycles = [float(m["last_cycle"]) for m in meta.values() if "last_cycle" in m]
    refused = {a: json.loads(m["api_refused"]) for a, m in meta.items() if "api_refused" in m}
    expires = {a: float(m["accesskey_expires"]) for a, m in meta.items() if "accesskey_expires" in m}
    one = account or (next(iter(meta)) if len(meta) == 1 else None)
    return {
        "last_cycle": str(min(cycles)) if cycles else None,  # the account longest without one
        "api_refused": refused.get(one) if one is not None else next(iter(refused.values()), None),
        "accesskey_expires": expires.get(one) if one is not None else min(expires.values(), default=None),
        "api_refused_by_account": refused,
        "accesskey_expires_by_account": expires,
    }


def empty_summary() -> dict[str, Any]:
    """The counts part of a summary for an account with nothing in the state (yet)."""
    return {**dict.fromkeys(STATES, 0), "oldest_pending": None, "last_error": None,
            "archived_flagged": dict.fromkeys(FLAGS, 0), "accesskey_expires": None}


def assemble_summaries(
    counts: Any, oldest: Any, flags: Any, meta: Any, last_error: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``summaries()`` from rows of (account, state, n), (account, id, tm_create) of each
    account's oldest waiting recording, (account, flag, n) and meta (account, key, value)."""
    by_account: dict[str, dict[str, Any]] = {}

    def one(account: str) -> dict[str, Any]:
        return by_account.setdefault(account, empty_summary())

    for account, state, n in counts:
        one(str(account))[str(state)] = n
    for account, rec_id, tm_create in oldest:
        one(str(account))["oldest_pending"] = {"id": rec_id, "tm_create": tm_create, "account": account}
    for account, flag, n in flags:
        one(str(account))["archived_flagged"][str(flag)] = n
    meta_rows: dict[str, list[Any]] = {}
    for row in meta:
        meta_rows.setdefault(str(row[0]), []).append(tuple(row))
        one(str(row[0]))
    for account, summary in by_account.items():
        summary["total"] = sum(summary[s] for s in STATES)
        summary.update(summary_meta(meta_rows.get(account, []), account))
    waiting = [s["oldest_pending"] for s in by_account.values() if s["oldest_pending"]]
    total: dict[str, Any] = {state: sum(s[state] for s in by_account.values()) for state in STATES}
    total["total"] = sum(total[s] for s in STATES)
    total["oldest_pending"] = min(waiting, key=lambda o: o["tm_create"] or 0.0) if waiting else None
    total["last_error"] = last_error
    total["archived_flagged"] = {f: sum(s["archived_flagged"][f] for s in by_account.values()) for f in FLAGS}
    total.update(summary_meta([tuple(r) for r in meta], None))
    return total, by_account


def counts_by_account(rows: Any) -> dict[str, dict[str, int]]:
    """Counts per state for each account, from rows of (account, state, count)."""
    out: dict[str, dict[str, int]] = {}
    for account, state, n in rows:
        out.setdefault(str(account), dict.fromkeys(STATES, 0))[str(state)] = n
    return out


def unusable_message(path: Path, exc: BaseException | str) -> str:
    """What is wrong with the state database and what the operator can do about it."""
    return (
        f"state database {path} cannot be used ({exc}). Restore it from a backup, or move it aside "
        f"(mv {path} {path}.broken) and run `backfill`: the state is rebuilt from the archive's files "
        "and sidecars without downloading them again. A read-only file or filesystem: make it writable. "
        "A disk that reports I/O errors (see dmesg): fix or replace it first."
    )
