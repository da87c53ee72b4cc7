"""The archive answers: call metadata walked from ``GET /calls``, ``find`` and ``export`` through
the real CLI against the simulator, checked with the real ``sha256sum -c``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from archiver.calls import address_key, normalize_number, parse_call
from archiver.errors import InvalidRecording
from tests.conftest import db_rows, run_cli, write_config


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_number_written_three_ways_is_one_number():
    assert normalize_number("+49 30 123-456") == normalize_number("004930123456") == normalize_number("4930123456")
    assert normalize_number("(030) 1234") == "0301234"  # a national number stays what it is
    for bad in ("", "+", "abc", "+49 30 12a", "1" * 16, "12"):
        with pytest.raises(ValueError):
            normalize_number(bad)
    assert address_key({"type": "sip", "target": "Alice@Example.com"}) == "alice@example.com"
    assert address_key({"type": "tel", "target": "not a number"}) == ""
    assert address_key("junk") == address_key({"target": 5}) == ""


def test_a_hostile_call_is_refused_alone():
    good = {"id": str(uuid.uuid4()), "direction": "incoming", "recording_ids": [str(uuid.uuid4()), "../x", 5],
            "source": {"type": "tel", "target": "+4930123"}}
    call = parse_call(good)
    assert call.source == "4930123" and len(call.recording_ids) == 1, "a malformed recording id names nothing"
    assert parse_call({**good, "direction": "sideways"}).direction == ""
    for bad in ([], {"id": "../../etc"}, {**good, "recording_ids": "all"}, {**good, "tm_create": "yesterday"},
                {**good, "pad": "x" * 300_000}):
        with pytest.raises(InvalidRecording):
            parse_call(bad)


async def test_find_and_export_answer_from_a_directory_archive(tmp_path, make_sim):
    sim = await make_sim(recordings=30, audio_bytes=4000, conference_every=7)
    calls = [r for r in sim.recordings.values() if r.reference_type == "call"]
    lost_call = calls[0]
    lost_call.call_listed = False  # deleted on the server: the recording outlives it
    repeated = calls[1]
    sim.extra_calls = [sim.call_json(repeated),  # listed twice
                       {**sim.call_json(calls[2]), "id": str(uuid.uuid4()), "recording_ids": [str(uuid.uuid4())]},
                       {"id": "not-a-uuid"}]
    sim.calls_delay = 1.0  # the calls walk behind the downloads: each sidecar must wait for its call
    cfg = write_config(tmp_path, sim)
    backfill = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert backfill.rc == 0, backfill
    assert "call pages listed" in backfill.out
    assert "calls noted late" not in backfill.out, "each sidecar waited for its call (the walks run side by side)"
    events = [json.loads(line) for line in backfill.err.splitlines() if line.startswith("{")]
    assert [e["call_id"] for e in events if e["event"] == "call_rejected"] == ["not-a-uuid"]
    assert sim.stats["calls"] / 30 <= 0.1, sim.stats  # one page of 100 and the empty one after it
    target = calls[3]
    number = sim.call_json(target)["source"]["target"]  # "+4930..."
    spellings = [number, "00" + number[1:], number[1:]]
    found = []
    for spelling in spellings:
        result = await run_cli("--config", str(cfg), "find", "--number", spelling, "--json")
        assert result.rc == 0, result
        found.append(_records(result.out))
    assert found[0] == found[1] == found[2]
    assert [r["recording_id"] for r in found[0]] == [target.id]
    record = found[0][0]
    assert record["source"] == number and record["call_id"] == target.reference_id
    assert record["direction"] == sim.call_json(target)["direction"]
    (sha,), = db_rows(tmp_path / "state.sqlite3", f"SELECT sha256 FROM recordings WHERE id='{target.id}'")
    assert record["sha256"] == sha

    by_call = _records((await run_cli("--config", str(cfg), "find", "--call", repeated.reference_id, "--json")).out)
    assert [r["recording_id"] for r in by_call] == [repeated.id]
    month = datetime.now(UTC).strftime("%Y-%m")
    all_month = _records((await run_cli("--config", str(cfg), "find", "--since", month, "--json")).out)
    started = [datetime.fromisoformat(r["tm_start"]) for r in all_month]
    assert len(all_month) == 30 and started == sorted(started), "oldest first, every recording"
    last_year = (datetime.now(UTC) - timedelta(days=400)).strftime("%Y-%m")
    empty = await run_cli("--config", str(cfg), "find", "--since", last_year, "--until", last_year + "-02")
    assert empty.rc == 1 and "no recording matches" in empty.err, empty
    incoming = _records((await run_cli("--config", str(cfg), "find", "--direction", "incoming", "--json")).out)
    assert incoming and all(r["direction"] == "incoming" for r in incoming)
    conference = next(r for r in all_month if r["reference_type"] == "confbridge")
    assert conference["call_note"] == "no call (a confbridge)" and conference["call_id"] is None
    orphan = next(r for r in all_month if r["recording_id"] == lost_call.id)
    assert orphan["state"] == "archived" and orphan["call_note"].startswith("call not listed"), orphan
    table = await run_cli("--config", str(cfg), "find", "--number", number)
    assert table.rc == 0 and target.id in table.out and number in table.out, table

    for flag, value in (("--number", "+49 30 abc"), ("--since", "March"), ("--call", "../etc/passwd")):
        bad = await run_cli("--config", str(cfg), "find", flag, value)
        assert bad.rc == 2 and f"argument {flag}" in bad.err, bad

    # the sidecar carries the call; a conference's says it has none
    archive = tmp_path / "archive"
    side = json.loads(next(archive.rglob(f"{target.id}.json")).read_text())
    assert side["call"]["id"] == target.reference_id and side["call"]["source"]["target"] == number
    conf_side = json.loads(next(archive.rglob(f"{conference['recording_id']}.json")).read_text())
    assert "no call" in conf_side["call"]["none"]

    out = tmp_path / "production"
    exported = await run_cli("--config", str(cfg), "export", "--out", str(out), "--since", month)
    assert exported.rc == 0, exported
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 60, "a body and a sidecar per recording"
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["export"]["recordings"] == 30 and manifest["export"]["complete"] is True
    assert manifest["export"]["filters"]["since"].startswith(month)
    assert manifest["export"]["archive"] == str(archive.resolve())
    again = await run_cli("--config", str(cfg), "export", "--out", str(out), "--since", month)
    assert again.rc == 2 and "not empty" in again.err, again

    # a recording changed behind the archiver's back: the export fails and names it
    victim = next(archive.rglob(f"{target.id}.zip"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    tampered = tmp_path / "tampered"
    failed = await run_cli("--config", str(cfg), "export", "--out", str(tampered), "--since", month)
    assert failed.rc == 1 and target.id in failed.err and "not what was archived" in failed.err, failed
    assert not (tampered / "SHA256SUMS").exists(), "a folder without checksums is not a production"
    assert [p.name for p in tampered.rglob("*.partial")] == [f"{target.id}.zip.partial"]
    report = json.loads((tampered / "export.json").read_text())
    assert report["export"]["complete"] is False and target.id in report["mismatches"][0]


async def test_a_call_listed_after_its_recording_was_archived_is_noted_in_the_sidecar(tmp_path, make_sim):
    sim = await make_sim(recordings=6, audio_bytes=2000, conference_every=0)
    late = next(iter(sim.recordings.values()))
    late.call_listed = False
    cfg = write_config(tmp_path, sim)
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    side_path = next((tmp_path / "archive").rglob(f"{late.id}.json"))
    assert "not listed" in json.loads(side_path.read_text())["call"]["none"]
    late.call_listed = True
    assert (second := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, second
    side = json.loads(side_path.read_text())
    assert side["call"]["id"] == late.reference_id, "the sidecar is rewritten with its call"
    assert side["archive"]["sha256"] == db_rows(tmp_path / "state.sqlite3",
                                                f"SELECT sha256 FROM recordings WHERE id='{late.id}'")[0][0]
    noted = db_rows(tmp_path / "state.sqlite3", "SELECT count(*) FROM recordings WHERE call_noted_at IS NOT NULL")
    assert noted == [(6,)]
    assert (await run_cli("--config", str(cfg), "verify")).rc == 0


async def test_call_metadata_off_walks_no_calls(tmp_path, make_sim):
    sim = await make_sim(recordings=4, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, archive={"directory": "archive", "settle_window": 60, "call_metadata": False})
    assert (result := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, result
    assert sim.stats["calls"] == 0
    side = next((tmp_path / "archive").rglob("*.json"))
    assert "call" not in json.loads(side.read_text())


@pytest.mark.s3
async def test_find_and_export_answer_from_a_locked_bucket(tmp_path, make_sim, rgw):
    from tests.test_s3 import Bucket, s3_config

    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=8, audio_bytes=4000, conference_every=4)
    calls = [r for r in sim.recordings.values() if r.reference_type == "call"]
    late = calls[0]
    late.call_listed = False
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="GOVERNANCE", retain_days=1)
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    late.call_listed = True
    assert (second := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, second
    assert "calls noted late" in second.out, second.out
    call_keys = [k for k in bucket.versions() if k.endswith(".call.json")]
    assert call_keys == [k for k in call_keys if late.id in k] and len(call_keys) == 1, call_keys
    late_call = json.loads(bucket.get(call_keys[0]))
    assert late_call["recording_id"] == late.id and late_call["call"]["id"] == late.reference_id
    assert bucket.client.head_object(Bucket=bucket.name, Key=call_keys[0])["ObjectLockMode"] == "GOVERNANCE"
    assert len(bucket.versions()[call_keys[0].replace(".call.json", ".json")]) == 1, "the sidecar is never rewritten"

    number = sim.call_json(calls[1])["destination"]["target"]
    found = _records((await run_cli("--config", str(cfg), "find", "--number", "00" + number[1:], "--json")).out)
    assert calls[1].id in [r["recording_id"] for r in found]
    assert all(r["key"].startswith("voipbin/") for r in found)

    out = tmp_path / "production"
    exported = await run_cli("--config", str(cfg), "export", "--out", str(out))
    assert exported.rc == 0, exported
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 8 * 2 + 1, check.stdout + check.stderr
    assert any(p.name.endswith(".call.json") for p in out.rglob("*")), "the late call goes with its recording"

    victim = next(k for k in bucket.versions() if k.endswith(".zip") and calls[1].id in k)
    bucket.client.put_object(Bucket=bucket.name, Key=victim, Body=b"not the recording")
    tampered = tmp_path / "tampered"
    failed = await run_cli("--config", str(cfg), "export", "--out", str(tampered), "--call", calls[1].reference_id)
    assert failed.rc == 1 and calls[1].id in failed.err, failed
    assert not (tampered / "SHA256SUMS").exists()


async def test_transcripts_opt_in_are_kept_beside_their_recordings_and_exported(tmp_path, make_sim):
    sim = await make_sim(recordings=9, audio_bytes=2000, transcribed_every=2)
    with_sessions = {r.id for r in sim.recordings.values() if sim.transcribes(r)}
    assert with_sessions and len(with_sessions) < 9, "the seed gives some of each"
    busy = sorted(with_sessions)[0]
    sim.recordings[busy].transcribing = True
    cfg = write_config(tmp_path, sim, archive={"directory": "archive", "settle_window": 60, "transcripts": True})
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    archive = tmp_path / "archive"
    kept = {p.name.split(".")[0] for p in archive.rglob("*.transcript.json")}
    assert kept == with_sessions - {busy}, "one file per recording with sessions, none while one is progressing"
    doc = json.loads(next(archive.rglob(f"{sorted(kept)[0]}.transcript.json")).read_text())
    rec = sim.recordings[doc["recording_id"]]
    assert [len(t["transcripts"]) for t in doc["transcribes"]] == [
        len(sim.transcript_lines(t["id"], rec)) for t in sim.transcribes(rec)]
    states = dict(db_rows(tmp_path / "state.sqlite3", "SELECT id, transcript_state FROM recordings"))
    assert states[busy] is None and {states[i] for i in kept} == {"done"}
    assert {states[i] for i in states if i not in with_sessions} == {"none"}
    out = tmp_path / "production"
    assert (exported := await run_cli("--config", str(cfg), "export", "--out", str(out))).rc == 0, exported
    assert {p.name.split(".")[0] for p in out.rglob("*.transcript.json")} == kept
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_call_metadata_costs_about_one_request_per_hundred_calls(tmp_path, make_sim):
    sim = await make_sim(recordings=600, audio_bytes=500, mode="wav")
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    calls = sum(1 for r in sim.recordings.values() if r.reference_type == "call")
    assert calls == 515 and sim.stats["calls"] == 7, sim.stats  # 5 full pages, the rest, the empty one after it
    assert sim.stats["calls"] / 600 <= 0.03
    line = next(line for line in result.out.splitlines() if line.strip().startswith("call pages listed"))
    assert line.split()[-1] == str(sim.stats["calls"]), result.out


async def test_find_works_while_the_service_runs_and_on_a_copy_of_the_database(tmp_path, make_sim):
    import asyncio
    import signal

    from tests.conftest import cli_command, cli_env, wait_until

    sim = await make_sim(recordings=10, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=cli_env())
    db = tmp_path / "state.sqlite3"
    try:
        def archived() -> list[tuple]:
            try:
                return db_rows(db, "SELECT count(*) FROM recordings WHERE state='archived'")
            except sqlite3.OperationalError:  # the service has not created (or migrated) it yet
                return []

        await wait_until(lambda: archived() == [(10,)], 60, "the service archived all 10")
        live = await run_cli("--config", str(cfg), "find", "--json")
        assert live.rc == 0 and len(_records(live.out)) == 10, live
        added = sim.add_recording()  # and it goes on archiving while we ask
        await wait_until(lambda: db_rows(db, f"SELECT state FROM recordings WHERE id='{added}'") == [("archived",)],
                         60, "the new recording archived")
        again = await run_cli("--config", str(cfg), "find", "--recording", added)
        assert again.rc == 0 and added in again.out, again
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        log_file.close()
    assert proc.returncode == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "state.sqlite3").write_bytes(db.read_bytes())  # a backup, somewhere else, read-only
    (copy / "state.sqlite3").chmod(0o400)
    copy_cfg = write_config(copy, sim, state={"database": "state.sqlite3"})
    copied = await run_cli("--config", str(copy_cfg), "find", "--json")
    assert copied.rc == 0 and len(_records(copied.out)) == 11, copied


async def test_export_lists_recordings_without_audio_or_incomplete_and_what_is_not_archived(tmp_path, make_sim):
    sim = await make_sim(recordings=8, audio_bytes=2000, no_audio=1, missing_member=1, pending=1, end_after=3600)
    cfg = write_config(tmp_path, sim, archive={"directory": "archive", "settle_window": 0})
    assert (result := await run_cli("--config", str(cfg), "backfill", "--wait", "0")).rc == 0, result
    out = tmp_path / "production"
    exported = await run_cli("--config", str(cfg), "export", "--out", str(out))
    assert exported.rc == 0 and "1 matched but not archived" in exported.out, exported
    report = json.loads((out / "export.json").read_text())
    by_state = {r["state"]: r for r in report["recordings"] if r["state"] == "no_audio" or r["flag"]}
    assert by_state["no_audio"]["files"] == [by_state["no_audio"]["files"][0]]
    assert by_state["no_audio"]["files"][0].endswith(".json") and "no audio" in by_state["no_audio"]["note"]
    assert by_state["archived"]["flag"] == "incomplete" and "incomplete" in by_state["archived"]["note"]
    assert [r["state"] for r in report["not_archived"]] == ["discovered"]
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 6 * 2 + 1, check.stdout  # and a sidecar alone
