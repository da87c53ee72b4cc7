"""Encryption at rest (``[archive] encrypt_to``) through the real CLI, checked with Debian's real
``age`` binary: every body decrypts to the server's bytes, no plaintext recording or number is
at rest, ``verify`` needs no private key, and the archive is adopted after a lost database."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import db_rows, run_cli, write_config

MAGIC = b"age-encryption.org/v1\n"


@pytest.fixture
def age_key(tmp_path: Path) -> tuple[Path, str]:
    """A key pair made by the real ``age-keygen``: (identity file, recipient)."""
    if not shutil.which("age") or not shutil.which("age-keygen"):
        pytest.skip("needs Debian's age and age-keygen (apt-get install age; .ci/run installs it)")
    key = tmp_path / "age-key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout
    return key, recipient.strip()


def age_decrypt(key: Path, data: bytes) -> bytes:
    return subprocess.run(["age", "-d", "-i", str(key)], input=data, check=True, capture_output=True).stdout


def assert_encrypted_archive(sim, root: Path, db: Path, key: Path) -> int:
    """Every archived body is an age file that ``age -d`` opens to the server's bytes; its
    sidecar holds no recording JSON and no call in the clear; nothing else is plaintext audio."""
    expected = sim.expected_archives()
    rows = {r[0]: r for r in db_rows(db, "SELECT id, state, path, sha256, plain_sha256 FROM recordings")}
    checked = 0
    for rec_id, body in expected.items():
        _, state, rel, sha, plain = rows[rec_id]
        assert state == "archived" and rel.endswith(".age"), (rec_id, state, rel)
        data = (root / rel).read_bytes()
        assert data.startswith(MAGIC) and hashlib.sha256(data).hexdigest() == sha
        assert age_decrypt(key, data) == body, f"{rec_id}: decrypts to other bytes"
        assert plain == hashlib.sha256(body).hexdigest()
        side = json.loads((root / rel).with_suffix("").with_suffix(".json").read_text())
        assert set(side) == {"archive", "sealed"}, sorted(side)
        assert side["archive"]["plaintext"]["sha256"] == plain and side["archive"]["sha256"] == sha
        private = json.loads(age_decrypt(key, side["sealed"].encode()))
        assert private["recording"]["id"] == rec_id
        checked += 1
    numbers = {r[0] for r in db_rows(db, "SELECT source FROM calls WHERE source <> ''")}
    assert numbers or not any(r.reference_type == "call" for r in sim.recordings.values())
    for path in root.rglob("*"):
        if path.is_file() and "manifests" not in path.parts:
            data = path.read_bytes()
            assert data[:4] not in (b"PK\x03\x04", b"RIFF"), f"{path}: plaintext audio at rest"
            leaked = [n for n in numbers if n.encode() in data]
            assert not leaked, f"{path}: a caller's number in the clear"
    return checked


async def test_malformed_recipients_stop_the_start(tmp_path, make_sim, age_key):
    sim = await make_sim(recordings=2)
    for value, error in ((["age1notakey"], "age1notakey"), ("age1x", "a list of age recipients"),
                         ([age_key[1], age_key[1]], "twice")):
        cfg = write_config(tmp_path, sim, archive={"encrypt_to": value} if isinstance(value, str) else {})
        if not isinstance(value, str):
            cfg.write_text(cfg.read_text().replace("[archive]\n", f"[archive]\nencrypt_to = {json.dumps(value)}\n"))
        run = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
        assert run.rc == 2 and error in run.err, run
    cfg = write_config(tmp_path, sim, archive={"unpack": True})
    cfg.write_text(cfg.read_text().replace("[archive]\n", f'[archive]\nencrypt_to = ["{age_key[1]}"]\n'))
    run = await run_cli("--config", str(cfg), "backfill", "--wait", "5")
    assert run.rc == 2 and "unpack" in run.err
    assert not (tmp_path / "archive").exists()


def encrypted_config(tmp_path: Path, sim, recipient: str, **sections) -> Path:
    cfg = write_config(tmp_path, sim, **sections)
    cfg.write_text(cfg.read_text().replace("[archive]\n", f'[archive]\nencrypt_to = ["{recipient}"]\n', 1))
    return cfg


async def test_an_encrypted_archive_decrypts_with_age_to_the_servers_bytes(tmp_path, make_sim, age_key):
    key, recipient = age_key
    sim = await make_sim(recordings=14, audio_bytes=600_000, conference_every=4)  # calls spill (over 1 MB)
    cfg = encrypted_config(tmp_path, sim, recipient)
    run = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert run.rc == 0, run
    root, db = tmp_path / "archive", tmp_path / "state.sqlite3"
    assert assert_encrypted_archive(sim, root, db, key) == 14
    ok = await run_cli("--config", str(cfg), "verify")
    assert ok.rc == 0 and "14 archived recordings: 0 problem(s)" in ok.out, ok
    deep = await run_cli("--config", str(cfg), "verify", "--identity", str(key))
    assert deep.rc == 0 and "0 problem(s)" in deep.out, deep

    # a lost database: the encrypted archive is adopted, nothing downloaded again
    requests = sim.stats["recordingfiles"]
    for name in ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    again = await run_cli("--config", str(cfg), "backfill", "--wait", "10")
    assert again.rc == 0, again
    assert sim.stats["recordingfiles"] == requests, "adopted, not downloaded again"
    assert assert_encrypted_archive(sim, root, db, key) == 14


async def test_export_of_an_encrypted_archive_with_and_without_the_key(tmp_path, make_sim, age_key):
    key, recipient = age_key
    sim = await make_sim(recordings=6, audio_bytes=3000)
    cfg = encrypted_config(tmp_path, sim, recipient)
    assert (await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0
    sealed = await run_cli("--config", str(cfg), "export", "--out", str(tmp_path / "sealed"))
    assert sealed.rc == 0, sealed
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=tmp_path / "sealed").returncode == 0
    bodies = sorted((tmp_path / "sealed").rglob("*.age"))
    assert len(bodies) == 6 and all(p.read_bytes().startswith(MAGIC) for p in bodies)
    opened = await run_cli("--config", str(cfg), "export", "--out", str(tmp_path / "open"), "--identity", str(key))
    assert opened.rc == 0, opened
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=tmp_path / "open").returncode == 0
    expected = sim.expected_archives()
    plain = sorted((tmp_path / "open").rglob("*.zip"))
    assert len(plain) == 6 and not list((tmp_path / "open").rglob("*.age"))
    for path in plain:
        assert path.read_bytes() == expected[path.name.split(".")[0]]
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["recording"]["id"] == path.name.split(".")[0] and "sealed" not in side
    wrong = tmp_path / "wrong.txt"
    subprocess.run(["age-keygen", "-o", str(wrong)], check=True, capture_output=True)
    refused = await run_cli("--config", str(cfg), "export", "--out", str(tmp_path / "no"), "--identity", str(wrong))
    assert refused.rc == 1, refused
    bad = await run_cli("--config", str(cfg), "verify", "--identity", str(wrong))
    assert bad.rc == 1 and "cannot decrypt" in bad.out, bad


@pytest.mark.s3
async def test_an_encrypted_compliance_bucket_with_a_late_call(tmp_path, make_sim, rgw, age_key):
    """The ciphertext goes to the bucket (its Content-MD5 and SHA-256 the ciphertext's); a call
    listed late is sealed in ``<id>.call.json``; ``age -d`` opens every object."""
    from tests.test_s3 import Bucket, s3_config

    key, recipient = age_key
    bucket = Bucket(rgw, lock=True)
    sim = await make_sim(recordings=8, audio_bytes=300_000, conference_every=4)
    late = next(r for r in sim.recordings.values() if r.reference_type == "call")
    late.call_listed = False
    cfg = s3_config(tmp_path, sim, bucket, object_lock_mode="COMPLIANCE", retain_days=1)
    cfg.write_text(cfg.read_text().replace("[archive]\n", f'[archive]\nencrypt_to = ["{recipient}"]\n', 1))
    assert (first := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, first
    late.call_listed = True
    assert (second := await run_cli("--config", str(cfg), "backfill", "--wait", "10")).rc == 0, second
    assert "calls noted late" in second.out, second.out
    rows = {r[0]: r for r in db_rows(tmp_path / "state.sqlite3",
                                     "SELECT id, state, path, sha256, plain_sha256 FROM recordings")}
    for rec_id, body in sim.expected_archives().items():
        obj = bucket.get("voipbin/" + rows[rec_id][2])
        assert rows[rec_id][2].endswith(".zip.age") and hashlib.sha256(obj).hexdigest() == rows[rec_id][3]
        assert age_decrypt(key, obj) == body
        side = json.loads(bucket.get("voipbin/" + rows[rec_id][2][: -len(".zip.age")] + ".json"))
        assert "recording" not in side and "call" not in side
    note = json.loads(bucket.get(next(k for k in bucket.versions() if k.endswith(".call.json"))))
    assert set(note) == {"recording_id", "sealed"} and note["recording_id"] == late.id
    assert json.loads(age_decrypt(key, note["sealed"].encode()))["call"]["id"] == late.reference_id
    for deep in ((), ("--deep",), ("--identity", str(key))):
        verified = await run_cli("--config", str(cfg), "verify", *deep)
        assert verified.rc == 0 and " 0 problem(s)" in verified.out, verified
