"""Freeing the server's capped store once the archive copy is safe ([retention], ``prune``)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import pytest

from archiver.simulator import Simulator
from tests.conftest import archive_files, cli_command, cli_env, db_rows, run_cli, wait_until, write_config

DELETE_SQL = "SELECT id, state, server_deleted_at, delete_request_id, delete_intent_at, last_error FROM recordings"
RETAIN = {"delete_from_server": True, "delete_after": 0}


def _audit(tmp_path: Path) -> list[dict]:
    path = tmp_path / "deletions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _cap_store(sim: Simulator, recordings: int) -> int:
    """Add a first recording and cap the store at room for ``recordings`` of its size."""
    first = sim.add_recording()
    size = len(sim.body(sim.recordings[first])[0])
    sim.cfg.store_capacity = recordings * size + size // 2
    sim.store_sizes[first] = size  # it was stored before the cap was set
    return size


async def _archive_without_deleting(tmp_path: Path, sim: Simulator, **retention) -> Path:
    cfg = write_config(tmp_path, sim, retention={**RETAIN, **retention})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5", "--no-delete")
    assert result.rc == 0, result
    assert sim.stats["delete"] == 0, "--no-delete"
    return cfg


async def test_service_keeps_a_capped_store_flowing_and_deletes_each_copy_once_after_it_is_safe(tmp_path, make_sim):
    sim = await make_sim(recordings=0, audio_bytes=4000)
    _cap_store(sim, 12)  # room for a dozen recordings
    cfg = write_config(tmp_path, sim, retention=RETAIN, workers={"poll_interval": 0.2})
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=cli_env())
    try:
        for _ in range(59):  # a steady stream of new calls, five times what the store holds
            await asyncio.sleep(0.15)
            sim.add_recording()
        await wait_until(lambda: len(sim.deletes) == 60, 120, "every recording deleted from the server",
                         lambda: f"{len(sim.deletes)} deleted, {len(sim.complete_downloads)} downloaded")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        log_file.close()
    assert proc.returncode == 0
    assert sim.stats["store_full"] == 0, "no recording lost its audio at the source"
    assert set(sim.deletes.values()) == {1}, "each deleted exactly once"
    assert sim.delete_violations == 0, "never before a complete download"
    rows = db_rows(tmp_path / "state.sqlite3", DELETE_SQL)
    assert len(rows) == 60 and all(r[1] == "archived" and r[2] and r[3] for r in rows)
    audit = _audit(tmp_path)
    assert sorted(a["recording_id"] for a in audit) == sorted(r[0] for r in rows), "one audit line each"
    assert all(a["sha256"] and a["request_id"] and a["http_status"] == 200 for a in audit)
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0, verify
    sidecar = json.loads(next(p for p in archive_files(tmp_path / "archive") if p.suffix == ".json").read_text())
    assert sidecar["server_copy"]["deleted"] is True and sidecar["server_copy"]["request_id"]


async def test_without_retention_nothing_is_deleted_and_a_full_store_loses_audio(tmp_path, make_sim):
    sim = await make_sim(recordings=0, audio_bytes=4000)
    _cap_store(sim, 5)
    for _ in range(9):
        sim.add_recording()
    cfg = write_config(tmp_path, sim)  # delete_from_server = false, the default
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sim.stats["delete"] == 0, "no DELETE is ever sent"
    states = [r[1] for r in db_rows(tmp_path / "state.sqlite3", DELETE_SQL)]
    assert states.count("archived") == 5 and states.count("no_audio") == 5, "the cost of not deleting"
    status = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    assert status["server_deletion"]["enabled"] is False and status["server_deletion"]["due"] == 0
    assert status["server_deletion"]["server_store"]["size"] == sum(sim.store_sizes.values())
    refused = await run_cli("--config", str(cfg), "prune")
    assert refused.rc == 2 and "delete_from_server is false" in refused.err


@pytest.mark.parametrize("stall", ["before", "after"])
async def test_kill_9_around_the_delete_leaves_exactly_one_deletion_and_one_audit_line(tmp_path, make_sim, stall):
    sim = await make_sim(recordings=5, audio_bytes=2000)
    cfg = await _archive_without_deleting(tmp_path, sim)
    db = tmp_path / "state.sqlite3"

    def intent_recorded() -> bool:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return con.execute("SELECT count(*) FROM recordings WHERE delete_intent_at IS NOT NULL").fetchone()[0] > 0
        finally:
            con.close()

    sim.delete_stall = stall  # "before": killed with the intent recorded, the DELETE not done;
    proc = await asyncio.create_subprocess_exec(  # "after": done on the server, not committed by us
        *cli_command("--config", str(cfg), "prune"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env=cli_env())
    await wait_until(lambda: intent_recorded() and sim.stats["delete"] == 1, 20, "the intent and the DELETE")
    if stall == "after":
        await wait_until(lambda: len(sim.deletes) == 1, 10, "the server to delete it")
    proc.kill()
    await proc.wait()
    assert len(sim.deletes) == (1 if stall == "after" else 0)
    assert not any(r[2] for r in db_rows(db, DELETE_SQL)), "nothing committed as deleted"

    sim.delete_stall = ""
    result = await run_cli("--config", str(cfg), "prune")
    assert result.rc == 0, result
    assert len(sim.deletes) == 5 and set(sim.deletes.values()) == {1}, "exactly one deletion each"
    audit = _audit(tmp_path)
    assert sorted(a["recording_id"] for a in audit) == sorted(sim.deletes), "the audit line present once each"
    assert ("already gone: 1" in result.out) == (stall == "after"), result.out
    assert all(r[2] for r in db_rows(db, DELETE_SQL))
    assert (await run_cli("--config", str(cfg), "verify")).rc == 0


async def test_a_tampered_archive_copy_is_never_deleted_and_is_fetched_again(tmp_path, make_sim):
    sim = await make_sim(recordings=4, audio_bytes=2000)
    cfg = await _archive_without_deleting(tmp_path, sim)
    victim, rel = next((r[0], r[2]) for r in db_rows(tmp_path / "state.sqlite3") if r[1] == "archived")
    path = tmp_path / "archive" / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit-flipped byte: what rot or a careless hand leaves
    path.write_bytes(bytes(data))
    result = await run_cli("--config", str(cfg), "prune")
    assert result.rc == 1, result
    assert "failed re-verification: 1" in result.out and "server_delete_refused" in result.err
    assert victim not in sim.deletes and len(sim.deletes) == 3
    row = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", DELETE_SQL)}[victim]
    assert row[1] == "pending" and row[2] is None and "re-verification" in row[5]
    assert victim not in {a["recording_id"] for a in _audit(tmp_path)}
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")  # the server still has it
    assert again.rc == 0, again
    assert path.read_bytes() == sim.expected_archives()[victim]
    assert set(sim.deletes) == set(sim.recordings) and set(sim.deletes.values()) == {1}
    assert sim.delete_violations == 0


async def test_dry_run_and_what_is_never_due(tmp_path, make_sim):
    sim = await make_sim(recordings=6, audio_bytes=2000, no_audio=1, missing_member=1)
    cfg = await _archive_without_deleting(tmp_path, sim)
    dry = await run_cli("--config", str(cfg), "prune", "--dry-run")
    assert dry.rc == 0, dry
    assert "due for deletion from the server now: 4 recordings" in dry.out, "not no_audio, not incomplete"
    assert sim.stats["delete"] == 0, "a dry run deletes nothing"
    status = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    assert status["server_deletion"]["due"] == 4 and status["server_deletion"]["deleted"] == 0

    later = write_config(tmp_path, sim, retention={**RETAIN, "delete_after": 3600})
    result = await run_cli("--config", str(later), "prune")
    assert result.rc == 0 and sim.stats["delete"] == 0, "not due for another hour"

    everything = write_config(tmp_path, sim, retention={**RETAIN, "delete_incomplete": True})
    result = await run_cli("--config", str(everything), "prune")
    assert result.rc == 0, result
    assert len(sim.deletes) == 5, "the incomplete one too, never the one without audio"
    table = await run_cli("--config", str(everything), "status")
    assert "server deletion: on; deleted 5, due now 0" in table.out and "server store:" in table.out


async def test_a_nearly_full_store_is_warned_about_and_blamed_for_no_audio(tmp_path, make_sim):
    sim = await make_sim(recordings=0, audio_bytes=2000)
    size = _cap_store(sim, 3)
    for _ in range(3):
        sim.add_recording()
    cfg = write_config(tmp_path, sim, retention={"store_capacity": 3 * size, "store_warn_ratio": 0.8})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert "server_store_near_full" in result.err and "no_audio_store_full" in result.err
    assert "delete_from_server = true" in result.err


async def test_a_backfill_deletes_what_its_last_downloads_archived_even_with_no_wait(tmp_path, make_sim):
    """#31: with ``--wait 0`` the feeder ends as soon as nothing is left to hand out, while the
    last downloads (here: every one, a ZIP build of 1.5 s each) are still under way; their
    recordings are archived before the backfill exits, and so are due for deletion in this run."""
    sim = await make_sim(recordings=6, audio_bytes=2000, slow_builds=6, build_seconds=1.5)
    cfg = write_config(tmp_path, sim, retention=RETAIN)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "0")
    assert result.rc == 0, result
    assert sim.stats["slow_builds"] == 6
    rows = db_rows(tmp_path / "state.sqlite3", DELETE_SQL)
    assert [r[1] for r in rows] == ["archived"] * 6
    assert len(sim.deletes) == 6 and all(r[2] for r in rows), "every archived recording deleted in the same run"
    assert len(_audit(tmp_path)) == 6
    assert "server deletion incomplete" not in result.out


async def test_a_backfill_whose_deletions_fail_says_so_and_exits_1(tmp_path, make_sim):
    sim = await make_sim(recordings=4, audio_bytes=2000, faults={"delete_500": 1.0})
    cfg = write_config(tmp_path, sim, retention=RETAIN)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 1, result
    assert "server deletion incomplete" in result.out and "still due: 4" in result.out, result.out
    assert not sim.deletes and [r[1] for r in db_rows(tmp_path / "state.sqlite3", DELETE_SQL)] == ["archived"] * 4
    sim.faults = {}
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert again.rc == 0 and len(sim.deletes) == 4, again
