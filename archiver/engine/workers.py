"""The workers: resolvers (poll, adopt, the signed URL ahead) and download workers (stream,
verify, store), each outcome recorded."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import replace

import structlog

from ..errors import (
    AuthRefused,
    InvalidRecording,
    LocalStorageError,
    NotReady,
    RecordingGone,
    RecordingRefused,
    StateUnusable,
    TransientError,
    VerificationError,
)
from ..logs import redact
from ..model import KNOWN_STATUSES, parse_recording
from ..retention import store_hint
from ..state import Row
from ..store import Archived
from .base import EngineParts, Job, T

log = structlog.get_logger("archiver.engine")


class Workers(EngineParts):
    """Stage 1 (resolvers) and stage 2 (``concurrency`` download workers), retries and outcomes."""

    def _start_workers(self) -> list[asyncio.Task[None]]:
        n = self.workers_cfg.concurrency
        keeper = [asyncio.create_task(self._keep_leases(), name="leases")] if self.state.lease else []
        if self.client.cfg.storage_listing:
            keeper.append(asyncio.create_task(self._rewalk_files(), name="storage-rewalks"))
        return keeper + [asyncio.create_task(self._resolver(), name=f"resolver-{i}") for i in range(n)] + [
            asyncio.create_task(self._downloader(), name=f"downloader-{i}") for i in range(n)
        ]

    async def _keep_leases(self) -> None:
        """A shared state: renew the leases of what is in flight every third of ``lease``, so
        no other daemon takes over a slow transfer; a failed renewal is tried again next time."""
        while True:
            await asyncio.sleep(self.state.lease / 3)
            try:
                await self.state.renew(set(self.in_flight))
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                log.warning("lease_renewal_failed", error=redact(str(exc)))

    async def _resolver(self) -> None:
        """Stage 1: poll what has not ended, adopt what is already on disk, and fetch the signed
        URL ahead, so the download workers always have the next transfer ready."""
        while True:
            row = await self.queue.get()
            job = None
            try:
                job = await self._guarded(row, self._prepare(row))
            finally:
                self.queue.task_done()
                if job is None:
                    self._done(row)
            if job is not None:
                await self.downloads.put(job)

    async def _downloader(self) -> None:
        """Stage 2: ``concurrency`` of these, so at most that many transfers run at once; each
        verifies and stores its file before the next. Recording a stored file in SQLite (a group
        commit) is handed to a task of its own; the row stays in flight until it is committed."""
        while True:
            job = await self.downloads.get()
            row = job.row
            result = None
            try:
                result = await self._guarded(row, self.downloader.archive(row, job.directory, job.url or None,
                                                                          job.listed))
            finally:
                self.downloads.task_done()
                if job.listed and row.id in self.downloader.listing_failed:  # it fell back in this attempt
                    self._fell_back("download")
                if result is None:
                    self._done(row)
            if result is not None:
                await self._recorders.acquire()
                task = asyncio.create_task(self._record(row, result, job.started))
                self._recording.add(task)
                task.add_done_callback(self._recording.discard)

    async def _record(self, row: Row, result: Archived, started: float) -> None:
        try:
            await self._guarded(row, self._archived(row, result, started))
        finally:
            self._recorders.release()
            self._done(row)

    def _done(self, row: Row) -> None:
        self.in_flight.discard(row.id)
        self.wake.set()

    async def _prepare(self, row: Row) -> Job | None:
        started = time.monotonic()
        if row.state == "discovered":
            polled = await self._poll(row)
            if polled is None:
                return None
            row = polled
        if self.cfg.archive.call_metadata:
            row = replace(row, call=await self._call_block(row))
        directory = self.downloader.directory(row)
        adopted = await self.downloader.adopt(row, directory)
        if adopted is not None:
            await self._archived(row, adopted, started)
            return None
        listed = await self._listed_files(row)
        if listed:  # from storage, no API request: its URLs are in the listing
            return Job(row, directory, "", started, listed)
        return Job(row, directory, await self.client.recordingfile_url(row.id), started)

    async def _guarded(self, row: Row, work: Awaitable[T]) -> T | None:
        """Run one stage for ``row``; every outcome but success is recorded here. Recording it
        can fail too (the state database's disk is full): that pauses the run, and the worker
        lives on; the row is released once the database can be written again."""
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every outcome is handled in _outcome
            try:
                await self._outcome(row, exc)
            except StateUnusable as broken:
                self._state_broken(str(broken))
            except LocalStorageError as unwritable:
                self._fatal(str(unwritable))
            except Exception:  # a bug must not kill the worker
                log.exception("outcome_not_recorded", recording_id=row.id)
        return None

    async def _outcome(self, row: Row, error: Exception) -> None:
        """What a failed stage means for the recording, recorded in SQLite."""
        try:
            raise error
        except StateUnusable:
            raise
        except NotReady as exc:
            delay = self._backoff(row.polls, self.workers_cfg.poll_backoff_min, self.workers_cfg.poll_backoff_max)
            await self.state.update(row.id, state="pending", polls=row.polls + 1, next_attempt_at=time.time() + delay)
            self.result.stats["not_ready"] += 1
            self.metrics.retries.labels("not_ready").inc()
            log.info("not_ready", recording_id=row.id, reason=str(exc), retry_in=round(delay, 1))
        except RecordingGone as exc:
            await self._finish(row, "skipped", f"deleted: {exc}")
        except (RecordingRefused, InvalidRecording) as exc:
            await self._finish(row, "failed", str(exc))
        except (TransientError, VerificationError) as exc:
            kind = "verification" if isinstance(exc, VerificationError) else "transient"
            await self._retry_later(row, str(exc), kind)
        except (AuthRefused, LocalStorageError) as exc:
            # not the recording's fault: no attempt counted, retryable as soon as we can work again
            try:
                await self.state.update(row.id, state=_waiting_state(row), next_attempt_at=time.time())
            except LocalStorageError:
                pass  # the database is what is full: release_downloading() frees the row later
            await self._halt(exc)
        except Exception as exc:  # a bug must not kill the worker or lose the row
            log.error("unexpected_error", recording_id=row.id, error=f"{type(exc).__name__}: {exc}",
                      exc_info=exc)
            await self._retry_later(row, f"unexpected {type(exc).__name__}: {exc}", "unexpected")

    async def _archived(self, row: Row, result: Archived, started: float) -> None:
        await self.state.mark_archived(
            row.id, result.rel_path, result.size, result.sha256,
            ",".join(f"{k}={v}" for k, v in result.server_hashes.items()), result.members,
            result.state, result.flag, result.flag_reason,
            call_noted=bool(row.call and row.call.get("id")) and not result.adopted, plain_sha256=result.plain_sha256,
        )
        seconds = time.monotonic() - started
        self.result.stats[result.state] += 1
        if result.via:
            self.result.stats[f"via_{result.via}"] += 1
        if result.flag:
            self.result.stats[f"archived_{result.flag}"] += 1
        if result.state == "no_audio":
            self.metrics.no_audio.inc()
            if self.store_near_full():
                log.error("no_audio_store_full", recording_id=row.id, hint=store_hint(),
                          server_store_percent=round(100 * self.store_usage.ratio, 1) if self.store_usage else None)
        else:
            self.result.stats["bytes"] += result.size
            self.metrics.archived.inc()
            if result.via:
                self.metrics.fetched.labels(result.via).inc()
            self.metrics.bytes.inc(result.size)
            self.metrics.files.inc(result.members)
            self.metrics.download_seconds.observe(seconds)
        (log.warning if result.state == "no_audio" else log.info)(
            result.state, recording_id=row.id, attempt=row.attempts + 1, bytes=result.size, members=result.members,
            seconds=round(seconds, 3), path=result.rel_path, adopted=result.adopted, flag=result.flag or None,
            reason=result.flag_reason if result.state == "no_audio" else None,
        )

    async def _poll(self, row: Row) -> Row | None:
        """``GET /recordings/{id}`` for a recording not ended yet; returns it claimed once ended.
        ``pending_timeout`` is judged on this answer, not the listing's: a recording the listing
        showed as recording may have ended since."""
        raw = await self.client.get_recording(row.id)
        rec = parse_recording(raw)
        if rec.id != row.id:
            raise InvalidRecording(f"detail answer is for another id {rec.id}")
        if rec.deleted:
            raise RecordingGone("tm_delete is set")
        self.result.stats["polls"] += 1
        if not rec.ended:
            if rec.status not in KNOWN_STATUSES:
                log.warning("unknown_status", recording_id=row.id, status=rec.status[:40])
            timeout = self.workers_cfg.pending_timeout
            if row.tm_create is not None and time.time() > row.tm_create + timeout:
                await self._finish(row, "failed", f"did not end within pending_timeout ({timeout:.0f} s)")
                return None
            delay = self._backoff(row.polls, self.workers_cfg.poll_backoff_min, self.workers_cfg.poll_backoff_max)
            await self.state.update(
                row.id, raw=raw, status=rec.status, polls=row.polls + 1, next_attempt_at=time.time() + delay
            )
            return None
        tm_end = rec.tm_end.timestamp() if rec.tm_end else None
        await self.state.update(row.id, state="downloading", raw=raw, status=rec.status, tm_end=tm_end, polls=0)
        return replace(row, state="downloading", raw=raw, polls=0, tm_end=tm_end)  # the account kept

    async def _finish(self, row: Row, state: str, reason: str) -> None:
        reason = redact(reason)
        await self.state.update(row.id, state=state, last_error=reason)
        self.result.stats[state] += 1
        (log.warning if state == "skipped" else log.error)(
            state, recording_id=row.id, attempt=row.attempts + 1, reason=reason
        )

    async def _retry_later(self, row: Row, reason: str, kind: str) -> None:
        reason = redact(reason)
        self.metrics.retries.labels(kind).inc()
        attempts = row.attempts + 1
        if attempts >= self.workers_cfg.max_attempts:
            await self.state.update(row.id, attempts=attempts)
            await self._finish(row, "failed", f"gave up after {attempts} attempts: {reason}")
            return
        delay = self._backoff(attempts - 1, self.workers_cfg.retry_backoff_min, self.workers_cfg.retry_backoff_max)
        await self.state.update(
            row.id, state=_waiting_state(row), attempts=attempts, last_error=reason, next_attempt_at=time.time() + delay
        )
        self.result.stats["retries"] += 1
        log.warning("retry_scheduled", recording_id=row.id, attempt=attempts, reason=reason, retry_in=round(delay, 1))

    @staticmethod
    def _backoff(n: int, low: float, high: float) -> float:
        """``low`` doubling to ``high``, with a little jitter so retries do not march in step."""
        return float(min(high, low * (2 ** min(n, 30))) * random.uniform(0.9, 1.0))


def _waiting_state(row: Row) -> str:
    """The state a recording waits in: not ended yet, or ended and due for download."""
    return "discovered" if row.state == "discovered" else "pending"
