"""The interface every destination implements (``Destination``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from ..state.base import Row
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

    async def read(self, rel: str, sink: BinaryIO) -> bool:
        """Write the bytes of the archive's file ``rel`` (a path under the directory, a key under
        the prefix) to ``sink``, from its start (a retry starts it again); False when there is
        no such file (``export``)."""
        raise NotImplementedError

    async def read_bytes(self, rel: str) -> bytes | None:
        """The whole of the archive's (small) file ``rel`` in memory (``read``), or None when
        there is no such file: a segment, a sidecar, a body to decrypt."""
        sink = io.BytesIO()
        return sink.getvalue() if await self.read(rel, sink) else None

    async def write_beside(self, row: dict[str, Any], suffix: str, doc: dict[str, Any]) -> None:
        """A JSON document beside ``row``'s files, ``<id>.<suffix>`` (a transcript), written once
        like every file (a directory: temporary name, fsync, rename; a bucket: locked)."""
        raise NotImplementedError

    async def note_call(self, row: dict[str, Any], call: dict[str, Any]) -> None:
        """``row``'s call, listed only after its sidecar was written: note it beside the archive
        copy (``row`` has ``id``, ``state``, ``path``)."""
        raise NotImplementedError

    async def note_server_deleted(self, row: dict[str, Any], request_id: str, status: int) -> None:
        """The server's copy of ``row`` was deleted: note it beside the archive copy."""
        raise NotImplementedError

    # the signed manifest (manifestwriter, manifestcheck)

    async def put_file(self, rel: str, data: bytes) -> None:
        """A new file ``rel`` (a manifest segment) written once like every file (a directory:
        temporary name, fsync, rename; a bucket: locked like the recordings)."""
        raise NotImplementedError

    async def list_files(self, under: str = "") -> list[tuple[str, int]]:
        """(path or key relative to the archive's root, size) of every file under ``under``,
        temporary names left out; what ``verify --manifest`` walks."""
        raise NotImplementedError

    async def hash_files(self, rels: list[str]) -> dict[str, tuple[int, str] | None]:
        """(size, SHA-256) of each of the archive's files ``rels``, each read once, as many at
        once as the destination bears; None for one missing (or, in a directory, a symlink)."""
        raise NotImplementedError

    async def read_files(self, rels: list[str]) -> dict[str, bytes | None]:
        """The bytes of each of the archive's small files ``rels`` (sidecars); None when missing."""
        raise NotImplementedError

    async def unpacked_files(self, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The members unpacked beside each archived recording of ``rows`` (``[archive] unpack``),
        by id, each ``{"path", "sha256", "size"}`` as its sidecar lists them (a sidecar that
        disagrees with the state's SHA-256 lists none)."""
        raise NotImplementedError

    # keeping and letting go (policy.py)

    async def removal_blocked(self, row: dict[str, Any]) -> str:
        """Why ``row``'s files may not be removed now ("" when they may): a bucket's Object Lock
        retention still running, or a legal hold on one of its versions."""
        raise NotImplementedError

    async def remove(self, row: dict[str, Any]) -> None:
        """Remove every file of the recording ``row`` (``id``, ``state``, ``path``): its body,
        sidecar, unpacked members and notes; every version of each in a bucket. Removing what is
        already gone is no error (a retry after a crash)."""
        raise NotImplementedError

    async def set_legal_hold(self, row: dict[str, Any], on: bool) -> None:
        """A bucket: the S3 legal hold on (or off) on every version of ``row``'s objects; a
        directory has none (the state's hold is what keeps it)."""
        raise NotImplementedError

