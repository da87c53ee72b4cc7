"""Hostile or broken input: each bad recording fails alone, with a reason; nothing escapes."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import zipfile

import pytest

from archiver.layout import sanitize_member_name
from archiver.simulator import make_wav
from tests.conftest import archived_this_run, db_rows, run_cli, wait_until, write_config


def _zip(entries: list[tuple[str, bytes]], level: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


WAV = make_wav(b"\x01\x02" * 100)


def _outside(tmp_path) -> list:
    """Everything written under tmp_path outside the archive directory, but our own files."""
    ours = {"config.toml", "state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm", "state.sqlite3.lock"}
    return [p for p in tmp_path.rglob("*") if p.is_file() and "archive" not in p.parts and p.name not in ours]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_zip([("../evil.wav", WAV), ("ok.wav", WAV)]), "path separator"),
        (_zip([("/abs/evil.wav", WAV), ("ok.wav", WAV)]), "path separator"),
        (_zip([("back\\slash.wav", WAV), ("ok.wav", WAV)]), "path separator"),
        (_zip([("..", WAV), ("ok.wav", WAV)]), "relative path"),
        (_zip([(f"m{i}.wav", WAV) for i in range(1500)], level=1), "more than max_members"),
        (_zip([("bomb.wav", b"\x00" * (40 * 1024 * 1024)), ("ok.wav", WAV)], level=9), "zip bomb"),
    ],
    ids=["dotdot", "absolute", "backslash", "dotdot-alone", "thousands", "bomb"],
)
async def test_hostile_zips_fail_the_recording_and_write_nothing_outside(tmp_path, make_sim, body, reason):
    sim = await make_sim(recordings=3, audio_bytes=4000)
    bad = sim.add_recording(body=body)
    cfg = write_config(tmp_path, sim, archive={"unpack": True})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    assert rows[bad][1] == "failed" and reason in rows[bad][4], rows[bad]
    assert sum(1 for r in rows.values() if r[1] == "archived") == 3, "the others are unaffected"
    assert not _outside(tmp_path)
    assert not list((tmp_path / "archive").rglob(f"*{bad}*")), "nothing of the hostile recording is kept"


@pytest.mark.parametrize(
    ("body", "overrides", "state", "reason"),
    [
        (None, {"format": "../../x"}, None, None),  # rejected in the listing
        (None, {"format": "wav/.."}, None, None),
        (b"MZ\x90\x00 not audio at all", {}, "failed", "neither a ZIP nor a WAV"),
    ],
    ids=["format-traversal", "format-dotdot", "not-audio"],
)
async def test_bad_recordings_are_isolated(tmp_path, make_sim, body, overrides, state, reason):
    sim = await make_sim(recordings=3, audio_bytes=4000)
    bad = sim.add_recording(body=body, raw_overrides=overrides)
    cfg = write_config(tmp_path, sim, workers={"max_attempts": 2})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    if state is None:
        assert bad not in rows and "listing_item_rejected" in result.err
        assert result.rc == 0, result
    else:
        assert result.rc == 1, result
        assert rows[bad][1] == state and reason in rows[bad][4], rows[bad]
    assert sum(1 for r in rows.values() if r[1] == "archived") == 3
    assert not _outside(tmp_path)


async def test_deleted_while_pending_is_skipped(tmp_path, make_sim):
    sim = await make_sim(recordings=2, audio_bytes=4000)
    doomed = sim.add_recording(ends_in=3600)
    cfg = write_config(tmp_path, sim)
    backfill = asyncio.ensure_future(run_cli("--config", str(cfg), "backfill", "--wait", "5"))
    db = tmp_path / "state.sqlite3"

    def listed() -> bool:  # deleted once the archiver knows it, however long its start took (#31)
        try:
            return any(r[0] == doomed and r[1] == "discovered" for r in db_rows(db))
        except sqlite3.Error:
            return False

    await wait_until(lambda: listed() or backfill.done(), 60, "the recording listed and waiting")
    sim.delete(doomed)
    result = await backfill
    assert result.rc == 0, result
    row = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}[doomed]
    assert row[1] == "skipped" and "deleted" in row[4]


async def test_unknown_status_is_logged_and_treated_as_not_ended(tmp_path, make_sim):
    sim = await make_sim(recordings=2, audio_bytes=4000)
    odd = sim.add_recording(raw_overrides={"status": "paused-by-martians"})
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "0.5")
    assert result.rc == 0, result
    assert "unknown_status" in result.err
    assert {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}[odd][1] == "discovered"


async def test_secrets_never_appear_in_any_output(tmp_path, make_sim):
    sim = await make_sim(recordings=30, audio_bytes=4000, faults={"api_500": 0.1, "storage_expired": 0.1})
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "--log-level", "debug", "backfill", "--wait", "5")
    assert result.rc == 0, result
    status = await run_cli("--config", str(cfg), "status", "--json")
    outputs = result.out + result.err + status.out + status.err
    outputs += "".join(p.read_text() for p in (tmp_path / "archive").rglob("*.json"))
    con = sqlite3.connect(tmp_path / "state.sqlite3")
    outputs += "\n".join(con.iterdump())
    con.close()
    assert sim.accesskey not in outputs
    assert "X-Goog-Signature=" not in outputs or "X-Goog-Signature=REDACTED" in outputs
    assert sim.credential_leaks == 0, "storage must never receive our credential"


async def test_login_mode_never_logs_the_password_or_jwt(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=4000)
    cfg = write_config(tmp_path, sim, api={"accesskey": None, "username": sim.cfg.username,
                                           "password": sim.cfg.password})
    result = await run_cli("--config", str(cfg), "--log-level", "debug", "backfill", "--wait", "3")
    assert result.rc == 0, result
    assert sim.stats["login"] == 1 and sim.tokens
    for secret in [sim.cfg.password, *sim.tokens]:
        assert secret not in result.out + result.err


async def test_revoked_credential_exits_3_without_counting_attempts(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=4000)
    sim.revoked = True
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    assert result.rc == 3, result
    assert "refused the credential" in result.err + result.out
    sim.revoked = False
    # the listing itself was refused, so nothing is known yet; once it works again, nothing was lost
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    assert again.rc == 0, again
    assert archived_this_run(again.out) == 10


async def test_credential_revoked_mid_run_costs_no_recording_an_attempt(tmp_path, make_sim):
    sim = await make_sim(recordings=60, audio_bytes=2000, latency=0.01)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 2})

    async def revoke_soon():
        while sim.stats["storage_requests"] < 10:
            await asyncio.sleep(0.01)
        sim.revoked = True

    revoker = asyncio.create_task(revoke_soon())
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    await revoker
    assert result.rc == 3, result
    rows = db_rows(tmp_path / "state.sqlite3", "SELECT state, attempts FROM recordings")
    assert {state for state, _ in rows} <= {"archived", "pending"}
    assert all(attempts == 0 for _, attempts in rows), "a refused credential is not the recording's fault"


def test_member_names_are_sanitised():
    assert sanitize_member_name("call_x_2021-01-28T09:17:00_in.wav") == "call_x_2021-01-28T09_17_00_in.wav"
    for hostile in ("../../etc/passwd", "/abs", "a\\b", "..", ".hidden", "x\x00y", "\x01", ""):
        safe = sanitize_member_name(hostile)
        assert safe and "/" not in safe and "\\" not in safe and ".." not in safe and "\x00" not in safe
        assert not safe.startswith(".")


async def test_oversized_answers_and_recordings_are_refused_with_a_clear_error(tmp_path, make_sim):
    sim = await make_sim(recordings=12, audio_bytes=2000)
    fat = sim.add_recording(raw_overrides={"notes": "x" * 300_000})  # one recording far beyond anything real
    cfg = write_config(tmp_path, sim, api={"page_size": 5})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    assert result.rc == 0, result
    assert "listing_item_rejected" in result.err and "more than 262144" in result.err
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3")}
    assert fat not in rows and sum(1 for r in rows.values() if r[1] == "archived") == 12
    assert max(p.stat().st_size for p in (tmp_path / "archive").rglob("*.json")) < 10_000


async def test_an_answer_past_8_mib_stops_the_walk_cleanly(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    sim.add_recording(raw_overrides={"notes": "x" * (9 * 1024 * 1024)})
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    assert "listing failed" in result.out and "more than 8388608" in result.out
    assert "Traceback" not in result.err


async def test_a_page_of_100000_items_is_skipped(tmp_path, make_sim):
    sim = await make_sim(recordings=15, audio_bytes=2000)
    sim.extra_listing_items = [{"id": "x"}] * 100_000
    cfg = write_config(tmp_path, sim, api={"page_size": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "3")
    assert result.rc == 0, result
    assert "page_too_large" in result.err
    assert archived_this_run(result.out) == 5, "the junk page is skipped, the walk goes on"


async def test_hostile_nesting_is_malformed_json_not_a_crash(make_sim):
    from archiver.client import ApiClient
    from archiver.config import ApiConfig
    from archiver.errors import TransientError

    sim = await make_sim(recordings=1)
    deep = "[" * 100_000 + "]" * 100_000
    sim.json_override = deep
    cfg = ApiConfig(base_url=sim.base_url, accesskey=sim.accesskey, requests_per_second=0, retry_base=0.01,
                    max_retries=1)
    async with ApiClient(cfg) as client:
        with pytest.raises(TransientError, match="malformed JSON"):
            await client.list_recordings("", 10)


def _day_dir(root, sim, rec_id: str):
    when = sim.recordings[rec_id].tm_create
    return root / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}"


async def test_a_directory_symlink_planted_in_the_archive_is_never_followed(tmp_path, make_sim):
    sim = await make_sim(recordings=5, audio_bytes=2000)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    archive = tmp_path / "archive"
    archive.mkdir()
    year = _day_dir(archive, sim, next(iter(sim.recordings))).parent.parent
    year.symlink_to(elsewhere, target_is_directory=True)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 1, result
    assert "is a symlink: refusing to write through it" in result.out + result.err
    assert not list(elsewhere.rglob("*")), "nothing written outside the archive"
    assert not [r for r in db_rows(tmp_path / "state.sqlite3") if r[1] in ("archived", "failed")]


async def test_a_symlink_planted_at_a_temporary_name_is_replaced_not_written_through(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    victim = next(iter(sim.recordings))
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    day = _day_dir(tmp_path / "archive", sim, victim)
    day.mkdir(parents=True)
    for name in (f".{victim}.download.partial", f".{victim}.json.partial"):
        (day / name).symlink_to(target)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert target.read_text() == "keep me", "the link's target was written"
    final = day / f"{victim}.zip"
    assert final.is_file() and not final.is_symlink()
    assert not [p for p in day.iterdir() if p.is_symlink()]
    assert (await run_cli("--config", str(cfg), "verify")).rc == 0


async def test_verify_reports_a_symlink_or_a_file_outside_the_archive(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "2")).rc == 0
    rows = [r for r in db_rows(tmp_path / "state.sqlite3") if r[1] == "archived"]
    final = tmp_path / "archive" / rows[0][2]
    copy = tmp_path / "copy.zip"
    copy.write_bytes(final.read_bytes())  # identical bytes: only the link gives it away
    final.unlink()
    final.symlink_to(copy)
    result = await run_cli("--config", str(cfg), "verify")
    assert result.rc == 1 and "is a symlink" in result.out, result
