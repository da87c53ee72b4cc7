"""Every step recorded in SQLite, so a crash, ``kill -9`` or reboot loses nothing.

One row per recording with its full JSON and our state:

``discovered``  listed but not ``ended`` yet: polled with ``GET /recordings/{id}``
``pending``     ended: its download is due at ``next_attempt_at`` (also: files not uploaded yet)
``downloading`` claimed by a worker (reset to ``pending`` at start-up after a crash)
``archived``    verified file renamed into place, sidecar written; ``flag`` ``incomplete`` (fewer
                files than expected) or ``damaged`` (broken structure, the server's only copy)
``no_audio``    settled with no audio on the server, for good: only the sidecar is kept
``failed``      given up, ``last_error`` says why
``skipped``     deleted or otherwise gone, ``last_error`` says why

Rows are keyed by (account, recording id): one database serves every configured account, and
each engine works through its account's view (``StateDB.for_account``). A database opened
without an account reports over all of them (``status``, ``verify``).

WAL mode with ``synchronous=FULL``: a committed change survives power loss.  The schema is
versioned with ``PRAGMA user_version``; ``MIGRATIONS[n]`` takes a database from version n to n+1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import aiosqlite

from ..calls import Call
from ..errors import LocalStorageError, StateLocked, StateUnusable
from ..model import Recording
from ..storagefiles import StorageFile
from ..store import fsync_path, mkdir_durable
from .base import (
    CALL_COLUMNS,
    CALL_UPDATES,
    DELETABLE_COLUMNS,
    FILE_COLUMNS,
    FILE_FORGET_AFTER,
    FILE_UPDATES,
    FLAGS,
    MANIFEST_COLUMNS,
    MANIFEST_HEAD,
    REMOVAL_COLUMNS,
    REMOVED_SQL,
    ROW_COLUMNS,
    STATES,
    STORED_SQL,
    SUMMARY_META,
    Dialect,
    FindQuery,
    ManifestDue,
    Row,
    assemble_summaries,
    call_rows,
    catalog_columns,
    counts_by_account,
    epoch,
    find_sql,
    initial_state,
    row_from,
    storage_file_rows,
    summary_meta,
    tm_start_fills,
    unusable_message,
)

MIGRATIONS: list[str] = [
    """
    CREATE TABLE recordings (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        raw TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT '',
        reference_type TEXT NOT NULL DEFAULT '',
        tm_create REAL,
        tm_end REAL,
        discovered_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        polls INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        path TEXT,
        size INTEGER,
        sha256 TEXT,
        server_hashes TEXT,
        members INTEGER,
        archived_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX recordings_due ON recordings(next_attempt_at) WHERE state IN ('discovered', 'pending');
    CREATE INDEX recordings_state ON recordings(state);
    CREATE TABLE walks (name TEXT PRIMARY KEY, token TEXT NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # v2: status, metrics and systemd STATUS= ask for the oldest waiting recording and the last
    # error every few seconds; without these, each asked SQLite to scan every waiting row.
    """
    CREATE INDEX recordings_waiting_created ON recordings(tm_create)
        WHERE state IN ('discovered', 'pending', 'downloading');
    CREATE INDEX recordings_errors ON recordings(updated_at) WHERE last_error IS NOT NULL;
    """,
    # v3: what a settled recording lacks (flag, flag_reason), for status and for deletion from
    # the server (only what is archived complete is ever deleted); the state ``no_audio``.
    """
    ALTER TABLE recordings ADD COLUMN flag TEXT;
    ALTER TABLE recordings ADD COLUMN flag_reason TEXT;
    CREATE INDEX recordings_flagged ON recordings(flag) WHERE flag IS NOT NULL;
    """,
    # v4: deleting the server's copy once the archive copy is safe (retention.py): the intent,
    # recorded before the DELETE, and the deletion with the server's request id.
    """
    ALTER TABLE recordings ADD COLUMN delete_intent_at REAL;
    ALTER TABLE recordings ADD COLUMN server_deleted_at REAL;
    ALTER TABLE recordings ADD COLUMN delete_request_id TEXT;
    CREATE INDEX recordings_deletable ON recordings(archived_at)
        WHERE state = 'archived' AND server_deleted_at IS NULL;
    CREATE INDEX recordings_delete_intents ON recordings(delete_intent_at)
        WHERE delete_intent_at IS NOT NULL AND server_deleted_at IS NULL;
    CREATE INDEX recordings_server_deleted ON recordings(server_deleted_at) WHERE server_deleted_at IS NOT NULL;
    """,
    # v5: several accounts in one database: rows, walk checkpoints and meta are keyed by account;
    # what an older database holds is the one account "default" (its paths unchanged).
    """
    CREATE TABLE recordings_v5 (
        account TEXT NOT NULL,
        id TEXT NOT NULL,
        state TEXT NOT NULL,
        raw TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT '',
        reference_type TEXT NOT NULL DEFAULT '',
        tm_create REAL,
        tm_end REAL,
        discovered_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        polls INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        path TEXT,
        size INTEGER,
        sha256 TEXT,
        server_hashes TEXT,
        members INTEGER,
        archived_at REAL,
        updated_at REAL NOT NULL,
        flag TEXT,
        flag_reason TEXT,
        delete_intent_at REAL,
        server_deleted_at REAL,
        delete_request_id TEXT,
        PRIMARY KEY (account, id)
    );
    INSERT INTO recordings_v5 SELECT 'default', id, state, raw, status, reference_type, tm_create, tm_end,
        discovered_at, attempts, polls, next_attempt_at, last_error, path, size, sha256, server_hashes, members,
        archived_at, updated_at, flag, flag_reason, delete_intent_at, server_deleted_at, delete_request_id
        FROM recordings;
    DROP TABLE recordings;
    ALTER TABLE recordings_v5 RENAME TO recordings;
    CREATE INDEX recordings_due ON recordings(account, next_attempt_at) WHERE state IN ('discovered', 'pending');
    CREATE INDEX recordings_state ON recordings(account, state);
    CREATE INDEX recordings_waiting_created ON recordings(tm_create)
        WHERE state IN ('discovered', 'pending', 'downloading');
    CREATE INDEX recordings_errors ON recordings(updated_at) WHERE last_error IS NOT NULL;
    CREATE INDEX recordings_flagged ON recordings(flag) WHERE flag IS NOT NULL;
    CREATE INDEX recordings_deletable ON recordings(archived_at)
        WHERE state = 'archived' AND server_deleted_at IS NULL;
    CREATE INDEX recordings_delete_intents ON recordings(delete_intent_at)
        WHERE delete_intent_at IS NOT NULL AND server_deleted_at IS NULL;
    CREATE INDEX recordings_server_deleted ON recordings(server_deleted_at) WHERE server_deleted_at IS NOT NULL;
    CREATE TABLE walks_v5 (account TEXT NOT NULL, name TEXT NOT NULL, token TEXT NOT NULL,
        updated_at REAL NOT NULL, PRIMARY KEY (account, name));
    INSERT INTO walks_v5 SELECT 'default', name, token, updated_at FROM walks;
    DROP TABLE walks;
    ALTER TABLE walks_v5 RENAME TO walks;
    CREATE TABLE meta_v5 (account TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (account, key));
    INSERT INTO meta_v5 SELECT 'default', key, value FROM meta;
    DROP TABLE meta;
    ALTER TABLE meta_v5 RENAME TO meta;
    """,
    # v6: an archive that answers (``find``, ``export``): each recording's start and call id beside
    # its JSON (tm_start is filled in from raw after this script: SQL cannot parse both its
    # styles), and the calls of ``GET /calls``, their addresses as ``find --number`` compares them.
    """
    ALTER TABLE recordings ADD COLUMN tm_start REAL;
    ALTER TABLE recordings ADD COLUMN reference_id TEXT;
    ALTER TABLE recordings ADD COLUMN call_noted_at REAL;
    ALTER TABLE recordings ADD COLUMN transcript_state TEXT;
    ALTER TABLE recordings ADD COLUMN transcript_due_at REAL;
    UPDATE recordings SET reference_id = json_extract(raw, '$.reference_id')
        WHERE json_valid(raw) AND json_type(raw, '$.reference_id') = 'text';
    CREATE INDEX recordings_start ON recordings(tm_start);
    CREATE INDEX recordings_reference ON recordings(reference_id) WHERE reference_id IS NOT NULL;
    CREATE INDEX recordings_transcripts_due ON recordings(account, transcript_due_at)
        WHERE transcript_state IS NULL AND state IN ('archived', 'no_audio');
    CREATE TABLE calls (
        account TEXT NOT NULL,
        id TEXT NOT NULL,
        raw TEXT NOT NULL,
        direction TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        destination TEXT NOT NULL DEFAULT '',
        source_target TEXT,
        destination_target TEXT,
        hangup_reason TEXT,
        tm_create REAL,
        discovered_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (account, id)
    );
    CREATE INDEX calls_source ON calls(source);
    CREATE INDEX calls_destination ON calls(destination);
    """,
    # v7: the storage listing as a download path: each recording's listed channel files with
    # their signed URLs (a cache of GET /storage_files, dropped a day after the URLs expire)
    """
    CREATE TABLE storage_files (
        account TEXT NOT NULL,
        id TEXT NOT NULL,
        recording_id TEXT NOT NULL,
        filename TEXT NOT NULL,
        filesize INTEGER,
        url TEXT NOT NULL,
        expires_at REAL,
        tm_create REAL,
        listed_at REAL NOT NULL,
        stranger_noted_at REAL,
        PRIMARY KEY (account, id)
    );
    CREATE INDEX storage_files_recording ON storage_files(account, recording_id);
    CREATE INDEX storage_files_expiry ON storage_files(expires_at);
    """,
    # v8: the signed manifest (manifestwriter.py): the segment that lists each recording's
    # archive copy, and the one that lists the deletion of its server copy (NULL: not yet)
    """
    ALTER TABLE recordings ADD COLUMN manifest_seq INTEGER;
    ALTER TABLE recordings ADD COLUMN manifest_deleted_seq INTEGER;
    CREATE INDEX recordings_manifest_due ON recordings(account, archived_at)
        WHERE manifest_seq IS NULL AND state IN ('archived', 'no_audio');
    CREATE INDEX recordings_manifest_deleted_due ON recordings(account)
        WHERE manifest_deleted_seq IS NULL AND server_deleted_at IS NOT NULL;
    ALTER TABLE recordings ADD COLUMN plain_sha256 TEXT;
    ALTER TABLE recordings ADD COLUMN remove_intent TEXT;
    ALTER TABLE recordings ADD COLUMN removed_at REAL;
    ALTER TABLE recordings ADD COLUMN removed_reason TEXT;
    CREATE INDEX recordings_manifest_removed_due ON recordings(account)
        WHERE manifest_seq IS NULL AND state IN ('expired', 'erased');
    CREATE INDEX recordings_removing ON recordings(account) WHERE remove_intent IS NOT NULL;
    CREATE TABLE holds (
        account TEXT NOT NULL,
        recording_id TEXT NOT NULL,
        reason TEXT NOT NULL,
        held_at REAL NOT NULL,
        PRIMARY KEY (account, recording_id)
    );
    CREATE TABLE hold_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        account TEXT NOT NULL,
        recording_id TEXT NOT NULL,
        action TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        manifest_seq INTEGER
    );
    CREATE INDEX hold_events_due ON hold_events(account) WHERE manifest_seq IS NULL;
    """,
]
CATALOG_FILLED_AT = 6  # the version after which recordings' tm_start is filled in from raw


SQLITE_FIND = Dialect(
    iso=lambda col: f"strftime('%Y-%m-%dT%H:%M:%fZ', {col}, 'unixepoch')",
    json_object=lambda pairs: "json_object(" + ", ".join(f"'{k}', {v}" for k, v in pairs) + ")",
    json_bool=lambda expr: f"json(CASE WHEN {expr} THEN 'true' ELSE 'false' END)",
)
P = ParamSpec("P")
T = TypeVar("T")


def _writes(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A write that SQLite could not make (a full disk, an I/O error: ``OperationalError``) is
    rolled back and raised as ``LocalStorageError``, the class the engine pauses on, like a full
    archive: the state is where it was, and the write is made again once there is room. A
    database SQLite finds damaged mid-run raises ``StateUnusable``: the engine stops (exit 2)."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        state = args[0]
        assert isinstance(state, StateDB)
        try:
            return await method(*args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise await state._storage_error(exc) from None
        except (LocalStorageError, StateUnusable):  # a read of this write failed (``_fetchall``)
            await state._rollback()
            raise

    return wrapper


class StateDB:
    """The archiver's SQLite state. Use ``await StateDB.open(path)``; one writer per file.

    What one account's engine reads and writes goes through ``for_account(name)``, a view on the
    same connection; the database as opened reports over every account.

    Every read is one ``execute_fetchall`` (a single step in aiosqlite's thread): a cursor left
    open across an await would see rows that another task updates meanwhile on the same
    connection, and SQLite's answer is then undefined (a GROUP BY once returned a NULL state)."""

    lease = 0.0  # no leases to renew: one daemon per file

    def __init__(self, db: aiosqlite.Connection, lock_fd: int | None, path: Path, account: str | None = None,
                 owner: StateDB | None = None) -> None:
        self.db = db
        self.path = path
        self.account = account
        self._owner = owner  # a view's database, which holds the lock and the connection
        self._lock_fd = lock_fd
        self._archived_batch: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def for_account(self, account: str) -> StateDB:
        """The view one account's engine works through: every row it reads or writes is that account's."""
        return StateDB(self.db, None, self.path, account, self._owner or self)

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        """One read in one step of aiosqlite's thread (see the class doc); a list at run time.
        A file SQLite finds damaged is ``StateUnusable`` whichever query meets it first, a read
        as well as a write (a worker's read once logged it as an unexpected error and retried)."""
        try:
            return cast(list[aiosqlite.Row], await self.db.execute_fetchall(sql, params))
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:
                raise  # an I/O error or a bug: as before, the caller's (and the CLI's) to say
            raise self._failure(exc, "read") from None

    @property
    def writer_tag(self) -> str:
        return ""  # the only writer (the lock says so): temporary names need no mark

    def pace(self, rate: float, burst: int) -> None:
        return None  # this process's own token bucket is the account's pace

    @property
    def _acct(self) -> str:
        if self.account is None:
            raise RuntimeError("this needs one account's view: state.for_account(name)")
        return self.account

    def _scope(self) -> tuple[str, tuple[str, ...]]:
        """(``account=? AND `` and its parameter) for a view, nothing for the whole database."""
        return ("", ()) if self.account is None else ("account=? AND ", (self.account,))

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> StateDB:
        """Open (and for a writer: lock, create, migrate and check) the database at ``path``.
        Anything SQLite refuses becomes ``StateUnusable`` with what to do, the lock released."""
        lock_fd = None
        db = None
        try:
            if readonly:
                if not path.exists():
                    raise FileNotFoundError(f"state database {path} does not exist yet")
                db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
            else:
                mkdir_durable(path.parent)
                lock_fd = _lock(path)
                if not path.exists():  # its name made durable before anything is committed in it
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
                    fsync_path(path.parent)
                db = await aiosqlite.connect(path)
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA busy_timeout=10000")
            db.row_factory = aiosqlite.Row
            state = cls(db, lock_fd, path)
            if readonly:
                await state._check_readable()
            else:
                await state._migrate()
                # a writer reads every page once: a truncated or damaged file is found now, not mid-run
                check = next(iter(await db.execute_fetchall("PRAGMA quick_check")))[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {check}")
                await db.execute("BEGIN IMMEDIATE")  # a read-only file or filesystem is found now too
                await db.execute("ROLLBACK")
            return state
        except BaseException as exc:
            if db is not None:
                await db.close()
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise StateUnusable(unusable_message(path, exc)) from None
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise StateUnusable(unusable_message(path, f"{exc.strerror}: {exc.filename}")) from None
            raise

    async def _check_readable(self) -> None:
        """A reader (``status``, ``verify``) cannot migrate: an older schema says what to do."""
        version = (await self._fetchall("PRAGMA user_version"))[0][0]
        if version != len(MIGRATIONS):
            raise StateUnusable(
                f"state database {self.path} is schema v{version}, this archiver reads v{len(MIGRATIONS)}: "
                + ("run `backfill` or `run` once to migrate it" if version < len(MIGRATIONS)
                   else "upgrade voipbin-archiver")
            )

    async def _storage_error(self, exc: sqlite3.DatabaseError) -> Exception:
        """What a failed write means, after a rollback (``_failure``)."""
        await self._rollback()
        return self._failure(exc, "write")

    async def _rollback(self) -> None:
        try:
            await self.db.rollback()
        except sqlite3.Error:
            pass

    def _failure(self, exc: sqlite3.DatabaseError, doing: str) -> Exception:
        """A full disk or an I/O error (``OperationalError``) is ``LocalStorageError``, which the
        engine pauses on; a damaged file ("malformed", "not a database") is ``StateUnusable``,
        which stops it; any other (``IntegrityError``...) is a bug and stays what it is."""
        if isinstance(exc, sqlite3.OperationalError):
            return LocalStorageError(f"cannot {doing} the state database {self.path}: {exc}")
        if type(exc) is sqlite3.DatabaseError:
            return StateUnusable(unusable_message(self.path, exc))
        return exc

    def lock_fds(self) -> tuple[int, ...]:
        """The lock's descriptor, for helper processes to hold (see ``storeproc``)."""
        if self._owner is not None:
            return self._owner.lock_fds()
        return () if self._lock_fd is None else (self._lock_fd,)

    async def close(self) -> None:
        if self._owner is not None:
            return  # a view: the database it belongs to closes the connection
        await self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _migrate(self) -> None:
        version = (await self._fetchall("PRAGMA user_version"))[0][0]
        if version > len(MIGRATIONS):
            raise StateUnusable(
                f"state database schema v{version} is newer than this archiver knows (v{len(MIGRATIONS)}): "
                "upgrade voipbin-archiver"
            )
        for number in range(version, len(MIGRATIONS)):
            await self.db.executescript(
                f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;"
            )
            if number + 1 == CATALOG_FILLED_AT:
                await self._fill_tm_start()

    async def _fill_tm_start(self) -> None:
        """Each known recording's ``tm_start`` from its JSON, once, after migration v6."""
        rows = await self._fetchall("SELECT account, id, raw FROM recordings WHERE tm_start IS NULL")
        await self.db.executemany("UPDATE recordings SET tm_start=? WHERE account=? AND id=?", tm_start_fills(rows))
        await self.db.commit()

    # ---- the walk ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def walk_lock(self, listing: str = "recordings") -> AsyncIterator[bool]:
        """Whether this process walks the account now: always (one process per database)."""
        yield True

    @contextlib.asynccontextmanager
    async def prune_lock(self) -> AsyncIterator[bool]:
        """Whether this process deletes the account's server copies now: always (one process)."""
        yield True

    async def renew(self, ids: set[str]) -> None:
        """Nothing to renew: no other process can take our rows."""

    @_writes
    async def store_page(self, recordings: list[Recording], walk: str | None, next_token: str) -> tuple[int, int]:
        """Insert unknown recordings and checkpoint the walk, in one transaction. Returns (new,
        known). A known ``discovered`` row that the listing now shows ended or deleted moves on
        (no detail request needed). A few statements per page, not one per recording."""
        account = self._acct
        now = time.time()
        marks = ",".join("?" * len(recordings))
        known: dict[str, str] = {r[0]: r[1] for r in await self._fetchall(
            f"SELECT id, state FROM recordings WHERE account=? AND id IN ({marks})",
            (account, *(r.id for r in recordings)))} if recordings else {}
        inserts = []
        moves = []
        for rec in recordings:
            state, reason = initial_state(rec)
            if rec.id not in known:
                known[rec.id] = state  # a page may (in theory) list an id twice
                inserts.append((account, rec.id, state, json.dumps(rec.raw), rec.status, rec.reference_type,
                                epoch(rec.tm_create), epoch(rec.tm_end), now, now, reason, now,
                                *catalog_columns(rec.raw)))
            elif (rec.ended or rec.deleted) and known[rec.id] == "discovered":  # (no statement for the rest)
                moves.append((state, json.dumps(rec.raw), rec.status, epoch(rec.tm_end), reason, now, now,
                              *catalog_columns(rec.raw), account, rec.id))
        if inserts:
            await self.db.executemany(
                "INSERT OR IGNORE INTO recordings (account, id, state, raw, status, reference_type, tm_create,"
                " tm_end, discovered_at, next_attempt_at, last_error, updated_at, tm_start, reference_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                inserts,
            )
        if moves:
            await self.db.executemany(
                "UPDATE recordings SET state=?, raw=?, status=?, tm_end=?, last_error=?,"
                " next_attempt_at=?, updated_at=?, tm_start=?, reference_id=? WHERE account=? AND id=?"
                " AND state='discovered'",
                moves,
            )
        await self._checkpoint(walk, next_token, now)
        await self.db.commit()
        return len(inserts), len(recordings) - len(inserts)

    async def _checkpoint(self, walk: str | None, next_token: str, now: float) -> None:
        """A walk's checkpoint, in the transaction that stored its page (committed by the
        caller): the next page's token, or none once the walk is over (``walk`` None: an
        incremental walk keeps none)."""
        if walk is None:
            return
        if next_token:
            await self.db.execute("INSERT OR REPLACE INTO walks (account, name, token, updated_at) VALUES (?,?,?,?)",
                                  (self._acct, walk, next_token, now))
        else:
            await self.db.execute("DELETE FROM walks WHERE account=? AND name=?", (self._acct, walk))

    async def walk_checkpoint(self, walk: str) -> str | None:
        rows = await self._fetchall(
            "SELECT token FROM walks WHERE account=? AND name=?", (self._acct, walk)
        )
        return rows[0][0] if rows else None

    @_writes
    async def end_walk(self, walk: str) -> None:
        await self.db.execute("DELETE FROM walks WHERE account=? AND name=?", (self._acct, walk))
        await self.set_meta(f"walk_done:{walk}", str(time.time()))

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetchall(
            "SELECT value FROM meta WHERE account=? AND key=?", (self._acct, key)
        )
        return rows[0][0] if rows else None

    @_writes
    async def set_meta(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO meta (account, key, value) VALUES (?,?,?)", (self._acct, key, value)
        )
        await self.db.commit()

    @_writes
    async def delete_meta(self, key: str) -> None:
        await self.db.execute("DELETE FROM meta WHERE account=? AND key=?", (self._acct, key))
        await self.db.commit()

    # ---- calls (``find``'s metadata) -----------------------------------------------------------

    @_writes
    async def store_calls(self, calls: list[Call], walk: str | None, next_token: str) -> tuple[int, int]:
        """Insert unknown calls, update changed ones and checkpoint the walk, in one
        transaction. Returns (new, unchanged)."""
        account = self._acct
        now = time.time()
        ids = list(dict.fromkeys(c.id for c in calls))
        known: dict[str, str] = {r[0]: r[1] for r in await self._fetchall(
            f"SELECT id, raw FROM calls WHERE account=? AND id IN ({','.join('?' * len(ids))})",
            (account, *ids))} if ids else {}
        upserts, new = call_rows(calls, known, account, now)
        if upserts:
            await self.db.executemany(
                f"INSERT INTO calls ({CALL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (account, id)"
                f" DO UPDATE SET {CALL_UPDATES}", upserts)
        await self._checkpoint(walk, next_token, now)
        await self.db.commit()
        return new, len(calls) - len(upserts)

    async def call_of(self, call_id: str) -> dict[str, Any] | None:
        """The JSON of one of this account's calls, None when it is not (or not yet) listed."""
        rows = await self._fetchall("SELECT raw FROM calls WHERE account=? AND id=?", (self._acct, call_id))
        return json.loads(rows[0][0]) if rows else None

    async def calls_to_note(self, limit: int) -> list[dict[str, Any]]:
        """Stored recordings whose call was listed after their sidecar was written, with it."""
        rows = await self._fetchall(
            "SELECT r.id, r.state, r.path, r.sha256, r.reference_type, c.raw AS call_raw FROM recordings r"
            " JOIN calls c ON c.account = r.account AND c.id = r.reference_id"
            f" WHERE r.account=? AND r.reference_type='call' AND r.state IN ({STORED_SQL})"
            " AND r.call_noted_at IS NULL LIMIT ?", (self._acct, limit))
        return [{**dict(r), "call": json.loads(r["call_raw"])} for r in rows]

    @_writes
    async def mark_call_noted(self, ids: list[str]) -> None:
        now = time.time()
        await self.db.executemany("UPDATE recordings SET call_noted_at=? WHERE account=? AND id=?",
                                  [(now, self._acct, rec_id) for rec_id in ids])
        await self.db.commit()

    # ---- the storage listing (a download path) ---------------------------------------------------

    @_writes
    async def store_storage_files(self, files: list[StorageFile], walk: str | None,
                                  next_token: str) -> tuple[int, int]:
        """Insert or refresh a page of listed files and checkpoint the walk, in one
        transaction; rows whose URLs expired a day ago go. Returns (new, already known)."""
        account = self._acct
        now = time.time()
        rows = storage_file_rows(files, account, now)
        ids = [r[1] for r in rows]
        known = {r[0] for r in await self._fetchall(
            f"SELECT id FROM storage_files WHERE account=? AND id IN ({','.join('?' * len(ids))})",
            (account, *ids))} if ids else set()
        if rows:
            await self.db.executemany(
                f"INSERT INTO storage_files ({FILE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"
                f" ON CONFLICT (account, id) DO UPDATE SET {FILE_UPDATES}", rows)
        await self.db.execute("DELETE FROM storage_files WHERE account=? AND expires_at < ?",
                              (account, now - FILE_FORGET_AFTER))
        await self._checkpoint(walk, next_token, now)
        await self.db.commit()
        return len(rows) - len(known), len(known)

    async def storage_files_of(self, rec_id: str) -> list[dict[str, Any]]:
        """The listed files whose ``reference_id`` is ``rec_id`` (never another's)."""
        rows = await self._fetchall(
            "SELECT id, filename, filesize, url, expires_at FROM storage_files WHERE account=? AND recording_id=?"
            " ORDER BY filename, id", (self._acct, rec_id))
        return [dict(r) for r in rows]

    @_writes
    async def storage_strangers(self, limit: int, listed_before: float) -> list[dict[str, Any]]:
        """Listed files of a recording the state does not know, each returned once (to be logged)."""
        rows = [dict(r) for r in await self._fetchall(
            "SELECT f.id, f.recording_id, f.filename FROM storage_files f WHERE f.account=?"
            " AND f.stranger_noted_at IS NULL AND f.tm_create < ? AND NOT EXISTS (SELECT 1 FROM recordings r"
            " WHERE r.account = f.account AND r.id = f.recording_id) LIMIT ?", (self._acct, listed_before, limit))]
        if rows:
            await self.db.executemany("UPDATE storage_files SET stranger_noted_at=? WHERE account=? AND id=?",
                                      [(time.time(), self._acct, r["id"]) for r in rows])
            await self.db.commit()
        return rows

    async def transcripts_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Stored recordings whose transcripts are not fetched yet (or due again: progressing)."""
        rows = await self._fetchall(
            "SELECT id, state, path, sha256 FROM recordings INDEXED BY recordings_transcripts_due WHERE account=?"
            f" AND transcript_state IS NULL AND state IN ({STORED_SQL}) AND (transcript_due_at IS NULL"
            " OR transcript_due_at <= ?) LIMIT ?", (self._acct, now, limit))
        return [dict(r) for r in rows]

    @_writes
    async def mark_transcript(self, rec_id: str, state: str | None, due_at: float | None = None) -> None:
        await self.db.execute("UPDATE recordings SET transcript_state=?, transcript_due_at=? WHERE account=? AND id=?",
                              (state, due_at, self._acct, rec_id))
        await self.db.commit()

    async def find(self, query: FindQuery) -> list[dict[str, Any]]:
        """What ``find`` and ``export`` list: recordings and their calls, oldest first."""
        sql, params = find_sql(query, SQLITE_FIND)
        return [{**r, "call_listed": bool(r["call_listed"]), "server_deleted": bool(r["server_deleted"])}
                for r in map(dict, await self._fetchall(sql, params))]

    async def find_json(self, query: FindQuery, key_prefix: str = "") -> list[str]:
        sql, params = find_sql(query, SQLITE_FIND, as_json=True, key_prefix=key_prefix)
        return [r[0] for r in await self._fetchall(sql, params)]

    # ---- the worker pool ---------------------------------------------------------------------

    async def due(self, now: float, limit: int, exclude: set[str]) -> list[Row]:
        """Rows whose next attempt is due, oldest first, skipping those already in flight (in
        SQL: fetching ``limit + len(exclude)`` rows to drop most of them in Python cost about
        40 µs of CPU per row returned, measured)."""
        skip = f" AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        rows = await self._fetchall(
            f"SELECT {ROW_COLUMNS} FROM recordings INDEXED BY recordings_due"
            f" WHERE account=? AND state IN ('discovered', 'pending') AND next_attempt_at <= ?{skip}"
            " ORDER BY next_attempt_at LIMIT ?",
            (self._acct, now, *exclude, limit),
        )
        return [row_from(r) for r in rows]

    async def next_due_time(self) -> float | None:
        rows = await self._fetchall(
            "SELECT min(next_attempt_at) FROM recordings INDEXED BY recordings_due"
            " WHERE account=? AND state IN ('discovered', 'pending')",
            (self._acct,),
        )
        return cast(float | None, rows[0][0])

    @_writes
    async def claim(self, ids: list[str]) -> None:
        """Mark ended recordings as being downloaded (one commit for the batch)."""
        if ids:
            marks = ",".join("?" * len(ids))
            await self.db.execute(
                f"UPDATE recordings SET state='downloading', updated_at=? WHERE account=? AND id IN ({marks})"
                " AND state='pending'",
                (time.time(), self._acct, *ids),
            )
            await self.db.commit()

    @_writes
    async def update(self, rec_id: str, **fields: Any) -> None:
        """Set columns of one row and commit; ``raw`` may be a dict (``find``'s columns follow it)."""
        if "raw" in fields and not isinstance(fields["raw"], str):
            fields["tm_start"], fields["reference_id"] = catalog_columns(fields["raw"])
            fields["raw"] = json.dumps(fields["raw"])
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        await self.db.execute(
            f"UPDATE recordings SET {sets} WHERE account=? AND id=?", (*fields.values(), self._acct, rec_id)
        )
        await self.db.commit()

    async def mark_archived(
        self, rec_id: str, path: str, size: int, sha256: str, server_hashes: str, members: int,
        state: str = "archived", flag: str = "", flag_reason: str = "", call_noted: bool = False,
        plain_sha256: str = "",
    ) -> None:
        """Record a stored recording (``archived`` or ``no_audio``). Concurrent calls share one
        transaction (group commit); each returns only once its own row is committed.
        ``call_noted``: its sidecar holds its call already; ``plain_sha256``: an encrypted body's plaintext's."""
        now = time.time()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        values = (state, path, size, sha256, server_hashes, members, flag or None, flag_reason or None,
                  now if call_noted else None, plain_sha256 or None)
        self._archived_batch.append(((*values, now, now, self._acct, rec_id), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_archived())
        await asyncio.shield(future)

    async def _flush_archived(self) -> None:
        await asyncio.sleep(0)  # let the other workers finishing now join this batch
        while self._archived_batch:
            batch, self._archived_batch = self._archived_batch, []
            try:
                await self.db.executemany(
                    "UPDATE recordings SET state=?, path=?, size=?, sha256=?, server_hashes=?, members=?,"
                    " flag=?, flag_reason=?, call_noted_at=?, plain_sha256=?, archived_at=?, last_error=NULL,"
                    " updated_at=?, manifest_seq=NULL WHERE account=? AND id=?",
                    [values for values, _ in batch],
                )
                await self.db.commit()
            except Exception as exc:  # noqa: BLE001 - handed to every waiter, who handles it
                if isinstance(exc, sqlite3.DatabaseError):
                    exc = await self._storage_error(exc)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    # ---- the signed manifest (manifestwriter.py) ----------------------------------------------

    @contextlib.asynccontextmanager
    async def manifest_lock(self) -> AsyncIterator[bool]:
        """Whether this process writes the account's manifest now: always (one process)."""
        yield True

    async def manifest_due(self, limit: int) -> ManifestDue:
        rows = await self._fetchall(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=? AND manifest_seq IS NULL"
            f" AND state IN ({STORED_SQL}) ORDER BY archived_at, id LIMIT ?", (self._acct, limit))
        deleted = await self._fetchall(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=? AND manifest_deleted_seq IS NULL"
            " AND server_deleted_at IS NOT NULL ORDER BY server_deleted_at, id LIMIT ?", (self._acct, limit))
        removed = await self._fetchall(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=? AND manifest_seq IS NULL"
            f" AND state IN ({REMOVED_SQL}) ORDER BY removed_at, id LIMIT ?", (self._acct, limit))
        holds = await self._fetchall(
            "SELECT seq, recording_id, action, reason, at FROM hold_events WHERE account=? AND manifest_seq IS NULL"
            " ORDER BY seq LIMIT ?", (self._acct, limit))
        return ManifestDue([dict(r) for r in rows], [dict(r) for r in deleted], [dict(r) for r in removed],
                           [dict(r) for r in holds])

    @_writes
    async def mark_manifested(self, seq: int, head: str, archived: list[tuple[str, str | None]],
                              deleted: list[str], hold_events: list[int] | None = None) -> None:
        account = self._acct
        await self.db.executemany("UPDATE hold_events SET manifest_seq=? WHERE seq=?",
                                  [(seq, n) for n in hold_events or []])
        await self.db.executemany(
            "UPDATE recordings SET manifest_seq=? WHERE account=? AND id=? AND sha256 IS ?",
            [(seq, account, rec_id, sha) for rec_id, sha in archived])
        await self.db.executemany(
            "UPDATE recordings SET manifest_deleted_seq=? WHERE account=? AND id=?",
            [(seq, account, rec_id) for rec_id in deleted])
        await self.db.execute("INSERT OR REPLACE INTO meta (account, key, value) VALUES (?,?,?)",
                              (account, MANIFEST_HEAD, head))
        await self.db.commit()

    # ---- keeping and letting go (policy.py): holds, expiry, erasure ----------------------------

    @contextlib.asynccontextmanager
    async def policy_lock(self) -> AsyncIterator[bool]:
        yield True  # one process per database

    @_writes
    async def change_holds(self, ids: list[str], hold: bool, reason: str, audit: dict[str, str]) -> list[str]:
        account = self._acct
        now = time.time()
        marks = ",".join("?" * len(ids))
        known = {r[0] for r in await self._fetchall(
            f"SELECT id FROM recordings WHERE account=? AND id IN ({marks})", (account, *ids))} if ids else set()
        held = {r[0] for r in await self._fetchall(
            f"SELECT recording_id FROM holds WHERE account=? AND recording_id IN ({marks})", (account, *ids))
        } if ids else set()
        changed = [i for i in dict.fromkeys(ids) if i in known and ((i in held) != hold)]
        if not changed:
            return []
        await asyncio.to_thread(_append_lines, policy_audit_path(self.path), [audit[i] for i in changed])
        if hold:
            await self.db.executemany("INSERT INTO holds (account, recording_id, reason, held_at) VALUES (?,?,?,?)",
                                      [(account, i, reason, now) for i in changed])
        else:
            await self.db.executemany("DELETE FROM holds WHERE account=? AND recording_id=?",
                                      [(account, i) for i in changed])
        await self.db.executemany(
            "INSERT INTO hold_events (account, recording_id, action, reason, at) VALUES (?,?,?,?,?)",
            [(account, i, "held" if hold else "released", reason, now) for i in changed])
        await self.db.commit()
        return changed

    async def holds(self) -> list[dict[str, Any]]:
        scope, params = self._scope()
        rows = await self._fetchall(
            f"SELECT account, recording_id, reason, held_at FROM holds WHERE {scope}1=1 ORDER BY held_at, recording_id",
            params)
        return [dict(r) for r in rows]

    async def removal_rows(self, ids: list[str]) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(ids))
        rows = await self._fetchall(
            f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=? AND id IN ({marks})",
            (self._acct, *ids)) if ids else []
        return [dict(r) for r in rows]

    async def expirable(self, before: float, limit: int, after: str = "") -> list[dict[str, Any]]:
        rows = await self._fetchall(
            f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=? AND state IN ({STORED_SQL})"
            " AND coalesce(tm_start, tm_create) < ? AND remove_intent IS NULL AND id > ? ORDER BY id LIMIT ?",
            (self._acct, before, after, limit))
        return [dict(r) for r in rows]

    async def removal_intents(self) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=? AND remove_intent IS NOT NULL",
            (self._acct,))
        return [dict(r) for r in rows]

    @_writes
    async def mark_removal_intent(self, ids: list[str], why: str, reason: str) -> None:
        await self.db.executemany("UPDATE recordings SET remove_intent=?, removed_reason=? WHERE account=? AND id=?",
                                  [(why, reason, self._acct, i) for i in ids])
        await self.db.commit()

    @_writes
    async def mark_removed(self, rows: list[tuple[str, str, str]], audit: list[str]) -> None:
        if audit:
            await asyncio.to_thread(_append_lines, policy_audit_path(self.path), audit)
        now = time.time()
        await self.db.executemany(
            "UPDATE recordings SET state=?, removed_reason=?, removed_at=?, remove_intent=NULL, manifest_seq=NULL,"
            " updated_at=? WHERE account=? AND id=?",
            [(state, reason, now, now, self._acct, rec_id) for rec_id, state, reason in rows])
        await self.db.commit()

    # ---- deleting the server's copy (retention.py) --------------------------------------------

    def _deletable_where(self, include_flagged: bool) -> str:
        flags = "" if include_flagged else " AND flag IS NULL"
        return f"state = 'archived' AND server_deleted_at IS NULL AND archived_at <= ?{flags}"

    async def deletable(self, before: float, include_flagged: bool, limit: int) -> list[dict[str, Any]]:
        """Recordings whose server copy may go: an interrupted deletion first, then those
        archived (complete, unless ``include_flagged``) before ``before``, oldest first."""
        account = self._acct
        rows = await self._fetchall(
            f"SELECT {DELETABLE_COLUMNS} FROM recordings INDEXED BY recordings_delete_intents"
            " WHERE account=? AND delete_intent_at IS NOT NULL AND server_deleted_at IS NULL"
            " AND state = 'archived' LIMIT ?",
            (account, limit),
        )
        if len(rows) < limit:
            rows += await self._fetchall(
                f"SELECT {DELETABLE_COLUMNS} FROM recordings INDEXED BY recordings_deletable"
                f" WHERE account=? AND {self._deletable_where(include_flagged)} AND delete_intent_at IS NULL"
                " ORDER BY archived_at LIMIT ?",
                (account, before, limit - len(rows)),
            )
        return [dict(r) for r in rows]

    async def deletable_totals(self, before: float, include_flagged: bool) -> tuple[int, int]:
        """(count, bytes) of what ``deletable`` would hand out now."""
        scope, params = self._scope()
        rows = await self._fetchall(
            f"SELECT count(*), coalesce(sum(size), 0) FROM recordings INDEXED BY recordings_deletable"
            f" WHERE {scope}{self._deletable_where(include_flagged)}",
            (*params, before),
        )
        return rows[0][0], rows[0][1]

    async def server_deleted(self, ids: list[str]) -> list[tuple[str, float | None]]:
        """(id, when the server's copy was deleted or None) for each of ``ids``."""
        out = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self._fetchall(
                f"SELECT id, server_deleted_at FROM recordings WHERE account=? AND id IN ({marks})",
                (self._acct, *chunk),
            )
            out += [(r[0], r[1]) for r in rows]
        return out

    async def delete_intents(self) -> list[str]:
        scope, params = self._scope()
        rows = await self._fetchall(
            "SELECT id FROM recordings INDEXED BY recordings_delete_intents"
            f" WHERE {scope}delete_intent_at IS NOT NULL AND server_deleted_at IS NULL",
            params,
        )
        return [r[0] for r in rows]

    async def audited(self, ids: list[str]) -> set[str]:
        return await asyncio.to_thread(_audited_ids, audit_path(self.path), set(ids))

    @_writes
    async def mark_server_deleted(self, rows: list[tuple[float, str, str]], audit: list[str]) -> None:
        """The audit lines appended to ``deletions.jsonl`` beside the database and fsynced, then
        (deleted_at, request id, recording id) for each: one transaction."""
        if audit:
            await asyncio.to_thread(_append_lines, audit_path(self.path), audit)
        account = self._acct
        await self.db.executemany(
            "UPDATE recordings SET server_deleted_at=?, delete_request_id=? WHERE account=? AND id=?",
            [(at, request_id, account, rec_id) for at, request_id, rec_id in rows],
        )
        await self.db.commit()

    async def deletion_summary(self, before: float, include_flagged: bool) -> dict[str, Any]:
        due, due_bytes = await self.deletable_totals(before, include_flagged)
        scope, params = self._scope()
        deleted = (await self._fetchall(
            "SELECT count(*) FROM recordings INDEXED BY recordings_server_deleted"
            f" WHERE {scope}server_deleted_at IS NOT NULL", params,
        ))[0][0]
        stores = [json.loads(r[0]) for r in await self._fetchall(
            f"SELECT value FROM meta WHERE {scope}key='server_store' ORDER BY account", params
        )]
        return {"due": due, "due_bytes": due_bytes, "deleted": deleted,
                "interrupted": len(await self.delete_intents()), "server_store": stores[0] if stores else None}

    @_writes
    async def release_downloading(self, in_flight: set[str]) -> int:
        """Rows left ``downloading`` by work that ended while the database could not be written:
        back to ``pending`` (those still in flight excepted)."""
        account = self._acct
        rows = await self._fetchall(
            "SELECT id FROM recordings INDEXED BY recordings_state WHERE account=? AND state='downloading'", (account,)
        )
        stale = [(account, r[0]) for r in rows if r[0] not in in_flight]
        if stale:
            await self.db.executemany(
                "UPDATE recordings SET state='pending' WHERE account=? AND id=? AND state='downloading'", stale
            )
            await self.db.commit()
        return len(stale)

    @_writes
    async def recover(self) -> list[Row]:
        """After a crash: rows left ``downloading`` go back to ``pending``. Returns them, so
        the caller can remove their temporary files."""
        account = self._acct
        rows = [
            row_from(r)
            for r in await self._fetchall(
                f"SELECT {ROW_COLUMNS} FROM recordings INDEXED BY recordings_state"
                " WHERE account=? AND state='downloading'", (account,)
            )
        ]
        await self.db.execute(
            "UPDATE recordings SET state='pending' WHERE account=? AND state='downloading'", (account,)
        )
        await self.db.commit()
        return rows

    @_writes
    async def retry_failed(self) -> int:
        scope, params = self._scope()
        cur = await self.db.execute(
            f"UPDATE recordings SET state='pending', attempts=0, next_attempt_at=? WHERE {scope}state='failed'",
            (time.time(), *params),
        )
        await self.db.commit()
        return cur.rowcount

    # ---- reports -----------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        scope, params = self._scope()
        rows = await self._fetchall(
            f"SELECT state, count(*) FROM recordings WHERE {scope}1 GROUP BY state", params
        )
        for state, n in rows:
            out[str(state)] = n
        return out

    async def counts_by_account(self) -> dict[str, dict[str, int]]:
        """Counts per state for each account (``status --json``, metrics)."""
        return counts_by_account(await self._fetchall(
            "SELECT account, state, count(*) FROM recordings INDEXED BY recordings_state GROUP BY account, state"
        ))

    async def summary(self) -> dict[str, Any]:
        """Counts per state, the oldest waiting recording and the last error, for ``status``.
        The whole database's: refusals and key expiry are each account's, keyed by account."""
        scope, params = self._scope()
        out: dict[str, Any] = await self.counts()
        out["total"] = sum(out[s] for s in STATES)
        rows = await self._fetchall(
            "SELECT id, tm_create, account FROM recordings INDEXED BY recordings_waiting_created"
            f" WHERE {scope}state IN ('discovered', 'pending', 'downloading') ORDER BY tm_create LIMIT 1", params
        )
        out["oldest_pending"] = (
            {"id": rows[0][0], "tm_create": rows[0][1], "account": rows[0][2]} if rows else None
        )
        out["last_error"] = await self._last_error()
        flags = dict.fromkeys(FLAGS, 0)
        for flag, n in await self._fetchall(
            "SELECT flag, count(*) FROM recordings INDEXED BY recordings_flagged"
            f" WHERE {scope}flag IS NOT NULL GROUP BY flag", params
        ):
            flags[str(flag)] = n
        out["archived_flagged"] = flags
        marks = ",".join("?" * len(SUMMARY_META))
        rows = await self._fetchall(
            f"SELECT account, key, value FROM meta WHERE {scope}key IN ({marks})", (*params, *SUMMARY_META)
        )
        return {**out, **summary_meta(rows, self.account)}

    async def summaries(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """``summary()`` of the whole database and of each account, in five queries whatever
        the number of accounts (the supervisor asks every two seconds)."""
        counts = await self._fetchall(
            "SELECT account, state, count(*) FROM recordings INDEXED BY recordings_state GROUP BY account, state")
        oldest = await self._fetchall(  # SQLite: the bare id is the min() row's
            "SELECT account, id, min(tm_create) FROM recordings INDEXED BY recordings_waiting_created"
            " WHERE state IN ('discovered', 'pending', 'downloading') GROUP BY account")
        flags = await self._fetchall(
            "SELECT account, flag, count(*) FROM recordings INDEXED BY recordings_flagged"
            " WHERE flag IS NOT NULL GROUP BY account, flag")
        meta = await self._fetchall(
            f"SELECT account, key, value FROM meta WHERE key IN ({','.join('?' * len(SUMMARY_META))})", SUMMARY_META)
        return assemble_summaries(counts, oldest, flags, meta, await self._last_error())

    async def _last_error(self) -> dict[str, Any] | None:
        """The latest error of a recording still failed or waiting (this view's, or anyone's)."""
        scope, params = self._scope()
        rows = await self._fetchall(
            "SELECT id, state, last_error, updated_at, account FROM recordings INDEXED BY recordings_errors"
            f" WHERE {scope}last_error IS NOT NULL AND state IN ('failed', 'pending', 'discovered')"
            " ORDER BY updated_at DESC LIMIT 1", params
        )
        return ({"id": rows[0][0], "state": rows[0][1], "error": rows[0][2], "at": rows[0][3],
                 "account": rows[0][4]} if rows else None)

    async def flagged(self, limit: int = 5) -> list[dict[str, Any]]:
        """The latest recordings kept imperfect or without audio, with why (``status``)."""
        scope, params = self._scope()
        rows = await self._fetchall(
            f"SELECT id, state, flag, flag_reason, account FROM recordings WHERE {scope}flag_reason IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT ?",
            (*params, limit),
        )
        return [dict(r) for r in rows]

    async def archived(self, batch: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Yield rows with files in the archive (``archived``, ``no_audio``) in batches
        (``verify``); never the whole table in memory."""
        scope, params = self._scope()
        last = ("", "")
        while True:
            rows = await self._fetchall(
                f"SELECT account, id, state, path, size, sha256, manifest_seq, plain_sha256 FROM recordings"
                f" WHERE {scope}state IN ({STORED_SQL})"
                " AND (account, id) > (?, ?) ORDER BY account, id LIMIT ?",
                (*params, *last, batch),
            )
            if not rows:
                return
            for r in rows:
                yield dict(r)
            last = (rows[-1]["account"], rows[-1]["id"])


def _lock(path: Path) -> int:
    """Hold an exclusive lock on ``<db>.lock`` for the life of the process (one writer)."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLocked(
            f"state database {path} is in use by another voipbin-archiver process (lock {lock_path})"
        ) from None
    return fd


def policy_audit_path(database: Path) -> Path:
    """The append-only audit trail of the archive's own changes (holds, expiry, erasure)."""
    return database.with_name("archive-audit.jsonl")


def audit_path(database: Path) -> Path:
    """The append-only audit trail of deletions, beside the SQLite database."""
    return database.with_name("deletions.jsonl")


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append to the audit file and fsync it (and, when it is new, its directory)."""
    new = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = ("\n".join(lines) + "\n").encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LocalStorageError(f"cannot write the deletion audit trail {path}: {exc.strerror}") from None
    if new:
        fsync_path(path.parent)


def _audited_ids(path: Path, wanted: set[str]) -> set[str]:
    """Which of ``wanted`` already have an audit line (read once, after a crash)."""
    found: set[str] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec_id = json.loads(line).get("recording_id")
                except (ValueError, AttributeError):
                    continue  # a torn last line from a crash mid-append
                if rec_id in wanted:
                    found.add(rec_id)
    except FileNotFoundError:
        pass
    return found
