"""The state database: migrations on start, refusal of a newer schema, one writer, damage."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from archiver.errors import StateLocked, StateUnusable
from archiver.state.sqlite import MIGRATIONS, StateDB
from tests.checks import assert_archive_complete
from tests.conftest import run_cli, small_disk, write_config


async def test_an_older_database_is_migrated_on_start(tmp_path):
    db = tmp_path / "state.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    con.execute(
        "INSERT INTO recordings (id, state, raw, discovered_at, updated_at) VALUES ('a', 'pending', ?, 0, 0)",
        ('{"tm_start": "2021-01-28 09:17:00.814000", "reference_type": "call", "reference_id": "c-1"}',),
    )
    con.commit()
    con.close()
    state = await StateDB.open(db)
    try:
        version = (await state.db.execute_fetchall("PRAGMA user_version"))[0][0]
        assert version == len(MIGRATIONS) == 8
        indexes = {r[0] for r in await state.db.execute_fetchall("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"recordings_due", "recordings_waiting_created", "recordings_errors", "recordings_flagged",
                "recordings_deletable", "recordings_manifest_due"} <= indexes
        assert (await state.counts())["pending"] == 1, "rows survive the migration"
        (row,) = await state.db.execute_fetchall("SELECT tm_start, reference_id FROM recordings")
        assert (row[0], row[1]) == (1611825420.814, "c-1"), "v6 fills in find's columns from the JSON"
    finally:
        await state.close()


async def test_a_newer_database_is_refused(tmp_path):
    db = tmp_path / "state.sqlite3"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StateUnusable, match="newer than this archiver"):
        await StateDB.open(db)


async def test_one_writer_per_database(tmp_path):
    first = await StateDB.open(tmp_path / "state.sqlite3")
    try:
        with pytest.raises(StateLocked, match="in use"):
            await StateDB.open(tmp_path / "state.sqlite3")
        reader = await StateDB.open(tmp_path / "state.sqlite3", readonly=True)  # status, verify
        await reader.close()
    finally:
        await first.close()


async def _seeded_database(tmp_path, make_sim):
    sim = await make_sim(recordings=300, audio_bytes=500)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    return sim, cfg


def _truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _randomise(db: Path) -> None:
    db.write_bytes(random.Random(7).randbytes(64 * 1024))


@pytest.mark.parametrize("damage", [_truncate, _randomise], ids=["truncated", "random"])
async def test_a_corrupt_database_is_a_clear_exit_2_that_releases_the_lock(tmp_path, make_sim, damage):
    _, cfg = await _seeded_database(tmp_path, make_sim)
    db = tmp_path / "state.sqlite3"
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"state.sqlite3{suffix}").unlink(missing_ok=True)
    damage(db)
    for command in (["backfill", "--wait", "1"], ["backfill", "--wait", "1"], ["status"], ["verify"]):
        result = await run_cli("--config", str(cfg), *command, timeout=30)
        assert result.rc == 2, (command, result)
        assert str(db) in result.err and "move it aside" in result.err, result.err
        assert "Traceback" not in result.err and "in use" not in result.err, "the lock was released"


async def test_a_database_moved_aside_is_rebuilt_from_the_archive(tmp_path, make_sim):
    sim, cfg = await _seeded_database(tmp_path, make_sim)
    db = tmp_path / "state.sqlite3"
    _randomise(db)
    db.rename(tmp_path / "state.sqlite3.broken")
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"state.sqlite3{suffix}").unlink(missing_ok=True)
    fetched = sum(sim.storage_gets.values())
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sum(sim.storage_gets.values()) == fetched, "rebuilt from files and sidecars, nothing fetched again"
    assert_archive_complete(sim, tmp_path / "archive", db)


async def test_a_read_only_database_is_a_clear_exit_2(tmp_path, make_sim):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a read-only filesystem")
    sim = await make_sim(recordings=5, audio_bytes=500)
    state_dir = tmp_path / "state"
    with small_disk(state_dir, "4m"):
        cfg = write_config(tmp_path, sim, state={"database": "state/state.sqlite3"})
        assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2")).rc == 0
        subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "1", timeout=30)
        assert result.rc == 2, result
        assert "state.sqlite3" in result.err and "read-only" in result.err.lower()
        assert "Traceback" not in result.err
        for command in ("status", "verify"):
            other = await run_cli("--config", str(cfg), command)
            assert other.rc in (0, 2) and "Traceback" not in other.err, other
            assert other.rc == 0 or "state.sqlite3" in other.err


async def test_due_is_oldest_first_and_never_hands_out_what_is_in_flight(tmp_path):
    """The feeder's only source of work: ``limit`` rows of this account, none of ``exclude``,
    even when the excluded ones are the oldest (they must not eat into the limit)."""
    root = await StateDB.open(tmp_path / "state.sqlite3")
    try:
        rows = [("acme", f"r{i}", "pending" if i % 3 else "discovered", float(i)) for i in range(10)]
        rows += [("other", "o1", "pending", 0.5), ("acme", "done", "archived", 0.1), ("acme", "later", "pending", 99.0)]
        await root.db.executemany(
            "INSERT INTO recordings (account, id, state, raw, discovered_at, updated_at, next_attempt_at)"
            " VALUES (?, ?, ?, '{}', 0, 0, ?)", rows,
        )
        await root.db.commit()
        acme = root.for_account("acme")
        assert [r.id for r in await acme.due(50.0, 4, set())] == ["r0", "r1", "r2", "r3"]
        assert [r.id for r in await acme.due(50.0, 4, {"r0", "r1", "r3"})] == ["r2", "r4", "r5", "r6"]
        everything = {f"r{i}" for i in range(10)}
        assert await acme.due(50.0, 4, everything) == []
        assert [r.id for r in await acme.due(100.0, 4, everything)] == ["later"]
    finally:
        await root.close()
