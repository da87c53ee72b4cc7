"""Re-check an archived recording's files against SQLite and its sidecar.

Used by ``verify`` and, immediately before the server's copy is deleted, by ``prune``: the
same check, so nothing is deleted that ``verify`` would call missing or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .inspect import hash_file
from .layout import sidecar_path


def check_archived(root: Path, row: dict[str, Any]) -> list[str]:
    """Problems with one archived recording's files (empty list: all good)."""
    escape = outside(root, row["path"])
    if escape:
        return [escape]
    if row["state"] == "no_audio":
        return _check_no_audio(root, row)
    problems: list[str] = []
    path = root / row["path"]
    try:
        size, sha = hash_file(path)
    except OSError as exc:
        return [f"{row['path']}: missing or unreadable ({exc.strerror})"]
    if size != row["size"] or sha != row["sha256"]:
        problems.append(f"{row['path']}: changed (size {size}, sha256 {sha[:16]}..., expected {row['sha256'][:16]}...)")
    try:
        meta = json.loads(sidecar_path(path).read_text())["archive"]
    except (OSError, ValueError, KeyError) as exc:
        return [*problems, f"{sidecar_path(path).name}: sidecar missing or unreadable ({exc})"]
    if not sidecar_agrees(meta, row):
        problems.append(f"{sidecar_path(path).name}: sidecar disagrees with the database")
    if meta.get("unpacked_to"):
        for member in meta.get("members", []):
            member_path = path.parent / row["id"] / member.get("stored_as", "")
            try:
                msize, msha = hash_file(member_path)
            except OSError:
                problems.append(f"{member_path.relative_to(root)}: unpacked member missing")
                continue
            if msha != member.get("sha256") or msize != member.get("size"):
                problems.append(f"{member_path.relative_to(root)}: unpacked member changed")
    return problems


def _check_no_audio(root: Path, row: dict[str, Any]) -> list[str]:
    """A recording without audio has only its sidecar, which must agree with the database."""
    try:
        meta = json.loads((root / row["path"]).read_text())["archive"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{row['path']}: sidecar of a recording without audio missing or unreadable ({exc})"]
    if not sidecar_agrees(meta, row):
        return [f"{row['path']}: sidecar disagrees with the database"]
    return []


def sidecar_agrees(meta: dict[str, Any], row: dict[str, Any]) -> bool:
    """A sidecar's ``archive`` part names the size and SHA-256 SQLite has (and, for a recording
    without audio, says so); shared by every destination's check."""
    if row["state"] == "no_audio" and meta.get("state") != "no_audio":
        return False
    return bool(meta.get("sha256") == row["sha256"] and meta.get("size") == row["size"])


def outside(root: Path, rel: str) -> str:
    """A problem if the file or a directory on its way is a symlink, or its real path leaves
    the archive ("" when it is a plain file inside)."""
    current = root
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            return f"{rel}: {current.relative_to(root)} is a symlink (to {os.readlink(current)})"
    if current.exists() and not Path(os.path.realpath(current)).is_relative_to(root):
        return f"{rel}: its real path leaves the archive"
    return ""
