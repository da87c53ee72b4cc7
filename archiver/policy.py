"""Keeping recordings exactly as long as policy says: legal holds, expiry, erasure.

* ``[archive] keep_days = N`` (0: forever): ``expire`` (and the service, once a day) removes
  recordings that started more than N days ago, with their sidecars and notes, from the directory
  or (every version) from the bucket once Object Lock allows it;
* ``hold add`` / ``hold remove``: a held recording is never removed (in a bucket the hold is
  also the S3 legal hold on each version);
* ``erase ID --reason``: one recording removed early (a data subject's request), refused under a
  hold or a lock.

Each removal, in this order, so that a crash anywhere repeats the removal and loses no line:
1. the intent in the state (``remove_intent``, with the reason);
2. the files removed (what is already gone is no error);
3. its line appended to the audit trail, durably, and the state ``expired`` or ``erased``, in one
   step (``mark_removed``); from then on it is never downloaded again;
4. an entry in the next manifest segment (``manifestwriter``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from .destinations import Destination
from .errors import ArchiverError
from .logs import redact
from .state import State

log = structlog.get_logger("archiver.policy")

BATCH = 200  # recordings read per round of ``expire``
EXPIRE_EVERY = 86400.0  # the service expires what is due this often


@dataclass
class PolicyResult:
    removed: int = 0
    due: int = 0
    held: int = 0  # due, kept: under a legal hold
    locked: int = 0  # due, kept: the bucket's Object Lock does not allow it yet
    errors: list[str] = field(default_factory=list)


class Policy:
    """One account's holds and removals (``state`` is that account's view)."""

    def __init__(self, state: State, destination: Destination, keep_days: int) -> None:
        self.state = state
        self.destination = destination
        self.keep_days = keep_days
        self.account = state.account or ""

    # ---- holds --------------------------------------------------------------------------------

    async def hold(self, ids: list[str], reason: str) -> list[str]:
        """Hold each known recording of ``ids``; returns those newly held. In a bucket the S3
        legal hold goes on first: a crash between leaves more protection, never less."""
        rows = await self.state.removal_rows(ids)
        for row in rows:
            if row["state"] in ("archived", "no_audio"):
                await self.destination.set_legal_hold(row, True)
        changed = await self.state.change_holds([r["id"] for r in rows], True, reason,
                                                self._audit(rows, "held", reason))
        for rec_id in changed:
            log.info("held", recording_id=rec_id, reason=reason)
        return changed

    async def release(self, ids: list[str], reason: str) -> list[str]:
        """Release each held recording of ``ids``: the state first, then the S3 legal hold."""
        rows = await self.state.removal_rows(ids)
        changed = await self.state.change_holds([r["id"] for r in rows], False, reason,
                                                self._audit(rows, "released", reason))
        for row in rows:
            if row["id"] in changed and row["state"] in ("archived", "no_audio"):
                await self.destination.set_legal_hold(row, False)
            if row["id"] in changed:
                log.info("released", recording_id=row["id"], reason=reason)
        return changed

    # ---- removals -----------------------------------------------------------------------------

    async def expire(self, dry_run: bool = False, stop: asyncio.Event | None = None) -> PolicyResult:
        """Remove what started more than ``keep_days`` ago (none with ``keep_days`` 0); held and
        locked ones are counted and kept. Interrupted removals are finished first."""
        result = PolicyResult()
        if not dry_run:
            await self._finish_interrupted(result)
        if not self.keep_days:
            return result
        before = time.time() - self.keep_days * 86400
        after = ""
        while not (stop and stop.is_set()):
            rows = await self.state.expirable(before, BATCH, after)
            if not rows:
                break
            after = rows[-1]["id"]
            for row in rows:
                result.due += 1
                if row["held"]:
                    result.held += 1
                    continue
                blocked = await self.destination.removal_blocked(row)
                if blocked:
                    result.locked += 1
                    log.info("expiry_kept", recording_id=row["id"], reason=blocked)
                    continue
                if not dry_run:
                    await self._remove(row, "expired", f"keep_days = {self.keep_days}", result)
                if stop and stop.is_set():
                    break
        if result.due:
            log.info("expire_done", due=result.due, removed=result.removed, held=result.held, locked=result.locked,
                     dry_run=dry_run)
        return result

    async def erase(self, rec_id: str, reason: str) -> str | None:
        """Remove one recording now; "" when done, why it was refused, or None when this account
        has no such recording."""
        await self._finish_interrupted(PolicyResult())
        rows = await self.state.removal_rows([rec_id])
        if not rows:
            return None
        row = rows[0]
        if row["state"] in ("expired", "erased"):
            return f"{rec_id}: already {row['state']}"
        if row["state"] not in ("archived", "no_audio"):
            return f"{rec_id}: not in the archive ({row['state']}); nothing to erase"
        if row["held"]:
            return f"{rec_id}: under a legal hold; release it first (`hold remove {rec_id} --reason ...`)"
        blocked = await self.destination.removal_blocked(row)
        if blocked:
            return f"{rec_id}: still locked: {blocked}"
        await self._remove(row, "erased", reason, PolicyResult())
        return ""

    async def _finish_interrupted(self, result: PolicyResult) -> None:
        for row in await self.state.removal_intents():
            log.info("removal_resumed", recording_id=row["id"], removal=row["remove_intent"])
            await self._remove(row, row["remove_intent"], row.get("removed_reason") or "", result, resumed=True)

    async def _remove(self, row: dict[str, Any], why: str, reason: str, result: PolicyResult,
                      resumed: bool = False) -> None:
        try:
            if not resumed:
                await self.state.mark_removal_intent([row["id"]], why, reason)
            await self.destination.remove(row)
            line = self._audit([row], why, reason)[row["id"]]
            await self.state.mark_removed([(row["id"], why, reason)], [line])
        except ArchiverError as exc:
            result.errors.append(f"{row['id']}: {redact(str(exc))}")
            log.error("removal_failed", recording_id=row["id"], removal=why, error=redact(str(exc)),
                      hint="the intent stays: finished by the next expire or start")
            return
        result.removed += 1
        log.info(why, recording_id=row["id"], path=row["path"], reason=reason)

    def _audit(self, rows: list[dict[str, Any]], event: str, reason: str) -> dict[str, str]:
        at = datetime.now(UTC).isoformat()
        return {r["id"]: json.dumps({
            "event": event, "account": self.account, "recording_id": r["id"], "path": r["path"],
            "sha256": r["sha256"], "size": r["size"], "reason": reason, "at": at,
            "archive": self.destination.location(),
        }, sort_keys=True) for r in rows}
