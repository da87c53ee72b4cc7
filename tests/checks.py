"""Assertions shared by the end-to-end tests: the archive is exactly what the simulator holds."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path

from archiver.simulator import Simulator
from tests.conftest import archive_files, db_rows


def assert_archive_complete(sim: Simulator, root: Path, db: Path, unpack: bool = False) -> None:
    """Every ended, non-deleted recording archived once with identical bytes and a right sidecar;
    nothing else in the archive; no temporary files."""
    expected = sim.expected_archives()
    rows = {r[0]: r for r in db_rows(db) if r[1] == "archived"}
    assert set(rows) == set(expected), (
        f"missing {sorted(set(expected) - set(rows))[:5]}, unexpected {sorted(set(rows) - set(expected))[:5]}"
    )
    known: set[Path] = set()
    for rec_id, body in expected.items():
        _, _, rel, sha, _ = rows[rec_id]
        path = root / rel
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["recording"]["id"] == rec_id
        meta = sidecar["archive"]
        if meta.get("fetched_from") == "storage_files":  # our own ZIP of the listed files
            body = path.read_bytes()
            assert_same_audio(sim, rec_id, body)
            listed = meta["storage_files"]
            assert all(set(f["server_hashes_checked"]) == {"md5", "crc32c"} for f in listed), listed
        else:
            assert path.read_bytes() == body, f"{rec_id}: bytes differ"
            assert set(meta["server_hashes_checked"]) == {"md5", "crc32c"}
        assert sha == hashlib.sha256(body).hexdigest()
        assert meta["sha256"] == sha and meta["size"] == len(body)
        rec = sim.recordings[rec_id]
        if sim.cfg.mode == "zip" and rec.body_override is None:
            assert [m["name"] for m in meta["members"]] == sim.member_names(rec), f"{rec_id}: early ZIP kept"
            with zipfile.ZipFile(path) as archive:
                crcs = [f"{archive.getinfo(m['name']).CRC:08x}" for m in meta["members"]]
            assert [m["crc32"] for m in meta["members"]] == crcs
            assert all(("sha256" in m) == unpack for m in meta["members"]), "member SHA-256 only when unpacked"
        known |= {path, path.with_suffix(".json")}
        if unpack:
            for m in meta["members"]:
                member = path.parent / rec_id / m["stored_as"]
                assert hashlib.sha256(member.read_bytes()).hexdigest() == m["sha256"]
                known.add(member)
    files = archive_files(root)
    assert not [p for p in files if p.name.endswith(".partial")], "temporary files left"
    strays = [p for p in files if p not in known and p.relative_to(root).parts[0] != "manifests"]
    assert not strays, f"files the database does not know: {strays[:5]}"


def archived_members(body: bytes) -> dict[str, bytes]:
    """The files of an archived body: a ZIP's members by name, or the single WAV."""
    if body[:4] == b"RIFF":
        return {"wav": body}
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def assert_same_audio(sim: Simulator, rec_id: str, body: bytes) -> None:
    """``body`` holds exactly the channel files the server stores for ``rec_id`` (whatever ZIP
    wraps them: the server's, or the archiver's own from the storage listing)."""
    expected = archived_members(sim.expected_archives()[rec_id])
    try:
        got = archived_members(body)
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError) as exc:  # torn, cut short: not a ZIP any more
        raise AssertionError(f"{rec_id}: incomplete or wrong bytes ({type(exc).__name__}: {exc})") from None
    assert got == expected, f"{rec_id}: archived files differ from the server's"
