"""Where verified recordings end up: the seam between the engine and the storage it writes to.

The store helpers verify every body the same way whatever the destination. A ``directory``
destination lets them rename the body into place themselves (``store.Store``); any other
destination gets the verified body staged (``store.Staged``) and commits it here, on the event
loop. Each destination also adopts what an interrupted run left behind, re-checks an archived
recording (``verify``, and before the server's copy is deleted) and notes that deletion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ArchiveConfig
from ..state import Row
from ..store import Archived, Staged, StoreJob


class Destination:
    """The interface; ``async with`` it around its use (``open`` checks what must hold at start)."""

    kind = ""

    async def open(self) -> None:
        """Start-up checks; raise ``ConfigError`` (exit 2) for what the operator must fix."""

    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> Destination:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def location(self) -> str:
        """Where the archive is, for logs and the audit trail (never a credential)."""
        raise NotImplementedError

    def staging_directory(self, row: Row) -> Path:
        """The local directory for ``row``'s temporary files."""
        raise NotImplementedError

    async def adopt(self, row: Row, staging: Path) -> Archived | None:
        """A verified copy an interrupted run (or a lost database) left in the archive, or None."""
        raise NotImplementedError

    async def commit(self, job: StoreJob, result: Archived | Staged) -> Archived:
        """Make the store helper's verified result durable in the archive; the recording is
        recorded ``archived`` only once this returns."""
        raise NotImplementedError

    async def check(self, row: dict[str, Any], deep: bool = False) -> list[str]:
        """Problems with one archived recording's copy (empty: all good)."""
        raise NotImplementedError

    async def note_server_deleted(self, row: dict[str, Any], request_id: str, status: int) -> None:
        """The server's copy of ``row`` was deleted: note it beside the archive copy."""
        raise NotImplementedError


def open_destination(cfg: ArchiveConfig) -> Destination:
    """The configured destination (not opened yet)."""
    if cfg.destination == "s3":
        from .s3 import S3Destination  # only with destination = "s3": its library is an extra

        return S3Destination(cfg)
    from .directory import DirectoryDestination

    return DirectoryDestination(cfg)
