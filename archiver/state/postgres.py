"""The state in PostgreSQL (``[state] url``), shared by several daemons on several machines.

The same rows, states and reports as ``state.StateDB`` (SQLite), plus what sharing needs:

* **Claims.** ``due()`` takes rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` and gives each a
  lease (``lease_owner``, ``lease_until``, the database's clock). The engine renews the leases of
  what it has in flight every ``lease / 3`` (``renew``); a daemon that dies loses them, and once
  ``lease`` has passed another daemon claims those rows (a ``downloading`` row goes back to
  ``pending`` as it is claimed).
* **Writes by the lease holder.** A worker's ``update`` applies only while the row is ours (or
  nobody's), and releases the lease unless the row stays ``downloading``. A lease lost under a
  stalled daemon makes its late writes no-ops.
* **Idempotent archiving.** ``mark_archived`` of a row already archived with the same SHA-256
  changes nothing; with another, the first stays and the conflict is logged.
* **One walker per account**: ``walk_lock()`` holds ``pg_try_advisory_lock`` for the walk.
* **One pace per account across daemons**: ``grant(n)`` takes tokens from a bucket row per
  account (``pace``), refilled at the account's rate by the database's clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import structlog

from ..calls import Call
from ..config import StateConfig
from ..errors import LocalStorageError, StateUnusable
from ..logs import register_secret
from ..model import Recording
from ..ratelimit import Grant
from ..storagefiles import StorageFile
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
)

log = structlog.get_logger("archiver.state.postgres")

NOW = "extract(epoch from statement_timestamp())"  # the database's clock: one for every daemon's leases

MIGRATIONS: list[str] = [
    """
    CREATE TABLE recordings (
        account text NOT NULL,
        id text NOT NULL,
        state text NOT NULL,
        raw text NOT NULL,
        status text NOT NULL DEFAULT '',
        reference_type text NOT NULL DEFAULT '',
        tm_create double precision,
        tm_end double precision,
        discovered_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        polls integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL DEFAULT 0,
        last_error text,
        path text,
        size bigint,
        sha256 text,
        server_hashes text,
        members integer,
        archived_at double precision,
        updated_at double precision NOT NULL,
        flag text,
        flag_reason text,
        delete_intent_at double precision,
        server_deleted_at double precision,
        delete_request_id text,
        lease_owner text,
        lease_until double precision,
        PRIMARY KEY (account, id)
    );
    CREATE INDEX recordings_due ON recordings(account, next_attempt_at)
        WHERE state IN ('discovered', 'pending', 'downloading');
    CREATE INDEX recordings_state ON recordings(account, state);
    CREATE INDEX recordings_owner ON recordings(lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX recordings_waiting_created ON recordings(tm_create)
        WHERE state IN ('discovered', 'pending', 'downloading');
    CREATE INDEX recordings_errors ON recordings(updated_at) WHERE last_error IS NOT NULL;
    CREATE INDEX recordings_flagged ON recordings(flag) WHERE flag IS NOT NULL;
    CREATE INDEX recordings_deletable ON recordings(archived_at)
        WHERE state = 'archived' AND server_deleted_at IS NULL;
    CREATE TABLE walks (account text NOT NULL, name text NOT NULL, token text NOT NULL,
        updated_at double precision NOT NULL, PRIMARY KEY (account, name));
    CREATE TABLE meta (account text NOT NULL, key text NOT NULL, value text NOT NULL, PRIMARY KEY (account, key));
    CREATE TABLE deletions (account text NOT NULL, recording_id text NOT NULL, line text NOT NULL,
        PRIMARY KEY (account, recording_id));
    CREATE TABLE pace (account text PRIMARY KEY, tokens double precision NOT NULL, at double precision NOT NULL,
        granted double precision NOT NULL DEFAULT 0);
    """,
    # v2: an archive that answers (``find``, ``export``): as SQLite's v6
    """
    ALTER TABLE recordings ADD COLUMN tm_start double precision;
    ALTER TABLE recordings ADD COLUMN reference_id text;
    ALTER TABLE recordings ADD COLUMN call_noted_at double precision;
    ALTER TABLE recordings ADD COLUMN transcript_state text;
    ALTER TABLE recordings ADD COLUMN transcript_due_at double precision;
    UPDATE recordings SET reference_id = raw::jsonb->>'reference_id'
        WHERE jsonb_typeof(raw::jsonb->'reference_id') = 'string';
    CREATE INDEX recordings_start ON recordings(tm_start);
    CREATE INDEX recordings_reference ON recordings(reference_id) WHERE reference_id IS NOT NULL;
    CREATE INDEX recordings_transcripts_due ON recordings(account, transcript_due_at)
        WHERE transcript_state IS NULL AND state IN ('archived', 'no_audio');
    CREATE TABLE calls (
        account text NOT NULL,
        id text NOT NULL,
        raw text NOT NULL,
        direction text NOT NULL DEFAULT '',
        status text NOT NULL DEFAULT '',
        source text NOT NULL DEFAULT '',
        destination text NOT NULL DEFAULT '',
        source_target text,
        destination_target text,
        hangup_reason text,
        tm_create double precision,
        discovered_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (account, id)
    );
    CREATE INDEX calls_source ON calls(source);
    CREATE INDEX calls_destination ON calls(destination);
    """,
    # v3: the storage listing as a download path (as SQLite's v7)
    """
    CREATE TABLE storage_files (
        account text NOT NULL,
        id text NOT NULL,
        recording_id text NOT NULL,
        filename text NOT NULL,
        filesize bigint,
        url text NOT NULL,
        expires_at double precision,
        tm_create double precision,
        listed_at double precision NOT NULL,
        stranger_noted_at double precision,
        PRIMARY KEY (account, id)
    );
    CREATE INDEX storage_files_recording ON storage_files(account, recording_id);
    CREATE INDEX storage_files_expiry ON storage_files(expires_at);
    """,
    # v4: the signed manifest (as SQLite's v8)
    """
    ALTER TABLE recordings ADD COLUMN manifest_seq bigint;
    ALTER TABLE recordings ADD COLUMN manifest_deleted_seq bigint;
    CREATE INDEX recordings_manifest_due ON recordings(account, archived_at)
        WHERE manifest_seq IS NULL AND state IN ('archived', 'no_audio');
    CREATE INDEX recordings_manifest_deleted_due ON recordings(account)
        WHERE manifest_deleted_seq IS NULL AND server_deleted_at IS NOT NULL;
    ALTER TABLE recordings ADD COLUMN plain_sha256 text;
    ALTER TABLE recordings ADD COLUMN remove_intent text;
    ALTER TABLE recordings ADD COLUMN removed_at double precision;
    ALTER TABLE recordings ADD COLUMN removed_reason text;
    CREATE INDEX recordings_manifest_removed_due ON recordings(account)
        WHERE manifest_seq IS NULL AND state IN ('expired', 'erased');
    CREATE INDEX recordings_removing ON recordings(account) WHERE remove_intent IS NOT NULL;
    CREATE TABLE holds (
        account text NOT NULL,
        recording_id text NOT NULL,
        reason text NOT NULL,
        held_at double precision NOT NULL,
        PRIMARY KEY (account, recording_id)
    );
    CREATE TABLE hold_events (
        seq bigserial PRIMARY KEY,
        account text NOT NULL,
        recording_id text NOT NULL,
        action text NOT NULL,
        reason text NOT NULL,
        at double precision NOT NULL,
        manifest_seq bigint
    );
    CREATE INDEX hold_events_due ON hold_events(account) WHERE manifest_seq IS NULL;
    CREATE TABLE archive_audit (id bigserial PRIMARY KEY, account text NOT NULL, recording_id text NOT NULL,
        line text NOT NULL);
    """,
]
CATALOG_FILLED_AT = 2  # the version after which recordings' tm_start is filled in from raw
MIGRATE_LOCK = 0x766F6970  # advisory lock key while migrating or importing ("voip")


def asyncpg_module() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StateUnusable(
            '[state] url needs PostgreSQL\'s driver: pip install "voipbin-archiver[postgresql]"'
        ) from None
    return asyncpg


PG_FIND = Dialect(
    iso=lambda col: f"to_char(to_timestamp({col}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
    json_object=lambda pairs: "json_build_object(" + ", ".join(f"'{k}', {v}" for k, v in pairs) + ")::text",
    json_bool=lambda expr: f"({expr})",
)


async def _checkpoint(con: Any, account: str, walk: str | None, next_token: str, now: float) -> None:
    """A walk's checkpoint, in the transaction that stored its page: the next page's token, or
    none once the walk is over (``walk`` None: an incremental walk keeps none)."""
    if walk is None:
        return
    if next_token:
        await con.execute(
            "INSERT INTO walks (account, name, token, updated_at) VALUES ($1,$2,$3,$4) ON CONFLICT"
            " (account, name) DO UPDATE SET token=excluded.token, updated_at=excluded.updated_at",
            account, walk, next_token, now)
    else:
        await con.execute("DELETE FROM walks WHERE account=$1 AND name=$2", account, walk)


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1``, ``$2``, ... (the shared SQL has no literal ``?``)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))


async def _fill_tm_start(con: Any) -> None:
    """Each known recording's ``tm_start`` from its JSON, once, in migration v2's transaction."""
    rows = await con.fetch("SELECT account, id, raw FROM recordings WHERE tm_start IS NULL")
    await con.executemany("UPDATE recordings SET tm_start=$1 WHERE account=$2 AND id=$3", tm_start_fills(rows))


async def _keep_session(con: Any) -> None:
    """A pooled connection goes back as it is: asyncpg's default reset sends a statement on every
    release (advisory locks, LISTEN, settings: none of which the pool's connections use; the
    advisory locks have connections of their own). An open transaction is still rolled back."""


class PgState:
    """The shared state. ``await PgState.open(cfg)``; ``for_account(name)`` as for ``StateDB``."""

    def __init__(self, pool: Any, cfg: StateConfig, account: str | None = None, owner: str = "",
                 root: PgState | None = None) -> None:
        self.pool = pool
        self.cfg = cfg
        self.lease = cfg.lease
        self.account = account
        self.path = cfg.database  # beside which S3 staging lives (the audit trail is the table deletions)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._tag: str = root._tag if root is not None else secrets.token_hex(4)
        self._root = root
        self._views: list[PgState] = []
        self._lock_cons: dict[str, Any] = {}  # the advisory locks' connections, by lock

    @classmethod
    async def open(cls, cfg: StateConfig, *, readonly: bool = False) -> PgState:
        asyncpg = asyncpg_module()
        if cfg.password:  # (the URL carries none: config refuses it)
            register_secret(cfg.password)
        try:
            pool = await asyncpg.create_pool(cfg.url, password=cfg.password or None, min_size=0, max_size=4,
                                             timeout=30, command_timeout=60, reset=_keep_session)
            state = cls(pool, cfg)
        except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
            # down, restarting or not up yet (a reboot): exit 1, which systemd's Restart= retries
            raise LocalStorageError(f"the state database {cfg.url} cannot be reached: {type(exc).__name__}: "
                                    f"{exc}; trying again later") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:  # a refused login, no such database
            raise StateUnusable(f"cannot use the state database {cfg.url}: {exc}") from None
        try:
            with state._reachable():
                await state._migrate(readonly)
        except asyncpg.PostgresError as exc:  # (the pool connects on first use: a refused login shows here)
            await pool.close()
            raise StateUnusable(f"cannot use the state database {cfg.url}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            await pool.close()
            raise
        return state

    def for_account(self, account: str) -> PgState:
        root = self._root or self
        view = PgState(self.pool, self.cfg, account, self.owner, root)
        root._views.append(view)
        return view


    @property
    def writer_tag(self) -> str:
        return self._tag  # other daemons write the same archive: our temporary names carry our mark

    def pace(self, rate: float, burst: int) -> Grant:
        """The account's bucket in the database, one for every daemon (``grant``)."""

        async def grant(wanted: int) -> tuple[int, float]:
            return await self.grant(wanted, rate, burst)

        return grant

    @property
    def _acct(self) -> str:
        if self.account is None:
            raise RuntimeError("this needs one account's view: state.for_account(name)")
        return self.account

    def _scope(self, n: int) -> tuple[str, tuple[str, ...]]:
        """(``account=$n AND ``, its parameter) for a view, nothing for the whole database."""
        return ("", ()) if self.account is None else (f"account=${n} AND ", (self.account,))

    def lock_fds(self) -> tuple[int, ...]:
        return ()

    async def close(self) -> None:
        if self._root is None:
            for view in self._views:
                for con in view._lock_cons.values():
                    con.terminate()
            await self.pool.close()

    async def _migrate(self, readonly: bool) -> None:
        async with self.pool.acquire() as con:
            if readonly:
                exists = await con.fetchval("SELECT to_regclass('archiver_schema') IS NOT NULL")
                version = await con.fetchval("SELECT version FROM archiver_schema") if exists else 0
                if version != len(MIGRATIONS):
                    raise StateUnusable(f"state database {self.cfg.url} is schema v{version}, this "
                                        f"archiver reads v{len(MIGRATIONS)}: run `backfill` or `run` once")
                return
            async with con.transaction():
                await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)  # one daemon migrates
                await con.execute("CREATE TABLE IF NOT EXISTS archiver_schema (version integer NOT NULL)")
                version = await con.fetchval("SELECT version FROM archiver_schema")
                if version is None:
                    await con.execute("INSERT INTO archiver_schema VALUES (0)")
                    version = 0
                if version > len(MIGRATIONS):
                    raise StateUnusable(f"state database schema v{version} is newer than this archiver knows "
                                        f"(v{len(MIGRATIONS)}): upgrade voipbin-archiver")
                for number in range(version, len(MIGRATIONS)):
                    await con.execute(MIGRATIONS[number])
                    if number + 1 == CATALOG_FILLED_AT:
                        await _fill_tm_start(con)
                    await con.execute("UPDATE archiver_schema SET version=$1", number + 1)

    @contextlib.contextmanager
    def _reachable(self) -> Any:
        """A database that cannot be reached (down, restarting, the network) is
        ``LocalStorageError``: the engine pauses and tries again, as for a full disk."""
        asyncpg = asyncpg_module()
        try:
            yield
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.InternalClientError, asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError) as exc:
            # (InternalClientError: a connection left mid-operation by the server going away)
            raise LocalStorageError(f"the state database {self.cfg.url} cannot be reached: "
                                    f"{type(exc).__name__}: {exc}") from None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A connection of the pool, its failures ``LocalStorageError`` (``import-state``)."""
        with self._reachable():
            async with self.pool.acquire() as con:
                yield con

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        with self._reachable():
            return list(await self.pool.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any) -> str:
        with self._reachable():
            return str(await self.pool.execute(sql, *args))

    # ---- the walk ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def walk_lock(self, listing: str = "recordings") -> AsyncIterator[bool]:
        """Whether this daemon walks the account's ``listing`` now: one daemon at a time (a
        dead daemon's lock goes with its session)."""
        suffix = "" if listing == "recordings" else f":{listing}"
        async with self._advisory(f"voipbin-archiver:walk:{self._acct}{suffix}") as got:
            yield got

    @contextlib.asynccontextmanager
    async def _advisory(self, key: str) -> AsyncIterator[bool]:
        """``pg_try_advisory_lock`` held on a connection of the account's own, not the pool's:
        the work under it needs the pool."""
        with self._reachable():
            con = self._lock_cons.get(key)
            if con is None or con.is_closed():  # one per lock: a walk and a prune may run at once
                con = self._lock_cons[key] = await asyncpg_module().connect(
                    self.cfg.url, password=self.cfg.password or None, timeout=30)
            got = await con.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key)
        try:
            yield bool(got)
        finally:
            if got:
                with self._reachable():
                    await con.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)

    async def store_page(self, recordings: list[Recording], walk: str | None, next_token: str) -> tuple[int, int]:
        account = self._acct
        now = time.time()
        with self._reachable():
            return await self._store_page(account, now, recordings, walk, next_token)

    async def _store_page(
        self, account: str, now: float, recordings: list[Recording], walk: str | None, next_token: str
    ) -> tuple[int, int]:
        async with self.pool.acquire() as con, con.transaction():
            ids = [r.id for r in recordings]
            known = {r[0]: r[1] for r in await con.fetch(
                "SELECT id, state FROM recordings WHERE account=$1 AND id = ANY($2::text[])", account, ids)}
            inserts, moves = [], []
            for rec in recordings:
                state, reason = initial_state(rec)
                if rec.id not in known:
                    known[rec.id] = state
                    inserts.append((account, rec.id, state, json.dumps(rec.raw), rec.status, rec.reference_type,
                                    epoch(rec.tm_create), epoch(rec.tm_end), now, now, reason, now,
                                    *catalog_columns(rec.raw)))
                elif (rec.ended or rec.deleted) and known[rec.id] == "discovered":  # (no statement for the rest)
                    moves.append((state, json.dumps(rec.raw), rec.status, epoch(rec.tm_end), reason, now, now,
                                  *catalog_columns(rec.raw), account, rec.id))
            if inserts:
                await con.executemany(
                    "INSERT INTO recordings (account, id, state, raw, status, reference_type, tm_create, tm_end,"
                    " discovered_at, next_attempt_at, last_error, updated_at, tm_start, reference_id)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) ON CONFLICT DO NOTHING", inserts)
            if moves:
                await con.executemany(
                    "UPDATE recordings SET state=$1, raw=$2, status=$3, tm_end=$4, last_error=$5, next_attempt_at=$6,"
                    " updated_at=$7, tm_start=$8, reference_id=$9 WHERE account=$10 AND id=$11"
                    " AND state='discovered'", moves)
            await _checkpoint(con, account, walk, next_token, now)
        return len(inserts), len(recordings) - len(inserts)

    async def walk_checkpoint(self, walk: str) -> str | None:
        rows = await self._fetch("SELECT token FROM walks WHERE account=$1 AND name=$2", self._acct, walk)
        return rows[0][0] if rows else None

    async def end_walk(self, walk: str) -> None:
        await self._execute("DELETE FROM walks WHERE account=$1 AND name=$2", self._acct, walk)
        await self.set_meta(f"walk_done:{walk}", str(time.time()))

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE account=$1 AND key=$2", self._acct, key)
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._execute("INSERT INTO meta (account, key, value) VALUES ($1,$2,$3)"
                            " ON CONFLICT (account, key) DO UPDATE SET value=excluded.value", self._acct, key, value)

    async def delete_meta(self, key: str) -> None:
        await self._execute("DELETE FROM meta WHERE account=$1 AND key=$2", self._acct, key)

    # ---- calls (``find``'s metadata) -----------------------------------------------------------

    async def store_calls(self, calls: list[Call], walk: str | None, next_token: str) -> tuple[int, int]:
        """As ``StateDB.store_calls``: (new, unchanged)."""
        account = self._acct
        now = time.time()
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                ids = list(dict.fromkeys(c.id for c in calls))
                known = {r[0]: r[1] for r in await con.fetch(
                    "SELECT id, raw FROM calls WHERE account=$1 AND id = ANY($2::text[])", account, ids)}
                upserts, new = call_rows(calls, known, account, now)
                if upserts:
                    await con.executemany(
                        f"INSERT INTO calls ({CALL_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)"
                        f" ON CONFLICT (account, id) DO UPDATE SET {CALL_UPDATES}", upserts)
                await _checkpoint(con, account, walk, next_token, now)
        return new, len(calls) - len(upserts)

    async def store_storage_files(self, files: list[StorageFile], walk: str | None,
                                  next_token: str) -> tuple[int, int]:
        """As ``StateDB.store_storage_files``: (new, already known)."""
        account = self._acct
        now = time.time()
        rows = storage_file_rows(files, account, now)
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                known = {r[0] for r in await con.fetch(
                    "SELECT id FROM storage_files WHERE account=$1 AND id = ANY($2::text[])",
                    account, [r[1] for r in rows])}
                if rows:
                    await con.executemany(
                        f"INSERT INTO storage_files ({FILE_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
                        f" ON CONFLICT (account, id) DO UPDATE SET {FILE_UPDATES}", rows)
                await con.execute("DELETE FROM storage_files WHERE account=$1 AND expires_at < $2",
                                  account, now - FILE_FORGET_AFTER)
                await _checkpoint(con, account, walk, next_token, now)
        return len(rows) - len(known), len(known)

    async def storage_files_of(self, rec_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT id, filename, filesize, url, expires_at FROM storage_files WHERE account=$1 AND recording_id=$2"
            " ORDER BY filename, id", self._acct, rec_id)
        return [dict(r) for r in rows]

    async def storage_strangers(self, limit: int, listed_before: float) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "UPDATE storage_files f SET stranger_noted_at=$2 WHERE (f.account, f.id) IN (SELECT g.account, g.id"
            " FROM storage_files g WHERE g.account=$1 AND g.stranger_noted_at IS NULL AND g.tm_create < $4"
            " AND NOT EXISTS (SELECT 1 FROM recordings r WHERE r.account = g.account AND r.id = g.recording_id)"
            " LIMIT $3) RETURNING f.id, f.recording_id, f.filename", self._acct, time.time(), limit, listed_before)
        return [dict(r) for r in rows]

    async def call_of(self, call_id: str) -> dict[str, Any] | None:
        rows = await self._fetch("SELECT raw FROM calls WHERE account=$1 AND id=$2", self._acct, call_id)
        return json.loads(rows[0][0]) if rows else None

    async def calls_to_note(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT r.id, r.state, r.path, r.sha256, r.reference_type, c.raw AS call_raw FROM recordings r"
            " JOIN calls c ON c.account = r.account AND c.id = r.reference_id"
            f" WHERE r.account=$1 AND r.reference_type='call' AND r.state IN ({STORED_SQL})"
            " AND r.call_noted_at IS NULL LIMIT $2", self._acct, limit)
        return [{**dict(r), "call": json.loads(r["call_raw"])} for r in rows]

    async def mark_call_noted(self, ids: list[str]) -> None:
        await self._execute("UPDATE recordings SET call_noted_at=$1 WHERE account=$2 AND id = ANY($3::text[])",
                            time.time(), self._acct, ids)

    async def transcripts_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT id, state, path, sha256 FROM recordings WHERE account=$1 AND transcript_state IS NULL"
            f" AND state IN ({STORED_SQL}) AND (transcript_due_at IS NULL OR transcript_due_at <= $2) LIMIT $3",
            self._acct, now, limit)
        return [dict(r) for r in rows]

    async def mark_transcript(self, rec_id: str, state: str | None, due_at: float | None = None) -> None:
        await self._execute("UPDATE recordings SET transcript_state=$1, transcript_due_at=$2 WHERE account=$3"
                            " AND id=$4", state, due_at, self._acct, rec_id)

    async def find(self, query: FindQuery) -> list[dict[str, Any]]:
        sql, params = find_sql(query, PG_FIND)
        return [dict(r) for r in await self._fetch(_numbered(sql), *params)]

    async def find_json(self, query: FindQuery, key_prefix: str = "") -> list[str]:
        sql, params = find_sql(query, PG_FIND, as_json=True, key_prefix=key_prefix)
        return [r[0] for r in await self._fetch(_numbered(sql), *params)]

    # ---- the pace ----------------------------------------------------------------------------

    async def grant(self, wanted: int, rate: float, burst: int) -> tuple[int, float]:
        """Take up to ``wanted`` tokens of the account's shared bucket: (granted, seconds until
        one more is there when none was)."""
        avail = f"least($2::float8, p.tokens + ({NOW} - p.at) * $3::float8)"  # refilled up to the burst
        rows = await self._fetch(
            f"""
            INSERT INTO pace AS p (account, tokens, at, granted)
            VALUES ($1, $2::float8 - least($4::float8, $2::float8), {NOW}, least($4::float8, $2::float8))
            ON CONFLICT (account) DO UPDATE SET
                tokens = {avail} - least($4::float8, floor({avail})),
                granted = least($4::float8, floor({avail})), at = {NOW}
            RETURNING tokens, granted
            """,
            self._acct, float(burst), float(rate), float(wanted),
        )
        left, granted = float(rows[0]["tokens"]), int(rows[0]["granted"])
        return granted, 0.0 if granted else max(0.01, (1.0 - left) / rate)

    # ---- the worker pool ---------------------------------------------------------------------

    async def due(self, now: float, limit: int, exclude: set[str]) -> list[Row]:
        """Claim up to ``limit`` due rows for this daemon: nobody's, or a dead claimant's (its
        lease over); locked rows another daemon is claiming now are skipped, not waited for."""
        rows = await self._fetch(
            f"""
            WITH picked AS (
                SELECT account, id FROM recordings
                WHERE account=$1 AND next_attempt_at <= $2
                  AND state IN ('discovered', 'pending', 'downloading')
                  AND (lease_until IS NULL AND state <> 'downloading' OR lease_until < {NOW})
                ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED
            )
            UPDATE recordings r SET lease_owner=$4, lease_until={NOW} + $5::float8,
                state = CASE WHEN r.state = 'downloading' THEN 'pending' ELSE r.state END
            FROM picked WHERE r.account = picked.account AND r.id = picked.id
            RETURNING {", ".join("r." + c.strip() for c in ROW_COLUMNS.split(","))}
            """,
            self._acct, now, limit, self.owner, float(self.lease),
        )
        return [row_from(r) for r in rows if r["id"] not in exclude]

    async def next_due_time(self) -> float | None:
        """When ``due()`` may next find work: a row another daemon holds is due when its lease
        runs out, not at its ``next_attempt_at`` (ours are in flight). A dead daemon's
        ``downloading`` rows count too, so a backfill waits for them instead of ending."""
        rows = await self._fetch(
            f"""
            SELECT min(CASE WHEN lease_until > {NOW} THEN greatest(next_attempt_at, lease_until)
                            ELSE next_attempt_at END)
            FROM recordings WHERE account=$1 AND (lease_owner IS NULL OR lease_owner <> $2)
              AND (state IN ('discovered', 'pending') OR state = 'downloading' AND lease_owner IS NOT NULL)
            """,
            self._acct, self.owner,
        )
        return cast(float | None, rows[0][0])

    async def claim(self, ids: list[str]) -> None:
        if ids:
            await self._execute(
                "UPDATE recordings SET state='downloading', updated_at=$1 WHERE account=$2 AND id = ANY($3::text[])"
                " AND state='pending' AND lease_owner=$4", time.time(), self._acct, ids, self.owner)

    async def renew(self, ids: set[str]) -> None:
        """Our leases on what is in flight, extended by ``lease`` from now."""
        if ids:
            await self._execute(
                f"UPDATE recordings SET lease_until = {NOW} + $1::float8 WHERE account=$2 AND id = ANY($3::text[])"
                " AND lease_owner=$4", float(self.lease), self._acct, list(ids), self.owner)

    async def update(self, rec_id: str, **fields: Any) -> None:
        """Set columns of one row while it is ours (or nobody's); the lease goes with the row
        unless it stays ``downloading``. Lost to another daemon: nothing changes, and it is logged.
        ``raw`` may be a dict (``find``'s columns follow it)."""
        if "raw" in fields and not isinstance(fields["raw"], str):
            fields["tm_start"], fields["reference_id"] = catalog_columns(fields["raw"])
            fields["raw"] = json.dumps(fields["raw"])
        fields["updated_at"] = time.time()
        sets = [f"{k}=${n}" for n, k in enumerate(fields, start=1)]
        if fields.get("state") != "downloading":
            sets += ["lease_owner=NULL", "lease_until=NULL"]
        n = len(fields)
        done = await self._execute(
            f"UPDATE recordings SET {', '.join(sets)} WHERE account=${n + 1} AND id=${n + 2}"
            f" AND (lease_owner IS NULL OR lease_owner=${n + 3})",
            *fields.values(), self._acct, rec_id, self.owner,
        )
        if done.endswith(" 0"):
            log.warning("lease_lost", recording_id=rec_id, change=sorted(fields),
                        reason="another daemon took the recording over after our lease ran out; ours is dropped")

    async def mark_archived(
        self, rec_id: str, path: str, size: int, sha256: str, server_hashes: str, members: int,
        state: str = "archived", flag: str = "", flag_reason: str = "", call_noted: bool = False,
        plain_sha256: str = "",
    ) -> None:
        """Idempotent: an archived row with the same SHA-256 is left as it is; with another
        SHA-256 the first is kept and the conflict logged (never two answers for one recording).
        ``call_noted``: its sidecar holds its call already."""
        now = time.time()
        rows = await self._fetch(
            "UPDATE recordings SET state=$1, path=$2, size=$3, sha256=$4, server_hashes=$5, members=$6, flag=$7,"
            " flag_reason=$8, archived_at=$9, last_error=NULL, updated_at=$9, lease_owner=NULL, lease_until=NULL,"
            " call_noted_at=$12, manifest_seq=NULL, plain_sha256=$13"
            " WHERE account=$10 AND id=$11 AND state NOT IN ('archived', 'no_audio') RETURNING id",
            state, path, size, sha256, server_hashes, members, flag or None, flag_reason or None, now,
            self._acct, rec_id, now if call_noted else None, plain_sha256 or None,
        )
        if rows:
            return
        kept = await self._fetch("SELECT state, sha256 FROM recordings WHERE account=$1 AND id=$2", self._acct, rec_id)
        if kept and kept[0]["sha256"] != sha256:
            log.error("archived_twice_differently", recording_id=rec_id, kept_sha256=kept[0]["sha256"],
                      other_sha256=sha256, hint="the first record stands; `verify` checks the file against it")

    # ---- the signed manifest (manifestwriter.py): one writer per account -----------------------

    @contextlib.asynccontextmanager
    async def manifest_lock(self) -> AsyncIterator[bool]:
        """Whether this daemon writes the account's manifest now: one daemon at a time."""
        async with self._advisory(f"voipbin-archiver:manifest:{self._acct}") as got:
            yield got

    async def manifest_due(self, limit: int) -> ManifestDue:
        rows = await self._fetch(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=$1 AND manifest_seq IS NULL"
            f" AND state IN ({STORED_SQL}) ORDER BY archived_at, id LIMIT $2", self._acct, limit)
        deleted = await self._fetch(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=$1 AND manifest_deleted_seq IS NULL"
            " AND server_deleted_at IS NOT NULL ORDER BY server_deleted_at, id LIMIT $2", self._acct, limit)
        removed = await self._fetch(
            f"SELECT {MANIFEST_COLUMNS} FROM recordings WHERE account=$1 AND manifest_seq IS NULL"
            f" AND state IN ({REMOVED_SQL}) ORDER BY removed_at, id LIMIT $2", self._acct, limit)
        holds = await self._fetch(
            "SELECT seq, recording_id, action, reason, at FROM hold_events WHERE account=$1 AND manifest_seq IS NULL"
            " ORDER BY seq LIMIT $2", self._acct, limit)
        return ManifestDue([dict(r) for r in rows], [dict(r) for r in deleted], [dict(r) for r in removed],
                           [dict(r) for r in holds])

    async def mark_manifested(self, seq: int, head: str, archived: list[tuple[str, str | None]],
                              deleted: list[str], hold_events: list[int] | None = None) -> None:
        account = self._acct
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                await con.executemany("UPDATE hold_events SET manifest_seq=$1 WHERE seq=$2",
                                      [(seq, n) for n in hold_events or []])
                await con.executemany(
                    "UPDATE recordings SET manifest_seq=$1 WHERE account=$2 AND id=$3"
                    " AND sha256 IS NOT DISTINCT FROM $4", [(seq, account, rec_id, sha) for rec_id, sha in archived])
                await con.executemany(
                    "UPDATE recordings SET manifest_deleted_seq=$1 WHERE account=$2 AND id=$3",
                    [(seq, account, rec_id) for rec_id in deleted])
                await con.execute("INSERT INTO meta (account, key, value) VALUES ($1,$2,$3)"
                                  " ON CONFLICT (account, key) DO UPDATE SET value=excluded.value",
                                  account, MANIFEST_HEAD, head)

    # ---- keeping and letting go (policy.py): holds, expiry, erasure ----------------------------

    @contextlib.asynccontextmanager
    async def policy_lock(self) -> AsyncIterator[bool]:
        async with self._advisory(f"voipbin-archiver:policy:{self._acct}") as got:
            yield got

    async def change_holds(self, ids: list[str], hold: bool, reason: str, audit: dict[str, str]) -> list[str]:
        account = self._acct
        now = time.time()
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                known = {r[0] for r in await con.fetch(
                    "SELECT id FROM recordings WHERE account=$1 AND id = ANY($2::text[]) FOR UPDATE", account, ids)}
                held = {r[0] for r in await con.fetch(
                    "SELECT recording_id FROM holds WHERE account=$1 AND recording_id = ANY($2::text[])", account, ids)}
                changed = [i for i in dict.fromkeys(ids) if i in known and ((i in held) != hold)]
                if hold:
                    await con.executemany("INSERT INTO holds (account, recording_id, reason, held_at)"
                                          " VALUES ($1,$2,$3,$4)", [(account, i, reason, now) for i in changed])
                else:
                    await con.executemany("DELETE FROM holds WHERE account=$1 AND recording_id=$2",
                                          [(account, i) for i in changed])
                await con.executemany(
                    "INSERT INTO hold_events (account, recording_id, action, reason, at) VALUES ($1,$2,$3,$4,$5)",
                    [(account, i, "held" if hold else "released", reason, now) for i in changed])
                await con.executemany("INSERT INTO archive_audit (account, recording_id, line) VALUES ($1,$2,$3)",
                                      [(account, i, audit[i]) for i in changed])
        return changed

    async def holds(self) -> list[dict[str, Any]]:
        scope, params = self._scope(1)
        rows = await self._fetch(
            f"SELECT account, recording_id, reason, held_at FROM holds WHERE {scope}true"
            " ORDER BY held_at, recording_id", *params)
        return [dict(r) for r in rows]

    async def removal_rows(self, ids: list[str]) -> list[dict[str, Any]]:
        rows = await self._fetch(f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=$1"
                                 " AND id = ANY($2::text[])", self._acct, ids)
        return [dict(r) for r in rows]

    async def expirable(self, before: float, limit: int, after: str = "") -> list[dict[str, Any]]:
        rows = await self._fetch(
            f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=$1 AND state IN ({STORED_SQL})"
            " AND coalesce(tm_start, tm_create) < $2 AND remove_intent IS NULL AND id > $4 ORDER BY id LIMIT $3",
            self._acct, before, limit, after)
        return [dict(r) for r in rows]

    async def removal_intents(self) -> list[dict[str, Any]]:
        rows = await self._fetch(f"SELECT {REMOVAL_COLUMNS} FROM recordings r WHERE account=$1"
                                 " AND remove_intent IS NOT NULL", self._acct)
        return [dict(r) for r in rows]

    async def mark_removal_intent(self, ids: list[str], why: str, reason: str) -> None:
        await self._execute("UPDATE recordings SET remove_intent=$1, removed_reason=$4 WHERE account=$2"
                            " AND id = ANY($3::text[])", why, self._acct, ids, reason)

    async def mark_removed(self, rows: list[tuple[str, str, str]], audit: list[str]) -> None:
        account = self._acct
        now = time.time()
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                await con.executemany("INSERT INTO archive_audit (account, recording_id, line) VALUES ($1,$2,$3)",
                                      [(account, json.loads(line)["recording_id"], line) for line in audit])
                await con.executemany(
                    "UPDATE recordings SET state=$1, removed_reason=$2, removed_at=$3, remove_intent=NULL,"
                    " manifest_seq=NULL, updated_at=$3 WHERE account=$4 AND id=$5",
                    [(state, reason, now, account, rec_id) for rec_id, state, reason in rows])

    # ---- deleting the server's copy (retention.py): one pruner per account ---------------------

    @contextlib.asynccontextmanager
    async def prune_lock(self) -> AsyncIterator[bool]:
        """Whether this daemon deletes the account's server copies now: one daemon at a time."""
        async with self._advisory(f"voipbin-archiver:prune:{self._acct}") as got:
            yield got

    def _deletable_where(self, include_flagged: bool, n: int) -> str:
        flags = "" if include_flagged else " AND flag IS NULL"
        return f"state = 'archived' AND server_deleted_at IS NULL AND archived_at <= ${n}{flags}"

    async def deletable(self, before: float, include_flagged: bool, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            f"SELECT {DELETABLE_COLUMNS} FROM recordings WHERE account=$1 AND delete_intent_at IS NOT NULL"
            " AND server_deleted_at IS NULL AND state = 'archived' LIMIT $2", self._acct, limit)
        if len(rows) < limit:
            rows += await self._fetch(
                f"SELECT {DELETABLE_COLUMNS} FROM recordings WHERE account=$1"
                f" AND {self._deletable_where(include_flagged, 2)} AND delete_intent_at IS NULL"
                " ORDER BY archived_at LIMIT $3", self._acct, before, limit - len(rows))
        return [dict(r) for r in rows]

    async def deletable_totals(self, before: float, include_flagged: bool) -> tuple[int, int]:
        scope, params = self._scope(2)
        rows = await self._fetch(
            f"SELECT count(*), coalesce(sum(size), 0) FROM recordings WHERE {scope}"
            f"{self._deletable_where(include_flagged, 1)}", before, *params)
        return int(rows[0][0]), int(rows[0][1])

    async def delete_intents(self) -> list[str]:
        scope, params = self._scope(1)
        rows = await self._fetch(
            f"SELECT id FROM recordings WHERE {scope}delete_intent_at IS NOT NULL AND server_deleted_at IS NULL",
            *params)
        return [r[0] for r in rows]

    async def server_deleted(self, ids: list[str]) -> list[tuple[str, float | None]]:
        rows = await self._fetch("SELECT id, server_deleted_at FROM recordings WHERE account=$1 AND id = ANY($2)",
                                 self._acct, ids)
        return [(r[0], r[1]) for r in rows]

    async def audited(self, ids: list[str]) -> set[str]:
        rows = await self._fetch("SELECT recording_id FROM deletions WHERE account=$1 AND recording_id = ANY($2)",
                                 self._acct, ids)
        return {r[0] for r in rows}

    async def mark_server_deleted(self, rows: list[tuple[float, str, str]], audit: list[str]) -> None:
        """(deleted_at, request id, recording id) for each, with the audit lines (the trail of
        every daemon, ``deletions``): one transaction; a line already there is not added again."""
        account = self._acct
        with self._reachable():
            async with self.pool.acquire() as con, con.transaction():
                await con.executemany(
                    "UPDATE recordings SET server_deleted_at=$1, delete_request_id=$2 WHERE account=$3 AND id=$4",
                    [(at, request_id, account, rec_id) for at, request_id, rec_id in rows])
                await con.executemany(
                    "INSERT INTO deletions (account, recording_id, line) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    [(account, json.loads(line)["recording_id"], line) for line in audit])

    async def deletion_summary(self, before: float, include_flagged: bool) -> dict[str, Any]:
        due, due_bytes = await self.deletable_totals(before, include_flagged)
        scope, params = self._scope(1)
        deleted = (await self._fetch(
            f"SELECT count(*) FROM recordings WHERE {scope}server_deleted_at IS NOT NULL", *params))[0][0]
        stores = [json.loads(r[0]) for r in await self._fetch(
            f"SELECT value FROM meta WHERE {scope}key='server_store' ORDER BY account", *params)]
        return {"due": due, "due_bytes": due_bytes, "deleted": deleted,
                "interrupted": len(await self.delete_intents()), "server_store": stores[0] if stores else None}

    # ---- start-up and shutdown ---------------------------------------------------------------

    async def release_downloading(self, in_flight: set[str]) -> int:
        rows = await self._fetch(
            "UPDATE recordings SET state='pending', lease_owner=NULL, lease_until=NULL WHERE account=$1"
            " AND lease_owner=$2 AND state='downloading' AND NOT (id = ANY($3::text[])) RETURNING id",
            self._acct, self.owner, list(in_flight))
        return len(rows)

    async def recover(self) -> list[Row]:
        """Our own claims (at shutdown) and dead daemons' whose lease ran out, back to
        ``pending``; returned, so the caller can remove their temporary files."""
        rows = await self._fetch(
            f"""
            UPDATE recordings SET state = CASE WHEN state = 'downloading' THEN 'pending' ELSE state END,
                lease_owner=NULL, lease_until=NULL
            WHERE account=$1 AND (lease_owner=$2 OR state='downloading' AND lease_until < {NOW})
            RETURNING {ROW_COLUMNS}
            """, self._acct, self.owner)
        return [row_from(r) for r in rows if r["state"] == "pending"]

    async def retry_failed(self) -> int:
        scope, params = self._scope(2)
        done = await self._execute(
            f"UPDATE recordings SET state='pending', attempts=0, next_attempt_at=$1 WHERE {scope}state='failed'",
            time.time(), *params)
        return int(done.split()[-1])

    # ---- reports -----------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        scope, params = self._scope(1)
        for state, n in await self._fetch(f"SELECT state, count(*) FROM recordings WHERE {scope}true GROUP BY state",
                                          *params):
            out[str(state)] = n
        return out

    async def counts_by_account(self) -> dict[str, dict[str, int]]:
        return counts_by_account(await self._fetch(
            "SELECT account, state, count(*) FROM recordings GROUP BY account, state"))

    async def summary(self) -> dict[str, Any]:
        scope, params = self._scope(1)
        out: dict[str, Any] = await self.counts()
        out["total"] = sum(out[s] for s in STATES)
        rows = await self._fetch(
            f"SELECT id, tm_create, account FROM recordings WHERE {scope}state IN ('discovered', 'pending',"
            " 'downloading') ORDER BY tm_create LIMIT 1", *params)
        out["oldest_pending"] = dict(rows[0]) if rows else None
        out["last_error"] = await self._last_error()
        flags = dict.fromkeys(FLAGS, 0)
        for flag, n in await self._fetch(
            f"SELECT flag, count(*) FROM recordings WHERE {scope}flag IS NOT NULL GROUP BY flag", *params
        ):
            flags[str(flag)] = n
        out["archived_flagged"] = flags
        scope, params = self._scope(2)
        rows = await self._fetch(
            f"SELECT account, key, value FROM meta WHERE {scope}key = ANY($1::text[])", list(SUMMARY_META), *params)
        return {**out, **summary_meta(rows, self.account)}

    async def summaries(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """As ``StateDB.summaries``: five queries whatever the number of accounts."""
        counts = await self._fetch("SELECT account, state, count(*) FROM recordings GROUP BY account, state")
        oldest = await self._fetch(
            "SELECT DISTINCT ON (account) account, id, tm_create FROM recordings"
            " WHERE state IN ('discovered', 'pending', 'downloading') ORDER BY account, tm_create")
        flags = await self._fetch(
            "SELECT account, flag, count(*) FROM recordings WHERE flag IS NOT NULL GROUP BY account, flag")
        meta = await self._fetch("SELECT account, key, value FROM meta WHERE key = ANY($1::text[])", list(SUMMARY_META))
        return assemble_summaries(counts, oldest, flags, meta, await self._last_error())

    async def _last_error(self) -> dict[str, Any] | None:
        """The latest error of a recording still failed or waiting (this view's, or anyone's)."""
        scope, params = self._scope(1)
        rows = await self._fetch(
            f"SELECT id, state, last_error AS error, updated_at AS at, account FROM recordings WHERE {scope}"
            "last_error IS NOT NULL AND state IN ('failed', 'pending', 'discovered') ORDER BY updated_at DESC LIMIT 1",
            *params)
        return dict(rows[0]) if rows else None

    async def flagged(self, limit: int = 5) -> list[dict[str, Any]]:
        scope, params = self._scope(2)
        rows = await self._fetch(
            f"SELECT id, state, flag, flag_reason, account FROM recordings WHERE {scope}flag_reason IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT $1", limit, *params)
        return [dict(r) for r in rows]

    async def archived(self, batch: int = 1000) -> AsyncIterator[dict[str, Any]]:
        scope, params = self._scope(4)
        last = ("", "")
        while True:
            rows = await self._fetch(
                f"SELECT account, id, state, path, size, sha256, manifest_seq, plain_sha256 FROM recordings"
                f" WHERE {scope}"
                f"state IN ({STORED_SQL}) AND (account, id) > ($1, $2) ORDER BY account, id LIMIT $3",
                *last, batch, *params)
            if not rows:
                return
            for r in rows:
                yield dict(r)
            last = (rows[-1]["account"], rows[-1]["id"])
