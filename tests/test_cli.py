"""The CLI as a newcomer and an operator meet it: demo, verify, status, the simulator alone."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.conftest import REPO, cli_env, db_rows, run_cli, write_config


async def test_demo_archives_from_the_bundled_simulator(tmp_path):
    result = await run_cli("demo", "--recordings", "25", cwd=tmp_path, timeout=180)
    assert result.rc == 0, result
    assert "demo summary" in result.out
    archive = tmp_path / "demo-archive" / "recordings"
    zips = list(archive.rglob("*.zip"))
    assert len(zips) >= 20 and all(z.with_suffix(".json").exists() for z in zips)
    rows = db_rows(tmp_path / "demo-archive" / "state.sqlite3")
    assert not [r for r in rows if r[1] == "failed"]


async def test_verify_finds_missing_and_changed_files(tmp_path, make_sim):
    sim = await make_sim(recordings=8, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2")).rc == 0
    rows = [r for r in db_rows(tmp_path / "state.sqlite3") if r[1] == "archived"]
    changed = tmp_path / "archive" / rows[0][2]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    missing = tmp_path / "archive" / rows[1][2]
    missing.unlink()
    result = await run_cli("--config", str(cfg), "verify")
    assert result.rc == 1, result
    assert rows[0][2] in result.out and "changed" in result.out
    assert rows[1][2] in result.out and "missing" in result.out
    assert "2 problem(s)" in result.out


async def test_status_json_has_every_state(tmp_path, make_sim):
    sim = await make_sim(recordings=4, audio_bytes=2000, deleted=1)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2")).rc == 0
    info = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    for state in ("discovered", "pending", "downloading", "archived", "failed", "skipped"):
        assert state in info
    assert info["archived"] == 3 and info["total"] == 3


async def test_unwritable_archive_directory_exits_non_zero_and_keeps_state(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    (tmp_path / "archive").write_text("a file where the archive directory should be")
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    assert "cannot create" in result.err + result.out
    rows = db_rows(tmp_path / "state.sqlite3")
    assert rows and all(r[1] == "pending" for r in rows), "still retryable, no attempt lost"


async def test_simulator_runs_on_its_own():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "archiver.simulator", "--port", "0", "--recordings", "3",
        stdout=asyncio.subprocess.PIPE, env=cli_env(), cwd=REPO,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("simulator: http://127.0.0.1:") and "accesskey=vb_" in line
    finally:
        proc.terminate()
        await proc.wait()
