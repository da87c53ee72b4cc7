"""kill -9 mid-backfill, restart: nothing lost, nothing duplicated, nothing half-written."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from archiver.engine import SHUTDOWN_GRACE
from tests.checks import assert_archive_complete
from tests.conftest import cli_command, cli_env, run_cli, wait_until, write_config


def _archived(db) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM recordings WHERE state='archived'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the store helpers of a daemon)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running, not gone and not a zombie waiting to be reaped."""
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("listing", [False, True], ids=["recordingfiles", "storage-listing"])
async def test_sigkill_mid_backfill_then_resume(tmp_path, make_sim, listing):
    sim = await make_sim(recordings=300, latency=0.02, audio_bytes=30_000, pending=4, late_files=4,
                         end_after=1.0, files_after=1.0)
    cfg = write_config(tmp_path, sim, api={"page_size": 25, "storage_listing": listing}, workers={"concurrency": 4})
    db = tmp_path / "state.sqlite3"
    for threshold in (40, 120, 200):
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "backfill", "--wait", "60"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=cli_env(),
        )
        try:
            await wait_until(lambda t=threshold: _archived(db) >= t, 60, f"{threshold} archived")
            helpers = _children(proc.pid)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert helpers, "the store helpers were running"
        await wait_until(lambda h=helpers: not any(_alive(p) for p in h), 10, "the orphaned helpers to exit")
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "60")
    assert final.rc == 0, final
    assert_archive_complete(sim, tmp_path / "archive", db)
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0, verify
    if listing:
        assert sim.stats["recordingfiles"] <= 8, "only the late ones may need /recordingfiles"


async def test_sigterm_stops_cleanly_and_resumes(tmp_path, make_sim):
    sim = await make_sim(recordings=200, latency=0.03, audio_bytes=30_000)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 4})
    db = tmp_path / "state.sqlite3"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log_file:  # a file, not a pipe nobody reads while it runs
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "run"), stdout=log_file, stderr=log_file, env=cli_env(),
        )
        await wait_until(lambda: _archived(db) >= 30, 60, "30 archived")
        helpers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0, log_path.read_text()[-2000:]
    assert helpers and not any(_alive(p) for p in helpers), "the daemon closed and reaped its helpers"
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM recordings WHERE state='downloading'").fetchone()[0] == 0
    con.close()
    assert not list((tmp_path / "archive").rglob("*.partial"))
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert final.rc == 0, final
    assert_archive_complete(sim, tmp_path / "archive", db)


async def test_sigterm_during_a_slow_walk_stops_within_seconds_and_resumes_from_the_checkpoint(tmp_path, make_sim):
    sim = await make_sim(recordings=3000, latency=0.3, audio_bytes=500)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 2})
    db = tmp_path / "state.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        *cli_command("--config", str(cfg), "backfill"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=cli_env(),
    )
    await wait_until(lambda: sim.stats["list"] >= 4, 30, "the walk under way")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    stopped_in = time.monotonic() - started
    assert stopped_in < 2 + SHUTDOWN_GRACE, f"took {stopped_in:.1f} s after SIGTERM"
    assert proc.returncode == 4, out.decode()  # interrupted: not "finished"
    assert "interrupted by SIGTERM" in out.decode()
    listed_before = sim.stats["list"]
    con = sqlite3.connect(db)
    checkpoint = con.execute("SELECT token FROM walks").fetchone()
    con.close()
    assert checkpoint, "the walk's place is kept"
    sim.cfg.latency = 0
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert final.rc == 0, final
    resumed = sim.stats["list"] - listed_before  # a whole walk is 31 pages (30 and the empty one)
    assert resumed <= 32 - listed_before < 31, "resumed from the checkpoint, not walked from the start"
    assert_archive_complete(sim, tmp_path / "archive", db)


async def test_a_second_instance_refuses_to_start(tmp_path, make_sim):
    sim = await make_sim(recordings=5, audio_bytes=4000)
    cfg = write_config(tmp_path, sim)
    proc = await asyncio.create_subprocess_exec(
        *cli_command("--config", str(cfg), "run"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=cli_env(),
    )
    try:
        await wait_until(lambda: _archived(tmp_path / "state.sqlite3") >= 5, 30, "first instance working")
        second = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
        assert second.rc == 2, second
        assert "in use by another voipbin-archiver process" in second.err
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert proc.returncode == 0


async def test_store_helpers_killed_mid_backfill_are_replaced_and_nothing_is_lost(tmp_path, make_sim):
    sim = await make_sim(recordings=600, latency=0.02, audio_bytes=30_000)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 4, "store_processes": 2})
    db = tmp_path / "state.sqlite3"
    log_path = tmp_path / "backfill.log"
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "--log-format", "json", "backfill", "--wait", "30"),
            stdout=log_file, stderr=log_file, env=cli_env(),
        )
        killed: list[int] = []
        for threshold in (50, 150):
            await wait_until(lambda t=threshold: _archived(db) >= t, 60, f"{threshold} archived")
            helpers = [p for p in _children(proc.pid) if p not in killed]
            assert helpers, "the store helpers were running"
            for pid in helpers:
                os.kill(pid, signal.SIGKILL)
            killed += helpers
        await asyncio.wait_for(proc.wait(), 120)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert_archive_complete(sim, tmp_path / "archive", db)  # replacements took over, nothing lost


async def test_a_body_left_without_its_sidecar_is_fetched_again(tmp_path, make_sim):
    """A power cut can keep a body's rename but lose its sidecar's (the power-cut tests make
    such survivors): the rerun must not trust the body, nor stall on it, but fetch it again."""
    sim = await make_sim(recordings=10, audio_bytes=6_000)
    cfg = write_config(tmp_path, sim)
    db = tmp_path / "state.sqlite3"
    first = await run_cli("--config", str(cfg), "backfill")
    assert first.rc == 0, first
    con = sqlite3.connect(db)
    rec_id, rel = con.execute("SELECT id, path FROM recordings WHERE state='archived' LIMIT 1").fetchone()
    con.execute("UPDATE recordings SET state='pending', path=NULL, next_attempt_at=0 WHERE id=?", (rec_id,))
    con.commit()
    con.close()
    body = tmp_path / "archive" / rel
    body.with_suffix(".json").unlink()
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert again.rc == 0, again
    assert "existing_file_rejected" in again.err and rec_id in again.err
    assert_archive_complete(sim, tmp_path / "archive", db)
