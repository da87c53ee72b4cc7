"""The daemon's side of the store helper processes (``storeproc``): start, feed, reap.

Why processes: hashing, ZIP checks, fsyncs and renames done in threads of the daemon's own
process hand its GIL back and forth with the event loop dozens of times per recording; on a
2-core machine that, not the disk or the CPU, limited a backfill to about 75 % of the latency
bound (README, Benchmarks). A helper has its own interpreter, so the event loop only writes a
request to a pipe and reads the answer.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys

import structlog

from .config import ArchiveConfig
from .errors import TransientError
from .store import Archived, Staged, StoreJob
from .storeproc import HEADER, frame, request_frame

log = structlog.get_logger("archiver.storepool")

CLOSE_WAIT = 20.0  # seconds helpers get to finish on shutdown (systemd's TimeoutStopSec is 30 s)

# the helper imports modules from where the daemon did (the same archiver, the same libraries)
_BOOTSTRAP = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from archiver.storeproc import main; main()"


class _Helper:
    """One helper process and the requests it has not answered yet."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: dict[int, asyncio.Future[Archived | Staged]] = {}
        self.reader: asyncio.Task[None] | None = None


class StorePool:
    """The daemon's side: ``await pool.store(job)`` in a helper; helpers start on first use
    and a helper that dies is replaced on the next request (its requests fail as transient)."""

    def __init__(self, cfg: ArchiveConfig, processes: int, hold_fds: tuple[int, ...] = ()) -> None:
        self.cfg = cfg
        self.processes = processes
        self.hold_fds = hold_fds
        self._helpers: list[_Helper] = []
        self._next_id = 0
        self._starting = asyncio.Lock()
        self._closed = False
        self._outstanding: dict[str, set[asyncio.Future[Archived | Staged]]] = {}  # by account
        self._warming: asyncio.Task[None] | None = None

    def warm(self) -> None:
        """Start the helpers in the background if none has started: called as a download
        begins, so that their start-up (about 70 ms of imports each) overlaps the transfer
        instead of following it. The first ``store`` reports a helper that cannot start."""
        if self._warming is None and not self._helpers and not self._closed:
            self._warming = asyncio.get_running_loop().create_task(self._warm(), name="store-helpers-warm")

    async def _warm(self) -> None:
        try:
            await self._helper()
        except TransientError:
            pass  # the next store() tries again, and says why

    async def store(self, job: StoreJob, account: str = "") -> Archived | Staged:
        helper = await self._helper()
        if helper.reader is None or helper.reader.done():  # it died while another one started
            raise TransientError("the store helper exited before it was asked")
        self._next_id += 1
        request = self._next_id
        future: asyncio.Future[Archived | Staged] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # the caller may have gone (shutdown): no "never retrieved"
        helper.waiting[request] = future
        outstanding = self._outstanding.setdefault(account, set())
        outstanding.add(future)
        future.add_done_callback(outstanding.discard)
        try:
            assert helper.proc.stdin is not None
            head, body = request_frame(request, job)
            helper.proc.stdin.write(head)
            helper.proc.stdin.write(body)  # two writes: joined, the body would be copied once more
            await helper.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            helper.waiting.pop(request, None)
            raise TransientError(f"store helper unreachable: {type(exc).__name__}") from None
        return await asyncio.shield(future)  # a cancelled caller must not lose the helper's answer

    async def drain(self, account: str) -> None:
        """Wait (up to ``CLOSE_WAIT``) until every request for ``account`` is answered: an engine
        that shares the pool stops without closing it, and then no helper touches its files."""
        pending = self._outstanding.get(account)
        if pending:
            _, late = await asyncio.wait(set(pending), timeout=CLOSE_WAIT)
            if late:
                log.error("store_requests_unanswered", requests=len(late), reason=f"still busy after {CLOSE_WAIT} s")

    async def close(self) -> None:
        """Let every helper finish what it has (for up to ``CLOSE_WAIT`` seconds), then reap it:
        its CPU time then counts as ours."""
        self._closed = True
        if self._warming is not None:  # a helper it starts must be among those closed below
            await asyncio.gather(self._warming, return_exceptions=True)
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            if helper.proc.stdin is not None:
                helper.proc.stdin.close()
        readers = [h.reader for h in helpers if h.reader is not None]
        if readers:
            _, late = await asyncio.wait(readers, timeout=CLOSE_WAIT)  # a reader ends once its helper is reaped
            for helper in helpers:
                if helper.reader in late:
                    log.error("store_helper_killed", pid=helper.proc.pid, reason=f"still busy after {CLOSE_WAIT} s")
                    helper.proc.kill()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _helper(self) -> _Helper:
        """The helper with the fewest unanswered requests, starting them as needed."""
        async with self._starting:
            if self._closed:
                raise TransientError("the store helpers are shut down")
            self._helpers = [h for h in self._helpers if h.reader is not None and not h.reader.done()]
            while len(self._helpers) < self.processes:
                self._helpers.append(await self._start())
        return min(self._helpers, key=lambda h: len(h.waiting))

    async def _start(self) -> _Helper:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=self.hold_fds,
            )
        except OSError as exc:
            raise TransientError(f"cannot start a store helper: {exc.strerror}") from None
        helper = _Helper(proc)
        assert proc.stdin is not None
        proc.stdin.write(frame(self.cfg))
        helper.reader = asyncio.create_task(self._read(helper), name=f"store-helper-{proc.pid}")
        return helper

    async def _read(self, helper: _Helper) -> None:
        stdout = helper.proc.stdout
        assert stdout is not None
        try:
            while True:
                size, body_length = HEADER.unpack(await stdout.readexactly(HEADER.size))
                if body_length:
                    raise ValueError(f"an answer with a body ({body_length} bytes)")
                request, result = pickle.loads(await stdout.readexactly(size))
                future = helper.waiting.pop(request, None)
                if future is None or future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it exited
        except Exception:  # an answer we cannot read: this helper is not to be trusted
            log.exception("store_helper_unreadable", pid=helper.proc.pid)
            helper.proc.kill()
        finally:
            code = await helper.proc.wait()
            if helper.waiting:
                log.error(
                    "store_helper_exited", pid=helper.proc.pid, exit_code=code, requests_lost=len(helper.waiting),
                    hint="the recordings are retried; a replacement helper starts on the next request",
                )
            for future in helper.waiting.values():
                if not future.done():
                    future.set_exception(TransientError(f"the store helper exited (code {code}) while storing"))
            helper.waiting.clear()


def _retrieved(future: asyncio.Future[Archived | Staged]) -> None:
    if not future.cancelled():
        future.exception()
