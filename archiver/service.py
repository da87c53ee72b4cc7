"""The process around the engine: open client and state, signals, verify, status."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from .client import ApiClient
from .config import Config
from .download import CHUNK
from .layout import sidecar_path
from .pool import Engine, RunResult
from .state import StateDB

log = structlog.get_logger("archiver.service")


def _on_signals(engine: Engine) -> None:
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        if not engine.stop.is_set():
            log.info("signal", signal=signame, action="stopping: no new work, finishing in-flight downloads")
        engine.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)


async def run_engine(
    cfg: Config, mode: str, since: datetime | None = None, until: datetime | None = None, wait: float = 900.0,
    retry_failed: bool = False,
) -> tuple[RunResult, dict[str, int], dict[str, int]]:
    """Run ``backfill`` or ``run``; returns (result, state counts, client request counts)."""
    state = await StateDB.open(cfg.state.database)
    try:
        if retry_failed:
            log.info("retry_failed", recordings=await state.retry_failed())
        async with ApiClient(cfg.api, cfg.workers.concurrency) as client:
            engine = Engine(cfg, client, state)
            _on_signals(engine)
            started = time.monotonic()
            if mode == "backfill":
                result = await engine.backfill(since, until, wait)
            else:
                result = await engine.serve()
            counts = await state.counts()
            result.stats["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
            log.info(f"{mode}_done", **dict(result.stats), **{f"total_{k}": v for k, v in counts.items()},
                     requests=client.stats["requests"], http_429=client.stats["http_429"])
            return result, counts, dict(client.stats)
    finally:
        await state.close()


async def status(cfg: Config) -> dict[str, Any]:
    state = await StateDB.open(cfg.state.database, readonly=True)
    try:
        return await state.summary()
    finally:
        await state.close()


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def check_archived(root: Path, row: dict[str, Any]) -> list[str]:
    """Problems with one archived recording's files (empty list: all good)."""
    problems: list[str] = []
    path = root / row["path"]
    try:
        size, sha = _sha256(path)
    except OSError as exc:
        return [f"{row['path']}: missing or unreadable ({exc.strerror})"]
    if size != row["size"] or sha != row["sha256"]:
        problems.append(f"{row['path']}: changed (size {size}, sha256 {sha[:16]}..., expected {row['sha256'][:16]}...)")
    try:
        meta = json.loads(sidecar_path(path).read_text())["archive"]
    except (OSError, ValueError, KeyError) as exc:
        return [*problems, f"{sidecar_path(path).name}: sidecar missing or unreadable ({exc})"]
    if meta.get("sha256") != row["sha256"] or meta.get("size") != row["size"]:
        problems.append(f"{sidecar_path(path).name}: sidecar disagrees with the database")
    if meta.get("unpacked_to"):
        for member in meta.get("members", []):
            member_path = path.parent / row["id"] / member.get("stored_as", "")
            try:
                msize, msha = _sha256(member_path)
            except OSError:
                problems.append(f"{member_path.relative_to(root)}: unpacked member missing")
                continue
            if msha != member.get("sha256") or msize != member.get("size"):
                problems.append(f"{member_path.relative_to(root)}: unpacked member changed")
    return problems


async def verify(cfg: Config) -> tuple[int, list[str]]:
    """Re-hash every archived file against SQLite and its sidecar. Returns (checked, problems)."""
    state = await StateDB.open(cfg.state.database, readonly=True)
    root = cfg.archive.directory.resolve()
    checked = 0
    problems: list[str] = []
    try:
        async for row in state.archived():
            checked += 1
            problems.extend(await asyncio.to_thread(check_archived, root, row))
    finally:
        await state.close()
    return checked, problems
