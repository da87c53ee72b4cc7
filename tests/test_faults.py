"""Faults the daemon must ride through, each against the simulator over real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import time

import aiohttp
import pytest

from tests.checks import assert_archive_complete
from tests.conftest import (
    archive_files,
    archived_this_run,
    body_when,
    cli_command,
    cli_env,
    db_rows,
    free_port,
    run_cli,
    small_disk,
    wait_until,
    write_config,
)


@pytest.mark.parametrize(
    "faults",
    [
        {"api_500": 0.25, "api_reset": 0.1},
        {"api_503": 0.3, "malformed_json": 0.2},
        {"storage_truncate": 0.25, "storage_500": 0.1},
        {"storage_corrupt": 0.2, "storage_bad_hash": 0.2},
        {"storage_expired": 0.4},
        {"storage_stall": 0.15},
    ],
    ids=["5xx-resets", "503-malformed-json", "truncated", "corrupt-hash", "expired-url", "slow-body"],
)
async def test_transient_faults_lose_nothing(tmp_path, make_sim, faults):
    sim = await make_sim(recordings=80, audio_bytes=20_000, faults=faults, stall_seconds=3)
    cfg = write_config(tmp_path, sim, api={"page_size": 20, "timeout": 0.5, "max_retries": 8},
                       workers={"max_attempts": 20})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    injected = sum(v for k, v in sim.stats.items() if k.startswith("fault_"))
    assert injected > 0, "the faults must actually have happened"


async def test_persistent_corruption_fails_the_recording_and_keeps_no_bad_file(tmp_path, make_sim):
    sim = await make_sim(recordings=5, audio_bytes=20_000, faults={"storage_corrupt": 1.0})
    cfg = write_config(tmp_path, sim, workers={"max_attempts": 2})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 1, result
    rows = db_rows(tmp_path / "state.sqlite3")
    assert {r[1] for r in rows} == {"failed"}
    assert all("mismatch" in r[4] and "after 2 attempts" in r[4] for r in rows), rows
    assert not archive_files(tmp_path / "archive"), "no bad file, no temporary file"


async def test_rate_limit_429_is_honoured_and_slows_the_pool(tmp_path, make_sim):
    sim = await make_sim(recordings=40, audio_bytes=2000, rate_limit=True, rate=20.0, burst=5)
    # we pace at 50/s against a server allowing 20/s: 429s will come, and must be waited out
    cfg = write_config(tmp_path, sim, api={"requests_per_second": 50, "burst": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert sim.stats["http_429"] > 0
    assert "rate_limited" in result.err
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_pacing_avoids_429(tmp_path, make_sim):
    sim = await make_sim(recordings=30, audio_bytes=2000, rate_limit=True, rate=16.7, burst=33)
    cfg = write_config(tmp_path, sim, api={"requests_per_second": 16})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert sim.stats["http_429"] == 0


async def test_a_page_that_is_not_a_list_is_skipped_and_the_walk_goes_on(tmp_path, make_sim):
    sim = await make_sim(recordings=30, audio_bytes=2000)
    sim.quirk = "result_not_list"
    cfg = write_config(tmp_path, sim, api={"page_size": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert "page_result_not_a_list" in result.err
    assert archived_this_run(result.out) == 20


async def test_expired_jwt_logs_in_again_once_and_carries_on(tmp_path, make_sim):
    sim = await make_sim(recordings=40, audio_bytes=2000, latency=0.01)
    cfg = write_config(tmp_path, sim, api={"accesskey": None, "username": sim.cfg.username,
                                           "password": sim.cfg.password, "page_size": 10},
                       workers={"concurrency": 2})
    import asyncio

    async def expire_soon():
        while sim.stats["storage_requests"] < 10:
            await asyncio.sleep(0.01)
        sim.tokens.clear()  # every JWT issued so far is now refused

    expiry = asyncio.create_task(expire_soon())
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    await expiry
    assert result.rc == 0, result
    assert sim.stats["login"] == 2, "one login at start, one after the 401"
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_redirect_to_plain_http_elsewhere_is_refused(tmp_path, make_sim):
    sim = await make_sim(recordings=2, audio_bytes=2000, storage_base="http://storage.example.com")
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    rows = db_rows(tmp_path / "state.sqlite3")
    assert all(r[1] == "failed" and "non-HTTPS" in r[4] for r in rows), rows


async def test_a_redirect_that_echoes_our_query_never_takes_the_key_to_storage(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=2000)
    sim.quirk = "echo_query"
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sim.credential_leaks == 0, "storage saw our access key"
    assert "redirect_credential_stripped" in result.err and sim.accesskey not in result.err
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_a_redirect_with_the_key_outside_its_query_is_refused(tmp_path, make_sim):
    sim = await make_sim(recordings=2, audio_bytes=2000)
    sim.quirk = "key_in_path"
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    assert sim.stats["storage_requests"] == 0, "nothing went to storage"
    rows = db_rows(tmp_path / "state.sqlite3")
    assert all(r[1] == "failed" and "carries our credential" in r[4] for r in rows), rows
    assert sim.accesskey not in result.err + result.out


async def test_a_dripping_storage_answer_cannot_hold_a_backfill(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000, faults={"storage_drip": 1.0})
    cfg = write_config(tmp_path, sim, api={"min_transfer_rate": 1024, "transfer_rate_window": 2})
    started = time.monotonic()
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5", timeout=60)
    elapsed = time.monotonic() - started
    assert result.rc == 0, result  # nothing failed for good: they stay pending
    assert elapsed < 5 + 6 + 6, f"{elapsed:.1f} s: the drip held the backfill"
    assert "storage transfer too slow" in result.err
    assert {r[1] for r in db_rows(tmp_path / "state.sqlite3")} == {"pending"}
    sim.faults.clear()
    final = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert final.rc == 0, final
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_disk_full_stops_cleanly_and_stays_retryable(tmp_path, make_sim):
    archive = tmp_path / "archive"
    with small_disk(archive, "600k"):
        sim = await make_sim(recordings=10, audio_bytes=200_000)
        cfg = write_config(tmp_path, sim, workers={"concurrency": 2})
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
        assert result.rc == 1, result
        assert "No space left on device" in result.err + result.out
        assert not [p for p in archive_files(archive) if p.name.endswith(".partial")]
        rows = db_rows(tmp_path / "state.sqlite3")
        archived = [r for r in rows if r[1] == "archived"]
        assert len(archived) < 10 and not [r for r in rows if r[1] in ("failed", "downloading")]
        for r in archived:  # what was archived is whole
            assert (archive / r[2]).stat().st_size > 0
        # with room again, the next run finishes the job
        subprocess.run(["mount", "-o", "remount,size=20m", str(archive)], check=True)
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
        assert result.rc == 0, result
        assert_archive_complete(sim, archive, tmp_path / "state.sqlite3")


async def test_a_full_disk_holding_database_and_archive_pauses_the_service_which_resumes_by_itself(
    tmp_path, make_sim
):
    disk = tmp_path / "disk"
    port = free_port()
    log_path = tmp_path / "run.log"
    with small_disk(disk, "900k"):
        sim = await make_sim(recordings=60, audio_bytes=30_000)
        cfg = write_config(tmp_path, sim, archive={"directory": "disk/archive"},
                           state={"database": "disk/state.sqlite3"}, metrics={"listen": f"127.0.0.1:{port}"},
                           workers={"concurrency": 4, "trouble_pause": 0.5, "poll_interval": 0.3})
        db = disk / "state.sqlite3"
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                        stdout=log_file, stderr=log_file, env=cli_env())
            try:
                async with aiohttp.ClientSession() as http:
                    await body_when(http, f"http://127.0.0.1:{port}/metrics",
                                    lambda body: "voipbin_archiver_unwritable 1.0" in body, 60,
                                    "the pause for the full disk")
                assert proc.returncode is None, "still running"
                subprocess.run(["mount", "-o", "remount,size=30m", str(disk)], check=True)  # space is back

                def all_archived() -> bool:
                    return sum(1 for r in db_rows(db) if r[1] == "archived") == 60

                await wait_until(all_archived, 60, "every recording archived after space came back")
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0
        log = log_path.read_text()
        assert "never retrieved" not in log and "Traceback" not in log, log[-3000:]
        assert "archive_unwritable" in log and "writable_again" in log
        assert not [r for r in db_rows(db) if r[1] == "downloading"]
        assert_archive_complete(sim, disk / "archive", db)


async def test_a_full_disk_holding_the_database_ends_a_backfill_with_a_summary(tmp_path, make_sim):
    disk = tmp_path / "disk"
    with small_disk(disk, "700k"):
        sim = await make_sim(recordings=60, audio_bytes=30_000)
        cfg = write_config(tmp_path, sim, archive={"directory": "disk/archive"},
                           state={"database": "disk/state.sqlite3"}, workers={"concurrency": 4})
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "5", timeout=60)
        assert result.rc == 1, result
        assert "backfill summary" in result.out and "stopped early" in result.out
        assert "not ended or files not uploaded" not in result.out, "the wrong reason for what waits"
        assert "Traceback" not in result.err and "never retrieved" not in result.err, result.err[-3000:]
        subprocess.run(["mount", "-o", "remount,size=30m", str(disk)], check=True)
        final = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
        assert final.rc == 0, final
        assert_archive_complete(sim, disk / "archive", disk / "state.sqlite3")


async def test_file_and_directory_modes(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, archive={"unpack": True})
    old = os.umask(0o022)
    try:
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    finally:
        os.umask(old)
    assert result.rc == 0, result
    assert stat.S_IMODE((tmp_path / "state.sqlite3").stat().st_mode) == 0o600
    for p in (tmp_path / "archive").rglob("*"):
        expected = 0o750 if p.is_dir() else 0o640
        assert stat.S_IMODE(p.stat().st_mode) == expected, p


async def test_final_file_without_a_database_record_is_reverified_not_trusted(tmp_path, make_sim):
    sim = await make_sim(recordings=6, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2")).rc == 0
    db = tmp_path / "state.sqlite3"
    rows = db_rows(db)
    good, bad = rows[0], rows[1]
    damaged = tmp_path / "archive" / bad[2]
    damaged.write_bytes(damaged.read_bytes()[:-10])  # as if the disk lost the tail
    con = sqlite3.connect(db)  # as if we crashed after the rename, before the commit
    con.execute("UPDATE recordings SET state='downloading', path=NULL WHERE id IN (?,?)", (good[0], bad[0]))
    con.commit()
    con.close()
    gets = dict(sim.storage_gets)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert sim.storage_gets[good[0]] == gets[good[0]], "a sound file is adopted, not downloaded again"
    assert sim.storage_gets[bad[0]] == gets[bad[0]] + 1, "a damaged file is downloaded again"
    assert "existing_file_rejected" in result.err and "existing_file_adopted" in result.err
    assert_archive_complete(sim, tmp_path / "archive", db)
