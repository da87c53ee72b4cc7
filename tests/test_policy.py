"""Retention by policy through the real CLI: ``[archive] keep_days``, ``expire``, legal holds
(``hold add|list|remove``), ``erase``, each attested in the audit trail and the signed manifest;
a removed recording is never downloaded again."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from archiver.manifest import keygen
from tests.conftest import db_rows, run_cli, write_config


def _age(db: Path, ids: list[str], days: float) -> None:
    """Make recordings look ``days`` old (their start), as a years-long archive has them."""
    with sqlite3.connect(db) as con:
        con.executemany("UPDATE recordings SET tm_start = ? WHERE id = ?",
                        [(time.time() - days * 86400, i) for i in ids])


def _segment_events(root: Path) -> list[dict]:
    return [e for p in sorted((root / "manifests" / "default").glob("*.json"))
            for e in json.loads(p.read_bytes())["entries"]]


async def test_expire_hold_and_erase_in_a_directory(tmp_path, make_sim):
    sim = await make_sim(recordings=8, audio_bytes=3000)
    keygen(tmp_path / "k")
    cfg = write_config(tmp_path, sim, archive={"signing_key_file": str(tmp_path / "k"), "keep_days": 30})
    cli = ("--config", str(cfg))
    assert (run := await run_cli(*cli, "backfill", "--wait", "10")).rc == 0, run
    db, root = tmp_path / "state.sqlite3", tmp_path / "archive"
    rows = {r[0]: r for r in db_rows(db) if r[1] == "archived"}
    old = sorted(rows)[:5]
    _age(db, old, 40)
    held = old[0]
    assert (r := await run_cli(*cli, "hold", "add", held, "--reason", "case 4711")).rc == 0, r
    assert "held 1 recording(s)" in r.out
    listed = await run_cli(*cli, "hold", "list", "--json")
    assert [json.loads(line)["recording_id"] for line in listed.out.splitlines()] == [held]

    dry = await run_cli(*cli, "expire", "--dry-run")
    assert dry.rc == 0 and "5 due" in dry.out and "1 kept under a hold" in dry.out, dry
    assert all((root / rows[i][2]).exists() for i in old), "a dry run removes nothing"

    done = await run_cli(*cli, "expire")
    assert done.rc == 0 and "4 removed" in done.out and "1 kept under a hold" in done.out, done
    states = {r[0]: r[1] for r in db_rows(db)}
    for rec_id in old[1:]:
        assert states[rec_id] == "expired"
        body = root / rows[rec_id][2]
        assert not body.exists() and not body.with_suffix(".json").exists(), "body and sidecar removed"
    assert states[held] == "archived" and (root / rows[held][2]).exists(), "the held one stays"
    trail = [json.loads(line) for line in (tmp_path / "archive-audit.jsonl").read_text().splitlines()]
    assert sorted(t["event"] for t in trail) == ["expired"] * 4 + ["held"]
    assert all(t["sha256"] and t["reason"] for t in trail)

    requests = sim.stats["recordingfiles"]
    assert (run := await run_cli(*cli, "backfill", "--wait", "5")).rc == 0, run
    assert sim.stats["recordingfiles"] == requests, "an expired recording is never downloaded again"
    assert {r[0]: r[1] for r in db_rows(db)}[old[1]] == "expired"

    ok = await run_cli(*cli, "verify", "--manifest")
    assert ok.rc == 0, ok
    events = [e["event"] for e in _segment_events(root)]
    assert events.count("expired") == 4 and events.count("held") == 1
    # an expired recording put back behind the archiver's back is named
    back = root / rows[old[1]][2]
    back.parent.mkdir(parents=True, exist_ok=True)
    back.write_bytes(b"restored from an old backup")
    bad = await run_cli(*cli, "verify", "--manifest")
    assert bad.rc == 1 and f"{rows[old[1]][2]}: still in the archive, but segment" in bad.out, bad
    back.unlink()

    refused = await run_cli(*cli, "erase", held, "--reason", "data subject request 17")
    assert refused.rc == 1 and "under a legal hold" in refused.err, refused
    assert (r := await run_cli(*cli, "hold", "remove", held, "--reason", "case closed")).rc == 0, r
    erased = await run_cli(*cli, "erase", held, "--reason", "data subject request 17")
    assert erased.rc == 0, erased
    assert not (root / rows[held][2]).exists() and {r[0]: r[1] for r in db_rows(db)}[held] == "erased"
    unknown = await run_cli(*cli, "erase", "3f0c6a43-0000-4000-8000-000000000000", "--reason", "x")
    assert unknown.rc == 1 and "no such recording" in unknown.err
    assert (run := await run_cli(*cli, "backfill", "--wait", "5")).rc == 0, run  # signs the last changes
    ok = await run_cli(*cli, "verify", "--manifest")
    assert ok.rc == 0, ok
    tail = [e["event"] for e in _segment_events(root) if e["event"] in ("held", "released", "erased")]
    assert tail == ["held", "released", "erased"]


async def test_an_interrupted_removal_is_finished_and_audited_once(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, archive={"keep_days": 10})
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    db = tmp_path / "state.sqlite3"
    rec_id, _, rel, _, _ = db_rows(db)[0]
    _age(db, [rec_id], 11)
    # the crash after the intent and the files' removal, before the audit line and the commit
    with sqlite3.connect(db) as con:
        con.execute("UPDATE recordings SET remove_intent='expired', removed_reason='keep_days = 10' WHERE id=?",
                    (rec_id,))
    (tmp_path / "archive" / rel).unlink()
    done = await run_cli("--config", str(cfg), "expire")
    assert done.rc == 0, done
    assert {r[0]: r[1] for r in db_rows(db)}[rec_id] == "expired"
    trail = (tmp_path / "archive-audit.jsonl").read_text().splitlines()
    assert len(trail) == 1 and json.loads(trail[0])["recording_id"] == rec_id


async def test_policy_config_errors(tmp_path, make_sim):
    sim = await make_sim(recordings=1)
    cfg = write_config(tmp_path, sim)
    refused = await run_cli("--config", str(cfg), "expire")
    assert refused.rc == 2 and "keep_days is 0" in refused.err
    no_reason = await run_cli("--config", str(cfg), "hold", "add", "x")
    assert no_reason.rc == 2 and "--reason" in no_reason.err
    nothing = await run_cli("--config", str(cfg), "hold", "add", "--reason", "r")
    assert nothing.rc == 2 and "name recordings" in nothing.err
    bad = write_config(tmp_path, sim, name="bad.toml", archive={"keep_days": -1})
    assert (await run_cli("--config", str(bad), "expire")).rc == 2


async def test_hold_by_find_filters(tmp_path, make_sim):
    sim = await make_sim(recordings=12, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    found = [json.loads(line) for line in (await run_cli("--config", str(cfg), "find", "--json")).out.splitlines()]
    number = next(r["source"] for r in found if r["source"])
    matching = [json.loads(line)["recording_id"] for line in
                (await run_cli("--config", str(cfg), "find", "--number", number, "--json")).out.splitlines()]
    held = await run_cli("--config", str(cfg), "hold", "add", "--number", number, "--reason", "subpoena 3")
    assert held.rc == 0 and f"held {len(matching)} recording(s)" in held.out, held
    listed = (await run_cli("--config", str(cfg), "hold", "list")).out
    assert all(rec_id in listed for rec_id in matching) and "subpoena 3" in listed


async def test_the_service_expires_what_is_due(tmp_path, make_sim):
    from tests.conftest import running_service, wait_until

    sim = await make_sim(recordings=5, audio_bytes=2000)
    cfg = write_config(tmp_path, sim, archive={"keep_days": 7})
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    db = tmp_path / "state.sqlite3"
    old = sorted(r[0] for r in db_rows(db))[:2]
    _age(db, old, 8)
    async with running_service(cfg, tmp_path / "run.log") as proc:
        await wait_until(lambda: sorted(r[0] for r in db_rows(db) if r[1] == "expired") == old, 30,
                         "the service to expire what is due")
    assert proc.returncode == 0
    assert '"event": "expire_done"' in (tmp_path / "run.log").read_text()
