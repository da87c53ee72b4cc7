"""The state: every step of every recording, recorded so a crash, ``kill -9`` or reboot loses
nothing. One interface, ``State``, two backends behind it:

* ``sqlite.StateDB``: one file beside the archive, one daemon per file (the embedded default);
* ``postgres.PgState``: one database shared by several daemons (``[state] url``), with leases,
  ``SKIP LOCKED`` claims, one walker and one pruner per account and a pace shared by all.

Callers (the engine, retention, the service, ``verify``, the CLI) see only ``State`` and the
shared types in ``base``; a difference between the backends (the deletion audit trail in a file
or in the database, a pace in this process or in the database, temporary names marked per
process or not) lives behind a method of the interface, never in a branch of a caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from ..calls import Call
from ..config import StateConfig
from ..model import Recording
from ..ratelimit import Grant
from ..storagefiles import StorageFile
from .base import (
    FLAGS,
    STATES,
    STORED,
    WAITING,
    FindQuery,
    ManifestDue,
    Row,
    empty_summary,
    unusable_message,
    waiting_count,
)
from .postgres import PgState
from .sqlite import StateDB

__all__ = [
    "FLAGS",
    "STATES",
    "STORED",
    "WAITING",
    "FindQuery",
    "PgState",
    "Row",
    "State",
    "StateDB",
    "empty_summary",
    "open_state",
    "unusable_message",
    "waiting_count",
]


class State(Protocol):
    """What the engine, retention, the service, ``verify`` and the CLI call on a state.

    A state opened by ``open_state`` reports over every account; ``for_account(name)`` is the
    view one account's engine works through (every row it reads or writes is that account's)."""

    account: str | None  # the view's account; None for the database as opened
    path: Path  # the SQLite file, or where S3 staging lives beside a PostgreSQL state
    lease: float  # seconds a claim lasts without renewal (``renew``); 0: claims never expire

    def for_account(self, account: str) -> State: ...

    @property
    def writer_tag(self) -> str:
        """A mark for this process's temporary names when other daemons write the same archive
        (a shared state), so that one never removes another's; "" for a single writer."""
        ...

    def pace(self, rate: float, burst: int) -> Grant | None:
        """Where the account's request budget is drawn: a grant shared by every daemon on this
        state, or None when this process's own token bucket is the pace."""
        ...

    def lock_fds(self) -> tuple[int, ...]:
        """File descriptors a child process must keep closed (the single-writer lock)."""
        ...

    async def close(self) -> None: ...

    # the walk
    def walk_lock(self, listing: str = "recordings") -> contextlib.AbstractAsyncContextManager[bool]:
        """Whether this process walks the account's ``listing`` (``recordings``, ``calls``) now."""
        ...
    async def store_page(self, recordings: list[Recording], walk: str | None, next_token: str) -> tuple[int, int]: ...
    async def walk_checkpoint(self, walk: str) -> str | None: ...
    async def end_walk(self, walk: str) -> None: ...

    # meta
    async def get_meta(self, key: str) -> str | None: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def delete_meta(self, key: str) -> None: ...

    # the feeder and the workers
    async def due(self, now: float, limit: int, exclude: set[str]) -> list[Row]: ...
    async def next_due_time(self) -> float | None: ...
    async def claim(self, ids: list[str]) -> None: ...
    async def renew(self, ids: set[str]) -> None: ...
    async def update(self, rec_id: str, **fields: Any) -> None: ...
    async def mark_archived(
        self, rec_id: str, path: str, size: int, sha256: str, server_hashes: str, members: int,
        state: str = "archived", flag: str = "", flag_reason: str = "", call_noted: bool = False,
        plain_sha256: str = "",
    ) -> None: ...
    async def release_downloading(self, in_flight: set[str]) -> int: ...
    async def recover(self) -> list[Row]: ...
    async def retry_failed(self) -> int: ...

    # calls: who spoke to whom (``GET /calls``), for the sidecar and for ``find``
    async def store_calls(self, calls: list[Call], walk: str | None, next_token: str) -> tuple[int, int]:
        """Store a page of calls (new, changed) and checkpoint the walk in one transaction:
        (new, unchanged)."""
        ...

    async def call_of(self, call_id: str) -> dict[str, Any] | None: ...

    async def store_storage_files(self, files: list[StorageFile], walk: str | None,
                                  next_token: str) -> tuple[int, int]:
        """A page of ``GET /storage_files`` (a recording's files only) and the walk's checkpoint,
        in one transaction; returns (new, already known)."""
        ...

    async def storage_files_of(self, rec_id: str) -> list[dict[str, Any]]:
        """The listed files of ``rec_id`` (id, filename, filesize, url, expires_at)."""
        ...

    async def storage_strangers(self, limit: int, listed_before: float) -> list[dict[str, Any]]:
        """Listed files created before ``listed_before`` naming no recording the state knows,
        each returned once."""
        ...

    async def calls_to_note(self, limit: int) -> list[dict[str, Any]]:
        """Stored recordings whose call was listed only after their sidecar was written."""
        ...

    async def mark_call_noted(self, ids: list[str]) -> None: ...

    async def transcripts_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Stored recordings whose transcripts are to be fetched (``[archive] transcripts``)."""
        ...

    async def mark_transcript(self, rec_id: str, state: str | None, due_at: float | None = None) -> None:
        """``done`` (stored), ``none`` (there are none), or None with ``due_at``: ask again then."""
        ...

    async def find(self, query: FindQuery) -> list[dict[str, Any]]:
        """Recordings matching ``query`` with their calls (the columns of ``base.find_columns``),
        oldest first: the state alone answers, never the API or the archive."""
        ...

    async def find_json(self, query: FindQuery, key_prefix: str = "") -> list[str]:
        """``find``'s rows as the JSON lines ``find --json`` prints, each made by the database."""
        ...

    # the signed manifest (manifestwriter.py): one writer per account
    def manifest_lock(self) -> contextlib.AbstractAsyncContextManager[bool]: ...

    async def manifest_due(self, limit: int) -> ManifestDue:
        """What no segment lists yet, oldest first, at most ``limit`` of each kind."""
        ...

    async def mark_manifested(self, seq: int, head: str, archived: list[tuple[str, str | None]],
                              deleted: list[str], hold_events: list[int] | None = None) -> None:
        """Segment ``seq`` (now durable in the archive) lists ``archived`` ((id, SHA-256) of a
        recording stored, expired or erased: a row changed since, with another SHA-256, stays
        due), ``deleted`` and ``hold_events``; ``head`` (JSON) becomes the chain's head (meta
        ``manifest_head``). One transaction."""
        ...

    # keeping and letting go (policy.py): holds, expiry, erasure
    def policy_lock(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """Whether this process removes the account's recordings now (one daemon at a time)."""
        ...

    async def change_holds(self, ids: list[str], hold: bool, reason: str, audit: dict[str, str]) -> list[str]:
        """Hold (or release) the known recordings of ``ids`` not already so; each change gets
        its line of ``audit`` in the archive's audit trail (``archive-audit.jsonl`` beside
        SQLite, the table ``archive_audit`` in PostgreSQL) and an event for the manifest.
        Returns the ids changed."""
        ...

    async def holds(self) -> list[dict[str, Any]]: ...

    async def removal_rows(self, ids: list[str]) -> list[dict[str, Any]]:
        """``base.REMOVAL_COLUMNS`` of each known recording of ``ids`` (``erase``)."""
        ...

    async def expirable(self, before: float, limit: int, after: str = "") -> list[dict[str, Any]]:
        """Stored recordings that started before ``before``, held or not (the caller says why
        one is kept), by id from after ``after`` (a pass pages through them once)."""
        ...

    async def removal_intents(self) -> list[dict[str, Any]]:
        """Recordings whose removal began and was not recorded done (a crash in between)."""
        ...

    async def mark_removal_intent(self, ids: list[str], why: str, reason: str) -> None:
        """The removal (``expired``, ``erased``) of ``ids`` begins, for ``reason``."""
        ...

    async def mark_removed(self, rows: list[tuple[str, str, str]], audit: list[str]) -> None:
        """(id, ``expired`` or ``erased``, reason) of each removed recording, after its audit
        line is durable in the trail: one transaction; the recording is never downloaded again."""
        ...

    # deleting the server's copy (retention.py)
    def prune_lock(self) -> contextlib.AbstractAsyncContextManager[bool]: ...
    async def deletable(self, before: float, include_flagged: bool, limit: int) -> list[dict[str, Any]]: ...
    async def deletable_totals(self, before: float, include_flagged: bool) -> tuple[int, int]: ...
    async def delete_intents(self) -> list[str]: ...
    async def server_deleted(self, ids: list[str]) -> list[tuple[str, float | None]]: ...

    async def audited(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` already have a line in the deletion audit trail (after a crash
        between the line and the commit)."""
        ...

    async def mark_server_deleted(self, rows: list[tuple[float, str, str]], audit: list[str]) -> None:
        """Commit (deleted_at, request id, recording id) of each, after appending its audit line
        (JSON) to the trail durably: a file beside SQLite, a table in PostgreSQL."""
        ...

    async def deletion_summary(self, before: float, include_flagged: bool) -> dict[str, Any]: ...

    # reports (status, metrics, verify)
    async def counts(self) -> dict[str, int]: ...
    async def counts_by_account(self) -> dict[str, dict[str, int]]: ...
    async def summary(self) -> dict[str, Any]: ...
    async def summaries(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]: ...
    async def flagged(self, limit: int = 5) -> list[dict[str, Any]]: ...
    def archived(self, batch: int = 1000) -> AsyncIterator[dict[str, Any]]: ...


async def open_state(cfg: StateConfig, *, readonly: bool = False) -> State:
    """The state the config names: SQLite at ``database``, or PostgreSQL at ``url``, which
    several daemons share."""
    if cfg.url:
        return await PgState.open(cfg, readonly=readonly)
    return await StateDB.open(cfg.database, readonly=readonly)
