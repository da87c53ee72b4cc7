"""The signed, chained manifest: ``keygen``, segments written by the real CLI against the
simulator, and ``verify --manifest`` catching and naming each kind of tampering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from archiver.errors import ConfigError
from archiver.manifest import Signer, keygen, load_public_key, make_segment, open_segment
from tests.conftest import cli_command, cli_env, free_port, http_get, run_cli, running_service, write_config


def _segments(root: Path, account: str = "default") -> list[Path]:
    return sorted((root / "manifests" / account).glob("*.json"))


def _bodies(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.zip") if "manifests" not in p.parts)


async def _archive(tmp_path: Path, make_sim, recordings: int = 12, **archive) -> tuple[Path, Path, Path]:
    """An archive of ``recordings`` with the manifest on: (config, archive root, key)."""
    sim = await make_sim(recordings=recordings, audio_bytes=3000)
    key = tmp_path / "signing.key"
    assert (await run_cli("keygen", "--out", str(key))).rc == 0
    cfg = write_config(tmp_path, sim, archive={"signing_key_file": str(key), **archive})
    run = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert run.rc == 0, run
    return cfg, tmp_path / "archive", key


async def _verify(cfg: Path, *extra: str):
    return await run_cli("--config", str(cfg), "verify", "--manifest", *extra)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    public, key_id = keygen(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    signer = Signer.load(tmp_path / "k")
    assert signer.key_id == key_id and public == tmp_path / "k.pub"
    data = make_segment(signer, "default", 1, None, [{"event": "archived"}], datetime.now(UTC))
    doc, why = open_segment(data, load_public_key(public))
    assert why == "" and doc["seq"] == 1
    doc, why = open_segment(data.replace(b'"archived"', b'"Archived"'), load_public_key(public))
    assert "edited" in why
    with pytest.raises(ConfigError, match="never overwrites"):
        keygen(tmp_path / "k")
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        Signer.load(tmp_path / "k")
    (tmp_path / "bad").write_text("not a key\n")
    (tmp_path / "bad").chmod(0o600)
    with pytest.raises(ConfigError, match="bad: not an unencrypted PEM"):
        Signer.load(tmp_path / "bad")


async def test_a_missing_or_bad_signing_key_stops_the_start_before_anything_is_archived(tmp_path, make_sim):
    sim = await make_sim(recordings=3)
    for key in (tmp_path / "absent.key", tmp_path / "config.toml"):
        cfg = write_config(tmp_path, sim, name="run.toml", archive={"signing_key_file": str(key)})
        run = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
        assert run.rc == 2 and str(key) in run.err, run
        assert "BEGIN" not in run.err, "never the key's content"
        assert not (tmp_path / "archive").exists() or not _bodies(tmp_path / "archive")


async def test_the_manifest_lists_every_archived_file_and_verify_proves_it(tmp_path, make_sim):
    cfg, root, key = await _archive(tmp_path, make_sim, unpack=True)
    segments = _segments(root)
    assert len(segments) == 1, "one segment for the run: written at shutdown"
    doc = json.loads(segments[0].read_bytes())
    assert doc["seq"] == 1 and doc["previous_sha256"] is None
    assert len([e for e in doc["entries"] if e["event"] == "archived"]) == 12
    assert any(e["files"] for e in doc["entries"]), "unpacked members are listed with their hashes"
    ok = await _verify(cfg)
    assert ok.rc == 0, ok
    assert "1 segment(s), 12 recording(s)" in ok.out and "0 problem(s)" in ok.out
    # the auditor's way: the public key alone, no state database
    shutil.move(tmp_path / "state.sqlite3", tmp_path / "state.moved")
    alone = await _verify(cfg, "--public-key", str(key) + ".pub")
    assert alone.rc == 0 and "without the state database" in alone.out, alone
    shutil.move(tmp_path / "state.moved", tmp_path / "state.sqlite3")
    # nothing new: a second run writes no segment
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert again.rc == 0 and len(_segments(root)) == 1, again


async def test_verify_names_each_kind_of_tampering(tmp_path, make_sim):
    cfg, root, _ = await _archive(tmp_path, make_sim)
    first, second, third = _bodies(root)[:3]
    # 1. a rewritten recording whose sidecar was rewritten to match
    forged = b"PK\x05\x06" + b"\0" * 18
    first.write_bytes(forged)
    side = first.with_suffix(".json")
    doc = json.loads(side.read_text())
    doc["archive"]["sha256"] = hashlib.sha256(forged).hexdigest()
    doc["archive"]["size"] = len(forged)
    side.write_text(json.dumps(doc))
    # 2. a deleted recording
    second.unlink()
    # 3. a file added behind the archiver's back
    (third.parent / "planted.wav").write_bytes(b"RIFF")
    bad = await _verify(cfg)
    assert bad.rc == 1, bad
    assert f"{first.relative_to(root)}: changed" in bad.out
    assert f"{side.relative_to(root)}: the sidecar does not name the SHA-256" in bad.out
    assert f"{second.relative_to(root)}: missing" in bad.out
    assert "planted.wav: in the archive but in no manifest entry" in bad.out
    # the state agrees with neither: `verify` (against the state) names the forgery too
    plain = await run_cli("--config", str(cfg), "verify")
    assert plain.rc == 1 and first.name in plain.out


async def test_verify_names_an_edited_a_deleted_and_a_reordered_segment(tmp_path, make_sim):
    sim = await make_sim(recordings=4, audio_bytes=2000)
    key = tmp_path / "k"
    keygen(key)
    cfg = write_config(tmp_path, sim, archive={"signing_key_file": str(key)})
    root = tmp_path / "archive"
    for _ in range(4):  # four runs, four segments
        sim.add_recording()
        sim.add_recording()
        assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    segments = _segments(root)
    assert [json.loads(p.read_bytes())["seq"] for p in segments] == [1, 2, 3, 4]
    ok = await _verify(cfg)
    assert ok.rc == 0, ok

    # an edited segment: its signature fails
    original = segments[1].read_bytes()
    segments[1].write_bytes(original.replace(b'"archived"', b'"Archived"', 1))
    bad = await _verify(cfg)
    assert bad.rc == 1 and f"{segments[1].relative_to(root)}: its signature does not match" in bad.out, bad
    segments[1].write_bytes(original)

    # a segment in the middle deleted (and its recordings with it, so no file gives it away)
    middle = json.loads(segments[2].read_bytes())
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(segments[2], moved / segments[2].name)
    bad = await _verify(cfg)
    assert bad.rc == 1 and "segment 3 missing (deleted)" in bad.out, bad
    shutil.move(moved / segments[2].name, segments[2])

    # two segments swapped by name: their numbers and links disagree
    a, b = segments[1], segments[2]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    bad = await _verify(cfg)
    assert bad.rc == 1 and "renamed or moved" in bad.out, bad
    a.write_bytes(a_bytes)
    b.write_bytes(b_bytes)

    # the newest segment deleted: the state's head names it; without the state, its files do
    newest = segments[-1]
    newest.unlink()
    bad = await _verify(cfg)
    assert bad.rc == 1 and f"segment 4 ({newest.relative_to(root)}) was written" in bad.out, bad
    shutil.move(tmp_path / "state.sqlite3", tmp_path / "state.moved")
    alone = await _verify(cfg, "--public-key", str(key) + ".pub")
    assert alone.rc == 1 and "in no manifest entry" in alone.out, alone
    assert middle["entries"], "(each segment listed recordings)"


async def test_a_segment_written_but_not_recorded_is_taken_up_not_written_twice(tmp_path, make_sim):
    """The crash between a segment's rename and the state's record of it: the state is put
    back to before the segment; the next start finds the segment and records what it lists."""
    cfg, root, _ = await _archive(tmp_path, make_sim, recordings=6)
    db = tmp_path / "state.sqlite3"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE recordings SET manifest_seq = NULL")
        con.execute("DELETE FROM meta WHERE key = 'manifest_head'")
    run = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert run.rc == 0 and "manifest_segment_taken_up" in run.err, run
    assert len(_segments(root)) == 1, "nothing listed twice"
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM recordings WHERE manifest_seq IS NULL").fetchone()[0] == 0
    assert (await _verify(cfg)).rc == 0


async def test_a_broken_chain_is_logged_and_exported_and_archiving_goes_on(tmp_path, make_sim):
    sim = await make_sim(recordings=3, audio_bytes=2000)
    key = tmp_path / "k"
    keygen(key)
    cfg = write_config(tmp_path, sim, archive={"signing_key_file": str(key)})
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    root = tmp_path / "archive"
    first = _segments(root)[0]
    first.write_bytes(first.read_bytes().replace(b'"archived"', b'"Archived"', 1))  # edited
    port = free_port()
    cfg = write_config(tmp_path, sim, name="svc.toml", archive={"signing_key_file": str(key)},
                       metrics={"listen": f"127.0.0.1:{port}"})
    sim.add_recording()
    async with running_service(cfg, tmp_path / "run.log") as proc, aiohttp.ClientSession() as http:
        async def until_exported() -> str:
            while True:
                text = (await http_get(http, f"http://127.0.0.1:{port}/metrics"))[1]
                if "voipbin_archiver_manifest_ok 0.0" in text and \
                        'voipbin_archiver_recordings{state="archived"} 4.0' in text:
                    return text
                await asyncio.sleep(0.05)

        await asyncio.wait_for(until_exported(), 30)
    assert proc.returncode == 0
    log_text = (tmp_path / "run.log").read_text()
    assert "manifest_broken" in log_text and "its signature does not match" in log_text
    assert len(_segments(root)) == 2, "the new recording was archived and signed all the same"
    bad = await _verify(cfg)
    assert bad.rc == 1 and "its signature does not match" in bad.out


async def test_kill_9_mid_backfill_loses_no_manifest_line(tmp_path, make_sim):
    sim = await make_sim(recordings=80, audio_bytes=4000, slow_builds=80, build_seconds=0.03)
    key = tmp_path / "k"
    keygen(key)
    cfg = write_config(tmp_path, sim, archive={"signing_key_file": str(key), "manifest_interval": 0.2},
                       workers={"concurrency": 2})
    root = tmp_path / "archive"
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "backfill", "--wait", "10"),
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                                                env=cli_env())

    async def two_segments() -> None:
        while len(_segments(root)) < 2:
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(two_segments(), 60)
    finally:
        proc.kill()  # SIGKILL: no shutdown, no last segment
        await proc.wait()
    with sqlite3.connect(tmp_path / "state.sqlite3") as con:
        archived = con.execute("SELECT count(*) FROM recordings WHERE state = 'archived'").fetchone()[0]
    assert 0 < archived < 80, "killed mid-backfill"
    run = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert run.rc == 0, run
    ok = await _verify(cfg)
    assert ok.rc == 0 and "80 recording(s)" in ok.out, ok
    shutil.move(tmp_path / "state.sqlite3", tmp_path / "state.moved")
    alone = await _verify(cfg, "--public-key", str(key) + ".pub")
    assert alone.rc == 0, alone
