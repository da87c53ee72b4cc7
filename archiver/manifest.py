"""The signed, chained manifest: what the archive holds, provably (``verify --manifest``).

Every change of the archive (a recording archived, its server copy deleted) becomes an entry.
Entries are gathered into *segments* (``manifests/<account>/<seq>-<time>.json`` inside the
archive), at most one per ``[archive] manifest_interval`` and one at shutdown, none when nothing
changed. A segment is one JSON document: its number, the SHA-256 of the previous segment's
bytes, its entries, and an Ed25519 signature over the canonical JSON of all of that. So an
auditor holding only the public key can prove that no segment was edited, removed or put out
of order, and (with the archive's files) that no recording was changed, removed or added.

This module is the format and the keys: pure functions, no I/O but reading key files. The
daemon's side is ``manifestwriter``, the auditor's ``manifestcheck``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError
from .store import fsync_path, write_file_atomic

FORMAT = "voipbin-archiver-manifest/1"
DIRECTORY = "manifests"  # inside the archive (a directory) or under the prefix (a bucket)
MAX_ENTRIES = 5000  # per segment: a backfill's hour becomes several segments, each a few MB at most
SEGMENT_NAME = re.compile(r"(?P<seq>\d{8})-(?P<time>\d{8}T\d{6}Z)\.json")
RECORDING_EVENTS = ("archived", "expired", "erased")  # the entries that say what the archive holds of one


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII (one spelling per document)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """The archiver's signing key (``[archive] signing_key_file``)."""

    private: Ed25519PrivateKey
    path: Path

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @classmethod
    def load(cls, path: Path) -> Signer:
        """The key at ``path``, or a ``ConfigError`` that names it (never its content)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"[archive] signing_key_file {path}: cannot read it ({exc.strerror}); "
                              "`voipbin-archiver keygen --out FILE` makes one") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[archive] signing_key_file {path}: not an unencrypted PEM private key "
                              f"({type(exc).__name__})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"[archive] signing_key_file {path}: not an Ed25519 key")
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"[archive] signing_key_file {path}: readable by others; chmod 600 it")
        return cls(key, path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An auditor's public key (``keygen``'s ``FILE.pub``), or a ``ConfigError`` naming it."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"public key {path}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key {path}: not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path}: not an Ed25519 key")
    return key


def keygen(out: Path) -> tuple[Path, str]:
    """A new key pair: the private key to ``out`` (0600), its public half to ``out.pub``; both
    written like every file (temporary name, fsync, rename), neither over an existing file.
    Returns (the public key's path, its key id)."""
    public_path = out.with_name(out.name + ".pub")
    for path in (out, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists: keygen never overwrites a key (move it away first)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a directory")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    old = os.umask(0o077)
    try:
        write_file_atomic(out, pem, mode=0o600)
    finally:
        os.umask(old)
    write_file_atomic(public_path, public, mode=0o644)
    fsync_path(out.parent)
    return public_path, key_id(private.public_key())


def segment_rel(account: str, seq: int, created: datetime) -> str:
    """Where segment ``seq`` of ``account`` lives, relative to the archive's root."""
    return f"{DIRECTORY}/{account}/{seq:08d}-{created.strftime('%Y%m%dT%H%M%SZ')}.json"


def parse_segment_rel(rel: str) -> tuple[str, int] | None:
    """(account, seq) of a segment's path, or None when ``rel`` is not one."""
    parts = rel.split("/")
    if len(parts) != 3 or parts[0] != DIRECTORY:
        return None
    match = SEGMENT_NAME.fullmatch(parts[2])
    return (parts[1], int(match["seq"])) if match else None


def make_segment(signer: Signer, account: str, seq: int, previous: str | None, entries: list[dict[str, Any]],
                 created: datetime) -> bytes:
    """A signed segment's bytes: the canonical JSON of the document with its signature."""
    doc: dict[str, Any] = {
        "format": FORMAT, "account": account, "seq": seq, "previous_sha256": previous,
        "created": created.astimezone(UTC).isoformat(timespec="seconds"), "key_id": signer.key_id,
        "entries": entries,
    }
    doc["signature"] = base64.b64encode(signer.sign(canonical(doc))).decode()
    return canonical(doc) + b"\n"


def open_segment(data: bytes, public: Ed25519PublicKey) -> tuple[dict[str, Any] | None, str]:
    """The document of a segment's bytes and "" when its signature holds; otherwise what is
    wrong (the document too when it parses, so the chain can still be followed)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None, "not a manifest segment of this format"
        signature = base64.b64decode(doc.pop("signature"), validate=True)
    except (ValueError, KeyError, TypeError):
        return None, "not a manifest segment (unreadable JSON or no signature)"
    if doc.get("key_id") != key_id(public):
        return doc, f"signed by another key ({str(doc.get('key_id'))[:16]}, this public key is {key_id(public)})"
    try:
        public.verify(signature, canonical(doc))
    except InvalidSignature:
        return doc, "its signature does not match its content (edited)"
    if not isinstance(doc.get("entries"), list) or not isinstance(doc.get("seq"), int):
        return doc, "malformed (no entries or no number)"
    return doc, ""


def archived_entry(account: str, row: dict[str, Any], files: list[dict[str, Any]], sidecar: str) -> dict[str, Any]:
    """A recording stored in the archive: its body (or, with no audio, its sidecar), the
    unpacked members (``files``) and its sidecar (a note: its content changes)."""
    at = row.get("archived_at")
    return {
        "event": "archived", "account": account, "recording_id": row["id"], "state": row["state"],
        "flag": row.get("flag") or None, "path": row["path"],
        "sha256": row["sha256"], "size": row["size"],  # of the body; a sidecar alone (no audio) is not hashed
        "plaintext_sha256": row.get("plain_sha256") or None,  # encrypted: the audio's own
        "files": files, "sidecar": sidecar,
        "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else None,
    }


def server_deleted_entry(account: str, row: dict[str, Any]) -> dict[str, Any]:
    """The server's copy of an archived recording was deleted (the archive's stays)."""
    at = row.get("server_deleted_at")
    return {
        "event": "server_copy_deleted", "account": account, "recording_id": row["id"],
        "request_id": row.get("delete_request_id"),
        "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else None,
    }


def removed_entry(account: str, row: dict[str, Any]) -> dict[str, Any]:
    """A recording removed from the archive by policy (``expired``) or on request (``erased``):
    its files are gone, the entry keeps what they were."""
    at = row.get("removed_at")
    return {
        "event": row["state"], "account": account, "recording_id": row["id"], "path": row["path"],
        "sha256": row["sha256"], "size": row["size"], "reason": row.get("removed_reason"),
        "at": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else None,
    }


def hold_entry(account: str, event: dict[str, Any]) -> dict[str, Any]:
    """A legal hold placed (``held``) or released on a recording."""
    return {
        "event": event["action"], "account": account, "recording_id": event["recording_id"],
        "reason": event["reason"], "event_seq": event["seq"],
        "at": datetime.fromtimestamp(event["at"], UTC).isoformat(timespec="seconds"),
    }


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
