"""Several accounts in one daemon: each its own credential, pace, walk and refusals; one state
database keyed by (account, recording id); the layout's ``{account}/``; an older database."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archiver.config import build_config
from archiver.errors import ConfigError
from archiver.model import parse_recording
from archiver.simulator import MultiSimulator
from archiver.state.sqlite import MIGRATIONS, StateDB
from tests.conftest import (
    cli_command,
    cli_env,
    db_rows,
    free_port,
    http_get,
    run_cli,
    toml_value,
    wait_until,
    write_config,
)

ROWS_SQL = "SELECT account, id, state, path, sha256 FROM recordings"


def write_accounts_config(directory: Path, sim: MultiSimulator, accounts: list[str] | None = None,
                          per_account: dict[str, Any] | None = None, name: str = "config.toml",
                          **sections: dict[str, Any]) -> Path:
    """A config with one [[accounts]] entry per simulated account, each key in a file of its own."""
    lines = []
    for account in accounts or list(sim.accounts):
        key_file = directory / f"{account}.key"
        key_file.write_text(sim.accounts[account].accesskey + "\n")
        lines += ["[[accounts]]", f"name = {toml_value(account)}", f"accesskey_file = {toml_value(str(key_file))}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in (per_account or {}).items()]
    sections = {**sections, "api": {"base_url": sim.base_url, **sections.get("api", {})},
                "workers": {"concurrency": 4, **sections.get("workers", {})}}
    return write_config(directory, None, name=name, extra=lines, **sections)


def assert_accounts_archived(sim: MultiSimulator, root: Path, db: Path, names: list[str] | None = None,
                             prefixed: bool = True) -> None:
    """Every account's recordings archived once under its own key, byte-identical, in ``<account>/``."""
    rows = {(r[0], r[1]): r for r in db_rows(db, ROWS_SQL)}
    for name in names or list(sim.accounts):
        expected = sim.accounts[name].expected_archives()
        mine = {k[1]: r for k, r in rows.items() if k[0] == name and r[2] == "archived"}
        assert set(mine) == set(expected), f"{name}: missing {sorted(set(expected) - set(mine))[:3]}"
        for rec_id, body in expected.items():
            rel, sha = mine[rec_id][3], mine[rec_id][4]
            assert rel.startswith(f"{name}/") == prefixed, rel
            assert (root / rel).read_bytes() == body and sha == hashlib.sha256(body).hexdigest()
            sidecar = json.loads((root / rel).with_suffix(".json").read_text())
            assert sidecar["recording"]["id"] == rec_id and sidecar["archive"]["account"] == name


async def populate_accounts(state: Any, sim: MultiSimulator) -> None:
    """Each account's recordings in the state as a mix: waiting, archived (one flagged), failed
    with an error, and meta (a refusal, a key's expiry, a last cycle)."""
    for n, (name, account) in enumerate(sim.accounts.items()):
        view = state.for_account(name)
        recs = [parse_recording(account.recording_json(r)) for r in account.recordings.values()]
        await view.store_page(recs, None, "")
        ids = [r.id for r in recs]
        for i, rec_id in enumerate(ids[: len(ids) // 2]):
            await view.mark_archived(rec_id, f"{name}/{rec_id}.zip", 100 + i, "0" * 64, "{}", 1,
                                     flag="incomplete" if i == n else "", flag_reason="short" if i == n else "")
        await view.update(ids[-1], state="failed", last_error=f"{name} broke")
        await view.set_meta("accesskey_expires", str(2_000_000_000 + n))
        await view.set_meta("last_cycle", str(1_000 + n))
        if n == 1:
            await view.set_meta("api_refused", json.dumps({"reason": "ACCOUNT_FROZEN", "status": 403, "since": 1.0}))


async def assert_summaries_agree(state: Any) -> None:
    """``summaries()`` (five queries for all accounts) says what ``summary()`` says of the whole
    state and of each account's view; the state is closed after."""
    try:
        total, by_account = await state.summaries()
        assert total == await state.summary()
        accounts = {r["account"] for r in await state.flagged(1000)} | set(by_account)
        assert len(accounts) > 1
        for account in accounts:
            mine = await state.for_account(account).summary()
            assert {k: v for k, v in by_account[account].items() if k != "last_error"} == {
                k: v for k, v in mine.items() if k != "last_error"}, account
    finally:
        await state.close()


def test_accounts_config_errors():
    base = {"api": {"base_url": "http://127.0.0.1:1/v1.0"}}
    cases = [
        ({"accounts": [{"name": "Acme", "accesskey": "k"}]}, "name must be 1 to 32"),
        ({"accounts": [{"name": "a"}]}, r"\[accounts a\] no credential"),
        ({"accounts": [{"name": "a", "accesskey": "k", "colour": 1}]}, r"\[accounts a\] unknown key 'colour'"),
        ({"api": {"accesskey": "k"}, "accounts": [{"name": "a", "accesskey": "k"}]}, "move it into"),
        ({"accounts": [{"name": "a", "accesskey": "k"}, {"name": "a", "accesskey": "j"}]}, "unique"),
        ({"accounts": [{"name": "a", "accesskey": "k"}, {"name": "b", "accesskey": "j"}],
          "archive": {"layout": "{year}/{id}.{ext}"}}, "must contain {account}"),
        ({"accounts": []}, "one or more tables"),
        ({"accounts": [{"name": "a", "accesskey": "k", "requests_per_second": -1}]}, ">= 0"),
    ]
    for extra, message in cases:
        data = {**base, **extra, "api": {**base["api"], **extra.get("api", {})}}
        with pytest.raises(ConfigError, match=message):
            build_config(data, Path("/tmp"), {})
    cfg = build_config({**base, "accounts": [{"name": "a", "accesskey": "k"},
                                             {"name": "b", "token": "t", "requests_per_second": 3}]}, Path("/tmp"), {})
    assert cfg.archive.layout == "{account}/{year}/{month}/{day}/{id}.{ext}"
    assert [(a.name, a.api.accesskey, a.api.token, a.api.requests_per_second, a.api.burst) for a in cfg.accounts] == [
        ("a", "k", "", 8.0, 8), ("b", "", "t", 3.0, 3)]
    single = build_config({"api": {"accesskey": "k"}}, Path("/tmp"), {})
    assert [a.name for a in single.accounts] == ["default"]
    assert single.archive.layout == "{year}/{month}/{day}/{id}.{ext}", "one account: paths as before"


async def test_a_backfill_of_three_accounts_keeps_each_apart(tmp_path, multi_sim):
    sim = await multi_sim(["acme", "beta", "gamma"], recordings=15, audio_bytes=3000)
    for account in sim.accounts.values():  # polled until it ends, then downloaded: still in its account's place
        account.add_recording(ends_in=1.0)
    cfg = write_accounts_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert result.rc == 0, result
    assert_accounts_archived(sim, tmp_path / "archive", tmp_path / "state.sqlite3")
    for account in sim.accounts.values():
        assert account.stats["api_requests"] > 0 and account.credential_leaks == 0
        assert account.overlapping_downloads == 0
    status = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    assert set(status["accounts"]) == {"acme", "beta", "gamma"}
    for name, counts in status["accounts"].items():
        assert counts["archived"] == len(sim.accounts[name].expected_archives()), name
    assert status["archived"] == sum(c["archived"] for c in status["accounts"].values())
    table = (await run_cli("--config", str(cfg), "status")).out
    assert "acme" in table and "gamma" in table
    await assert_summaries_agree(await StateDB.open(tmp_path / "state.sqlite3", readonly=True))
    mixed = await StateDB.open(tmp_path / "mixed.sqlite3")
    await populate_accounts(mixed, sim)
    total, _ = await mixed.summaries()
    assert total["oldest_pending"] and total["last_error"] and total["archived_flagged"]["incomplete"] == 3
    assert total["api_refused"] and len(total["accesskey_expires_by_account"]) == 3
    await assert_summaries_agree(mixed)
    verify = await run_cli("--config", str(cfg), "verify")
    assert verify.rc == 0 and "0 problem(s)" in verify.out, verify
    gets = {name: sum(s.storage_gets.values()) for name, s in sim.accounts.items()}
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert again.rc == 0, again
    assert {name: sum(s.storage_gets.values()) for name, s in sim.accounts.items()} == gets, "nothing fetched twice"


async def test_a_frozen_account_stops_only_its_own_backfill(tmp_path, multi_sim):
    sim = await multi_sim(["acme", "frozen"], recordings=12, audio_bytes=2000)
    sim.accounts["frozen"].refusal = "ACCOUNT_FROZEN"
    cfg = write_accounts_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert result.rc == 3, result
    assert "ACCOUNT_FROZEN" in result.out
    assert_accounts_archived(sim, tmp_path / "archive", tmp_path / "state.sqlite3", ["acme"])
    status = json.loads((await run_cli("--config", str(cfg), "status", "--json")).out)
    assert status["accounts"]["frozen"]["api_refused"]["reason"] == "ACCOUNT_FROZEN"
    assert status["accounts"]["acme"]["api_refused"] is None
    assert not [r for r in db_rows(tmp_path / "state.sqlite3", ROWS_SQL) if r[2] == "failed"]
    sim.accounts["frozen"].refusal = ""
    thawed = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert thawed.rc == 0, thawed
    assert_accounts_archived(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


async def test_the_service_pauses_a_frozen_account_and_serves_the_others(tmp_path, multi_sim):
    sim = await multi_sim(["acme", "beta", "frozen"], recordings=10, audio_bytes=2000)
    frozen = sim.accounts["frozen"]
    frozen.refusal = "ACCOUNT_FROZEN"
    port = free_port()
    cfg = write_accounts_config(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"},
                                workers={"trouble_pause": 0.5, "poll_interval": 0.5})
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "state.sqlite3"

    def archived(name: str) -> int:
        try:
            return sum(1 for r in db_rows(db, ROWS_SQL) if r[0] == name and r[2] == "archived")
        except sqlite3.Error:
            return 0

    try:
        await wait_until(lambda: archived("acme") == 10 and archived("beta") == 10, 60, "the others archived")
        assert archived("frozen") == 0
        async with aiohttp.ClientSession() as http:
            metrics = ""
            for _ in range(400):
                _, metrics = await http_get(http, base + "/metrics")
                if 'voipbin_archiver_recordings{account="acme",state="archived"} 10.0' in metrics:
                    break
                await asyncio.sleep(0.05)
            assert 'voipbin_archiver_credential_refused{account="frozen",reason="ACCOUNT_FROZEN"} 1.0' in metrics
            assert 'credential_refused{account="acme"' not in metrics
            status, text = await http_get(http, base + "/healthz")
            assert status == 503 and "account frozen" in text and "acme" not in text
            frozen.refusal = ""
            await wait_until(lambda: archived("frozen") == 10, 60, "the thawed account archived")
            for _ in range(400):
                status, text = await http_get(http, base + "/healthz")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200, text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        log_file.close()
    assert_accounts_archived(sim, tmp_path / "archive", db)
    log = (tmp_path / "run.log").read_text()
    assert '"account": "frozen"' in log or "account=frozen" in log, "refusals say whose they are"
    assert all(s.accesskey not in log for s in sim.accounts.values())


def _downgrade_to_v4(db: Path) -> None:
    """Rewrite a current database as the v4 schema the single-account release wrote."""
    old = db.with_name("old.sqlite3")
    con = sqlite3.connect(old)
    for number in range(4):
        con.executescript(f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;")
    con.execute("ATTACH DATABASE ? AS cur", (str(db),))
    columns = [r[1] for r in con.execute("PRAGMA main.table_info(recordings)")]
    con.execute(f"INSERT INTO main.recordings ({', '.join(columns)}) SELECT {', '.join(columns)} FROM cur.recordings")
    con.execute("INSERT INTO main.meta (key, value) SELECT key, value FROM cur.meta")
    con.commit()
    con.execute("DETACH DATABASE cur")
    con.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    old.rename(db)


async def test_a_single_account_archive_migrates_and_keeps_its_paths(tmp_path, multi_sim):
    sim = await multi_sim(["default", "newco"], recordings=12, audio_bytes=2000)
    single = write_accounts_config(tmp_path, sim, ["default"])
    first = await run_cli("--config", str(single), "backfill", "--wait", "5")
    assert first.rc == 0, first
    db = tmp_path / "state.sqlite3"
    _downgrade_to_v4(db)  # as the single-account release left it
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 4
    stale = await run_cli("--config", str(single), "status")
    assert stale.rc == 2 and "run `backfill` or `run` once to migrate" in stale.err, stale

    both = write_accounts_config(tmp_path, sim, ["default", "newco"])
    fetched_before = sum(sim.accounts["default"].storage_gets.values())
    second = await run_cli("--config", str(both), "backfill", "--wait", "5")
    assert second.rc == 0, second
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert sum(sim.accounts["default"].storage_gets.values()) == fetched_before, "nothing downloaded again"
    assert_accounts_archived(sim, tmp_path / "archive", db, ["default"], prefixed=False)
    assert_accounts_archived(sim, tmp_path / "archive", db, ["newco"], prefixed=True)
    verify = await run_cli("--config", str(both), "verify")
    assert verify.rc == 0, verify
