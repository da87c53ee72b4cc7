"""The process around the engine: open client and state, signals, verify, status."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .client import ApiClient
from .config import ApiConfig, Config
from .destinations import Destination, open_destination
from .engine import Engine, RunResult
from .errors import ArchiverError, ConfigError, LocalStorageError, VerificationError
from .expiry import expiry_warning, watch_accesskey
from .layout import set_temp_tag
from .logs import redact
from .notify import Notifier, watchdog_interval
from .policy import EXPIRE_EVERY, Policy, PolicyResult
from .ratelimit import Grant
from .retention import Pruner, PruneResult, read_store
from .seal import decrypt, identities_of
from .state import STATES, State, empty_summary, open_state, waiting_count
from .state.base import MANIFEST_HEAD
from .storepool import StorePool

if TYPE_CHECKING:  # each imported where it is used: a run without a manifest or metrics imports
    # neither cryptography nor aiohttp's server (about 40 ms of every start, measured)
    from .manifest import Signer
    from .manifestcheck import ManifestReport
    from .manifestwriter import ManifestWriter

log = structlog.get_logger("archiver.service")


def _on_signals(engines: list[Engine], notifier: Notifier) -> None:
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        if not all(e.stop.is_set() for e in engines):
            log.info("signal", signal=signame, action="stopping: no new work, finishing in-flight downloads")
            notifier.send("STOPPING=1")
        for engine in engines:
            engine.result.interrupted = engine.result.interrupted or signame
            engine.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)


def merge_results(engines: list[Engine]) -> RunResult:
    """One run's result over every account's engine (a single account's as it is)."""
    if len(engines) == 1:
        return engines[0].result
    out = RunResult()
    for engine in engines:
        r = engine.result
        out.stats.update(r.stats)
        tag = f"account {engine.account}: "
        out.fatal = out.fatal or (tag + r.fatal if r.fatal else "")
        out.walk_error = out.walk_error or (tag + r.walk_error if r.walk_error else "")
        out.refusal = out.refusal or r.refusal
        out.interrupted = out.interrupted or r.interrupted
        out.auth_refused = out.auth_refused or r.auth_refused
        out.state_unusable = out.state_unusable or r.state_unusable
        out.abandoned += r.abandoned
    return out


async def run_engine(
    cfg: Config, mode: str, since: datetime | None = None, until: datetime | None = None, wait: float = 900.0,
    retry_failed: bool = False, progress: bool = False, no_delete: bool = False,
) -> tuple[RunResult, dict[str, int], dict[str, int]]:
    """Run ``backfill`` or ``run`` for every account, one engine each; returns (result, state
    counts, client request counts), over all accounts."""
    signer = load_signer(cfg)  # a missing or bad key stops the start, before anything is archived
    state = await open_state(cfg.state)
    if state.writer_tag:  # other daemons write beside us: our temporary names carry our mark
        cfg = replace(cfg, archive=replace(cfg.archive, temp_tag=state.writer_tag))
        set_temp_tag(cfg.archive.temp_tag)
    notifier = Notifier.from_env()
    metrics_runner = None
    try:
        if retry_failed:
            log.info("retry_failed", recordings=await state.retry_failed())
        async with open_destination(cfg.archive) as destination, contextlib.AsyncExitStack() as clients:
            store_pool = StorePool(cfg.archive, cfg.workers.store_processes, state.lock_fds())
            clients.push_async_callback(store_pool.close)  # after every engine has stopped
            engines = []
            for account in cfg.accounts:
                view = state.for_account(account.name)
                client = await clients.enter_async_context(
                    ApiClient(account.api, cfg.workers.concurrency, _shared_pace(view, account.api))
                )
                engine = Engine(cfg, client, view, destination, store_pool)
                engine.no_delete = no_delete
                engines.append(engine)
            _on_signals(engines, notifier)
            if cfg.metrics.listen:
                from .metrics import serve_metrics

                metrics_runner = await serve_metrics({e.account: e.metrics for e in engines}, cfg.metrics.listen,
                                                     cfg.workers.poll_interval)
                log.info("metrics_listening", listen=cfg.metrics.listen)
            helpers = [asyncio.create_task(_supervise(engines, state, notifier, mode, progress))]
            writers = _manifest_writers(signer, engines, destination)
            if writers:
                helpers.append(asyncio.create_task(_write_manifests(writers, engines, cfg.archive.manifest_interval)))
            if mode == "run" and cfg.archive.keep_days:
                helpers += [asyncio.create_task(_with_account(e, _expire_daily(
                    e, Policy(e.state, destination, cfg.archive.keep_days)))) for e in engines]
            for account, engine in zip(cfg.accounts, engines, strict=True):
                if account.api.credential_kind == "accesskey":
                    helpers.append(asyncio.create_task(
                        _with_account(engine, watch_accesskey(engine.client, engine.state, once=mode == "backfill"))
                    ))
            started = time.monotonic()
            try:
                if mode == "backfill":
                    await asyncio.gather(*(e.backfill(since, until, wait) for e in engines))
                else:
                    await asyncio.gather(*(e.serve() for e in engines))
            finally:
                notifier.send("STOPPING=1")
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                for writer, engine in zip(writers, engines, strict=False):  # what this run changed, signed
                    await _flush_manifest(writer, engine)
            result = merge_results(engines)
            counts = await state.counts()
            requests: Counter[str] = Counter()
            for engine in engines:
                requests.update(engine.client.stats)
            result.stats["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
            log.info(f"{mode}_done", **dict(result.stats), **{f"total_{k}": v for k, v in counts.items()},
                     requests=requests["requests"], http_429=requests["http_429"])
            return result, counts, dict(requests)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        notifier.close()
        await state.close()


def load_signer(cfg: Config) -> Signer | None:
    """The manifest's signing key (``[archive] signing_key_file``), or None: no manifest."""
    if not cfg.archive.signing_key_file:
        return None
    from .manifest import Signer

    return Signer.load(Path(cfg.archive.signing_key_file))


def _manifest_writers(signer: Signer | None, engines: list[Engine], destination: Destination) -> list[ManifestWriter]:
    if signer is None:
        return []
    from .manifestwriter import ManifestWriter

    return [ManifestWriter(signer, e.state, destination, e.account) for e in engines]


async def _write_manifests(writers: list[ManifestWriter], engines: list[Engine], interval: float) -> None:
    """Check each account's chain, then sign what changed every ``interval`` (and at shutdown,
    in ``run_engine``)."""
    for writer, engine in zip(writers, engines, strict=True):
        try:
            await writer.check_chain()
        except ArchiverError as exc:
            log.error("manifest_unreadable", error=redact(str(exc)), hint="checked again at the next start")
        engine.metrics.set_manifest(writer.ok, writer.segments_written)
    while True:
        for writer, engine in zip(writers, engines, strict=True):
            await _flush_manifest(writer, engine)
        await asyncio.sleep(interval)


async def _flush_manifest(writer: ManifestWriter, engine: Engine) -> None:
    """One account's segments written; a failure (a full disk, a bucket away) is logged and
    tried again at the next interval: what is due stays due in the state."""
    try:
        await writer.flush()
    except ArchiverError as exc:
        log.error("manifest_not_written", account=writer.account, error=redact(str(exc)),
                  hint="what is due stays due; tried again at the next interval and at shutdown")
    engine.metrics.set_manifest(writer.ok, writer.segments_written)


def _shared_pace(view: State, api: ApiConfig) -> Grant | None:
    """With a shared state, the account's pace is one bucket for every daemon (in the database)."""
    if api.requests_per_second <= 0:
        return None
    return view.pace(api.requests_per_second, api.burst)


async def _with_account(engine: Engine, work: Any) -> None:
    """``work`` with the account bound to its log events, as the engine's own are."""
    engine._bind_account()
    await work


async def _supervise(engines: list[Engine], state: State, notifier: Notifier, mode: str, progress: bool) -> None:
    """Beside the engines: READY=1, then STATUS=/WATCHDOG=1, metrics gauges and progress. A
    state database found damaged by one engine stops them all."""
    for engine in engines:
        await engine.ready.wait()
    notifier.send("READY=1")
    cfg = engines[0].cfg
    watchdog = watchdog_interval()
    every = cfg.logging.progress_interval
    tick = max(0.1, min(watchdog or 2.0, 2.0, every or 2.0))
    started = time.monotonic()
    last_progress = 0.0
    live = ProgressLine(sys.stderr) if progress else None
    try:
        while True:
            if watchdog:
                notifier.send("WATCHDOG=1")  # from the event loop itself: it proves the loop is alive
            if any(e.result.state_unusable for e in engines):
                for engine in engines:
                    engine._state_broken(next(e.result.fatal for e in engines if e.result.state_unusable))
            try:
                summary = await _read_summaries(engines, state)
            except LocalStorageError as exc:  # the state database is away: the engines pause on it too
                notifier.send(f"STATUS=PAUSED: {redact(str(exc))[:200]}")
                await asyncio.sleep(tick)
                continue
            text = _status_text(summary, engines)
            notifier.send(f"STATUS={text}")
            elapsed = time.monotonic() - started
            if live is not None:
                live.show(_progress_text(summary, engines, elapsed))
            elif mode == "backfill" and every and elapsed - last_progress >= every:
                last_progress = elapsed
                log.info("progress", **_progress_fields(summary, engines, elapsed))
            await asyncio.sleep(tick)
    finally:
        if live is not None:
            live.clear()


async def _read_summaries(engines: list[Engine], state: State) -> dict[str, Any]:
    """Each account's counts into its metrics; returns the summary over all of them."""
    if len(engines) > 1:
        summary, by_account = await state.summaries()  # a fixed number of queries for any number of accounts
    else:
        summary = await engines[0].state.summary()
        by_account = {engines[0].account: summary}
    for engine in engines:
        mine = by_account.get(engine.account) or empty_summary()
        oldest = mine["oldest_pending"]
        engine.metrics.set_counts(mine, oldest["tm_create"] if oldest else None)
        engine.metrics.api_requests.set(engine.client.stats["requests"])
        engine.metrics.budget_requests.set(engine.client.stats["requests"] - engine.client.stats["storage"])
        engine.metrics.http_429.set(engine.client.stats["http_429"])
        engine.metrics.budget_shared.set(1 if engine.client.budget_shared else 0)
    return summary


def _status_text(summary: dict[str, Any], engines: list[Engine]) -> str:
    """systemd's ``STATUS=``: what needs the operator first, then the counts."""
    waiting = waiting_count(summary)
    cycles = [e.metrics.last_cycle_at for e in engines]
    cycle = min(cycles) if all(cycles) else 0.0
    when = time.strftime("%H:%M:%S", time.gmtime(cycle)) + " UTC" if cycle else "none yet"
    alerts = []
    for engine in engines:
        whose = f"account {engine.account}: " if len(engines) > 1 else ""
        if engine.metrics.refused:
            alerts.append(f"PAUSED: {whose}the API refuses us ({engine.metrics.refused})")
        if engine.unwritable:
            alerts.append(f"PAUSED: {whose}cannot write ({engine.unwritable[:120]})")
        if engine.store_near_full() and engine.store_usage is not None:
            alerts.append(f"{whose}SERVER STORE {100 * engine.store_usage.ratio:.0f}% FULL"
                          + ("" if engine.pruner else ": new recordings will have no audio; see [retention]"))
    key = expiry_warning(summary.get("accesskey_expires"))
    if key:
        alerts.append(key.upper()[:1] + key[1:])
    counts = (f"archived {summary['archived']}, no audio {summary['no_audio']}, waiting {waiting}, "
              f"failed {summary['failed']}, skipped {summary['skipped']}; last cycle {when}")
    return "; ".join([*alerts, counts])


def _progress_fields(summary: dict[str, Any], engines: list[Engine], elapsed: float) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    for engine in engines:
        stats.update(engine.result.stats)
    waiting = waiting_count(summary)
    rate = stats["archived"] / elapsed if elapsed > 0 else 0.0
    return {
        "pages": stats["pages"], "known": summary["total"], "archived": summary["archived"],
        "waiting": waiting, "failed": summary["failed"],
        "mb_per_s": round(stats["bytes"] / 1e6 / elapsed, 2) if elapsed > 0 else 0.0,
        "eta_s": round(waiting / rate) if rate > 0 and waiting else None,
    }


def _progress_text(summary: dict[str, Any], engines: list[Engine], elapsed: float) -> str:
    f = _progress_fields(summary, engines, elapsed)
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
    state = await open_state(cfg.state, readonly=True)
    try:
        retention = cfg.retention
        deletion = await state.deletion_summary(time.time() - retention.delete_after, retention.delete_incomplete)
        deletion["enabled"] = retention.delete_from_server
        summary = await state.summary()
        refused, expires = summary.pop("api_refused_by_account"), summary.pop("accesskey_expires_by_account")
        accounts = {
            name: {**counts, "api_refused": refused.get(name), "accesskey_expires": expires.get(name)}
            for name, counts in (await state.counts_by_account()).items()
        }
        for name in (a.name for a in cfg.accounts):  # configured, nothing recorded yet
            accounts.setdefault(name, {**dict.fromkeys(STATES, 0), "api_refused": refused.get(name),
                                       "accesskey_expires": expires.get(name)})
        return {**summary, "flagged_recent": await state.flagged(), "server_deletion": deletion, "accounts": accounts}
    finally:
        await state.close()


async def prune(cfg: Config, dry_run: bool) -> PruneResult:
    """``prune``: delete the server's copy of what is due now (``--dry-run``: count it), account
    after account, and exit. A refused account (``AuthRefused``) stops the command."""
    state = await open_state(cfg.state)
    total = PruneResult()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_destination(cfg.archive) as destination:
            for account in cfg.accounts:
                if stop.is_set():
                    break
                view = state.for_account(account.name)
                async with ApiClient(account.api, cfg.workers.concurrency) as client:
                    pruner = Pruner(cfg, client, view, destination)
                    if dry_run:
                        result = await pruner.dry_run()
                    else:
                        await read_store(client, view, cfg.retention.store_capacity, cfg.retention.store_warn_ratio)
                        result = await pruner.run(stop)
                        await read_store(client, view, cfg.retention.store_capacity, cfg.retention.store_warn_ratio)
                for name in ("deleted", "already_gone", "refused", "due", "due_bytes"):
                    setattr(total, name, getattr(total, name) + getattr(result, name))
                total.errors += result.errors
            return total
    finally:
        await state.close()


async def verify(cfg: Config, deep: bool = False, identity: Path | None = None,
                 ) -> tuple[int, list[str], list[tuple[str, str]]]:
    """Re-check every archived recording against SQLite and its sidecar (a directory: re-hash
    every file; a bucket: HEAD each object, ``deep`` downloads and re-hashes it); with
    ``identity`` (an age identity file), each encrypted body is decrypted and its plaintext's
    SHA-256 checked too. Returns (checked, problems, (account, id) of each recording with a problem)."""
    identities = identities_of(identity) if identity else None
    state = await open_state(cfg.state, readonly=True)
    checked = 0
    problems: list[str] = []
    bad: list[tuple[str, str]] = []
    try:
        async with open_destination(cfg.archive) as destination:
            async for row in state.archived():
                checked += 1
                found = await destination.check(row, deep)
                if identities and not found and row["plain_sha256"]:
                    found = await _check_plaintext(destination, row, identities)
                if found:
                    problems.extend(found)
                    bad.append((row["account"], row["id"]))
    finally:
        await state.close()
    return checked, problems, bad


async def _check_plaintext(destination: Destination, row: dict[str, Any], identities: list[Any]) -> list[str]:
    """An encrypted body decrypted (in memory) and its plaintext's SHA-256 checked."""
    data = await destination.read_bytes(row["path"])
    if data is None:
        return [f"{row['path']}: missing"]
    try:
        plain = decrypt(data, identities)
    except VerificationError as exc:
        return [f"{row['path']}: {exc} (another key, or the ciphertext is damaged)"]
    if hashlib.sha256(plain).hexdigest() != row["plain_sha256"]:
        return [f"{row['path']}: decrypts to other bytes than were archived"]
    return []


async def mark_for_repair(
    cfg: Config, bad: list[tuple[str, str]]
) -> tuple[list[str], list[tuple[str, float]]]:
    """``verify --repair``: recordings whose files are missing or changed go back to ``pending``
    (downloaded again by the next backfill) unless the server's copy was deleted: those cannot
    be repaired from the server. Returns (queued ids, [(id, server deleted at)])."""
    state = await open_state(cfg.state)
    queued: list[str] = []
    lost: list[tuple[str, float]] = []
    try:
        for account in sorted({a for a, _ in bad}):
            view = state.for_account(account)
            for rec_id, deleted_at in await view.server_deleted([i for a, i in bad if a == account]):
                if deleted_at is not None:
                    lost.append((rec_id, deleted_at))
                    continue
                await view.update(rec_id, state="pending", attempts=0, next_attempt_at=time.time(),
                                  last_error="verify --repair: file missing or changed; downloading it again")
                queued.append(rec_id)
    finally:
        await state.close()
    return queued, lost


async def verify_manifest_of(cfg: Config, public_key: Path | None) -> tuple[ManifestReport, bool]:
    """``verify --manifest``: the archive against its signed manifest, with the public key
    (``--public-key``, else ``<signing_key_file>.pub``). The state is read too when it can be
    (the chain's head, what was archived after the newest segment); the check needs it not.
    Returns (the report, whether the state was read)."""
    if public_key is None:
        if not cfg.archive.signing_key_file:
            raise ConfigError("verify --manifest needs the public key: --public-key FILE (keygen's FILE.pub)")
        public_key = Path(cfg.archive.signing_key_file + ".pub")
    from .manifest import load_public_key
    from .manifestcheck import Expected, verify_manifest

    public = load_public_key(public_key)
    state: State | None
    try:
        state = await open_state(cfg.state, readonly=True)
    except (ArchiverError, OSError) as exc:
        log.warning("verify_without_state", reason=redact(str(exc)), hint="the manifest alone is checked")
        state = None
    try:
        heads = {}
        if state is not None:
            for account in cfg.accounts:
                raw = await state.for_account(account.name).get_meta(MANIFEST_HEAD)
                if raw:
                    heads[account.name] = json.loads(raw)

        async def state_files() -> dict[str, Expected | None]:
            assert state is not None
            known: dict[str, Expected | None] = {}
            async for row in state.archived():
                known[row["path"]] = None if row["state"] == "no_audio" else Expected(
                    row["sha256"], row["size"], row["id"], "the state (archived after the newest segment)")
            return known

        async with open_destination(cfg.archive) as destination:
            report = await verify_manifest(
                destination, public, heads=heads, state_files=state_files if state is not None else None,
                ignore=_state_files_in_archive(cfg))
        return report, state is not None
    finally:
        if state is not None:
            await state.close()


def _state_files_in_archive(cfg: Config) -> set[str]:
    """The state's own files, when its database lives inside the archive directory."""
    if cfg.archive.destination != "directory" or cfg.state.url:
        return set()
    root = cfg.archive.directory.resolve()
    database = cfg.state.database.resolve()
    if not database.is_relative_to(root):
        return set()
    rel = str(database.relative_to(root))
    folder = rel.rpartition("/")[0]
    return {rel, rel + "-wal", rel + "-shm", rel + "-journal", rel + ".lock",
            f"{folder}/deletions.jsonl" if folder else "deletions.jsonl"}


async def policy_run(cfg: Config, work: Callable[[Policy], Awaitable[Any]], account: str | None = None) -> Any:
    """``work`` on each account's ``Policy`` (or the one named), under its policy lock; the
    results of several accounts are added up (``PolicyResult``, lists), or the one account's
    that is not None (``erase``: the account that has the recording)."""
    state = await open_state(cfg.state)
    try:
        async with open_destination(cfg.archive) as destination:
            names = [a.name for a in cfg.accounts]
            if account is not None and account not in names:
                raise ConfigError(f"--account {account!r}: not an [[accounts]] name ({', '.join(names)})")
            total: Any = None
            for name in [account] if account else names:
                view = state.for_account(name)
                async with view.policy_lock() as mine:
                    if not mine:
                        raise ConfigError(f"account {name}: another daemon is removing or holding recordings now; "
                                          "try again in a minute")
                    got = await work(Policy(view, destination, cfg.archive.keep_days))
                total = _added(total, got)
            return total
    finally:
        await state.close()


def _added(total: Any, got: Any) -> Any:
    if total is None or got is None:
        return got if total is None else total
    if isinstance(got, PolicyResult):
        return PolicyResult(total.removed + got.removed, total.due + got.due, total.held + got.held,
                            total.locked + got.locked, total.errors + got.errors)
    if isinstance(got, list):
        return total + got
    return total


async def list_holds(cfg: Config) -> list[dict[str, Any]]:
    state = await open_state(cfg.state, readonly=True)
    try:
        return await state.holds()
    finally:
        await state.close()


async def _expire_daily(engine: Engine, policy: Policy) -> None:
    """The service's expiry: what is due, once a day (and interrupted removals at start)."""
    while True:
        try:
            async with engine.state.policy_lock() as mine:
                if mine:
                    await policy.expire(stop=engine.stop)
        except ArchiverError as exc:
            log.error("expire_failed", error=redact(str(exc)), hint="tried again tomorrow and at the next start")
        await asyncio.sleep(EXPIRE_EVERY)

