"""What VoIPbin's real server does (shared/voipbin-api.md, sections marked new), end to end:
an account-level 403, login limits, the shared rate budget, slow ZIP builds, audio that never
comes, damaged-but-served files, access keys that expire, proxies' error bodies."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from archiver.client import ApiClient
from archiver.config import ApiConfig
from archiver.errors import AuthRefused, RecordingGone
from archiver.simulator import make_wav
from tests.checks import assert_archive_complete
from tests.conftest import archive_files, cli_command, cli_env, db_rows, free_port, http_get, run_cli, write_config

STATE_SQL = "SELECT id, state, attempts, flag, flag_reason FROM recordings"


async def _status(cfg) -> dict:
    result = await run_cli("--config", str(cfg), "status", "--json")
    assert result.rc == 0, result
    return json.loads(result.out)


async def test_frozen_account_mid_backfill_exits_3_counts_nothing_and_a_plain_rerun_finishes(tmp_path, make_sim):
    sim = await make_sim(recordings=60, audio_bytes=2000, latency=0.01)
    cfg = write_config(tmp_path, sim, api={"page_size": 20}, workers={"concurrency": 2})

    async def freeze_midway():
        while sim.stats["storage_requests"] < 15:
            await asyncio.sleep(0.01)
        sim.refusal = "ACCOUNT_FROZEN"

    freezer = asyncio.create_task(freeze_midway())
    first = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    await freezer
    assert first.rc == 3, first
    assert "ACCOUNT_FROZEN" in first.out and "frozen" in first.out and "restore the account" in first.out
    assert "account_refused" in first.err
    rows = db_rows(tmp_path / "state.sqlite3", STATE_SQL)
    assert not [r for r in rows if r[1] == "failed"], "a 403 never fails a recording"
    assert all(r[2] == 0 for r in rows), "no attempt is counted for a 403"
    archived_before = sum(1 for r in rows if r[1] == "archived")
    assert 0 < archived_before < 60, "frozen in the middle"
    status = await _status(cfg)
    assert status["api_refused"]["reason"] == "ACCOUNT_FROZEN" and status["failed"] == 0
    table = await run_cli("--config", str(cfg), "status")
    assert "API REFUSES US" in table.out and "ACCOUNT_FROZEN" in table.out

    sim.refusal = ""  # thawed
    second = await run_cli("--config", str(cfg), "backfill", "--wait", "10")  # no --retry-failed
    assert second.rc == 0, second
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    assert (await _status(cfg))["api_refused"] is None


@pytest.mark.parametrize(
    ("reason", "words"),
    [("DELETION_SCHEDULED", "scheduled for deletion"), ("PERMISSION_DENIED", "customer-admin or customer-manager")],
)
async def test_other_account_refusals_name_their_reason(tmp_path, make_sim, reason, words):
    sim = await make_sim(recordings=5, audio_bytes=2000, refusal=reason)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 3, result
    assert reason in result.out and words in result.out
    assert sim.accesskey not in result.out + result.err


async def test_the_service_pauses_on_a_frozen_account_shows_it_and_resumes_when_thawed(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=2000, refusal="ACCOUNT_FROZEN")
    port = free_port()
    cfg = write_config(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"}, workers={"trouble_pause": 0.5})
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, str]:
                return await http_get(http, base + path)

            seen: dict[str, str] = {}

            async def until(path: str, predicate) -> None:
                while True:
                    status, body = await get(path)
                    if predicate(status, body):
                        seen[path] = body
                        return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(until("/healthz", lambda st, body: st == 503 and "ACCOUNT_FROZEN" in body), 20)
            await asyncio.wait_for(until(
                "/metrics", lambda st, body: 'voipbin_archiver_credential_refused{reason="ACCOUNT_FROZEN"} 1.0' in body
            ), 20)
            refused_requests = sim.stats["http_403"]
            assert refused_requests >= 1
            sim.refusal = ""
            await asyncio.wait_for(until(
                "/metrics", lambda st, body: 'voipbin_archiver_recordings{state="archived"} 10.0' in body
            ), 30)
            await asyncio.wait_for(until("/healthz", lambda st, body: st == 200), 20)
            assert "credential_refused{" not in seen["/metrics"], "the refusal is cleared once accepted again"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        log_file.close()
    assert proc.returncode == 0
    rows = db_rows(tmp_path / "state.sqlite3", STATE_SQL)
    assert all(r[1] == "archived" and r[2] == 0 for r in rows), rows
    log_text = (tmp_path / "run.log").read_text()
    assert "account_refused" in log_text and "api_accepts_again" in log_text


async def test_login_429_and_5xx_are_transient_not_a_refused_credential(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=2000, login_429=3, faults={"login_5xx": 0.3})
    cfg = write_config(tmp_path, sim, api={"accesskey": None, "username": sim.cfg.username,
                                           "password": sim.cfg.password, "max_retries": 10})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    assert sim.stats["login_429"] == 3 and "login_rate_limited" in result.err
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    assert sim.cfg.password not in result.out + result.err


async def test_a_wrong_password_is_a_refused_credential(tmp_path, make_sim):
    sim = await make_sim(recordings=2, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, api={"accesskey": None, "username": sim.cfg.username, "password": "wrong"})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 3, result
    assert "login refused: HTTP 400" in result.out and "wrong" not in result.out + result.err


async def test_default_pace_leaves_half_the_shared_budget_and_meets_no_429(tmp_path, make_sim):
    # someone else of the customer takes 8/s of its 16.7/s; our default must fit beside them
    sim = await make_sim(recordings=60, audio_bytes=1000, rate_limit=True, background_rps=8.0)
    cfg = write_config(tmp_path, sim, api={"requests_per_second": None, "page_size": 20})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert sim.stats["http_429"] == 0, sim.stats
    times = sim.api_times
    span = times[-1] - times[0]
    budget = sim.cfg.rate * span + sim.cfg.burst  # what the server would have let the customer send
    assert len(times) >= 64 and span > 5  # 60 /recordingfiles, 4 pages, /accesskeys
    assert len(times) <= 0.5 * budget, f"{len(times)} requests in {span:.1f} s: more than half of {budget:.0f}"
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_a_429_while_under_our_pace_says_once_that_others_use_the_budget(tmp_path, make_sim):
    sim = await make_sim(recordings=60, audio_bytes=1000, rate_limit=True, background_rps=14.0)
    cfg = write_config(tmp_path, sim, api={"requests_per_second": None, "page_size": 20})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "20")
    assert result.rc == 0, result
    assert sim.stats["http_429"] > 0
    assert result.err.count('"rate_budget_shared"') == 1, "said once, not per 429"
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_a_recordingfiles_answer_slower_than_the_timeout_is_archived(tmp_path, make_sim):
    """The server builds the ZIP while the request waits: past [api] timeout (60 s by default;
    4 s here, the same rule in a fifteenth of the time), not a failure."""
    sim = await make_sim(recordings=3, audio_bytes=2000)
    slow = sim.add_recording(build_seconds=5)
    cfg = write_config(tmp_path, sim, api={"timeout": 4})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30", timeout=120)
    assert result.rc == 0, result
    assert sim.stats["recordingfiles"] == 4, "one request each: the slow one was not retried"
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", STATE_SQL)}
    assert rows[slow][1] == "archived" and rows[slow][2] == 0
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_wait_bounds_the_backfill_with_a_request_that_hangs(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    stuck = sim.add_recording(build_seconds=3600)
    cfg = write_config(tmp_path, sim)
    started = time.monotonic()
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "8", timeout=90)
    elapsed = time.monotonic() - started
    assert result.rc == 0, result  # what is not ready yet is no failure
    assert elapsed < 8 + 6 + 5, f"exited after {elapsed:.1f} s: past --wait and the shutdown grace"
    assert "still waiting: 1 (1 abandoned in flight" in result.out, result.out
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", STATE_SQL)}
    assert rows[stuck][1] == "pending" and rows[stuck][2] == 0, rows[stuck]
    assert sum(1 for r in rows.values() if r[1] == "archived") == 3
    assert not [p for p in archive_files(tmp_path / "archive") if p.name.endswith(".partial")]


async def test_wait_0_still_archives_a_whole_backlog_of_ready_recordings(tmp_path, make_sim):
    """--wait ends waiting, not work that is due: a queue still full at the deadline is drained."""
    sim = await make_sim(recordings=150, audio_bytes=1000, latency=0.005)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 2})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "0")
    assert result.rc == 0, result
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_recordings_without_audio_get_their_own_state_and_keep_their_metadata(tmp_path, make_sim):
    sim = await make_sim(recordings=20, audio_bytes=2000, no_audio=3, missing_member=2)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    silent = sim.expected_no_audio()
    assert len(silent) == 3
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", STATE_SQL)}
    assert {rid for rid, r in rows.items() if r[1] == "no_audio"} == silent
    for rid in silent:
        assert "10 GB store" in rows[rid][4]
        files = [p for p in archive_files(tmp_path / "archive") if rid in p.name]
        assert [p.name for p in files] == [f"{rid}.json"]
        sidecar = json.loads(files[0].read_text())
        assert sidecar["recording"]["id"] == rid and sidecar["archive"]["state"] == "no_audio"
        assert sidecar["archive"]["file"] is None and "10 GB store" in sidecar["archive"]["flag_reason"]
    incomplete = {rid for rid, r in rows.items() if r[3] == "incomplete"}
    assert len(incomplete) == 2 and all(rows[rid][1] == "archived" for rid in incomplete)
    # the archive holds every recording with audio, the silent ones as sidecars only
    expected = sim.expected_archives()
    assert {rid for rid, r in rows.items() if r[1] == "archived"} == set(expected)
    status = await _status(cfg)
    assert status["no_audio"] == 3 and status["archived"] == len(expected)
    assert status["archived_flagged"] == {"incomplete": 2, "damaged": 0}
    assert "no audio" in result.out and "10 GB store" in result.out
    table = await run_cli("--config", str(cfg), "status")
    assert "no_audio" in table.out and "incomplete 2" in table.out
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0 and "0 problem(s)" in verify.out, verify
    (tmp_path / "archive" / rows[next(iter(silent))][0]).exists()

    # the database lost: a new one over the same archive adopts the sidecars instead of refetching
    fetched = dict(sim.storage_gets)
    cfg2 = write_config(tmp_path, sim, state={"database": "rebuilt.sqlite3"})
    again = await run_cli("--config", str(cfg2), "backfill", "--wait", "5")
    assert again.rc == 0, again
    assert {r[0] for r in db_rows(tmp_path / "rebuilt.sqlite3", STATE_SQL) if r[1] == "no_audio"} == silent
    assert all(sim.storage_gets[rid] == fetched.get(rid, 0) for rid in silent), "adopted, not fetched again"


def _damaged_wav() -> bytes:
    good = make_wav(b"\x01\x02" * 4000)
    return good[:4] + (len(good) + 100).to_bytes(4, "little") + good[8:]  # RIFF size says more than there is


async def test_a_damaged_wav_the_server_serves_after_the_settle_window_is_kept_and_flagged(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000, mode="wav")
    body = _damaged_wav()
    damaged = sim.add_recording(body=body)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", STATE_SQL)}
    assert rows[damaged][1] == "archived" and rows[damaged][3] == "damaged", rows[damaged]
    assert "RIFF size" in rows[damaged][4] and "only copy" in rows[damaged][4]
    kept = next(p for p in archive_files(tmp_path / "archive") if p.name == f"{damaged}.wav")
    assert kept.read_bytes() == body, "kept exactly as served"
    sidecar = json.loads(kept.with_suffix(".json").read_text())["archive"]
    assert sidecar["flag"] == "damaged" and "RIFF size" in sidecar["flag_reason"]
    assert "archived_damaged" in result.err
    status = await _status(cfg)
    assert status["archived_flagged"]["damaged"] == 1
    assert any(item["id"] == damaged for item in status["flagged_recent"])
    assert (await run_cli("--config", str(cfg), "verify")).rc == 0


async def test_a_damaged_wav_before_the_settle_window_is_not_ready_not_failed(tmp_path, make_sim):
    sim = await make_sim(recordings=1, audio_bytes=2000, mode="wav")
    damaged = sim.add_recording(body=_damaged_wav())
    cfg = write_config(tmp_path, sim, archive={"settle_window": 3600})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert result.rc == 0, result
    row = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3", STATE_SQL)}[damaged]
    assert row[1] == "pending" and row[2] == 0, row
    assert not [p for p in archive_files(tmp_path / "archive") if damaged in p.name]


async def test_accesskey_expiry_is_learnt_shown_and_warned_about(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000, accesskey_ttl=5 * 86400)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert "accesskey_expires_soon" in result.err
    status = await _status(cfg)
    assert abs(status["accesskey_expires"] - sim.accesskey_expires) < 1
    table = await run_cli("--config", str(cfg), "status")
    assert "access key expires in 5.0 days" in table.out or "access key expires in 4.9 days" in table.out


async def test_a_key_that_may_not_list_keys_says_so_once_and_carries_on(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000, accesskeys_denied=True)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "2")
    assert result.rc == 0, result
    assert result.err.count('"accesskey_expiry_unknown"') == 1 and "PERMISSION_DENIED" in result.err
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    assert (await _status(cfg))["accesskey_expires"] is None


async def test_proxy_error_bodies_are_handled_by_their_status(tmp_path, make_sim):
    sim = await make_sim(recordings=40, audio_bytes=2000, faults={"proxy_html": 0.2, "proxy_empty": 0.2})
    cfg = write_config(tmp_path, sim, api={"page_size": 10, "max_retries": 10}, workers={"max_attempts": 20})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert sim.stats["fault_proxy_html"] and sim.stats["fault_proxy_empty"]
    assert "http_502" in result.err and "http_504" in result.err
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_errors_carry_the_reason_and_the_request_id_of_the_header(make_sim):
    sim = await make_sim(recordings=1)
    cfg = ApiConfig(base_url=sim.base_url, accesskey=sim.accesskey, requests_per_second=0)
    async with ApiClient(cfg) as client:
        with pytest.raises(RecordingGone) as gone:
            await client.get_recording("00000000-0000-4000-8000-000000000000")
        assert "RESOURCE_NOT_FOUND" in str(gone.value)
        request_id = str(gone.value).split("request_id=")[1]
        assert len(request_id) == 36, gone.value
        sim.refusal = "PERMISSION_DENIED"
        with pytest.raises(AuthRefused) as refused:
            await client.list_recordings("", 10)
        assert refused.value.reason == "PERMISSION_DENIED" and refused.value.status == 403
