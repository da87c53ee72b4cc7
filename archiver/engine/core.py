"""The engine: walk the listing into SQLite, and a bounded pool of workers that polls and downloads.

Data flows one way: paginator -> ``State`` -> feeder -> bounded queue -> resolvers (poll,
signed URL) -> bounded queue -> ``concurrency`` download workers -> ``Downloader`` (the stream)
-> a store helper process (verify, fsync, rename; ``storepool``) -> a group commit in SQLite.
The feeder is the only reader of due work, and it never hands out a recording that is already
in flight, so a recording never has two downloads at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Literal

import structlog

from ..client import ApiClient
from ..config import DEFAULT_ACCOUNT, Config
from ..destinations import Destination
from ..download import Downloader, remove_temporaries
from ..errors import (
    AuthRefused,
    InvalidRecording,
    LocalStorageError,
    RecordingGone,
    RecordingRefused,
    StateUnusable,
    TransientError,
)
from ..logs import redact
from ..metrics import Metrics
from ..retention import Pruner, StoreUsage, read_store
from ..state import Row, State
from ..storepool import StorePool
from .base import SHUTDOWN_GRACE, WALKED_ELSEWHERE, EngineParts, Job, RunResult, WalkProgress
from .calls import CallWalker
from .feeder import Feeder
from .storage import StorageWalker
from .transcripts import Transcripts
from .walker import Walker
from .workers import Workers

log = structlog.get_logger("archiver.engine")


class Engine(Walker, CallWalker, StorageWalker, Transcripts, Feeder, Workers, EngineParts):
    """One engine per account. ``backfill()`` returns when done; ``serve()`` when ``stop`` is set."""

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
        self.downloads: asyncio.Queue[Job] = asyncio.Queue(maxsize=cfg.workers.concurrency)
        self.in_flight: set[str] = set()
        self._recording: set[asyncio.Task[None]] = set()  # stored files whose commit is under way
        self._recorders = asyncio.Semaphore(cfg.workers.concurrency * 2)
        self.wake = asyncio.Event()
        self.calls_progress = WalkProgress()
        self.files_progress = WalkProgress()
        self.files_wanted = asyncio.Event()
        self.files_walk_ok = True  # until a walk fails
        self._files_walking = asyncio.Lock()
        self.files_seen = False
        self._route_logged: set[str] = set()
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
                walked = await self._walk_both(full=True, since=since, until=until)
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
            try:  # before deletions: the server's copy may take its transcripts with it
                await self._fetch_transcripts()
            except (AuthRefused, LocalStorageError) as exc:
                await self._halt(exc)
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
            new = await self._walk_both(full=full)
            if new is None or new == WALKED_ELSEWHERE:
                return  # stopped mid-walk (the checkpoint keeps its place), or not ours to walk
            await self.state.set_meta("last_cycle", str(time.time()))
            await self._succeeded()
            await self._watch_store()
            await self._fetch_transcripts()
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

    async def _walk_both(self, full: bool, since: datetime | None = None, until: datetime | None = None) -> int | None:
        """The recordings walk and beside it the calls walk (``[archive] call_metadata``; about
        one request per 100 calls, both newest first) and the storage listing's (``[api]
        storage_listing``). A sidecar whose call is not stored yet waits for the calls walk to
        pass its time (``_call_block``), a recording for the storage walk to reach its files
        (``_listed_files``), so downloads start at once (a call listed later: ``_note_calls``)."""
        began = time.time()
        beside = [asyncio.create_task(self._walk_calls_guarded(full, since), name="calls-walk"),
                  asyncio.create_task(self._walk_files_guarded(), name="storage-walk")]
        try:
            walked = await self._walk_unless_stopped(full=full, since=since, until=until)
        except BaseException:
            for task in beside:
                task.cancel()
            await asyncio.gather(*beside, return_exceptions=True)
            raise
        for task in beside:
            await task
        if walked is not None and walked != WALKED_ELSEWHERE and since is None and until is None:
            await self._note_strangers(began)  # a range walk leaves out recordings on purpose
        return walked

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
