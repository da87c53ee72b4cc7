"""Several daemons on one PostgreSQL state (``[state] url``): claims with SKIP LOCKED and leases,
one walker per account, one pace per account across daemons. A real PostgreSQL 15 cluster."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from archiver.config import build_config
from archiver.errors import ConfigError
from archiver.manifest import keygen
from archiver.state.sqlite import _lock as sqlite_lock
from tests.conftest import cli_command, cli_env, db_rows, free_port, run_cli, write_config
from tests.test_accounts import write_accounts_config

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg_url(pg_cluster):
    """A database of its own for each test."""
    name = "t_" + secrets.token_hex(4)
    con = await asyncpg.connect(pg_cluster.url())
    await con.execute(f"CREATE DATABASE {name}")
    await con.close()
    return pg_cluster.url(name)


async def _rows(url: str) -> list[Any]:
    con = await asyncpg.connect(url)
    try:
        return list(await con.fetch("SELECT account, id, state, path, sha256 FROM recordings"))
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await con.close()


def _archived(rows: list[Any], account: str | None = None) -> int:
    return sum(1 for r in rows if r["state"] == "archived" and account in (None, r["account"]))


def _max_in_window(times: list[float], window: float) -> int:
    """The most requests that arrived within any ``window`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_state_url_config_errors():
    base = {"api": {"accesskey": "k"}}
    for state, message in [
        ({"url": "mysql://db/x"}, "postgresql://"),
        ({"url": "postgresql://u:secret@db/x"}, "must not carry a password"),
        ({"lease": 10}, "for url"),
        ({"url": "postgresql://u@db/x", "lease": 0.5}, ">= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config({**base, "state": state}, Path("/tmp"), {})
    cfg = build_config({**base, "state": {"url": "postgresql://u@db/x"}}, Path("/tmp"), {"PGPASSWORD": "pw"})
    assert cfg.state.url and cfg.state.password == "pw" and cfg.state.lease == 45
    assert "pw" not in repr(cfg)


async def test_a_database_not_up_yet_is_exit_1_for_systemd_to_retry(tmp_path, make_sim, pg_url):
    """At start-up (a reboot: the database not up yet) the daemon exits 1, which the unit's
    Restart=on-failure retries; exit 2 (RestartPreventExitStatus) is for what a retry cannot mend."""
    sim = await make_sim(recordings=1)
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/archiver"
    for command in ("run", "status"):
        cfg = write_config(tmp_path, sim, state={"url": down})
        result = await run_cli("--config", str(cfg), command, timeout=60)
        assert result.rc == 1 and "cannot be reached" in result.err and "Traceback" not in result.err, result
    missing = pg_url.rpartition("/")[0] + "/no_such_database"
    cfg = write_config(tmp_path, sim, state={"url": missing})
    result = await run_cli("--config", str(cfg), "run", timeout=60)
    assert result.rc == 2 and "no_such_database" in result.err and "Traceback" not in result.err, result


async def _stop_running(daemons: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to each daemon still running, and its exit awaited."""
    for daemon in daemons:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 20)


async def _start(cfg: Path, log: Path) -> asyncio.subprocess.Process:
    out = open(log, "wb")  # the daemon writes to it until it exits
    try:
        return await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"), stdout=out,
                                                    stderr=out, env=cli_env())
    finally:
        out.close()


async def test_three_daemons_share_four_accounts_and_survive_a_kill(tmp_path, multi_sim, pg_url):
    names = ["acme", "beta", "gamma", "frozen"]
    sim = await multi_sim(names, recordings=24, audio_bytes=3000)
    sim.accounts["frozen"].refusal = "ACCOUNT_FROZEN"
    rate, burst = 4, 4
    configs = [
        write_accounts_config(tmp_path, sim, name=f"daemon{n}.toml",
                              per_account={"requests_per_second": rate, "burst": burst},
                              state={"url": pg_url, "lease": 2},
                              workers={"trouble_pause": 0.5, "poll_interval": 0.3, "concurrency": 3})
        for n in range(3)
    ]
    logs = [tmp_path / f"daemon{n}.log" for n in range(3)]
    daemons = [await _start(cfg, log) for cfg, log in zip(configs, logs, strict=True)]
    rows: list[Any] = []

    async def poll() -> None:
        rows[:] = await _rows(pg_url)

    async def until(predicate: Any, timeout: float, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await poll()
            if predicate():
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {_archived(rows)} archived")
            await asyncio.sleep(0.1)

    try:
        await until(lambda: _archived(rows) >= 15, 60, "a first part archived")
        daemons[0].send_signal(signal.SIGKILL)  # its leases run out; the others take its rows over
        assert await asyncio.wait_for(daemons[0].wait(), 10) == -signal.SIGKILL
        await until(lambda: _archived(rows) >= 40, 60, "more archived after the kill")
        daemons[1].send_signal(signal.SIGTERM)  # hands its claims back at once
        assert await asyncio.wait_for(daemons[1].wait(), 20) == 0
        await until(lambda: all(_archived(rows, a) == 24 for a in names[:3]), 90, "the three accounts archived")
        assert _archived(rows, "frozen") == 0, "the frozen account pauses itself only"
        sim.accounts["frozen"].refusal = ""
        await until(lambda: _archived(rows, "frozen") == 24, 60, "the thawed account archived")
    finally:
        await _stop_running(daemons)
    assert daemons[2].returncode == 0
    rows = await _rows(pg_url)
    assert len({(r["account"], r["id"]) for r in rows}) == len(rows) == 4 * 24
    _check_files(sim, tmp_path, rows)
    text = "".join(log.read_text() for log in logs)
    for name, account in sim.accounts.items():
        assert account.overlapping_downloads == 0, f"{name}: two downloads of one recording at once"
        assert account.credential_leaks == 0 and account.accesskey not in text
        # one pace per account across the three daemons: the bucket's rate and burst, plus at
        # most the one token each daemon may hold from its last grant
        most = _max_in_window(account.api_times, 2.0)
        assert most <= rate * 2 + burst + 3, f"{name}: {most} API requests within 2 s at {rate}/s"


def _check_files(sim: Any, tmp_path: Path, rows: list[Any]) -> None:
    """Every recording archived once under its account's directory, byte-identical."""
    by_key = {(r["account"], r["id"]): r for r in rows}
    for name, account in sim.accounts.items():
        for rec_id, body in account.expected_archives().items():
            row = by_key[(name, rec_id)]
            assert row["state"] == "archived" and row["path"].startswith(f"{name}/") == (len(sim.accounts) > 1)
            assert (tmp_path / "archive" / row["path"]).read_bytes() == body
            assert json.loads((tmp_path / "archive" / row["path"]).with_suffix(".json").read_text())[
                "recording"]["id"] == rec_id
    leftovers = [p for p in (tmp_path / "archive").rglob("*.partial")]
    assert not leftovers, leftovers[:3]


async def test_a_slow_transfer_keeps_its_lease(tmp_path, multi_sim, pg_url):
    """Transfers stall for longer than the lease: the heartbeat keeps them ours, so the other
    daemon never starts a second download of the same recording."""
    sim = await multi_sim(["acme"], recordings=6, audio_bytes=3000, faults={"storage_stall": 1.0},
                          stall_seconds=3.5)
    configs = [write_accounts_config(tmp_path, sim, name=f"d{n}.toml", state={"url": pg_url, "lease": 1.2},
                                     workers={"concurrency": 2, "poll_interval": 0.3}) for n in range(2)]
    daemons = [await _start(cfg, tmp_path / f"d{n}.log") for n, cfg in enumerate(configs)]
    acme = sim.accounts["acme"]
    try:
        rows: list[Any] = []

        async def done() -> bool:
            rows[:] = await _rows(pg_url)
            return _archived(rows) == 6

        deadline = asyncio.get_running_loop().time() + 60
        while not await done():
            assert asyncio.get_running_loop().time() < deadline, f"{_archived(rows)} archived"
            await asyncio.sleep(0.2)
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 20) == 0
    assert acme.stats["fault_storage_stall"] >= 6
    assert acme.overlapping_downloads == 0
    assert set(acme.storage_gets.values()) == {1}, "one download per recording"
    _check_files(sim, tmp_path, await _rows(pg_url))


async def test_status_and_verify_read_the_shared_state(tmp_path, multi_sim, pg_url):
    sim = await multi_sim(["acme", "beta"], recordings=5, audio_bytes=2000)
    cfg = write_accounts_config(tmp_path, sim, state={"url": pg_url})
    early = await run_cli("--config", str(cfg), "status")
    assert early.rc == 2 and "run `backfill` or `run` once" in early.err, early
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 0, result
    status = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    assert {n: c["archived"] for n, c in status["accounts"].items()} == {"acme": 5, "beta": 5}
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0 and "verified 10 archived" in verify.out, verify
    beta = sim.accounts["beta"]
    rec = next(r for r in beta.recordings.values() if r.reference_type == "call")
    number = beta.call_json(rec)["source"]["target"]
    found = await run_cli("--config", str(cfg), "find", "--number", number[1:], "--account", "beta", "--json")
    assert found.rc == 0 and [json.loads(line)["recording_id"] for line in found.out.splitlines()] == [rec.id], found
    out = tmp_path / "production"
    exported = await run_cli("--config", str(cfg), "export", "--out", str(out), "--account", "acme")
    assert exported.rc == 0, exported
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 10, check.stdout + check.stderr
    con = await asyncpg.connect(pg_url)
    try:
        await con.execute("ALTER TABLE recordings RENAME COLUMN flag TO flag_gone")  # a schema someone changed
    finally:
        await con.close()
    broken = await run_cli("--config", str(cfg), "status")
    assert broken.rc == 2 and "the PostgreSQL state refused a request" in broken.err, broken
    assert "Traceback" not in broken.err, broken


async def test_a_daemon_stopped_past_its_lease_is_taken_over_without_a_second_copy(tmp_path, multi_sim, pg_url):
    """A daemon frozen (SIGSTOP) mid-transfer for longer than its lease: another takes its
    recordings over and archives them; the first, resumed, finishes its own transfers, and its
    late commits change nothing: one row per recording, the same bytes, no temporaries left."""
    sim = await multi_sim(["acme"], recordings=6, audio_bytes=3000, faults={"storage_stall": 1.0},
                          stall_seconds=2.0)
    acme = sim.accounts["acme"]
    configs = [write_accounts_config(tmp_path, sim, name=f"d{n}.toml", state={"url": pg_url, "lease": 1.0},
                                     workers={"concurrency": 6, "poll_interval": 0.3}) for n in range(2)]
    first = await _start(configs[0], tmp_path / "d0.log")
    deadline = asyncio.get_running_loop().time() + 30
    while sum(acme.downloading.values()) < 3:
        assert asyncio.get_running_loop().time() < deadline, "no transfers began"
        await asyncio.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    second = await _start(configs[1], tmp_path / "d1.log")
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while _archived(await _rows(pg_url)) < 6:
            assert asyncio.get_running_loop().time() < deadline, "the second daemon did not take over"
            await asyncio.sleep(0.2)
        taken_over = acme.overlapping_downloads
        first.send_signal(signal.SIGCONT)
        deadline = asyncio.get_running_loop().time() + 30
        while sum(acme.downloading.values()):  # the first one's transfers finish too
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
    finally:
        for daemon in (first, second):
            daemon.send_signal(signal.SIGCONT)
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 20) == 0
    assert taken_over >= 1, "the stopped daemon's recordings were downloaded again by the other"
    rows = await _rows(pg_url)
    assert len(rows) == 6 and _archived(rows) == 6
    _check_files(sim, tmp_path, rows)
    log = (tmp_path / "d0.log").read_text() + (tmp_path / "d1.log").read_text()
    assert "archived_twice_differently" not in log and "Traceback" not in log


async def test_the_database_going_away_pauses_the_service_and_loses_nothing(tmp_path, multi_sim, pg_cluster, pg_url):
    """PostgreSQL stopped mid-run and started again: the daemon pauses (no crash, no failed
    recording), then carries on; every recording archived once."""
    sim = await multi_sim(["acme", "beta"], recordings=30, audio_bytes=3000, latency=0.05)
    cfg = write_accounts_config(tmp_path, sim, state={"url": pg_url, "lease": 3},
                                per_account={"requests_per_second": 10},
                                workers={"concurrency": 2, "poll_interval": 0.3, "trouble_pause": 0.5})
    daemon = await _start(cfg, tmp_path / "d.log")
    paused = False
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while _archived(await _rows(pg_url)) < 10:
            assert asyncio.get_running_loop().time() < deadline, "nothing archived"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(pg_cluster.pause)
        paused = True
        deadline = asyncio.get_running_loop().time() + 20  # the daemon keeps running meanwhile
        while asyncio.get_running_loop().time() < deadline and "cannot be reached" not in (
                tmp_path / "d.log").read_text():
            await asyncio.sleep(0.1)
        assert daemon.returncode is None, "the daemon lives on without its database"
        await asyncio.to_thread(pg_cluster.resume)
        paused = False
        deadline = asyncio.get_running_loop().time() + 90
        while _archived(rows := await _rows(pg_url)) < 60:
            assert daemon.returncode is None
            assert asyncio.get_running_loop().time() < deadline, f"{_archived(rows)} archived after the outage"
            await asyncio.sleep(0.2)
    finally:
        if paused:  # for the tests after this one
            await asyncio.to_thread(pg_cluster.resume)
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 20) == 0
    log = (tmp_path / "d.log").read_text()
    assert "cannot be reached" in log and "Traceback" not in log
    rows = await _rows(pg_url)
    assert not [r for r in rows if r["state"] == "failed"]
    _check_files(sim, tmp_path, rows)


async def test_two_daemons_delete_each_server_copy_once_with_one_audit_trail(tmp_path, multi_sim, pg_url):
    """[retention] on a shared state: one daemon prunes an account at a time (an advisory lock);
    each copy is deleted once, after its download, with one line each in the database's trail;
    `prune --dry-run` and `status` read it. Both sign the manifest: one chain per account, one
    writer at a time (an advisory lock), every archival and deletion listed once."""
    sim = await multi_sim(["acme", "beta"], recordings=15, audio_bytes=2000)
    retention = {"delete_from_server": True, "delete_after": 0}
    keygen(tmp_path / "signing.key")
    signing = {"signing_key_file": str(tmp_path / "signing.key"), "manifest_interval": 0.2}
    configs = [write_accounts_config(tmp_path, sim, name=f"d{n}.toml", state={"url": pg_url, "lease": 3},
                                     retention=retention, workers={"concurrency": 3, "poll_interval": 0.2},
                                     archive={"directory": "archive", **signing})
               for n in range(2)]
    daemons = [await _start(cfg, tmp_path / f"d{n}.log") for n, cfg in enumerate(configs)]
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while sum(len(s.deletes) for s in sim.accounts.values()) < 30:
            assert asyncio.get_running_loop().time() < deadline, "not every server copy was deleted"
            await asyncio.sleep(0.1)
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.wait(), 20) == 0
    for account in sim.accounts.values():
        assert set(account.deletes.values()) == {1}, "each deleted exactly once"
        assert account.delete_violations == 0, "never before a complete download"
    assert sum(s.stats["delete"] for s in sim.accounts.values()) == 30, "one DELETE each: one pruner per account"
    con = await asyncpg.connect(pg_url)
    try:
        trail = [json.loads(r["line"]) for r in await con.fetch("SELECT line FROM deletions")]
        marked = await con.fetchval("SELECT count(*) FROM recordings WHERE server_deleted_at IS NOT NULL")
    finally:
        await con.close()
    assert marked == 30 and len(trail) == 30
    assert {(t["account"], t["recording_id"]) for t in trail} == {
        (name, rec_id) for name, s in sim.accounts.items() for rec_id in s.deletes}
    assert all(t["sha256"] and t["request_id"] and t["http_status"] == 200 for t in trail)
    dry = await run_cli("--config", str(configs[0]), "prune", "--dry-run")
    assert dry.rc == 0 and "due for deletion from the server now: 0 recordings" in dry.out, dry
    status = json.loads((await run_cli("--config", str(configs[0]), "status", "--json")).out)
    assert status["server_deletion"]["deleted"] == 30
    verified = await run_cli("--config", str(configs[0]), "verify", "--manifest")
    assert verified.rc == 0 and "30 recording(s)" in verified.out and " 0 problem(s)" in verified.out, verified
    for name in ("acme", "beta"):
        segments = sorted((tmp_path / "archive" / "manifests" / name).glob("*.json"))
        entries = [e for p in segments for e in json.loads(p.read_bytes())["entries"]]
        assert [json.loads(p.read_bytes())["seq"] for p in segments] == list(range(1, len(segments) + 1))
        assert sorted(e["event"] for e in entries) == ["archived"] * 15 + ["server_copy_deleted"] * 15, name



async def test_a_sqlite_state_moves_into_postgresql_without_downloading_again(tmp_path, multi_sim, pg_url):
    """One daemon on SQLite (one account, [retention] on) grows into several accounts on
    PostgreSQL: `import-state` carries every row, the walk, the meta and the deletion audit trail
    over; the old account keeps its paths; only what was still waiting is downloaded."""
    sim = await multi_sim(["acme", "beta"], recordings=10, audio_bytes=2000)
    acme = sim.accounts["acme"]
    late = [acme.add_recording(ends_in=3600) for _ in range(2)]  # still recording when the SQLite run ends
    old = write_config(tmp_path, None, name="old.toml", api={"base_url": sim.base_url, "accesskey": acme.accesskey},
                       retention={"delete_from_server": True, "delete_after": 0})
    first = await run_cli("--config", str(old), "backfill", "--wait", "0")
    assert first.rc == 0, first
    sql = "SELECT id, state, path, sha256 FROM recordings"
    before = {r[0]: tuple(r[1:]) for r in db_rows(tmp_path / "state.sqlite3", sql)}
    assert len(before) == 12 and sum(1 for r in before.values() if r[0] == "archived") == 10
    assert len(acme.deletes) == 10
    sqlite_bytes = (tmp_path / "state.sqlite3").read_bytes()

    new = write_accounts_config(tmp_path, sim, name="new.toml", state={"url": pg_url},
                                retention={"delete_from_server": True, "delete_after": 0})
    src = str(tmp_path / "state.sqlite3")
    no_url = await run_cli("--config", str(old), "import-state", src)
    assert no_url.rc == 2 and "needs [state] url" in no_url.err, no_url
    bad = await run_cli("--config", str(new), "import-state", src, "--account", "default")
    assert bad.rc == 2 and "use OLD=NEW" in bad.err, bad
    unnamed = await run_cli("--config", str(new), "import-state", src)
    assert unnamed.rc == 2 and "holds account 'default'" in unnamed.err and "--account default=" in unnamed.err, unnamed
    lock = sqlite_lock(tmp_path / "state.sqlite3")  # a daemon still running on the file
    try:
        busy = await run_cli("--config", str(new), "import-state", src, "--account", "default=acme")
        assert busy.rc == 2 and "in use by another voipbin-archiver process" in busy.err, busy
    finally:
        os.close(lock)
    assert await _rows(pg_url) == [], "a refused import leaves PostgreSQL empty"

    moved = await run_cli("--config", str(new), "import-state", src, "--account", "default=acme")
    assert moved.rc == 0, moved
    assert "acme: 12 recordings (10 archived, 2 discovered)" in moved.out and "10 deletion audit line(s)" in moved.out
    assert (tmp_path / "state.sqlite3").read_bytes() == sqlite_bytes, "the SQLite file is left as it was"
    rows = await _rows(pg_url)
    assert {r["id"]: (r["state"], r["path"], r["sha256"]) for r in rows} == before
    assert {r["account"] for r in rows} == {"acme"}
    again = await run_cli("--config", str(new), "import-state", src, "--account", "default=acme")
    assert again.rc == 2 and "already holds account 'acme'" in again.err, again
    await _import_in_batches_of_five(new, Path(src), pg_url, rows)

    downloads = acme.stats["storage_requests"]
    for rec_id in late:
        acme.recordings[rec_id].ends_at = acme.recordings[rec_id].files_at = time.time()
    second = await run_cli("--config", str(new), "backfill", "--wait", "10")
    assert second.rc == 0, second
    assert acme.stats["storage_requests"] - downloads == 2, "only what was still waiting is downloaded"
    assert set(acme.deletes.values()) == {1} and len(acme.deletes) == 12, "each deleted once, before and after"
    rows = await _rows(pg_url)
    assert _archived(rows, "acme") == 12 and _archived(rows, "beta") == 10
    paths = {r["id"]: r["path"] for r in rows if r["account"] == "acme"}
    assert all(paths[i] == before[i][1] for i in before if before[i][0] == "archived"), "the old paths are kept"
    assert all(paths[i].startswith("acme/") for i in late), "what is new follows the new layout"
    verify = await run_cli("--config", str(new), "verify")
    assert verify.rc == 0 and "verified 22 archived" in verify.out, verify
    con = await asyncpg.connect(pg_url)
    try:
        trail = await con.fetchval("SELECT count(*) FROM deletions WHERE account='acme'")
        calls = await con.fetchval("SELECT count(*) FROM calls WHERE account='acme'")
    finally:
        await con.close()
    assert trail == 12, "the SQLite run's audit lines and the new ones, in one trail"
    assert calls == sum(1 for r in acme.recordings.values() if r.reference_type == "call"), "the calls came along"


async def _import_in_batches_of_five(config: Path, source: Path, pg_url: str, expected: list[Any]) -> None:
    """The same import, in process, into a second database, five rows at a time: the same rows."""
    import dataclasses

    from archiver import statemove
    from archiver.config import load_config

    other = pg_url.rpartition("/")[0] + "/" + pg_url.rpartition("/")[2] + "_b"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {other.rpartition('/')[2]}")
    finally:
        await admin.close()
    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, state=dataclasses.replace(cfg.state, url=other))
    batch, statemove.BATCH = statemove.BATCH, 5
    try:
        report = await statemove.import_sqlite(cfg, source, {"default": "acme"})
    finally:
        statemove.BATCH = batch
    assert report.counts == {"acme": {"archived": 10, "discovered": 2}} and report.audit_lines == 10
    assert sorted(map(tuple, await _rows(other))) == sorted(map(tuple, expected))


@pytest.mark.s3
async def test_two_daemons_share_one_bucket(tmp_path, multi_sim, pg_url, rgw):
    """The shared destination for several machines: a versioned bucket, two daemons on one
    PostgreSQL, one SIGKILLed mid-run. Every key holds exactly one version, byte-identical, with
    its sidecar; nothing else is in the bucket; no recording is downloaded twice at once."""
    from tests.test_s3 import Bucket

    bucket = Bucket(rgw, lock=False)
    sim = await multi_sim(["acme", "beta"], recordings=20, audio_bytes=3000)
    configs = [write_accounts_config(tmp_path, sim, name=f"d{n}.toml", state={"url": pg_url, "lease": 2},
                                     archive={"directory": None, "destination": "s3"},
                                     **{"archive.s3": bucket.section()},
                                     workers={"concurrency": 3, "poll_interval": 0.3, "trouble_pause": 0.5})
               for n in range(2)]
    daemons = [await _start(cfg, tmp_path / f"d{n}.log") for n, cfg in enumerate(configs)]
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while _archived(await _rows(pg_url)) < 10:
            assert asyncio.get_running_loop().time() < deadline, "nothing archived"
            await asyncio.sleep(0.1)
        daemons[0].send_signal(signal.SIGKILL)  # mid-upload, perhaps: its leases run out, the other takes over
        assert await asyncio.wait_for(daemons[0].wait(), 10) == -signal.SIGKILL
        while _archived(await _rows(pg_url)) < 40:
            assert asyncio.get_running_loop().time() < deadline + 60, "not everything archived after the kill"
            await asyncio.sleep(0.1)
    finally:
        await _stop_running(daemons)
    assert daemons[1].returncode == 0
    rows = {(r["account"], r["id"]): r for r in await _rows(pg_url)}
    versions = bucket.versions()
    doubled = {k: len(v) for k, v in versions.items() if len(v) > 1}
    assert not doubled, f"keys with more than one version: {doubled}"
    known = set()
    for name, account in sim.accounts.items():
        assert account.overlapping_downloads == 0, f"{name}: two downloads of one recording at once"
        for rec_id, body in account.expected_archives().items():
            row = rows[(name, rec_id)]
            key = "voipbin/" + row["path"]
            assert row["state"] == "archived" and row["path"].startswith(f"{name}/")
            assert bucket.get(key) == body and row["sha256"] == hashlib.sha256(body).hexdigest()
            side_key = key.rpartition(".")[0] + ".json"
            assert json.loads(bucket.get(side_key))["archive"]["sha256"] == row["sha256"]
            known |= {key, side_key}
    assert set(versions) == known, f"objects the database does not know: {sorted(set(versions) - known)[:3]}"
    verify = await run_cli("--config", str(configs[1]), "verify")
    assert verify.rc == 0 and "40 archived recordings: 0 problem(s)" in verify.out, verify


async def test_a_backfill_waits_for_a_dead_daemons_claims(tmp_path, multi_sim, pg_url):
    """A daemon killed mid-transfer leaves rows `downloading` under a lease: a backfill started
    after it waits for the leases to run out, takes the rows over and archives them, instead of
    ending with them still waiting."""
    sim = await multi_sim(["acme"], recordings=6, audio_bytes=3000, faults={"storage_stall": 1.0},
                          stall_seconds=30)
    acme = sim.accounts["acme"]
    cfg = write_accounts_config(tmp_path, sim, name="d.toml", state={"url": pg_url, "lease": 3},
                                workers={"concurrency": 3, "poll_interval": 0.3})
    daemon = await _start(cfg, tmp_path / "d.log")
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while sum(1 for r in await _rows(pg_url) if r["state"] == "downloading") < 3:
            assert asyncio.get_running_loop().time() < deadline, "no transfers in flight"
            await asyncio.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGKILL)
        await asyncio.wait_for(daemon.wait(), 10)
    acme.faults["storage_stall"] = 0.0  # the storage is quick again
    backfill = await run_cli("--config", str(cfg), "backfill", "--wait", "20")
    assert backfill.rc == 0, backfill
    rows = await _rows(pg_url)
    assert _archived(rows) == 6, [(r["id"][:8], r["state"]) for r in rows]
    _check_files(sim, tmp_path, rows)


async def test_summaries_of_every_account_in_five_queries_agree_with_each_view(multi_sim, pg_url):
    from archiver.config import StateConfig
    from archiver.state import PgState
    from tests.test_accounts import assert_summaries_agree, populate_accounts

    sim = await multi_sim(["acme", "beta", "gamma"], recordings=6, audio_bytes=1000)
    state = await PgState.open(StateConfig(url=pg_url))
    await populate_accounts(state, sim)
    total, _ = await state.summaries()
    assert total["oldest_pending"] and total["last_error"] and total["archived_flagged"]["incomplete"] == 3
    await assert_summaries_agree(state)


async def test_a_shared_state_started_empty_adopts_the_archive_without_downloading(tmp_path, multi_sim, pg_url):
    """Without `import-state`, a PostgreSQL state started empty beside an existing archive adopts
    each file its walk finds there (re-verified against its sidecar) instead of downloading it."""
    sim = await multi_sim(["acme", "beta"], recordings=8, audio_bytes=2000)
    sqlite_cfg = write_accounts_config(tmp_path, sim, name="sqlite.toml")
    first = await run_cli("--config", str(sqlite_cfg), "backfill", "--wait", "5")
    assert first.rc == 0, first
    downloads = {name: sum(s.storage_gets.values()) for name, s in sim.accounts.items()}
    assert downloads == {"acme": 8, "beta": 8}
    shared = write_accounts_config(tmp_path, sim, name="shared.toml", state={"url": pg_url})
    second = await run_cli("--config", str(shared), "backfill", "--wait", "5")
    assert second.rc == 0, second
    assert {name: sum(s.storage_gets.values()) for name, s in sim.accounts.items()} == downloads, "nothing again"
    rows = await _rows(pg_url)
    assert _archived(rows) == 16
    _check_files(sim, tmp_path, rows)


async def test_two_accounts_fetch_from_their_own_listings_into_the_shared_state(tmp_path, multi_sim, pg_url):
    """The storage listing's path on PostgreSQL: each account's listed files in the state under
    its own name, each recording from its own listing, a stranger file logged once, and
    ``export`` re-verifying the archiver's own ZIPs like the server's."""
    sim = await multi_sim(["acme", "beta"], recordings=30, audio_bytes=4000)
    acme = sim.accounts["acme"]
    victim = next(iter(acme.recordings.values()))
    item = acme.files.file_json(victim, acme.member_names(victim)[0], datetime.now(UTC) - timedelta(minutes=5))
    stranger = str(uuid.uuid4())
    acme.files.stranger_files.append({**item, "id": str(uuid.uuid4()), "reference_id": stranger})
    cfg = write_accounts_config(tmp_path, sim, state={"url": pg_url}, api={"storage_listing": True})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "30")
    assert result.rc == 0, result
    rows = await _rows(pg_url)
    assert {a: _archived(rows, a) for a in ("acme", "beta")} == {"acme": 30, "beta": 30}
    assert all(s.stats["recordingfiles"] == 0 for s in sim.accounts.values())
    con = await asyncpg.connect(pg_url)
    try:
        listed = dict(await con.fetch("SELECT account, count(*) FROM storage_files GROUP BY account"))
        noted = await con.fetchval("SELECT count(*) FROM storage_files WHERE stranger_noted_at IS NOT NULL")
    finally:
        await con.close()
    assert listed == {n: sum(len(s.stored_names(r)) for r in s.recordings.values()) + (n == "acme")
                      for n, s in sim.accounts.items()}
    assert noted == 1
    strangers = [line for line in (result.out + result.err).splitlines() if "storage_file_of_no_recording" in line]
    assert len(strangers) == 1 and stranger in strangers[0], strangers
    out = tmp_path / "production"
    exported = await run_cli("--config", str(cfg), "export", "--out", str(out), "--account", "beta")
    assert exported.rc == 0, exported
    check = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(".zip: OK") == 30, check.stdout + check.stderr


async def test_holds_expiry_and_erasure_on_the_shared_state(tmp_path, multi_sim, pg_url):
    sim = await multi_sim(["acme", "beta"], recordings=4, audio_bytes=2000)
    cfg = write_accounts_config(tmp_path, sim, state={"url": pg_url}, archive={"directory": "archive",
                                                                               "keep_days": 30})
    assert (run := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, run
    con = await asyncpg.connect(pg_url)
    try:
        await con.execute("UPDATE recordings SET tm_start = extract(epoch from now()) - 40 * 86400")
        ids = [r["id"] for r in await con.fetch("SELECT id FROM recordings WHERE account = 'acme' ORDER BY id")]
        assert (r := await run_cli("--config", str(cfg), "hold", "add", ids[0], "--reason", "case 9")).rc == 0, r
        done = await run_cli("--config", str(cfg), "expire")
        assert done.rc == 0 and "7 removed" in done.out and "1 kept under a hold" in done.out, done
        states = {r["id"]: r["state"] for r in await con.fetch("SELECT id, state FROM recordings")}
        assert states[ids[0]] == "archived" and sum(s == "expired" for s in states.values()) == 7
        refused = await run_cli("--config", str(cfg), "erase", ids[0], "--reason", "r")
        assert refused.rc == 1 and "legal hold" in refused.err
        assert (await run_cli("--config", str(cfg), "hold", "remove", ids[0], "--reason", "done")).rc == 0
        assert (await run_cli("--config", str(cfg), "erase", ids[0], "--reason", "r")).rc == 0
        trail = [json.loads(r["line"])["event"] for r in await con.fetch("SELECT line FROM archive_audit")]
        assert sorted(trail) == ["erased", "expired", *["expired"] * 6, "held", "released"]
    finally:
        await con.close()
