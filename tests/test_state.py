"""The state database: migrations on start, refusal of a newer schema, one writer."""

from __future__ import annotations

import sqlite3

import pytest

from archiver.errors import StateLocked
from archiver.state import MIGRATIONS, StateDB


async def test_an_older_database_is_migrated_on_start(tmp_path):
    db = tmp_path / "state.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    con.execute(
        "INSERT INTO recordings (id, state, raw, discovered_at, updated_at) VALUES ('a', 'pending', '{}', 0, 0)"
    )
    con.commit()
    con.close()
    state = await StateDB.open(db)
    try:
        version = (await state.db.execute_fetchall("PRAGMA user_version"))[0][0]
        assert version == len(MIGRATIONS) == 4
        indexes = {r[0] for r in await state.db.execute_fetchall("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"recordings_due", "recordings_waiting_created", "recordings_errors", "recordings_flagged",
                "recordings_deletable"} <= indexes
        assert (await state.counts())["pending"] == 1, "rows survive the migration"
    finally:
        await state.close()


async def test_a_newer_database_is_refused(tmp_path):
    db = tmp_path / "state.sqlite3"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StateLocked, match="newer than this archiver"):
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
