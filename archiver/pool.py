"""The engine: walk the listing into SQLite, and a bounded pool of workers that polls and downloads.

Data flows one way: paginator -> ``State`` -> feeder -> bounded queue -> resolvers (poll,
signed URL) -> bounded queue -> ``concurrency`` download workers -> ``Downloader`` (the stream)
-> a store helper process (verify, fsync, rename; ``storepool``) -> a group commit in SQLite.
The feeder is the only reader of due work, and it never hands out a recording that is already
in flight, so a recording never has two downloads at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

import structlog

from .client import ApiClient
from .config import DEFAULT_ACCOUNT, Config
from .destinations import Destination
from .download import Downloader, remove_temporaries
from .errors import (
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
from .logs import redact
from .metrics import Metrics
from .model import KNOWN_STATUSES, parse_recording
from .paginate import walk_pages
from .retention import Pruner, StoreUsage, read_store, store_hint
from .state import Row, State
from .store import Archived
from .storepool import StorePool

log = structlog.get_logger("archiver.pool")
T = TypeVar("T")

WALKED_ELSEWHERE = -1  # _walk's answer when another daemon walks the account (a shared state)
SHUTDOWN_GRACE = 6.0  # seconds in-flight downloads get to finish on SIGTERM before they are abandoned


@dataclass(frozen=True)
class _Job:
    """A recording ready for a download worker: where it goes and its signed URL."""

    row: Row
    directory: Path
    url: str
    started: float


@dataclass
class RunResult:
    """What one backfill or service run did (this process only)."""

    stats: Counter[str] = field(default_factory=Counter)
    fatal: str = ""  # why the run stopped early, if it did
    auth_refused: bool = False  # the API refused the credential or the account (exit 3)
    refusal: str = ""  # the server's reason for that refusal (ACCOUNT_FROZEN, ...)
    walk_error: str = ""
    abandoned: int = 0  # in flight at the end (--wait over, or a stop), abandoned: still pending
    interrupted: str = ""  # the signal that stopped the run (SIGTERM, SIGINT), if one did
    state_unusable: bool = False  # the state database turned out damaged mid-run (exit 2)
    deletion_error: str = ""  # a backfill left deletions that were due undone: why (exit 1)
    deletions_left: int = 0  # due for deletion from the server at the end of a backfill, not deleted


class Engine:
    """One engine per process. ``backfill()`` returns when done; ``serve()`` when ``stop`` is set."""

    def __init__(
        self, cfg: Config, client: ApiClient, state: State, destination: Destination,
        store_pool: StorePool | None = None,
    ) -> None:
        """One account's engine: ``state`` is that account's view (``State.for_account``).
        Several engines (accounts) in one process share the destination and ``store_pool``,
        which their owner closes; without one, the engine has helpers of its own."""
        self.cfg = cfg
        self.client = client
        self.state = state
        self.account = state.account or DEFAULT_ACCOUNT
        if state.account is None:
            self.state = state = state.for_account(self.account)
        self.destination = destination
        self._owns_pool = store_pool is None
        self.store_pool = store_pool or StorePool(cfg.archive, cfg.workers.store_processes, state.lock_fds())
        self.downloader = Downloader(client, cfg.archive, self.store_pool, destination)
        self.workers_cfg = cfg.workers
        # due rows -> resolvers -> (row, signed URL) -> download workers; both queues bounded
        self.queue: asyncio.Queue[Row] = asyncio.Queue(maxsize=cfg.workers.concurrency * 2)
        self.downloads: asyncio.Queue[_Job] = asyncio.Queue(maxsize=cfg.workers.concurrency)
        self.in_flight: set[str] = set()
        self._recording: set[asyncio.Task[None]] = set()  # stored files whose commit is under way
        self._recorders = asyncio.Semaphore(cfg.workers.concurrency * 2)
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.result = RunResult()
        self.paused_until = 0.0
        self.mode: Literal["backfill", "run"] = "backfill"
        self.walk_done = False
        self.deadline = float("inf")
        self.metrics = Metrics()
        self.ready = asyncio.Event()  # set once recovered and working (systemd READY=1)
        self.pruner = Pruner(cfg, client, state, destination) if cfg.retention.delete_from_server else None
        self.no_delete = False  # backfill --no-delete: skip deletions for this run
        self._pruning: asyncio.Task[bool] | None = None
        self._grace_ends: float | None = None  # when in-flight downloads are abandoned (monotonic)
        self.store_usage: StoreUsage | None = None
        self.unwritable = ""  # why the archive or the state database cannot be written, while paused for it

    # ---- lifecycle ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """Start-up: rows a crash left ``downloading`` become ``pending``, temporaries go."""
        rows = await self.state.recover()
        for row in rows:
            await asyncio.to_thread(remove_temporaries, self.destination, row)
        if rows:
            log.info("recovered", rows=len(rows), reason="interrupted downloads reset to pending")

    def _bind_account(self) -> None:
        """With several accounts, every event of this engine's tasks says whose it is."""
        if len(self.cfg.accounts) > 1:
            structlog.contextvars.bind_contextvars(account=self.account)

    async def backfill(
        self, since: datetime | None = None, until: datetime | None = None, wait: float = 900.0
    ) -> RunResult:
        self.mode = "backfill"
        self._bind_account()
        await self.recover()
        await self._watch_store()
        workers = self._start_workers()
        feeder = asyncio.create_task(self._feed(), name="feeder")
        self.ready.set()
        try:
            try:
                walked = await self._walk_unless_stopped(full=True, since=since, until=until)
                if walked is not None and walked != WALKED_ELSEWHERE:
                    await self._succeeded()
            except (AuthRefused, LocalStorageError) as exc:
                await self._halt(exc)
            except (TransientError, RecordingRefused, RecordingGone, InvalidRecording) as exc:
                self.result.walk_error = redact(str(exc))
                log.error("walk_failed", error=self.result.walk_error, hint="the next run resumes from the checkpoint")
            self.walk_done = True
            self.deadline = time.time() + wait
            self.wake.set()
            await self._wait_first(feeder, wait)
            # the downloads under way finish (or the grace ends) before deletions, so every
            # recording archived by this run is due for deletion in this run, not the next
            await self._let_in_flight_finish()
            if self.pruner is not None and not self.no_delete and not self.stop.is_set():
                if await self._prune():  # deletions due run after the downloads
                    await self._count_deletions_left()
            if not self.stop.is_set():
                await self._watch_store()
        finally:
            await self._shutdown(feeder, workers)
        return self.result

    async def serve(self) -> RunResult:
        """The service: a cycle every ``poll_interval`` until ``self.stop`` is set."""
        self.mode = "run"
        self._bind_account()
        await self.recover()
        workers = self._start_workers()
        feeder = asyncio.create_task(self._feed(), name="feeder")
        self.ready.set()
        try:
            while not self.stop.is_set():
                await self.cycle()
                if self.pruner is not None and time.time() >= self.paused_until and (
                    self._pruning is None or self._pruning.done()
                ):
                    self._pruning = asyncio.create_task(self._prune(), name="pruner")
                await self._sleep_unless_stopped(self.workers_cfg.poll_interval)
        finally:
            await self._shutdown(feeder, workers)
        return self.result

    async def cycle(self) -> None:
        """One service cycle: a full walk when due (never completed, or rewalk interval), else
        an incremental walk from the newest page that stops at known recordings."""
        if time.time() < self.paused_until:
            return
        started = time.time()
        cpu = time.process_time()
        before = self.client.stats["requests"]
        try:
            if self.unwritable:  # paused for a full disk: what was cut short goes back to pending
                released = await self.state.release_downloading(self.in_flight)
                log.info("writable_again", was=self.unwritable, released=released)
                self.unwritable = ""
                self.metrics.unwritable.set(0)
            full = await self._full_walk_due()
            new = await self._walk_unless_stopped(full=full)
            if new is None or new == WALKED_ELSEWHERE:
                return  # stopped mid-walk (the checkpoint keeps its place), or not ours to walk
            await self.state.set_meta("last_cycle", str(time.time()))
            await self._succeeded()
            await self._watch_store()
        except (AuthRefused, LocalStorageError) as exc:
            await self._halt(exc)
            return
        except (TransientError, RecordingRefused, RecordingGone, InvalidRecording) as exc:
            log.error("cycle_walk_failed", error=redact(str(exc)))
            return
        except StateUnusable as exc:
            self._state_broken(str(exc))
            return
        except Exception:  # a bug must not stop the service: logged, and the next cycle tries again
            log.exception("cycle_unexpected_error")
            return
        try:
            counts = await self.state.counts()
        except LocalStorageError:  # the state database went away just now: the next cycle pauses on it
            counts = {}
        log.info(
            "cycle_done", full_walk=full, new=new, requests=self.client.stats["requests"] - before,
            seconds=round(time.time() - started, 3), cpu_seconds=round(time.process_time() - cpu, 4), **counts,
        )

    async def _full_walk_due(self) -> bool:
        if await self.state.walk_checkpoint("full") is not None:
            return True
        done = await self.state.get_meta("walk_done:full")
        interval = self.workers_cfg.full_rewalk_interval
        return done is None or (interval > 0 and time.time() - float(done) > interval)

    def _start_workers(self) -> list[asyncio.Task[None]]:
        n = self.workers_cfg.concurrency
        keeper = [asyncio.create_task(self._keep_leases(), name="leases")] if self.state.lease else []
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

    async def _wait_first(self, feeder: asyncio.Task[None], wait: float) -> None:
        """Until the feeder has nothing left, a stop, or the backfill's ``--wait`` is over: then
        the feeder stops once no due work is left to hand out (``_feed``), and whatever is still
        in flight (a slow ZIP build, a dripping transfer) is abandoned by ``_shutdown``."""
        stopper = asyncio.create_task(self.stop.wait())
        await asyncio.wait({feeder, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if self.in_flight and not self.stop.is_set():
            log.info("wait_over", wait_seconds=wait, in_flight=len(self.in_flight), grace_seconds=SHUTDOWN_GRACE)

    async def _shutdown(self, feeder: asyncio.Task[None], workers: list[asyncio.Task[None]]) -> None:
        """Stop taking work; let in-flight downloads finish briefly, then abandon them cleanly."""
        self.stop.set()
        feeder.cancel()
        if self._pruning is not None and not self._pruning.done():
            # the pruner stops between deletions once stop is set, and records what it deleted
            # before it returns; one still waiting past the grace is cancelled (an interrupted
            # deletion keeps its intent and is finished on the next start)
            await asyncio.wait({self._pruning}, timeout=SHUTDOWN_GRACE)
            self._pruning.cancel()
        await asyncio.gather(feeder, *([self._pruning] if self._pruning else []), return_exceptions=True)
        while not self.queue.empty():  # not started: back to the database as they were
            row = self.queue.get_nowait()
            self.in_flight.discard(row.id)
            self.queue.task_done()
        busy = [w for w in workers if not w.done()]
        await self._let_in_flight_finish()
        abandoned = self.result.abandoned = len(self.in_flight)
        for w in busy:
            w.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        await asyncio.gather(*self._recording, return_exceptions=True)  # files already stored: record them
        if self._owns_pool:
            await self.store_pool.close()  # after its last answer, no helper touches the archive
        else:
            await self.store_pool.drain(self.account)  # our requests answered: no helper touches ours
        # Every claimed row goes back to pending, including a batch the feeder claimed just as it
        # was cancelled; we are the only writer, and every task has stopped.
        try:
            await self.recover()
        except LocalStorageError as exc:
            log.error("rows_left_downloading", reason=redact(str(exc)), hint="reset to pending on the next start")
        if abandoned:
            log.info("shutdown_abandoned", recordings=abandoned, reason="will be downloaded on the next run")

    async def _let_in_flight_finish(self) -> None:
        """Wait for the downloads under way (and their commits) until none is left or the grace
        is over; the grace (``SHUTDOWN_GRACE``) runs from the first call, so a backfill that
        waited before its deletions does not wait again at shutdown."""
        if self._grace_ends is None:
            if self.in_flight:
                log.info("shutdown_waiting", in_flight=len(self.in_flight), grace_seconds=SHUTDOWN_GRACE)
            self._grace_ends = time.monotonic() + SHUTDOWN_GRACE
        while self.in_flight and time.monotonic() < self._grace_ends:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), self._grace_ends - time.monotonic())
            except TimeoutError:
                break

    async def _count_deletions_left(self) -> None:
        """A backfill after its deletion pass: what is still due was not deleted, and the summary
        and the exit code say so (a failed request, a copy that failed re-verification)."""
        assert self.pruner is not None
        try:
            left = await self.pruner.dry_run()
        except LocalStorageError:
            return  # the state went away: the run has already failed on it
        self.result.deletions_left = left.due
        if left.due and not self.result.deletion_error:
            self.result.deletion_error = f"{left.due} recording(s) due for deletion were not deleted"

    async def _watch_store(self) -> None:
        """How full the server's capped store is (``GET /storage_account``), for metrics and status."""
        retention = self.cfg.retention
        try:
            usage = await read_store(self.client, self.state, retention.store_capacity, retention.store_warn_ratio)
        except (AuthRefused, LocalStorageError) as exc:
            await self._halt(exc)
            return
        if usage is not None:
            self.store_usage = usage
            self.metrics.set_store(usage.size, usage.capacity)

    def store_near_full(self) -> bool:
        usage = self.store_usage
        return usage is not None and usage.ratio >= self.cfg.retention.store_warn_ratio

    async def _prune(self) -> bool:
        """Delete the server's copy of what is due (``retention.Pruner``); it yields to downloads
        by taking one token at a time from the shared bucket, one deletion after another. False
        when this daemon did not run the pass (another one prunes this account, or it failed)."""
        assert self.pruner is not None
        try:
            async with self.state.prune_lock() as mine:
                if not mine:
                    return False  # another daemon prunes this account now
                done = await self.pruner.run(self.stop)
        except (AuthRefused, LocalStorageError) as exc:
            await self._halt(exc)
            return False
        except Exception:  # a bug must not go unseen in a background task; intents stay for next time
            log.exception("prune_unexpected_error")
            self.result.deletion_error = self.result.deletion_error or "an unexpected error, see the log"
            return False
        if self.mode == "backfill" and (done.errors or done.refused):
            why = done.errors[0] if done.errors else f"{done.refused} archive copy(ies) failed re-verification"
            self.result.deletion_error = why
        self.result.stats["server_deleted"] += done.deleted + done.already_gone
        self.result.stats["delete_refused"] += done.refused
        self.metrics.server_deletions.inc(done.deleted + done.already_gone)
        self.metrics.deletion_refused.inc(done.refused)
        if done.refused:
            self.wake.set()  # what failed re-verification is pending again: download it
        return True

    async def _succeeded(self) -> None:
        """A walk went through: the API accepts us again, if it had refused us."""
        if self.metrics.refused:
            log.info("api_accepts_again", was=self.metrics.refused)
        self.metrics.cycle_succeeded()
        if await self.state.get_meta("api_refused") is not None:
            await self.state.delete_meta("api_refused")

    async def _halt(self, exc: AuthRefused | LocalStorageError) -> None:
        """Not any recording's fault: the API refuses us, or the archive or the state database
        cannot be written. A backfill stops; the service pauses and tries again later."""
        if isinstance(exc, AuthRefused):
            await self._refused(exc)
        else:
            self._fatal(str(exc))

    async def _refused(self, exc: AuthRefused) -> None:
        """The API refused the credential or the account, for every request alike: recorded
        for ``status``, then the run stops (backfill) or pauses (service)."""
        if self.metrics.refused != exc.reason:
            self.metrics.set_refused(exc.reason)
            record = {"reason": exc.reason, "http_status": exc.status, "message": redact(str(exc)),
                      "since": time.time()}
            await self.state.set_meta("api_refused", json.dumps(record))
        self.result.refusal = exc.reason
        self._fatal(str(exc), auth=True, event="account_refused" if exc.status == 403 else "credential_refused")

    def _fatal(self, reason: str, auth: bool = False, event: str = "archive_unwritable") -> None:
        """Backfill: stop the run. Service: pause taking work and say so loudly."""
        if self.mode == "run":
            self._trouble(reason, auth, event)
            return
        if not self.result.fatal:
            log.error("stopping", cause=event, reason=redact(reason))
        self.result.fatal = self.result.fatal or redact(reason)
        self.result.auth_refused = self.result.auth_refused or auth
        self.stop.set()

    def _state_broken(self, reason: str) -> None:
        """The state database is damaged: nothing more can be recorded, so stop, in both modes
        (exit 2: systemd does not restart into it)."""
        if not self.result.state_unusable:
            log.error("stopping", cause="state_unusable", reason=redact(reason))
        self.result.state_unusable = True
        self.result.fatal = self.result.fatal or redact(reason)
        self.stop.set()

    def _trouble(self, reason: str, auth: bool, event: str) -> None:
        pause = self.workers_cfg.trouble_pause
        if time.time() < self.paused_until - pause / 2:
            return  # already paused for this (many workers see the same refusal at once)
        self.paused_until = time.time() + pause
        self.result.auth_refused = self.result.auth_refused or auth
        if not auth:
            self.unwritable = redact(reason)
            self.metrics.unwritable.set(1)
        log.error(
            event, reason=redact(reason),
            paused_seconds=round(pause), hint="retrying slowly; nothing is counted against any recording"
            if auth else "free disk space or fix permissions (or bring the bucket or the state database back)",
        )

    # ---- the walk ----------------------------------------------------------------------------

    async def _walk_unless_stopped(
        self, full: bool, since: datetime | None = None, until: datetime | None = None
    ) -> int | None:
        """``_walk``, abandoned at once when ``stop`` is set (SIGTERM must not wait for a slow
        listing); None then. Each page is stored whole before the next is asked for."""
        walk = asyncio.ensure_future(self._walk(full, since, until))
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({walk, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if walk.done():
            return walk.result()
        walk.cancel()
        await asyncio.gather(walk, return_exceptions=True)
        log.info("walk_interrupted", hint="the next run resumes from the checkpoint")
        return None

    async def _walk(self, full: bool, since: datetime | None = None, until: datetime | None = None) -> int:
        """``_walk_pages`` unless another daemon walks this account now (a shared state): one
        walker per account; the others only download."""
        async with self.state.walk_lock() as mine:
            if not mine:
                log.debug("walk_skipped", reason="another daemon walks this account now")
                return WALKED_ELSEWHERE
            return await self._walk_pages(full, since, until)

    async def _walk_pages(self, full: bool, since: datetime | None = None, until: datetime | None = None) -> int:
        """Store listed recordings. Full walks checkpoint each page; incremental ones stop at
        known recordings (after ``overlap`` of them). Returns how many were new."""
        name = None
        start = ""
        if full:
            name = "full" if since is None and until is None else f"range:{since}:{until}"
            start = await self.state.walk_checkpoint(name) or ""
            if start:
                log.info("walk_resumed", walk=name)
        new_total = 0
        known_total = 0
        pages = 0
        async for page in walk_pages(self.client, self.cfg.api.page_size, start):
            pages += 1
            for raw_id, reason in page.rejected:
                self.result.stats["rejected"] += 1
                log.error("listing_item_rejected", recording_id=redact(raw_id), reason=reason)
            recs = page.recordings
            reached_since = since is not None and any(r.tm_create and r.tm_create < since for r in recs)
            if since is not None:
                recs = [r for r in recs if r.tm_create is None or r.tm_create >= since]
            if until is not None:
                recs = [r for r in recs if r.tm_create is None or r.tm_create < until]
            token = "" if reached_since else page.next_token
            # shielded: a stop mid-walk must not cut a page's transaction in two
            new, known = await asyncio.shield(self.state.store_page(recs, name, token))
            new_total += new
            self.result.stats["pages"] += 1
            self.result.stats["discovered"] += new
            if new:
                self.wake.set()
            if reached_since:
                break
            if not full:
                known_total += known
                if known_total >= self.workers_cfg.overlap or (page.raw_count and known == len(page.recordings)):
                    break
        if name is not None:
            await self.state.end_walk(name)
        log.debug("walk_done", full=full, pages=pages, new=new_total)
        return new_total

    # ---- feeder and workers ------------------------------------------------------------------

    async def _feed(self) -> None:
        """Hand due recordings to the workers; in backfill, finish when nothing is left to wait for.
        A state database that cannot be written pauses the run; the feeder waits it out."""
        while not self.stop.is_set():
            try:
                if await self._feed_once():
                    return
            except LocalStorageError as exc:
                self._fatal(str(exc))
                await self._sleep_unless_stopped(max(0.1, self.paused_until - time.time()))

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _feed_once(self) -> bool:
        """One round of the feeder; True when a backfill has nothing left to wait for."""
        self.wake.clear()
        now = time.time()
        free = self.queue.maxsize - self.queue.qsize()
        # refill in batches, not row by row: one query and one commit serve many rows; a
        # queue still three-quarters full is refilled when a worker finishes (self.wake)
        can_refill = free >= max(1, self.queue.maxsize // 4) and now >= self.paused_until
        if can_refill:
            rows = await self.state.due(now, free, self.in_flight)
            if rows:
                await self.state.claim([r.id for r in rows if r.state == "pending"])
                for row in rows:
                    self.in_flight.add(row.id)
                    self.queue.put_nowait(row)
                return False
        timeout = 1.0
        if can_refill:
            next_due = await self.state.next_due_time()
            if self.mode == "backfill" and self.walk_done:
                if not self.in_flight and (next_due is None or next_due > self.deadline):
                    return True
                if now >= self.deadline and self.queue.empty() and self.downloads.empty():
                    # --wait is over and nothing due is left to start: what is still running
                    # (a slow ZIP build, a dripping transfer) gets the shutdown grace
                    return True
            if next_due is not None:
                timeout = min(max(next_due - now, 0.01), 5.0)
        elif now < self.paused_until:
            timeout = min(self.paused_until - now, 5.0)
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            pass
        return False

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
                result = await self._guarded(row, self.downloader.archive(row, job.directory, job.url))
            finally:
                self.downloads.task_done()
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

    async def _prepare(self, row: Row) -> _Job | None:
        started = time.monotonic()
        if row.state == "discovered":
            polled = await self._poll(row)
            if polled is None:
                return None
            row = polled
        directory = self.downloader.directory(row)
        adopted = await self.downloader.adopt(row, directory)
        if adopted is not None:
            await self._archived(row, adopted, started)
            return None
        return _Job(row, directory, await self.client.recordingfile_url(row.id), started)

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
        )
        seconds = time.monotonic() - started
        self.result.stats[result.state] += 1
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
