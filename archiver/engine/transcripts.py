"""Transcripts (``[archive] transcripts``, opt-in): each stored recording's transcription
sessions (``GET /transcribes?reference_type=recording&reference_id=``) and their lines
(``GET /transcripts?transcribe_id=``), kept as ``<id>.transcript.json`` beside it. The requests
go through the same pace as every other; a session still ``progressing`` is asked for again
``RECHECK`` seconds later, and the file is written only once all are done (a bucket's objects
are written once)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import structlog

from ..errors import AuthRefused, InvalidRecording, LocalStorageError, RecordingGone, RecordingRefused, TransientError
from ..logs import redact
from ..model import check_id
from .base import EngineParts

log = structlog.get_logger("archiver.engine")

RECHECK = 3600.0  # seconds until a recording whose transcription is still progressing is asked again
BATCH = 50
MAX_PAGES = 1000  # of one listing: a server that loops is stopped


class Transcripts(EngineParts):
    async def _fetch_transcripts(self) -> None:
        """Every stored recording due, until none is left or a stop."""
        if not self.cfg.archive.transcripts:
            return
        while not self.stop.is_set():
            rows = await self.state.transcripts_due(time.time(), BATCH)
            if not rows:
                return
            for row in rows:
                if self.stop.is_set():
                    return
                await self._fetch_one(row)

    async def _fetch_one(self, row: dict[str, Any]) -> None:
        try:
            sessions, progressing = await self._sessions(row["id"])
        except (AuthRefused, LocalStorageError):
            raise
        except RecordingGone:
            await self.state.mark_transcript(row["id"], "none")  # the server's copy is gone, and with it any
            return
        except (TransientError, InvalidRecording, RecordingRefused) as exc:
            log.warning("transcript_not_fetched", recording_id=row["id"], error=redact(str(exc)),
                        hint=f"asked again in {RECHECK:.0f} s")
            await self.state.mark_transcript(row["id"], None, time.time() + RECHECK)
            return
        if progressing:
            await self.state.mark_transcript(row["id"], None, time.time() + RECHECK)
            return
        if not sessions:
            await self.state.mark_transcript(row["id"], "none")
            return
        doc = {"recording_id": row["id"], "fetched_at": datetime.now(UTC).isoformat(), "transcribes": sessions}
        await self.destination.write_beside(row, "transcript.json", doc)
        await self.state.mark_transcript(row["id"], "done")
        self.result.stats["transcripts"] += 1

    async def _sessions(self, rec_id: str) -> tuple[list[dict[str, Any]], bool]:
        """The recording's sessions, each with its ``transcripts`` lines; whether one is still
        progressing (then its lines are not asked for yet)."""
        sessions = await _all_pages(lambda token: self.client.transcribes_of(rec_id, token))
        progressing = False
        for session in sessions:
            session_id = check_id(session.get("id"))
            if session.get("status") != "done":
                progressing = True
                continue
            session["transcripts"] = await _all_pages(
                lambda token, s=session_id: self.client.transcript_lines(s, token))
        return sessions, progressing


async def _all_pages(fetch: Any) -> list[dict[str, Any]]:
    """Every item of a paged listing (objects only; a junk item is left out, a junk page ends it)."""
    items: list[dict[str, Any]] = []
    token = ""
    for _ in range(MAX_PAGES):
        body = await fetch(token)
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list):
            raise InvalidRecording("a transcription listing without a result list")
        items += [item for item in result if isinstance(item, dict)]
        next_token = body.get("next_page_token") or ""
        if not result or not isinstance(next_token, str) or next_token == token:
            return items
        token = next_token
    raise InvalidRecording(f"a transcription listing goes on past {MAX_PAGES} pages")
