"""``voipbin-archiver export``: a production folder for one request (a regulator, a court, a
customer), with proof that what it holds is what was archived.

The recordings ``find`` would list (the state answers which), each file re-read from the archive
(the directory or the bucket) into ``--out`` under its archive path: written to a temporary name,
fsynced, hashed from the disk and only then renamed, once its SHA-256 and size are the ones
archived (a body, an unpacked member) or its content agrees with the state (a sidecar). Then
``SHA256SUMS`` (``sha256sum -c SHA256SUMS`` in ``--out`` checks the lot) and ``export.json``
(the filters, the time, the archive, the version, the counts). A file that is not what was
archived is left as ``<name>.partial``, named in ``export.json`` and on stderr, and the export
fails (exit 1) with no ``SHA256SUMS``: a folder without one is not a production.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .config import Config
from .destinations import Destination, open_destination
from .errors import ConfigError, VerificationError
from .inspect import hash_file
from .layout import EXTRA_SUFFIXES as EXTRAS
from .layout import beside_rel
from .logs import redact
from .seal import SUFFIX as SEAL_SUFFIX
from .seal import decrypt, identities_of, unseal_json
from .state import STORED, FindQuery, open_state
from .store import fsync_path, mkdir_durable, write_file_atomic
from .verify import sidecar_agrees

log = structlog.get_logger("archiver.export")

SUMS = "SHA256SUMS"
MANIFEST = "export.json"


class Mismatch(Exception):
    """A file of the archive is not what was archived (or is missing)."""


@dataclass
class ExportReport:
    recordings: list[dict[str, Any]] = field(default_factory=list)  # what was exported, with its files
    not_archived: list[dict[str, str]] = field(default_factory=list)  # matched, but nothing stored (yet)
    mismatches: list[str] = field(default_factory=list)
    sums: dict[str, str] = field(default_factory=dict)  # export path -> SHA-256
    bytes: int = 0

    @property
    def complete(self) -> bool:
        return not self.mismatches


def check_out(out: Path) -> None:
    """``--out`` must be a new or empty directory: an export never mixes with other files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: not a directory")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty; an export goes into a new or empty directory")


async def export(cfg: Config, query: FindQuery, out: Path, filters: dict[str, Any],
                 identity: Path | None = None) -> ExportReport:
    """Everything ``query`` matches into ``out`` (see the module doc); an encrypted archive's
    files as they are (ciphertext), or with ``identity`` (an age identity file) decrypted, each
    plaintext checked against the SHA-256 archived before encryption."""
    identities = identities_of(identity) if identity else None
    check_out(out)
    state = await open_state(cfg.state, readonly=True)
    try:
        rows = [{**r, "id": r["recording_id"]} for r in await state.find(query)]
    finally:
        await state.close()
    report = ExportReport()
    if not rows:
        return report
    mkdir_durable(out)
    async with open_destination(cfg.archive) as destination:
        for row in rows:
            if row["state"] not in STORED:
                report.not_archived.append({"id": row["id"], "account": row["account"], "state": row["state"]})
                continue
            try:
                files = await _export_recording(destination, row, out, report)
                if identities:
                    files = _open_sealed(out, row, files, identities, report)
            except Mismatch as exc:
                report.mismatches.append(str(exc))
                log.error("export_mismatch", recording_id=row["id"], problem=str(exc))
                continue
            report.recordings.append(_listed(row, files))
        location = destination.location()
    if report.complete:
        lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(report.sums.items()))
        write_file_atomic(out / SUMS, lines.encode())
    write_file_atomic(out / MANIFEST, json.dumps({
        "export": {
            "created_at": datetime.now(UTC).isoformat(), "archiver": f"voipbin-archiver/{__version__}",
            "archive": location, "state": redact(cfg.state.url) if cfg.state.url else str(cfg.state.database),
            "filters": filters, "complete": report.complete, "recordings": len(report.recordings),
            "files": len(report.sums), "bytes": report.bytes, "checksums": SUMS if report.complete else None,
        },
        "recordings": report.recordings,
        "not_archived": report.not_archived,
        "mismatches": report.mismatches,
    }, indent=2, sort_keys=True).encode())
    fsync_path(out)
    return report


def _listed(row: dict[str, Any], files: list[str]) -> dict[str, Any]:
    return {
        "id": row["id"], "account": row["account"], "state": row["state"], "flag": row["flag"],
        "flag_reason": row["flag_reason"], "tm_start": row["tm_start"], "size": row["size"],
        "sha256": row["sha256"], "reference_type": row["reference_type"],
        "call_id": row["call_id"] if row["call_listed"] else None, "files": files,
        "note": "no audio on the server: only the sidecar" if row["state"] == "no_audio" else (
            f"archived {row['flag']}: {row['flag_reason']}" if row["flag"] else None),
    }


async def _export_recording(destination: Destination, row: dict[str, Any], out: Path,
                            report: ExportReport) -> list[str]:
    """One recording's files; raises ``Mismatch`` naming it at the first file that is not right."""
    rel = row["path"]
    rec = row["id"]
    files: list[str] = []
    if row["state"] == "no_audio":  # the sidecar is all there is
        files.append(await _copy_sidecar(destination, rel, row, out, report))
        return files + await _copy_extras(destination, rel, out, report, rec)
    await _copy(destination, rel, out, report, rec, (row["size"], row["sha256"]))
    files.append(rel)
    side_rel = beside_rel(rel, "json")
    files.append(await _copy_sidecar(destination, side_rel, row, out, report))
    meta = json.loads((out / side_rel).read_text())["archive"]
    if meta.get("unpacked_to"):
        base = rel.rpartition("/")[0]
        for member in meta.get("members", []):
            member_rel = "/".join(p for p in (base, rec, str(member.get("stored_as", ""))) if p)
            await _copy(destination, member_rel, out, report, rec, (member.get("size"), member.get("sha256")))
            files.append(member_rel)
    files += await _copy_extras(destination, rel, out, report, rec)
    return files


async def _copy_extras(destination: Destination, rel: str, out: Path, report: ExportReport, rec: str) -> list[str]:
    """A bucket's late call and a transcript, when there are any."""
    found = []
    for suffix in EXTRAS:
        extra = beside_rel(rel, suffix)
        try:
            await _copy(destination, extra, out, report, rec, None, optional=True, json_of=rec)
        except FileNotFoundError:
            continue
        found.append(extra)
    return found


async def _copy_sidecar(destination: Destination, rel: str, row: dict[str, Any], out: Path,
                        report: ExportReport) -> str:
    await _copy(destination, rel, out, report, row["id"], None, sidecar_of=row)
    return rel


async def _copy(
    destination: Destination, rel: str, out: Path, report: ExportReport, rec: str,
    expected: tuple[Any, Any] | None, *, optional: bool = False, sidecar_of: dict[str, Any] | None = None,
    json_of: str = "",
) -> tuple[int, str]:
    """``rel`` from the archive to ``out/rel``: temporary name, fsync, checked, renamed. A file
    that fails its check stays as ``<name>.partial``; a missing one is a ``Mismatch`` (or
    ``FileNotFoundError`` when ``optional``)."""
    final = _inside(out, rel, rec)
    mkdir_durable(final.parent)
    tmp = final.parent / f".{final.name}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "w+b") as sink:
            found = await destination.read(rel, sink)
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not found:
        tmp.unlink(missing_ok=True)
        if optional:
            raise FileNotFoundError(rel)
        raise Mismatch(f"recording {rec}: {rel} is missing from the archive")
    size, sha = hash_file(tmp)
    problem = ""
    if expected is not None and (size, sha) != (expected[0], expected[1]):
        problem = (f"{rel} is not what was archived (size {size}, sha256 {sha[:16]}...; archived: size "
                   f"{expected[0]}, sha256 {str(expected[1])[:16]}...)")
    elif sidecar_of is not None or json_of:
        problem = _json_problem(tmp, rel, sidecar_of, json_of)
    if problem:
        os.replace(tmp, final.with_name(final.name + ".partial"))
        fsync_path(final.parent)
        raise Mismatch(f"recording {rec}: {problem}; kept as {final.name}.partial")
    os.replace(tmp, final)
    fsync_path(final.parent)
    report.sums[rel] = sha
    report.bytes += size
    return size, sha


def _json_problem(path: Path, rel: str, sidecar_of: dict[str, Any] | None, json_of: str) -> str:
    """What is wrong with a sidecar (it must agree with the state) or a call file, or ""."""
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        return f"{rel} is not JSON"
    if sidecar_of is not None:
        meta = doc.get("archive") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or not sidecar_agrees(meta, sidecar_of):
            return f"{rel}: the sidecar disagrees with the state (size and SHA-256 archived)"
        if "sealed" in doc and "recording" not in doc:  # encrypted: the recording's JSON is sealed
            return ""
        recording = doc.get("recording")
        if not isinstance(recording, dict) or recording.get("id") != sidecar_of["id"]:
            return f"{rel}: the sidecar is another recording's"
    elif not isinstance(doc, dict) or doc.get("recording_id") != json_of:  # (a sealed note names it too)
        return f"{rel}: the call file is another recording's"
    return ""


def _open_sealed(out: Path, row: dict[str, Any], files: list[str], identities: list[Any],
                 report: ExportReport) -> list[str]:
    """The exported files of an encrypted recording opened in ``out``: each ``.age`` body
    decrypted (its plaintext checked against the sidecar's ``plaintext`` SHA-256, which agrees
    with the state) and renamed without ``.age``; each sealed JSON merged back into its document."""
    rec = row["id"]
    opened = []
    plain_sha = ""
    for rel in files:
        if rel.endswith(".json"):
            doc = json.loads((out / rel).read_bytes())
            if isinstance(doc, dict) and isinstance(doc.get("sealed"), str):
                try:
                    doc.update(unseal_json(doc.pop("sealed"), identities))
                except (VerificationError, ValueError) as exc:
                    raise Mismatch(f"recording {rec}: {rel}: cannot open its sealed part ({exc})") from None
                plain_sha = plain_sha or str((doc.get("archive") or {}).get("plaintext", {}).get("sha256", ""))
                data = json.dumps(doc, indent=2, sort_keys=True).encode()
                write_file_atomic(out / rel, data)
                report.sums[rel] = hashlib.sha256(data).hexdigest()
    for rel in files:
        if not rel.endswith(f".{SEAL_SUFFIX}"):
            opened.append(rel)
            continue
        try:
            plain = decrypt((out / rel).read_bytes(), identities)
        except VerificationError as exc:
            raise Mismatch(f"recording {rec}: {rel}: {exc}") from None
        sha = hashlib.sha256(plain).hexdigest()
        if sha != plain_sha:
            raise Mismatch(f"recording {rec}: {rel} decrypts to other bytes than were archived")
        plain_rel = rel[: -len(SEAL_SUFFIX) - 1]
        write_file_atomic(out / plain_rel, plain)
        report.bytes += len(plain) - (out / rel).stat().st_size
        (out / rel).unlink()
        report.sums.pop(rel, None)
        report.sums[plain_rel] = sha
        opened.append(plain_rel)
    return opened


def _inside(out: Path, rel: str, rec: str) -> Path:
    """``out/rel``, refusing a path from the state that would leave ``out``."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise Mismatch(f"recording {rec}: {rel[:200]!r} is not a path inside the archive")
    return out.joinpath(*parts)
