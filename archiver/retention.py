"""Free the server's capped store once the archive copy is safe, and watch how full it is.

VoIPbin keeps at most 10 GB of files per customer; past that, every new recording is stored
with no audio at all, for good. With ``[retention] delete_from_server = true`` a recording that
is ``archived`` complete (and, with ``delete_incomplete``, one kept flagged) is deleted from the
server ``delete_after`` seconds after it was archived, one at a time through the shared token
bucket, each step recorded so a crash anywhere repeats no deletion and loses no audit line:

1. re-verify the archive copy (the destination's ``check``: size and SHA-256 of the file against
   SQLite and the sidecar; for a bucket, a HEAD of size and checksum); a failure never deletes:
   the recording goes back to ``pending``;
2. record the intent in SQLite (``delete_intent_at``);
3. ``DELETE /recordings/{id}``; a ``404`` means it is already gone (a retry after a crash);
4. note it beside the archive copy (a directory's sidecar is rewritten atomically with
   ``server_copy``; a locked bucket's objects are never rewritten, the audit trail says it);
5. append one line per deletion to the audit trail, durably, per batch (the state keeps it:
   ``deletions.jsonl`` beside SQLite, the table ``deletions`` in PostgreSQL);
6. commit ``server_deleted_at`` and the request id.

After a crash, rows with an intent and no commit are taken up first; the trail is asked once
which of them it already holds, so each deletion has exactly one audit line.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from .client import ApiClient
from .config import Config
from .destinations import Destination
from .errors import ArchiverError, AuthRefused
from .logs import redact
from .state import State

log = structlog.get_logger("archiver.retention")

BATCH = 20  # deletions per audit fsync and SQLite commit


@dataclass
class PruneResult:
    deleted: int = 0
    already_gone: int = 0  # a 404: deleted before (a retry after a crash)
    refused: int = 0  # the archive copy failed re-verification: not deleted, back to pending
    due: int = 0
    due_bytes: int = 0
    errors: list[str] = field(default_factory=list)


class Pruner:
    """Deletes the server's copy of recordings whose archive copy is safe (see the module doc)."""

    def __init__(self, cfg: Config, client: ApiClient, state: State, destination: Destination) -> None:
        self.cfg = cfg.retention
        self.client = client
        self.state = state
        self.destination = destination
        self._audited: set[str] | None = None  # ids already in the audit trail, asked once after a crash

    def _before(self) -> float:
        return time.time() - self.cfg.delete_after

    async def due(self, limit: int) -> list[dict[str, Any]]:
        return await self.state.deletable(self._before(), self.cfg.delete_incomplete, limit)

    async def dry_run(self) -> PruneResult:
        count, size = await self.state.deletable_totals(self._before(), self.cfg.delete_incomplete)
        return PruneResult(due=count, due_bytes=size)

    async def run(self, stop: asyncio.Event) -> PruneResult:
        """Delete everything due now, batch by batch, until none is left or ``stop`` is set.
        ``AuthRefused`` propagates (the engine pauses or stops); other API errors end this run
        with the recordings still due (and any intent kept for the next run)."""
        result = PruneResult()
        interrupted = await self.state.delete_intents()
        if interrupted and self._audited is None:
            self._audited = await self.state.audited(interrupted)
        while not stop.is_set():
            batch = await self.due(BATCH)
            if not batch:
                break
            done: list[tuple[dict[str, Any], str, int]] = []
            try:
                for row in batch:
                    if stop.is_set():
                        break
                    outcome = await self._delete(row, result)
                    if outcome is not None:
                        done.append((row, *outcome))
            except AuthRefused:
                raise
            except ArchiverError as exc:
                result.errors.append(redact(str(exc)))
                log.error("server_delete_failed", error=redact(str(exc)), hint="retried on the next run")
                break
            finally:
                if done:
                    await self._record(done)
        if result.deleted or result.already_gone or result.refused:
            log.info("prune_done", deleted=result.deleted, already_gone=result.already_gone, refused=result.refused)
        return result

    async def _delete(self, row: dict[str, Any], result: PruneResult) -> tuple[str, int] | None:
        """Steps 1-4 for one recording; returns (request id, HTTP status) once deleted."""
        problems = await self.destination.check(row)
        if problems:
            result.refused += 1
            reason = "archive copy failed re-verification before deleting the server's copy: " + "; ".join(problems)
            await self.state.update(row["id"], state="pending", attempts=0, next_attempt_at=time.time(),
                                    last_error=reason, delete_intent_at=None)
            log.error("server_delete_refused", recording_id=row["id"], reason=reason,
                      action="not deleted; downloaded again while the server still has it")
            return None
        if row["delete_intent_at"] is None:
            await self.state.update(row["id"], delete_intent_at=time.time())
        status, request_id = await self.client.delete_recording(row["id"])
        if status == 404:
            result.already_gone += 1
        else:
            result.deleted += 1
        await self.destination.note_server_deleted(row, request_id, status)
        log.info("server_copy_deleted", recording_id=row["id"], http_status=status, request_id=request_id)
        return request_id, status

    async def _record(self, done: list[tuple[dict[str, Any], str, int]]) -> None:
        """Steps 5-6 for a batch: the audit lines (one fsync), then one commit."""
        now = time.time()
        lines = []
        for row, request_id, status in done:
            if self._audited is not None and row["id"] in self._audited:
                continue  # written before a crash
            lines.append(json.dumps({
                "time": datetime.fromtimestamp(now, UTC).isoformat(), "recording_id": row["id"],
                "account": self.state.account,
                "sha256": row["sha256"], "size": row["size"], "path": row["path"],
                "archive": self.destination.location(), "request_id": request_id, "http_status": status,
            }, sort_keys=True))
        marks = [(now, request_id, row["id"]) for row, request_id, _ in done]
        await self.state.mark_server_deleted(marks, lines)


@dataclass
class StoreUsage:
    size: int
    count: int
    capacity: int
    at: float

    @property
    def ratio(self) -> float:
        return self.size / self.capacity if self.capacity else 0.0


async def read_store(client: ApiClient, state: State, capacity: int, warn_ratio: float) -> StoreUsage | None:
    """``GET /storage_account``: record the usage for ``status`` and warn when it is nearly full."""
    try:
        body = await client.storage_account()
        size, count = body["total_file_size"], body.get("total_file_count", 0)
        if not isinstance(size, int) or not isinstance(count, int):
            raise TypeError("total_file_size or total_file_count is not a number")
    except AuthRefused:
        raise
    except (ArchiverError, KeyError, TypeError, AttributeError) as exc:
        log.info("server_store_unknown", reason=redact(str(exc))[:200])
        return None
    usage = StoreUsage(size, count, capacity, time.time())
    await state.set_meta("server_store", json.dumps(
        {"size": size, "count": count, "capacity": capacity, "at": usage.at}
    ))
    if usage.ratio >= warn_ratio:
        log.warning("server_store_near_full", used_bytes=size, capacity_bytes=capacity,
                    percent=round(100 * usage.ratio, 1), hint=store_hint())
    return usage


def store_hint() -> str:
    return ("past the cap, every new recording is stored with no audio, for good; set [retention] "
            "delete_from_server = true to free the server's copy of what is archived")
