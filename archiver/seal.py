"""Encryption at rest to the customer's keys (``[archive] encrypt_to``): age, X25519 recipients.

A body is stored as ``<id>.<ext>.age``, the standard age format (``age -d -i key.txt`` opens
it). A sidecar keeps a clear ``archive`` part (the plaintext's and the ciphertext's SHA-256 and
size, the checks made, the recipients), so ``verify`` and ``verify --manifest`` check the
archive without the private key, and a ``sealed`` part: the recording's JSON and its call
(numbers, names), age-encrypted and ASCII-armored. Notes written later (a late call, a
transcript) are sealed the same way. The private key never needs to be on the archiver's host.

``pyrage`` (the Rust ``rage`` implementation's binding) does the cryptography.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyrage

from .errors import ConfigError, LocalStorageError, VerificationError

SUFFIX = "age"  # appended to a body's name: <id>.zip.age


def recipients_of(texts: tuple[str, ...] | list[str], where: str = "[archive] encrypt_to") -> list[Any]:
    """Parsed age recipients, or a ``ConfigError`` naming the malformed one."""
    out = []
    for text in texts:
        try:
            out.append(pyrage.x25519.Recipient.from_str(text))
        except (pyrage.RecipientError, ValueError) as exc:
            raise ConfigError(f"{where}: {text[:80]!r} is not an age X25519 recipient (age1...): {exc}") from None
    return out


def identities_of(path: Path) -> list[Any]:
    """The age identities (``AGE-SECRET-KEY-1...`` lines) of an identity file, as ``age-keygen``
    writes it; a ``ConfigError`` naming the file (never its content) otherwise."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"identity file {path}: cannot read it ({exc})") from None
    found = []
    for line in lines:
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                found.append(pyrage.x25519.Identity.from_str(line))
            except (pyrage.IdentityError, ValueError):
                raise ConfigError(f"identity file {path}: a malformed AGE-SECRET-KEY line") from None
    if not found:
        raise ConfigError(f"identity file {path}: no AGE-SECRET-KEY line (age-keygen writes one)")
    return found


def encrypt(data: bytes, recipients: list[Any]) -> bytes:
    return bytes(pyrage.encrypt(data, recipients))


def encrypt_file(source: Path, target: Path, recipients: list[Any]) -> None:
    """``source``'s bytes, encrypted, into ``target`` (streamed: a large body is never whole in
    memory); the disk's failure (pyrage wraps it) is the archive's: ``LocalStorageError``."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            pyrage.encrypt_io(src, dst, recipients)
    except pyrage.EncryptError as exc:
        raise LocalStorageError(f"cannot encrypt into {target.name}: {exc}") from None


def decrypt(data: bytes, identities: list[Any]) -> bytes:
    """The plaintext of an age file, or a ``VerificationError`` (a wrong key, a damaged file)."""
    try:
        return bytes(pyrage.decrypt(data, identities))
    except (pyrage.DecryptError, ValueError) as exc:
        raise VerificationError(f"cannot decrypt: {exc}") from None


def sealed(doc: dict[str, Any], recipients: list[Any] | None) -> dict[str, Any]:
    """A note (a late call, a transcript) as it is written: as it is, or ``{"sealed": ...}``
    with ``recipients``."""
    return doc if not recipients else {"sealed": seal_json(doc, recipients), "recording_id": doc.get("recording_id")}


def seal_json(doc: Any, recipients: list[Any]) -> str:
    """A JSON value encrypted and ASCII-armored (text that fits in a JSON string; ``age -d``
    opens it as it is)."""
    return bytes(pyrage.encrypt(json.dumps(doc, sort_keys=True).encode(), recipients, armored=True)).decode()


def unseal_json(text: str, identities: list[Any]) -> Any:
    return json.loads(decrypt(text.encode(), identities))  # pyrage reads the armor itself
