"""Moving a SQLite state into PostgreSQL (``voipbin-archiver import-state``): the step from one
daemon to several, without downloading or uploading anything again.

Everything the SQLite file holds comes along, in one PostgreSQL transaction: every recording's
row (its state, attempts, path, size, SHA-256, flags, deletion marks), the walk checkpoints, the
meta (API refusals, key expiry, the last cycle) and the deletion audit trail ``deletions.jsonl``
beside the file. A ``downloading`` row arrives ``pending`` with no lease. Before the commit the
counts per account and state, and the archived bytes, are compared with the file's; any
difference rolls the whole import back.

The SQLite file is locked for the import (a daemon still running on it is refused) and is left
as it was, apart from a schema migration an older file gets exactly as ``run`` would give it:
keep it as the backup of the moment of the move. An account that PostgreSQL already holds
anything of is refused: an import never merges two histories of one account.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ACCOUNT_NAME, DEFAULT_ACCOUNT, Config
from .errors import ConfigError, StateUnusable
from .state.base import CALL_COLUMNS as CALL_ROW
from .state.postgres import MIGRATE_LOCK, PgState, asyncpg_module
from .state.sqlite import StateDB, audit_path

# the recordings' columns both schemas have (PostgreSQL adds lease_owner and lease_until)
COLUMNS = (
    "account", "id", "state", "raw", "status", "reference_type", "tm_create", "tm_end", "discovered_at",
    "attempts", "polls", "next_attempt_at", "last_error", "path", "size", "sha256", "server_hashes", "members",
    "archived_at", "updated_at", "flag", "flag_reason", "delete_intent_at", "server_deleted_at",
    "delete_request_id", "tm_start", "reference_id", "call_noted_at", "transcript_state", "transcript_due_at",
)
_FLOATS = {"tm_create", "tm_end", "discovered_at", "next_attempt_at", "archived_at", "updated_at",
           "delete_intent_at", "server_deleted_at", "tm_start", "call_noted_at", "transcript_due_at"}
_INTS = {"attempts", "polls", "size", "members"}
CALL_COLUMNS = tuple(c.strip() for c in CALL_ROW.split(","))  # the calls' columns, alike in both schemas
_SAMPLE = 20  # archived files looked for in the directory, to catch a config that names another one
_SIZE, _PATH = COLUMNS.index("size"), COLUMNS.index("path")
BATCH = 5000  # rows read from SQLite and copied to PostgreSQL at a time


@dataclass
class ImportReport:
    """What one import moved, per account (the names as they are in PostgreSQL)."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    archived_bytes: dict[str, int] = field(default_factory=dict)
    walks: int = 0
    meta: int = 0
    audit_lines: int = 0
    warnings: list[str] = field(default_factory=list)
    sample: list[str] = field(default_factory=list)  # archived paths, for _missing_files


def parse_renames(pairs: list[str]) -> dict[str, str]:
    """``--account OLD=NEW`` arguments as a mapping; bad ones are a ``ConfigError``."""
    renames: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not ACCOUNT_NAME.fullmatch(new):
            raise ConfigError(f"--account {pair!r}: use OLD=NEW, NEW matching [a-z0-9-]{{1,32}}")
        if old in renames:
            raise ConfigError(f"--account {old}=... given twice")
        renames[old] = new
    return renames


async def import_sqlite(cfg: Config, source: Path, renames: dict[str, str]) -> ImportReport:
    """Copy the SQLite state at ``source`` into the PostgreSQL state ``cfg`` names. The rows go
    over in batches of ``BATCH`` (memory stays flat for millions), all in one transaction."""
    if not cfg.state.url:
        raise ConfigError("import-state copies into PostgreSQL: the config needs [state] url = \"postgresql://...\"")
    if not source.is_file():
        raise ConfigError(f"{source}: no such SQLite state database")
    sqlite = await StateDB.open(source)  # locks it (no daemon may be writing it) and migrates an older file
    try:
        db = sqlite.db
        walks = [tuple(r) for r in await db.execute_fetchall("SELECT account, name, token, updated_at FROM walks")]
        meta = [tuple(r) for r in await db.execute_fetchall("SELECT account, key, value FROM meta")]
        calls = [tuple(r) for r in await db.execute_fetchall(f"SELECT {', '.join(CALL_COLUMNS)} FROM calls")]
        accounts = sorted({r[0] for r in await db.execute_fetchall(
            "SELECT DISTINCT account FROM recordings INDEXED BY recordings_state")} | {w[0] for w in walks}
            | {m[0] for m in meta})
        target = _targets(cfg, source, accounts, renames)
        audit = _audit_lines(audit_path(source), target)
        report = ImportReport(walks=len(walks), meta=len(meta), audit_lines=len(audit))
        await _write(cfg, _batches(db, target, report), [(target[a], *rest) for a, *rest in walks],
                     [(target[a], *rest) for a, *rest in meta], audit, report, sorted(set(target.values())),
                     [(target.get(a, a), *rest) for a, *rest in calls])
    finally:
        await sqlite.close()
    report.warnings += _missing_files(cfg, report.sample)
    return report


def _targets(cfg: Config, source: Path, accounts: list[str], renames: dict[str, str]) -> dict[str, str]:
    """Each account of the file and its name in PostgreSQL, which the config must name."""
    unknown_renames = sorted(set(renames) - set(accounts))
    if unknown_renames:
        raise ConfigError(f"--account {unknown_renames[0]}=...: {source} holds no account of that name "
                          f"(it holds: {', '.join(accounts) or 'none'})")
    target = {a: renames.get(a, a) for a in accounts}
    configured = {a.name for a in cfg.accounts}
    for old, new in target.items():
        if new not in configured:
            hint = f"add --account {old}=NAME (one of: {', '.join(sorted(configured))})"
            raise ConfigError(f"{source} holds account {new!r}, which this config does not name: {hint}, "
                              f"or an [[accounts]] entry named {new}")
    if len(set(target.values())) != len(target):
        raise ConfigError(f"--account maps two accounts of {source} onto one: {target}")
    return target


async def _batches(db: Any, target: dict[str, str], report: ImportReport) -> AsyncIterator[list[tuple[Any, ...]]]:
    """The file's rows as PostgreSQL records, ``BATCH`` at a time in key order, counted into
    ``report`` (and a sample of archived paths kept for ``_missing_files``)."""
    last = ("", "")
    while True:
        rows = await db.execute_fetchall(
            f"SELECT {', '.join(COLUMNS)} FROM recordings WHERE (account, id) > (?, ?) ORDER BY account, id LIMIT ?",
            (*last, BATCH))
        if not rows:
            return
        last = (rows[-1]["account"], rows[-1]["id"])
        records = [_record(dict(r), target[r["account"]]) for r in rows]
        for rec in records:
            account, state = rec[0], rec[2]
            counts = report.counts.setdefault(account, {})
            counts[state] = counts.get(state, 0) + 1
            if state == "archived":
                report.archived_bytes[account] = report.archived_bytes.get(account, 0) + (rec[_SIZE] or 0)
                if len(report.sample) < _SAMPLE and rec[_PATH]:
                    report.sample.append(rec[_PATH])
        yield records


def _record(row: dict[str, Any], account: str) -> tuple[Any, ...]:
    """One row as PostgreSQL's types want it; ``downloading`` (nobody's claim now) is ``pending``."""
    values: list[Any] = []
    for column in COLUMNS:
        value = row[column]
        if column == "account":
            value = account
        elif column == "state" and value == "downloading":
            value = "pending"
        elif value is not None and column in _FLOATS:
            value = float(value)
        elif value is not None and column in _INTS:
            value = int(value)
        elif value is not None:
            value = str(value)
        values.append(value)
    return tuple(values)


def _call_record(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """One call as PostgreSQL's types want it (the three times, last, as floats; the rest text)."""
    times = len(CALL_COLUMNS) - 3
    return tuple(float(v) if v is not None and i >= times else v for i, v in enumerate(row))


def _audit_lines(path: Path, target: dict[str, str]) -> list[tuple[str, str, str]]:
    """(account in PostgreSQL, recording id, line) of each deletion in the audit file, the line
    unchanged; a line written before accounts existed is the account ``default``'s."""
    if not path.exists():
        return []
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
            rec_id = str(entry["recording_id"])
        except (ValueError, KeyError, TypeError):
            raise StateUnusable(f"{path} line {number} is not a deletion record; fix or move the file, "
                                "then import again") from None
        account = str(entry.get("account") or DEFAULT_ACCOUNT)
        lines.append((target.get(account, account), rec_id, text))  # the line itself as it was written
    return lines


async def _write(cfg: Config, batches: AsyncIterator[list[tuple[Any, ...]]], walks: list[tuple[Any, ...]],
                 meta: list[tuple[Any, ...]], audit: list[tuple[str, str, str]], report: ImportReport,
                 accounts: list[str], calls: list[tuple[Any, ...]] | None = None) -> None:
    state = await PgState.open(cfg.state)  # creates or migrates the schema
    try:
        await _copy(state, MIGRATE_LOCK, batches, walks, meta, audit, report, accounts, calls or [])
    except asyncpg_module().PostgresError as exc:  # a value PostgreSQL refuses (a NUL in a text...): all rolled back
        raise StateUnusable(f"PostgreSQL refused the import ({type(exc).__name__}: {exc}): nothing was imported") \
            from None
    finally:
        await state.close()


async def _copy(state: PgState, lock: int, batches: AsyncIterator[list[tuple[Any, ...]]], walks: list[tuple[Any, ...]],
                meta: list[tuple[Any, ...]], audit: list[tuple[str, str, str]], report: ImportReport,
                accounts: list[str], calls: list[tuple[Any, ...]] | None = None) -> None:
    """The copy and its check, in one transaction."""
    async with state.connection() as con, con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", lock)  # one import at a time
        for account in accounts:
            held = await con.fetchval(
                "SELECT (SELECT count(*) FROM recordings WHERE account=$1) + (SELECT count(*) FROM walks "
                "WHERE account=$1) + (SELECT count(*) FROM deletions WHERE account=$1)", account)
            if held:
                raise StateUnusable(
                    f"the PostgreSQL state already holds account {account!r} ({held} rows): an import never "
                    "merges into an account; import into a new database, or with --account OLD=NEW")
        async for records in batches:
            await con.copy_records_to_table("recordings", records=records, columns=list(COLUMNS))
        await con.copy_records_to_table("calls", records=[_call_record(c) for c in calls or []],
                                        columns=list(CALL_COLUMNS))
        await con.executemany("INSERT INTO walks (account, name, token, updated_at) VALUES ($1, $2, $3, $4)",
                              [(a, n, t, float(u)) for a, n, t, u in walks])
        await con.executemany("INSERT INTO meta (account, key, value) VALUES ($1, $2, $3) "
                              "ON CONFLICT (account, key) DO UPDATE SET value = EXCLUDED.value", meta)
        await con.executemany("INSERT INTO deletions (account, recording_id, line) VALUES ($1, $2, $3) "
                              "ON CONFLICT DO NOTHING", audit)
        stored = await con.fetch(
            "SELECT account, state, count(*) AS n, coalesce(sum(size) FILTER (WHERE state='archived'), 0) AS b "
            "FROM recordings WHERE account = ANY($1::text[]) GROUP BY account, state",
            list(report.counts))
        counts: dict[str, dict[str, int]] = {}
        archived: dict[str, int] = {}
        for r in stored:
            counts.setdefault(r["account"], {})[r["state"]] = r["n"]
            if r["state"] == "archived":
                archived[r["account"]] = int(r["b"])
        if counts != report.counts or archived != report.archived_bytes:
            raise StateUnusable(f"PostgreSQL holds other counts than the SQLite file after the copy "
                                f"({counts} against {report.counts}): nothing was imported")


def _missing_files(cfg: Config, sample: list[str]) -> list[str]:
    """A few archived files looked for where this config's directory says they are."""
    if cfg.archive.destination != "directory":
        return []
    missing = [p for p in sample if not (cfg.archive.directory / p).is_file()]
    if sample and len(missing) == len(sample):
        return [f"none of {len(sample)} archived files looked for is under {cfg.archive.directory} "
                f"(e.g. {missing[0]}): does [archive] directory name the archive the SQLite state describes? "
                "`verify` will tell"]
    return []
