"""What every part of the engine shares: the run's result, the state of one account's engine
(declared here, set up by ``Engine.__init__``) and how trouble that is no recording's fault is
handled (a refused credential, an unwritable archive or state: stop a backfill, pause the service)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from ..client import ApiClient
from ..config import Config, WorkersConfig
from ..destinations import Destination
from ..download import Downloader
from ..errors import AuthRefused, LocalStorageError
from ..logs import redact
from ..metrics import Metrics
from ..retention import StoreUsage
from ..state import Row, State
from ..storepool import StorePool

log = structlog.get_logger("archiver.engine")
T = TypeVar("T")  # what a guarded piece of work returns (workers._guarded)

WALKED_ELSEWHERE = -1  # _walk's answer when another daemon walks the account (a shared state)
SHUTDOWN_GRACE = 6.0  # seconds in-flight downloads get to finish on SIGTERM before they are abandoned


@dataclass(frozen=True)
class Job:
    """A recording ready for a download worker: where it goes and its signed URL."""

    row: Row
    directory: Path
    url: str  # "" when it is fetched from its listed files
    started: float
    listed: tuple[dict[str, Any], ...] = ()  # its channel files from the storage listing


class WalkProgress:
    """How far back a listing's walk under way has stored its items (an epoch: every item it
    lists created since then is in the state), for work that waits for an item that may be on a
    page still to come. ``-inf`` while no walk runs, ``inf`` once one has begun and stored nothing."""

    def __init__(self) -> None:
        self.reached = -math.inf
        self._moved = asyncio.Event()

    def moved_to(self, reached: float) -> None:
        """A page is stored (or the walk began or ended): every waiter looks again."""
        self.reached = reached
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    @contextlib.contextmanager
    def walking(self) -> Iterator[None]:
        self.moved_to(math.inf)
        try:
            yield
        finally:
            self.moved_to(-math.inf)  # whatever the walk stored, it has stored

    async def until(self, ask: Callable[[], Awaitable[T]], done: Callable[[T], bool], since: float,
                    timeout: float, stop: asyncio.Event) -> T:
        """``ask()`` again at each page stored, until ``done`` takes its answer, the walk has
        passed ``since`` (or none runs), ``stop`` is set or ``timeout`` seconds are over; the last
        answer. Where the walk was is read before each ``ask``: a page stored during it is not missed."""
        deadline = time.monotonic() + timeout
        while True:
            moved, reached = self._moved, self.reached
            answer = await ask()
            if done(answer) or reached <= since or stop.is_set():
                return answer
            try:
                await asyncio.wait_for(moved.wait(), deadline - time.monotonic())
            except TimeoutError:
                return answer


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


class EngineParts:
    """The attributes the engine's parts (``walker``, ``feeder``, ``workers``) share, and the
    handling of trouble; ``core.Engine`` puts them together."""

    cfg: Config
    client: ApiClient
    state: State
    account: str
    destination: Destination
    store_pool: StorePool
    downloader: Downloader
    workers_cfg: WorkersConfig
    queue: asyncio.Queue[Row]  # due rows -> resolvers
    downloads: asyncio.Queue[Job]  # (row, signed URL) -> download workers
    in_flight: set[str]
    _recording: set[asyncio.Task[None]]
    _recorders: asyncio.Semaphore
    wake: asyncio.Event
    stop: asyncio.Event
    result: RunResult
    paused_until: float
    mode: Literal["backfill", "run"]
    walk_done: bool
    deadline: float
    metrics: Metrics
    store_usage: StoreUsage | None
    unwritable: str
    calls_progress: WalkProgress  # how far back the calls walk under way has come
    files_progress: WalkProgress  # the same for the storage listing's walk
    files_wanted: asyncio.Event  # a recording waits for files not listed yet: walk the listing again
    files_walk_ok: bool  # no storage walk has failed since the last that went through (else no waiting)
    _files_walking: asyncio.Lock  # one storage walk at a time in this process
    files_seen: bool  # a storage walk has listed some recording's files (else none is waited for)
    _route_logged: set[str]  # recordings whose unusable listing was logged (once each)

    async def _until_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``, abandoned (cancelled) at once when ``stop`` is set: None then. Cancelling the
        caller cancels ``work`` too, so it never runs on after whoever started it (a walk must
        not write to a state that is being closed)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _call_block(self, row: Row) -> dict[str, Any]:
        """The sidecar's ``call`` block for ``row`` (``calls.CallWalker``)."""
        raise NotImplementedError

    async def _listed_files(self, row: Row) -> tuple[dict[str, Any], ...]:
        """The channel files to fetch ``row`` from, or () (``storage.StorageWalker``)."""
        raise NotImplementedError

    async def _rewalk_files(self) -> None:
        """Walk the storage listing again when a recording waits for its files (``storage``)."""
        raise NotImplementedError

    def store_near_full(self) -> bool:
        usage = self.store_usage
        return usage is not None and usage.ratio >= self.cfg.retention.store_warn_ratio

    def _fell_back(self, why: str) -> None:
        """A listed recording sent to ``/recordingfiles``: ``listing`` (its listed files were
        unusable) or ``download`` (they failed to download or verify). Counted for the run's
        summary and the metrics; the log line that says which recording is the caller's."""
        self.result.stats[f"fallback_{why}"] += 1
        self.metrics.listing_fallbacks.labels(why).inc()

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

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass
