"""The storage listing as a download path: recent recordings fetched from their listed channel
files (no API budget), everything else through /recordingfiles, and hostile listings."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sqlite3
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from archiver.errors import InvalidRecording
from archiver.storagefiles import URL_MARGIN, parse_storage_file, storage_route
from tests.checks import archived_members, assert_archive_complete, assert_same_audio
from tests.conftest import archived_this_run, cli_command, cli_env, db_rows, run_cli, wait_until, write_config

LISTING = {"storage_listing": True}


def _sidecars(root: Path) -> dict[str, dict]:
    out = {}
    for path in root.rglob("*.json"):
        doc = json.loads(path.read_text())
        if "recording" in doc:
            out[doc["recording"]["id"]] = doc
    return out


def _events(out: str, name: str) -> list[dict]:
    """The JSON log events called ``name`` in a run's output (stdout and stderr, joined)."""
    events = []
    for line in out.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


@pytest.mark.parametrize("unpack", [False, True], ids=["zip", "unpacked"])
async def test_recent_recordings_come_from_the_listing_without_api_budget(tmp_path, make_sim, unpack):
    sim = await make_sim(recordings=150, audio_bytes=8000)
    cfg = write_config(tmp_path, sim, api=LISTING, archive={"unpack": unpack})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert archived_this_run(result.out) == 150
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3", unpack=unpack)
    assert sim.stats["recordingfiles"] == 0, "not one ZIP asked for"
    assert sim.stats["storage_file_requests"] == sum(len(sim.stored_names(r)) for r in sim.recordings.values())
    assert sim.stats["api_requests"] / 150 <= 0.1, sim.stats
    sidecars = _sidecars(tmp_path / "archive")
    assert {d["archive"]["fetched_from"] for d in sidecars.values()} == {"storage_files"}
    for rec_id, doc in sidecars.items():
        listed = doc["archive"]["storage_files"]
        assert [f["name"] for f in listed] == sim.member_names(sim.recordings[rec_id])
        assert [f["size"] for f in listed] == [m["size"] for m in doc["archive"]["members"]]
    assert "from listed files" in result.out and "of which API" in result.out
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0 and "verified 150" in verify.out, verify
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")  # adopted, nothing fetched
    assert again.rc == 0 and archived_this_run(again.out) == 0, again
    assert sim.stats["recordingfiles"] == 0


async def test_recordings_older_than_their_urls_and_young_ones_each_take_their_path(tmp_path, make_sim):
    # 60 recordings over 14 days: the older half's listed URLs have expired
    sim = await make_sim(recordings=60, audio_bytes=8000, spacing=14 * 86400 / 60)
    cfg = write_config(tmp_path, sim, api=LISTING)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    ways = {rid: d["archive"]["fetched_from"] for rid, d in _sidecars(tmp_path / "archive").items()}
    horizon = time.time() - 7 * 86400 + URL_MARGIN
    for rid, way in ways.items():
        old = sim.recordings[rid].tm_create.timestamp() < horizon - 3600
        young = sim.recordings[rid].tm_create.timestamp() > horizon + 3600
        assert way == ("recordingfiles" if old else "storage_files") or not (old or young), (rid, way)
    assert 20 <= sim.stats["recordingfiles"] <= 40, sim.stats
    # the walk stopped at the URLs' horizon instead of listing every file ever stored
    assert sim.stats["storage_files"] <= 2


async def test_hostile_listings_send_each_recording_to_recordingfiles_once(tmp_path, make_sim):
    sim = await make_sim(recordings=40, audio_bytes=8000, conference_every=0)
    ids = [rid for _, rid in sim._order]
    faults = {ids[1]: "expired_early", ids[3]: "bad_size", ids[5]: "twice", ids[7]: "unsigned",
              ids[11]: "refused_early"}
    sim.files.file_faults.update(faults)
    stranger = str(uuid.uuid4())  # a file of no recording of ours, named like a real one of ours
    victim = sim.recordings[ids[9]]
    item = sim.files.file_json(victim, sim.member_names(victim)[0], datetime.now(UTC) - timedelta(minutes=5))
    sim.files.stranger_files.append({**item, "id": str(uuid.uuid4()), "reference_id": stranger})
    cfg = write_config(tmp_path, sim, api=LISTING)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    ways = {rid: d["archive"]["fetched_from"] for rid, d in _sidecars(tmp_path / "archive").items()}
    assert {rid for rid, way in ways.items() if way == "recordingfiles"} == set(faults), ways
    assert sim.stats["recordingfiles"] == len(faults)
    for rid in faults:  # the server's own ZIP, byte for byte
        rel = next(r[2] for r in db_rows(tmp_path / "state.sqlite3") if r[0] == rid)
        assert (tmp_path / "archive" / rel).read_bytes() == sim.expected_archives()[rid]
    logged = {e["recording_id"] for e in _events(result.out + result.err, "storage_listing_fallback")}
    logged |= {e["recording_id"] for e in _events(result.out + result.err, "storage_listing_unusable")}
    assert logged == set(faults), logged
    per_recording = [e["recording_id"] for e in _events(result.out + result.err, "storage_listing_fallback")]
    assert len(per_recording) == len(set(per_recording)), "each logged once"
    strangers = _events(result.out + result.err, "storage_file_of_no_recording")
    assert [e["reference_id"] for e in strangers] == [stranger]
    assert "traceback" not in result.out.lower() + result.err.lower()


async def test_a_server_whose_listing_holds_no_recordings_files_is_not_waited_for(tmp_path, make_sim):
    """The tutorial's server (single WAVs) lists only other files: every recording, even one
    that ended a minute ago, goes through /recordingfiles at once, not an hour later."""
    sim = await make_sim(recordings=20, mode="wav", audio_bytes=4000)
    sim.add_recording(ends_in=0.0)
    cfg = write_config(tmp_path, sim, api=LISTING, archive={"settle_window": 3600})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "20")
    assert result.rc == 0 and archived_this_run(result.out) == 21, result
    assert sim.stats["recordingfiles"] == 21 and sim.stats["storage_files"] >= 1, sim.stats
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_a_listing_that_repeats_its_token_ends_the_walk_and_nothing_is_lost(tmp_path, make_sim):
    sim = await make_sim(recordings=250, audio_bytes=4000)
    sim.files.files_repeat_token = True
    cfg = write_config(tmp_path, sim, api=LISTING)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    assert sim.stats["storage_files"] <= 3, sim.stats
    ways = [d["archive"]["fetched_from"] for d in _sidecars(tmp_path / "archive").values()]
    assert ways.count("storage_files") >= 40, "the first page's recordings came from the listing"


async def test_files_listed_late_are_waited_for_without_requests_then_settled_ones_fall_back(tmp_path, make_sim):
    # late files: registered 3 s after the end; a call missing a leg for good; one never stored
    sim = await make_sim(recordings=30, audio_bytes=8000, late_files=4, files_after=3.0, missing_member=2,
                         no_audio=2, conference_every=0)
    cfg = write_config(tmp_path, sim, api=LISTING, archive={"settle_window": 8})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "60")
    assert result.rc == 0, result
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", "SELECT id, state, flag FROM recordings")}
    ways = {rid: d["archive"]["fetched_from"] for rid, d in _sidecars(tmp_path / "archive").items()}
    missing = {r.id for r in sim.recordings.values() if r.member_missing}
    never = {r.id for r in sim.recordings.values() if r.files_never}
    late = {r.id for r in sim.recordings.values() if r.ends_at is not None}
    assert all(ways[rid] == "storage_files" for rid in late), "late files waited for, then from the listing"
    assert all(rows[rid][1:] == ("archived", "incomplete") and ways[rid] == "recordingfiles" for rid in missing)
    assert all(rows[rid][1] == "no_audio" for rid in never)
    # only what settled without its files asked for a ZIP, once each
    assert sim.zips_asked == {rid: 1 for rid in missing | never}, (sim.zips_asked, missing, never)
    for rid in set(sim.expected_archives()) - missing:
        rel = next(r[2] for r in db_rows(tmp_path / "state.sqlite3") if r[0] == rid)
        assert_same_audio(sim, rid, (tmp_path / "archive" / rel).read_bytes())


async def test_corrupt_and_truncated_storage_answers_are_retried_and_never_kept(tmp_path, make_sim):
    sim = await make_sim(recordings=60, audio_bytes=8000,
                         faults={"storage_corrupt": 0.1, "storage_truncate": 0.1, "storage_bad_hash": 0.1})
    cfg = write_config(tmp_path, sim, api=LISTING)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "60")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    assert sim.stats["fault_storage_corrupt"] and sim.stats["fault_storage_truncate"]


async def test_the_service_takes_new_recordings_from_the_listing(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=8000, conference_every=0)
    cfg = write_config(tmp_path, sim, api=LISTING)
    proc = await asyncio.create_subprocess_exec(
        *cli_command("--config", str(cfg), "run"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env=cli_env())
    db = tmp_path / "state.sqlite3"

    def archived() -> int:
        try:
            return len(db_rows(db, "SELECT id FROM recordings WHERE state='archived'"))
        except sqlite3.OperationalError:  # not created (or not migrated) yet
            return 0

    try:
        await wait_until(lambda: archived() == 10, 60, "the first ten archived")
        for _ in range(5):  # new calls that end now: their files are registered 2 s later
            rid = sim.add_recording(ends_in=0.5)
            sim.recordings[rid].files_at = time.time() + 2.5
            sim.recordings[rid].reference_type = "call"
        await wait_until(lambda: archived() == 15, 60, "the new five archived")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert sim.stats["recordingfiles"] == 0, sim.stats
    assert_archive_complete(sim, tmp_path / "archive", db)


# ---- the listing's items and the route, on their own ----------------------------------------------

def _item(**fields):
    base = {"id": str(uuid.uuid4()), "reference_type": "recording", "reference_id": str(uuid.uuid4()),
            "type": "recording", "filename": "call_x_in.wav", "filesize": 100, "uri_download": "https://s/x",
            "tm_download_expire": "2030-01-01T00:00:00Z", "tm_create": "2026-01-01T00:00:00Z"}
    return {**base, **fields}


@pytest.mark.parametrize("fields", [
    {"id": "../../etc"}, {"reference_id": "not-a-uuid"}, {"filename": "../x_in.wav"}, {"filename": "a/b_in.wav"},
    {"filename": "x\x00_in.wav"}, {"filename": "x" * 300}, {"uri_download": 5}, {"tm_create": "yesterday"},
])
def test_hostile_listed_items_are_rejected(fields):
    with pytest.raises(InvalidRecording):
        parse_storage_file(_item(**fields))


def test_files_of_no_recording_are_kept_apart():
    rag = parse_storage_file(_item(reference_type="", type="rag", filename="handbook.pdf", uri_download=""))
    assert rag.recording_id is None
    odd = parse_storage_file(_item(filesize=-1))
    assert odd.filesize is None


def _row(name, **fields):
    return {"id": str(uuid.uuid4()), "filename": name, "filesize": 10, "url": "https://storage/x",
            "expires_at": time.time() + 86400, **fields}


def test_the_route_takes_only_a_complete_unambiguous_fresh_set():
    now = time.time()
    both = [_row("c_in.wav"), _row("c_out.wav")]
    assert storage_route(both, "call", now).way == "storage"
    assert [f["filename"] for f in storage_route(both[::-1], "call", now).files] == ["c_in.wav", "c_out.wav"]
    assert storage_route(both[:1], "call", now).way == "wait"
    assert storage_route([], "confbridge", now).way == "absent"
    assert storage_route(both[:1], "confbridge", now).way == "storage"
    assert storage_route([*both, _row("c_in.wav")], "call", now).way == "fallback"  # twice
    assert storage_route([*both, _row("c_in.mp3")], "call", now).way == "fallback"  # unexpected
    assert storage_route([_row("c_in.wav", url=""), both[1]], "call", now).way == "fallback"
    assert storage_route([_row("c_in.wav", expires_at=now + 60), both[1]], "call", now).way == "fallback"
    assert storage_route([_row("c_in.wav", url="http://evil.example/x"), both[1]], "call", now).way == "fallback"
    assert storage_route([_row("c_in.wav", filesize=None), both[1]], "call", now).way == "fallback"
    assert storage_route(both, "mystery", now).way == "fallback"


def test_our_zip_of_listed_files_is_the_same_bytes_every_time(tmp_path):
    """Fetched twice, the same files make the same ZIP (same SHA-256): adoption and a re-fetch agree."""
    from archiver.config import ArchiveConfig
    from archiver.layout import Layout
    from archiver.simulator import make_wav
    from archiver.store import ListedFile, Store, StoreJob, make_dirs

    cfg = ArchiveConfig(directory=tmp_path, settle_window=0)
    store = Store(cfg)
    wav = make_wav(b"\x01\x02" * 500)
    raw = {"id": str(uuid.uuid4()), "reference_type": "confbridge"}
    created = time.time() - 100
    directory = Layout(tmp_path, cfg.layout).path(Layout(tmp_path, cfg.layout).relative(
        raw["id"], "zip", created, "confbridge", "default")).parent
    make_dirs(tmp_path, directory)
    bodies = []
    for _ in range(2):
        files = (ListedFile(str(uuid.uuid4()), "c_in.wav", directory / ".a.partial", wav, False, len(wav),
                            len(wav), {}),)
        job = StoreJob(raw["id"], raw, created, created + 10, directory, directory / ".b.partial",
                       b"", False, None, {}, files=files)
        archived = store.store(job)
        final = tmp_path / archived.rel_path
        bodies.append(final.read_bytes())
        final.unlink()
    assert bodies[0] == bodies[1]
    assert archived_members(bodies[0]) == {"c_in.wav": wav}
    with zipfile.ZipFile(io.BytesIO(bodies[0])) as archive:
        assert archive.infolist()[0].compress_type == zipfile.ZIP_STORED
