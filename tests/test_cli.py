"""The CLI as a newcomer and an operator meet it: demo, verify, status, the simulator alone."""

from __future__ import annotations

import asyncio
import json
import sqlite3
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


async def test_demo_leaves_a_config_for_status_and_verify(tmp_path):
    result = await run_cli("demo", "--recordings", "12", cwd=tmp_path, timeout=180)
    assert result.rc == 0, result
    config = tmp_path / "demo-archive" / "config.toml"
    assert f"voipbin-archiver --config {config} status" in result.out
    status = await run_cli("--config", str(config), "status", "--json", cwd=tmp_path)
    info = json.loads(status.out)
    assert status.rc == 0 and info["archived"] == info["total"] == 10, status  # 12, two of them deleted
    verify = await run_cli("verify", "--config", str(config), cwd=tmp_path)  # --config after the command
    assert verify.rc == 0 and "0 problem(s)" in verify.out, verify
    shown = next(line.strip() for line in result.out.splitlines() if " export --number " in line)
    export = await run_cli(*shown.split()[1:], cwd=tmp_path)  # the demo's own export command, as printed
    assert export.rc == 0 and "sha256sum -c SHA256SUMS" in export.out, export
    assert (tmp_path / "demo-production" / "SHA256SUMS").read_text().count("\n") >= 2


async def test_verify_repair_downloads_again_what_is_missing_or_changed(tmp_path, make_sim):
    sim = await make_sim(recordings=6, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, retention={"delete_from_server": True, "delete_after": 0})
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2", "--no-delete")).rc == 0
    rows = [r for r in db_rows(tmp_path / "state.sqlite3") if r[1] == "archived"]
    gone, changed, deleted = (tmp_path / "archive" / r[2] for r in rows[:3])
    gone.unlink()
    changed.write_bytes(changed.read_bytes()[:-5] + b"xxxxx")
    sim.recordings[rows[2][0]].deleted_at = None
    con = sqlite3.connect(tmp_path / "state.sqlite3")  # as if pruned long ago, then lost locally
    con.execute("UPDATE recordings SET server_deleted_at = 1 WHERE id = ?", (rows[2][0],))
    con.commit()
    con.close()
    deleted.unlink()
    result = await run_cli("--config", str(cfg), "verify", "--repair", "--config", str(cfg))
    assert result.rc == 1, result  # the one deleted from the server cannot be repaired
    assert f"CANNOT REPAIR {rows[2][0]}" in result.out and "restore the file from your backup" in result.out
    assert "downloading 2 recording(s) again" in result.out
    assert gone.read_bytes() == sim.expected_archives()[rows[0][0]]
    assert changed.read_bytes() == sim.expected_archives()[rows[1][0]]
    assert "verified again: 6 archived recordings, 1 problem(s)" in result.out
