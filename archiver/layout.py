"""Where a recording's files go. Nothing the server sends ever chooses a path on its own."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from .config import ACCOUNT_NAME, DEFAULT_ACCOUNT
from .errors import InvalidRecording
from .model import check_id

EXTENSIONS = ("zip", "wav")
EXTRA_SUFFIXES = ("call.json", "transcript.json")  # notes a recording may have beside it: a late call, a transcript
NOTE_SUFFIXES = ("json", *EXTRA_SUFFIXES)  # every file beside a body: its sidecar and its notes
MEMBER_NAME_BYTES = 200  # a stored member's name, with room for a repeat's prefix below 255
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f:*?\"<>|\ud800-\udfff]")


@dataclass(frozen=True)
class Layout:
    """Maps a recording to ``<directory>/<template>``; the template is checked in config."""

    directory: Path
    template: str

    @cached_property
    def root(self) -> Path:
        """The archive directory, resolved once (resolving per file costs an lstat per component)."""
        return self.directory.resolve()

    def relative(
        self, rec_id: str, ext: str, tm_create: float | None, reference_type: str = "", account: str = DEFAULT_ACCOUNT
    ) -> str:
        rec_id = check_id(rec_id)
        if ext not in EXTENSIONS:
            raise InvalidRecording(f"unsupported file kind {ext!r}")
        when = datetime.fromtimestamp(tm_create or 0, UTC)
        ref = reference_type if re.fullmatch(r"[a-z_]{1,32}", reference_type or "") else "unknown"
        rel = self.template.format(
            year=f"{when.year:04d}", month=f"{when.month:02d}", day=f"{when.day:02d}",
            hour=f"{when.hour:02d}", id=rec_id, ext=ext, reference_type=ref, account=_check_account(account),
        )
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
            raise InvalidRecording(f"layout produced an unsafe path {rel!r}")
        return rel

    def path(self, rel: str) -> Path:
        """Absolute path for a relative archive path, refusing anything that leaves the directory.

        Checked lexically: ``relative()`` only builds paths from validated fields (digits, the
        UUID, the extension) and a template without ``..``, so no component can climb out."""
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise InvalidRecording(f"path {rel!r} leaves the archive directory")
        return self.root.joinpath(*parts)

    def directory_for(
        self, rec_id: str, tm_create: float | None, reference_type: str = "", account: str = DEFAULT_ACCOUNT
    ) -> Path:
        """The directory a recording's files go to (the same whatever the file kind)."""
        return self.path(self.relative(rec_id, "zip", tm_create, reference_type, account)).parent


def _check_account(name: str) -> str:
    """An account's name as a path component: checked in config, checked again here."""
    if not ACCOUNT_NAME.fullmatch(name):
        raise InvalidRecording(f"account name {name[:40]!r} is not a safe path component")
    return name


def sidecar_path(final: Path) -> Path:
    """``<id>.json`` beside the body ``<id>.<ext>`` (or, encrypted, ``<id>.<ext>.age``)."""
    if final.suffix == ".age":
        final = final.with_suffix("")
    return final.with_suffix(".json")


def beside_rel(rel: str, suffix: str) -> str:
    """``<id>.<suffix>`` beside the recording at ``rel`` (its body, or a sidecar alone): a
    bucket's late call (``call.json``), a transcript (``transcript.json``)."""
    base = rel[:-4] if rel.endswith(".age") else rel  # an encrypted body: <id>.<ext>.age
    return base.rpartition(".")[0] + "." + suffix


_temp_tag = ""  # this process's mark in temporary names, when other daemons write beside it


def set_temp_tag(tag: str) -> None:
    """Daemons sharing a state (and a directory) each put their own mark in temporary names:
    a daemon that lost its lease, still writing, then never renames another's partial file."""
    global _temp_tag
    _temp_tag = f".{tag}" if tag else ""


def temp_name(name: str) -> str:
    """The temporary name for a file called ``name``: ``.<name>[.<tag>].partial``."""
    return f".{name}{_temp_tag}.partial"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary name (``temp_name``): a file still being written."""
    return name.startswith(".") and name.endswith(".partial")


def temp_path(directory: Path, rec_id: str, what: str) -> Path:
    """A deterministic temporary name (for this process), so start-up recovery can find and
    remove it; recovery removes every process's (``.<id>.*.partial``)."""
    return directory / temp_name(f"{rec_id}.{what}")


def sanitize_member_name(name: str) -> str:
    """A safe single path component for a ZIP member's name: no separators, ``..``, NUL, leading
    dots or control characters survive; ``:`` becomes ``_``. Never empty."""
    name = unicodedata.normalize("NFC", name)
    name = name.replace("/", "_").replace("\\", "_")
    name = _UNSAFE_CHARS.sub("_", name)
    name = name.replace("..", "_")
    name = name.lstrip(". ")
    # at most MEMBER_NAME_BYTES of UTF-8 (a filesystem allows 255 per name; "200 characters"
    # of accented text is 400), cut at a character boundary
    name = name.encode("utf-8")[:MEMBER_NAME_BYTES].decode("utf-8", "ignore")
    return name or "member"


def unique_member_name(safe: str, taken: set[str]) -> str:
    """``safe``, or ``<n>_safe`` for the n-th repeat (within the byte limit), not in ``taken``."""
    name, n = safe, 1
    while name in taken:
        n += 1
        prefix = f"{n}_"
        name = prefix + safe.encode("utf-8")[: MEMBER_NAME_BYTES - len(prefix)].decode("utf-8", "ignore")
    taken.add(name)
    return name
