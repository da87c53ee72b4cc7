"""End to end: the real CLI archives from the simulator over real HTTP into a temp directory."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.checks import assert_archive_complete
from tests.conftest import archive_files, archived_this_run, db_rows, run_cli, write_config


@pytest.mark.parametrize(
    ("mode", "timestamps", "listing"), [("zip", "rfc3339", False), ("wav", "tutorial", False),
                                        ("zip", "tutorial", True)],
    ids=["zip-today", "wav-tutorial", "storage-listing"],
)
async def test_backfill_archives_everything_once(tmp_path, make_sim, mode, timestamps, listing):
    sim = await make_sim(
        recordings=240, mode=mode, timestamps=timestamps, pending=6, late_files=6, deleted=5,
        end_after=1.0, files_after=2.0, audio_bytes=16_000,
    )
    cfg = write_config(tmp_path, sim, api={"page_size": 35, "storage_listing": listing})
    first = await run_cli("--config", str(cfg), "backfill", "--wait", "60")
    assert first.rc == 0, first
    assert archived_this_run(first.out) == 235, first.out
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    if listing:  # the late ones waited for their files to be listed: not one request for a ZIP
        assert sim.stats["recordingfiles"] == 0, sim.stats
    # the late ones were fetched while not ready, yet only their final body was kept
    assert sim.stats["list"] >= 240 // 35 + 1
    deleted = [r.id for r in sim.recordings.values() if sim.is_deleted(r)]
    assert not [p for p in (tmp_path / "archive").rglob("*") if any(d in p.name for d in deleted)]

    gets_before = sum(sim.storage_gets.values())
    files_before = sim.stats["recordingfiles"]
    second = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert second.rc == 0, second
    assert sum(sim.storage_gets.values()) == gets_before, "second backfill downloaded again"
    assert sim.stats["recordingfiles"] == files_before
    assert archived_this_run(second.out) == 0

    status = await run_cli("--config", str(cfg), "status", "--json")
    info = json.loads(status.out)
    assert info["archived"] == 235 and info["pending"] == 0 and info["failed"] == 0

    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0, verify
    assert "verified 235" in verify.out


async def test_happy_path_costs_two_requests_per_recording(tmp_path, make_sim):
    sim = await make_sim(recordings=120, audio_bytes=4000)
    cfg = write_config(tmp_path, sim, api={"page_size": 100})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sim.stats["detail"] == 0, "ended recordings need no detail request"
    assert sim.stats["recordingfiles"] == 120 and sim.stats["storage_requests"] == 120
    assert sim.stats["list"] == 3  # 100 + 20 + the empty page after the short last page


async def test_a_lost_database_is_rebuilt_from_the_archive_without_downloading(tmp_path, make_sim):
    sim = await make_sim(recordings=30, audio_bytes=4000)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "5")).rc == 0
    downloads = sim.stats["storage_requests"]
    for name in ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sim.stats["storage_requests"] == downloads, "files already in the archive are re-verified, not fetched"
    assert result.err.count('"existing_file_adopted"') == 30
    assert [r[1] for r in db_rows(tmp_path / "state.sqlite3")] == ["archived"] * 30
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_unpack_extracts_verified_members(tmp_path, make_sim):
    sim = await make_sim(recordings=20, audio_bytes=4000)
    cfg = write_config(tmp_path, sim, archive={"unpack": True})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3", unpack=True)
    names = {p.name for p in (tmp_path / "archive").rglob("*.wav")}
    assert names and not any(":" in n for n in names), "':' must become '_'"


async def test_pending_recording_times_out(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=4000)
    stuck = sim.add_recording(ends_in=3600)
    cfg = write_config(tmp_path, sim, workers={"pending_timeout": 0.5})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 1, result
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    assert rows[stuck][1] == "failed" and "pending_timeout" in rows[stuck][4]


async def test_pending_timeout_is_judged_on_a_fresh_poll(tmp_path, make_sim):
    """Past pending_timeout, a recording the listing showed as recording is polled once more:
    it has ended since, so it is archived, not failed."""
    sim = await make_sim(recordings=0, audio_bytes=4000)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    # the first poll (within 4 s of now) finds it recording and not timed out; the next, 5 s
    # later, is past the timeout and finds it ended
    late = sim.add_recording(ends_in=4, raw_overrides={"tm_create": now})
    cfg = write_config(tmp_path, sim, workers={"pending_timeout": 4, "poll_backoff_min": 5, "poll_backoff_max": 5})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "15")
    assert result.rc == 0, result
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    assert rows[late][1] == "archived", rows[late]
    # normally the second poll, after the timeout, found it ended; on a machine that takes over
    # 4 s to start, the first poll already finds it ended (and this test proves less)
    assert sim.stats["detail"] >= 1, sim.stats


async def test_unfinished_recordings_stay_pending_without_failing(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=4000)
    later = sim.add_recording(ends_in=3600)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "0.5")
    assert result.rc == 0, result
    assert "still waiting: 1" in result.out
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    assert rows[later][1] == "discovered"


async def test_settled_empty_zip_is_no_audio_with_only_its_sidecar(tmp_path, make_sim):
    from archiver.simulator import EMPTY_ZIP

    sim = await make_sim(recordings=0)
    empty = sim.add_recording(body=EMPTY_ZIP)
    cfg = write_config(tmp_path, sim, archive={"settle_window": 0})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    row = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}[empty]
    assert row[1] == "no_audio", row
    files = archive_files(tmp_path / "archive")
    assert [p.name for p in files] == [f"{empty}.json"], "the sidecar alone: an empty ZIP is no archive"


@pytest.mark.parametrize("mode", ["zip", "wav"])
async def test_large_recordings_stream_to_disk_in_pieces(tmp_path, make_sim, mode):
    """Bodies over the 1 MiB write buffer take the spill path (aiofiles writes as they stream)."""
    sim = await make_sim(recordings=4, mode=mode, audio_bytes=3_500_000, faults={"storage_corrupt": 0.2})
    cfg = write_config(tmp_path, sim, archive={"unpack": mode == "zip"}, workers={"max_attempts": 20})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3", unpack=mode == "zip")
