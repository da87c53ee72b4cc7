"""The process around the engine: open client and state, signals, verify, status."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime
from typing import Any

import structlog

from .client import ApiClient
from .config import Config
from .destinations import open_destination
from .expiry import expiry_warning, watch_accesskey
from .metrics import serve_metrics
from .notify import Notifier, watchdog_interval
from .pool import Engine, RunResult
from .retention import Pruner, PruneResult, read_store
from .state import StateDB, waiting_count

log = structlog.get_logger("archiver.service")


def _on_signals(engine: Engine, notifier: Notifier) -> None:
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        if not engine.stop.is_set():
            log.info("signal", signal=signame, action="stopping: no new work, finishing in-flight downloads")
            notifier.send("STOPPING=1")
            engine.result.interrupted = engine.result.interrupted or signame
        engine.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)


async def run_engine(
    cfg: Config, mode: str, since: datetime | None = None, until: datetime | None = None, wait: float = 900.0,
    retry_failed: bool = False, progress: bool = False, no_delete: bool = False,
) -> tuple[RunResult, dict[str, int], dict[str, int]]:
    """Run ``backfill`` or ``run``; returns (result, state counts, client request counts)."""
    state = await StateDB.open(cfg.state.database)
    notifier = Notifier.from_env()
    metrics_runner = None
    try:
        if retry_failed:
            log.info("retry_failed", recordings=await state.retry_failed())
        async with open_destination(cfg.archive) as destination, ApiClient(cfg.api, cfg.workers.concurrency) as client:
            engine = Engine(cfg, client, state, destination)
            engine.no_delete = no_delete
            _on_signals(engine, notifier)
            if cfg.metrics.listen:
                metrics_runner = await serve_metrics(engine.metrics, cfg.metrics.listen, cfg.workers.poll_interval)
                log.info("metrics_listening", listen=cfg.metrics.listen)
            supervisor = asyncio.create_task(_supervise(engine, state, client, notifier, mode, progress))
            helpers = [supervisor]
            if cfg.api.credential_kind == "accesskey":
                helpers.append(asyncio.create_task(watch_accesskey(client, state, once=mode == "backfill")))
            started = time.monotonic()
            try:
                if mode == "backfill":
                    result = await engine.backfill(since, until, wait)
                else:
                    result = await engine.serve()
            finally:
                notifier.send("STOPPING=1")
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
            counts = await state.counts()
            result.stats["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
            log.info(f"{mode}_done", **dict(result.stats), **{f"total_{k}": v for k, v in counts.items()},
                     requests=client.stats["requests"], http_429=client.stats["http_429"])
            return result, counts, dict(client.stats)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        notifier.close()
        await state.close()


async def _supervise(
    engine: Engine, state: StateDB, client: ApiClient, notifier: Notifier, mode: str, progress: bool
) -> None:
    """Beside the engine: READY=1, then STATUS=/WATCHDOG=1, metrics gauges and progress."""
    await engine.ready.wait()
    notifier.send("READY=1")
    watchdog = watchdog_interval()
    every = engine.cfg.logging.progress_interval
    tick = max(0.1, min(watchdog or 2.0, 2.0, every or 2.0))
    started = time.monotonic()
    last_progress = 0.0
    live = ProgressLine(sys.stderr) if progress else None
    try:
        while True:
            if watchdog:
                notifier.send("WATCHDOG=1")  # from the event loop itself: it proves the loop is alive
            summary = await state.summary()
            oldest = summary["oldest_pending"]
            engine.metrics.set_counts(summary, oldest["tm_create"] if oldest else None)
            engine.metrics.api_requests.set(client.stats["requests"])
            engine.metrics.http_429.set(client.stats["http_429"])
            engine.metrics.budget_shared.set(1 if client.budget_shared else 0)
            text = _status_text(summary, engine)
            notifier.send(f"STATUS={text}")
            elapsed = time.monotonic() - started
            if live is not None:
                live.show(_progress_text(summary, engine, elapsed))
            elif mode == "backfill" and every and elapsed - last_progress >= every:
                last_progress = elapsed
                log.info("progress", **_progress_fields(summary, engine, elapsed))
            await asyncio.sleep(tick)
    finally:
        if live is not None:
            live.clear()


def _status_text(summary: dict[str, Any], engine: Engine) -> str:
    """systemd's ``STATUS=``: what needs the operator first, then the counts."""
    waiting = waiting_count(summary)
    cycle = engine.metrics.last_cycle_at
    when = time.strftime("%H:%M:%S", time.gmtime(cycle)) + " UTC" if cycle else "none yet"
    alerts = []
    if engine.metrics.refused:
        alerts.append(f"PAUSED: the API refuses us ({engine.metrics.refused})")
    if engine.unwritable:
        alerts.append(f"PAUSED: cannot write ({engine.unwritable[:120]})")
    if engine.store_near_full() and engine.store_usage is not None:
        alerts.append(f"SERVER STORE {100 * engine.store_usage.ratio:.0f}% FULL"
                      + ("" if engine.pruner else ": new recordings will have no audio; see [retention]"))
    key = expiry_warning(summary.get("accesskey_expires"))
    if key:
        alerts.append(key.upper()[:1] + key[1:])
    counts = (f"archived {summary['archived']}, no audio {summary['no_audio']}, waiting {waiting}, "
              f"failed {summary['failed']}, skipped {summary['skipped']}; last cycle {when}")
    return "; ".join([*alerts, counts])


def _progress_fields(summary: dict[str, Any], engine: Engine, elapsed: float) -> dict[str, Any]:
    stats = engine.result.stats
    waiting = waiting_count(summary)
    rate = stats["archived"] / elapsed if elapsed > 0 else 0.0
    return {
        "pages": stats["pages"], "known": summary["total"], "archived": summary["archived"],
        "waiting": waiting, "failed": summary["failed"],
        "mb_per_s": round(stats["bytes"] / 1e6 / elapsed, 2) if elapsed > 0 else 0.0,
        "eta_s": round(waiting / rate) if rate > 0 and waiting else None,
    }


def _progress_text(summary: dict[str, Any], engine: Engine, elapsed: float) -> str:
    f = _progress_fields(summary, engine, elapsed)
    eta = f"{f['eta_s'] // 60}m{f['eta_s'] % 60:02d}s" if f["eta_s"] is not None else "-"
    return (f"pages {f['pages']}  known {f['known']}  archived {f['archived']}  waiting {f['waiting']}  "
            f"failed {f['failed']}  {f['mb_per_s']:.1f} MB/s  ETA {eta}")


class ProgressLine:
    """One line on a terminal, rewritten in place."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def show(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


async def status(cfg: Config) -> dict[str, Any]:
    state = await StateDB.open(cfg.state.database, readonly=True)
    try:
        retention = cfg.retention
        deletion = await state.deletion_summary(time.time() - retention.delete_after, retention.delete_incomplete)
        deletion["enabled"] = retention.delete_from_server
        return {**await state.summary(), "flagged_recent": await state.flagged(), "server_deletion": deletion}
    finally:
        await state.close()


async def prune(cfg: Config, dry_run: bool) -> PruneResult:
    """``prune``: delete the server's copy of what is due now (``--dry-run``: count it) and exit."""
    state = await StateDB.open(cfg.state.database)
    try:
        async with open_destination(cfg.archive) as destination, ApiClient(cfg.api, cfg.workers.concurrency) as client:
            pruner = Pruner(cfg, client, state, destination)
            if dry_run:
                return await pruner.dry_run()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await read_store(client, state, cfg.retention.store_capacity, cfg.retention.store_warn_ratio)
            result = await pruner.run(stop)
            await read_store(client, state, cfg.retention.store_capacity, cfg.retention.store_warn_ratio)
            return result
    finally:
        await state.close()


async def verify(cfg: Config, deep: bool = False) -> tuple[int, list[str], list[str]]:
    """Re-check every archived recording against SQLite and its sidecar (a directory: re-hash
    every file; a bucket: HEAD each object, ``deep`` downloads and re-hashes it). Returns
    (checked, problems, ids of the recordings with a problem)."""
    state = await StateDB.open(cfg.state.database, readonly=True)
    checked = 0
    problems: list[str] = []
    bad: list[str] = []
    try:
        async with open_destination(cfg.archive) as destination:
            async for row in state.archived():
                checked += 1
                found = await destination.check(row, deep)
                if found:
                    problems.extend(found)
                    bad.append(row["id"])
    finally:
        await state.close()
    return checked, problems, bad


async def mark_for_repair(cfg: Config, ids: list[str]) -> tuple[list[str], list[tuple[str, float]]]:
    """``verify --repair``: recordings whose files are missing or changed go back to ``pending``
    (downloaded again by the next backfill) unless the server's copy was deleted: those cannot
    be repaired from the server. Returns (queued ids, [(id, server deleted at)])."""
    state = await StateDB.open(cfg.state.database)
    queued: list[str] = []
    lost: list[tuple[str, float]] = []
    try:
        for rec_id, deleted_at in await state.server_deleted(ids):
            if deleted_at is not None:
                lost.append((rec_id, deleted_at))
                continue
            await state.update(rec_id, state="pending", attempts=0, next_attempt_at=time.time(),
                               last_error="verify --repair: file missing or changed; downloading it again")
            queued.append(rec_id)
    finally:
        await state.close()
    return queued, lost
