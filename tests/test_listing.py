"""The storage listing as a download path: recent recordings fetched from their listed channel
files (no API budget), everything else through /recordingfiles, and hostile listings."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sqlite3
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from archiver.errors import InvalidRecording
from archiver.storagefiles import URL_MARGIN, parse_storage_file, storage_route
from tests.checks import archived_members, assert_archive_complete, assert_same_audio
from tests.conftest import (
    archived_this_run,
    body_when,
    cli_command,
    cli_env,
    db_rows,
    free_port,
    run_cli,
    wait_until,
    write_config,
)

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


async def _archive_with_faulty_files(tmp_path, sim, faults: dict[str, str]):
    """A backfill through the listing with these listing ``faults``: every recording archived,
    exactly the faulty ones through /recordingfiles. The config, the run, each one's path."""
    sim.files.file_faults.update(faults)
    cfg = write_config(tmp_path, sim, api=LISTING)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    ways = {rid: d["archive"]["fetched_from"] for rid, d in _sidecars(tmp_path / "archive").items()}
    assert {rid for rid, way in ways.items() if way == "recordingfiles"} == set(faults), ways
    return cfg, result, ways


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
    stranger = str(uuid.uuid4())  # a file of no recording of ours, named like a real one of ours
    victim = sim.recordings[ids[9]]
    item = sim.files.file_json(victim, sim.member_names(victim)[0], datetime.now(UTC) - timedelta(minutes=5))
    sim.files.stranger_files.append({**item, "id": str(uuid.uuid4()), "reference_id": stranger})
    _, result, _ = await _archive_with_faulty_files(tmp_path, sim, faults)
    assert sim.stats["recordingfiles"] == len(faults)
    for rid in faults:  # the server's own ZIP, byte for byte
        rel = next(r[2] for r in db_rows(tmp_path / "state.sqlite3") if r[0] == rid)
        assert (tmp_path / "archive" / rel).read_bytes() == sim.expected_archives()[rid]
    logged = {e["recording_id"] for e in _events(result.out + result.err, "storage_listing_fallback")}
    logged |= {e["recording_id"] for e in _events(result.out + result.err, "storage_listing_unusable")}
    assert logged == set(faults), logged
    per_recording = [e["recording_id"] for e in _events(result.out + result.err, "storage_listing_fallback")]
    assert len(per_recording) == len(set(per_recording)), "each logged once"
    summary = {name: int(n) for name, n in re.findall(r"^  +(listed, [a-z ]+?) +(\d+)$", result.out, re.M)}
    assert sum(summary.values()) == len(faults) and len(summary) == 2, result.out  # both kinds, in the summary
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
    port = free_port()
    cfg = write_config(tmp_path, sim, api=LISTING, metrics={"listen": f"127.0.0.1:{port}"})
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
        # the request gauges are refreshed with the counts, each cycle: wait for the one after the last file
        async with aiohttp.ClientSession() as http:
            metrics = await body_when(http, f"http://127.0.0.1:{port}/metrics", lambda m: (
                'voipbin_archiver_fetched_recordings_total{path="storage_files"} 15.0' in m
                and _gauge(m, "voipbin_archiver_api_requests") - _gauge(m, "voipbin_archiver_budget_requests") >= 30),
                20, "the metrics of all 15 and their storage downloads")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert sim.stats["recordingfiles"] == 0, sim.stats
    # the operator sees which path each came by, what fell back, and what the API budget paid
    assert 'voipbin_archiver_fetched_recordings_total{path="recordingfiles"} 0.0' in metrics
    assert 'voipbin_archiver_storage_listing_fallbacks_total{why="listing"} 0.0' in metrics
    assert 'voipbin_archiver_storage_listing_fallbacks_total{why="download"} 0.0' in metrics
    assert 0 < _gauge(metrics, "voipbin_archiver_budget_requests") <= sim.stats["api_requests"], sim.stats
    assert_archive_complete(sim, tmp_path / "archive", db)


def _gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics, re.M)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


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


def _reference_zip(files: list[tuple[str, bytes]]) -> bytes:
    """The ZIP zipfile itself makes of ``files`` (stored, 1980-01-01): what ours must equal."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


@pytest.mark.parametrize("way", ["in_memory", "spilled_apart", "spilled_in_place"])
def test_listed_files_make_zipfiles_own_bytes_however_they_were_spilled(tmp_path, way):
    """In memory, spilled to a file of their own, or spilled by the daemon where their bytes lie
    in the ZIP (``listed_offsets``; the store then writes only the headers and the tails around
    them): the ZIP is byte for byte the one zipfile makes of the same files."""
    from archiver.config import ArchiveConfig
    from archiver.layout import Layout
    from archiver.simulator import make_wav
    from archiver.store import ListedFile, Store, StoreJob, listed_offsets, make_dirs

    cfg = ArchiveConfig(directory=tmp_path, settle_window=0)
    wavs = [("c_in.wav", make_wav(b"\x01\x02" * 700_000)), ("c_out.wav", make_wav(b"\x03\x04" * 650_001))]
    raw = {"id": str(uuid.uuid4()), "reference_type": "call"}
    created = time.time() - 100
    layout = Layout(tmp_path, cfg.layout)
    directory = layout.path(layout.relative(raw["id"], "zip", created, "call", "default")).parent
    make_dirs(tmp_path, directory)
    zip_tmp = directory / f".{raw['id']}.download.partial"
    offsets = listed_offsets([(name, len(data)) for name, data in wavs])
    assert offsets is not None
    files = []
    for i, (name, data) in enumerate(wavs):
        cut = len(data) - 300_000 - i  # the daemon's last chunks stay in memory (the tail)
        if way == "in_memory":
            files.append(ListedFile(str(i), name, directory / f".{i}.partial", data, False, len(data), len(data), {}))
        elif way == "spilled_apart":
            (directory / f".{i}.partial").write_bytes(data[:cut])
            files.append(ListedFile(str(i), name, directory / f".{i}.partial", data[cut:], True, len(data),
                                    len(data), {}, cut))
        else:
            fd = os.open(zip_tmp, os.O_WRONLY | os.O_CREAT, 0o640)  # the headers' room left as holes
            os.pwrite(fd, data[:cut], offsets[i])
            os.close(fd)
            files.append(ListedFile(str(i), name, zip_tmp, data[cut:], True, len(data), len(data), {}, cut,
                                    offsets[i]))
    job = StoreJob(raw["id"], raw, created, created + 10, directory, zip_tmp, b"", False, None, {},
                   files=tuple(files))
    archived = Store(cfg).store(job)
    assert (tmp_path / archived.rel_path).read_bytes() == _reference_zip(wavs)
    assert not list(directory.glob(".*.partial")), "nothing left beside it"


async def test_a_listed_file_longer_than_its_filesize_is_never_spilled_past_it(tmp_path):
    """In place, the bytes past a file's listed size would land on the next file's: the spill
    refuses them before writing one (the recording then goes through /recordingfiles)."""
    from archiver.download import _Body, _Place
    from archiver.errors import VerificationError

    path = tmp_path / "zip.partial"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        body = _Body(tmp_path / "unused.partial", None, {}, _Place(path, fd, 40), 4, "listed file 'c_in.wav'")
        body.add(b"RIFF")
        await body.spill()  # up to its size: written in place
        body.add(b"x")
        with pytest.raises(VerificationError, match="more than its listed filesize 4"):
            await body.spill()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 40 + b"RIFF"
    assert not (tmp_path / "unused.partial").exists()


async def test_large_listed_files_are_archived_in_place_and_a_wrong_filesize_falls_back(tmp_path, make_sim):
    """Channel files of over a megabyte go the in-place way through the real pipeline: each ZIP
    is zipfile's own bytes of the sim's files, nothing is left beside it, and a ``filesize`` one
    byte off either way sends that recording to /recordingfiles (logged), never into a ZIP."""
    sim = await make_sim(recordings=6, audio_bytes=3_000_000, conference_every=3)
    ids = [rid for _, rid in sim._order]
    faults = {ids[1]: "bad_size", ids[4]: "short_size"}
    cfg, result, ways = await _archive_with_faulty_files(tmp_path, sim, faults)
    rels = {r[0]: r[2] for r in db_rows(tmp_path / "state.sqlite3")}
    for rid, way in ways.items():
        if way == "storage_files":
            rec = sim.recordings[rid]
            assert len(sim.files.member_wav(rec, sim.member_names(rec)[0])) > 1 << 20, "spilled, not in memory"
            reference = _reference_zip([(n, sim.files.member_wav(rec, n)) for n in sim.member_names(rec)])
            assert (tmp_path / "archive" / rels[rid]).read_bytes() == reference
    fallbacks = {e["recording_id"] for e in _events(result.out + result.err, "storage_listing_fallback")}
    assert fallbacks == set(faults)
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0 and "verified 6" in verify.out, verify


async def test_the_daemon_spills_large_listed_files_where_they_lie_in_our_zip(tmp_path, make_sim):
    """What the daemon hands the store helper for channel files over a megabyte, fetched from
    the simulator over HTTP: their first bytes already in the recording's ZIP at the offsets
    ``listed_offsets`` gives, not in a file of their own (so the helper does not copy them)."""
    from archiver.client import ApiClient
    from archiver.config import ApiConfig, ArchiveConfig
    from archiver.download import Downloader
    from archiver.state import Row
    from archiver.store import listed_offsets

    sim = await make_sim(recordings=1, audio_bytes=3_000_000, conference_every=0)
    rec = next(iter(sim.recordings.values()))
    wavs = {name: sim.files.member_wav(rec, name) for name in sim.member_names(rec)}
    listed = tuple({"id": sim.files.file_id(rec.id, name), "filename": name, "filesize": len(data),
                    "url": sim.files.file_url(rec.id, name, time.time() + 3600)} for name, data in wavs.items())
    offsets = listed_offsets([(name, len(data)) for name, data in wavs.items()])
    directory = tmp_path / "d"
    directory.mkdir()

    class Handed(Exception):
        pass

    class Store:
        def warm(self) -> None:
            pass

        async def store(self, job, account):
            assert [f.offset for f in job.files] == offsets
            content = job.tmp.read_bytes()
            for f, data in zip(job.files, wavs.values(), strict=True):
                assert f.spilled and f.tmp == job.tmp and f.spilled_bytes + len(f.tail) == len(data)
                assert content[f.offset:f.offset + f.spilled_bytes] == data[:f.spilled_bytes]
                assert f.tail == data[f.spilled_bytes:]
            assert sorted(p.name for p in directory.iterdir()) == [job.tmp.name], "no file of their own"
            raise Handed

    api = ApiConfig(base_url=sim.base_url, accesskey=sim.accesskey, requests_per_second=0, retry_base=0.01)
    async with ApiClient(api) as client:
        downloader = Downloader(client, ArchiveConfig(directory=tmp_path), Store(), None)  # type: ignore[arg-type]
        row = Row(rec.id, "ended", {"id": rec.id}, 0, 0, time.time() - 60, time.time() - 30)
        with pytest.raises(Handed):
            await downloader._fetch_listed(row, directory, listed)
    assert not list(directory.iterdir()), "a failed store leaves nothing behind"
