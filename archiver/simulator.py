"""A VoIPbin API simulator, faithful to ``shared/voipbin-api.md`` including its faults.

Used by the tests, the benchmarks and ``voipbin-archiver demo``; runnable on its own:
``python -m archiver.simulator --port 8080 --recordings 500``.

What it serves:
* ``POST /auth/login``, ``GET /v1.0/recordings`` (keyset pages, newest first),
  ``GET /v1.0/recordings/{id}``, ``GET /v1.0/recordingfiles/{id}`` (307 to a signed URL),
  ``GET /storage/{id}`` (the signed "storage" object, with ``x-goog-hash``).
* ``GET /v1.0/storage_files`` (each recording's channel files with their own signed URLs, valid
  7 days from the file's creation; knowledge-base files beside them), ``GET
  /v1.0/storage_files/{id}/file`` and the per-file storage URLs (``simfiles``).
* ``GET /v1.0/calls`` (paged like the recordings: the call each recording of ``reference_type``
  "call" names, created 3 s before it, incoming or outgoing, E.164 ``tel`` addresses; a call
  can be unlisted, as one deleted on the server, and junk or repeated calls added to the newest
  page), ``GET /v1.0/transcribes`` (both filter parameters or a 400) and ``GET /v1.0/transcripts``
  (``transcribe_id`` required; paged): every ``transcribed_every``-th recording has sessions.
* ZIP bodies (today's server) or single WAVs (the tutorial's), both timestamp styles.
* Recordings that end after a delay, whose files arrive late (empty ZIP, then one of two
  members, then all), deleted ones; the per-customer rate limit (429 + ``Retry-After`` +
  ``details: [{"limited_by": "customer"}]``), shared with a background consumer if asked.
* Today's server as ``shared/voipbin-api.md`` describes it: the string-status error envelope
  and ``X-Request-Id`` on every answer; unset timestamps omitted, ``owner_type`` ``""``; Go-style
  ZIPs (deflate, data descriptors, zero DOS timestamps); a frozen account (403 on every
  request, switchable while running); recordings whose files never arrive; a ZIP cached with a
  member missing; slow ZIP builds (seconds before the 307); a login rate limit; access keys
  with ``tm_expire`` listed by ``GET /accesskeys``; ``DELETE /recordings/{id}`` (a soft delete
  that frees the store), ``GET /storage_account`` and the store cap: a recording created while
  the store is full never gets files. A ``DELETE`` of a recording nobody downloaded whole is
  counted as a violation (``delete_violations``).
* Switchable faults with probabilities: 5xx, 503, resets, malformed JSON, truncated or
  corrupted bodies, wrong hashes, expired signed URLs, HTML or empty error bodies of a proxy.

Tests change the switches on the object (``sim.refusal = "ACCOUNT_FROZEN"``); a separate
process does it with ``POST /_sim/control`` and a JSON object of the same names.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextvars
import hashlib
import hmac
import json
import operator
import random
import secrets
import time
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import google_crc32c
from aiohttp import web

from .simdata import (
    CUSTOMER_ID,
    EMPTY_ZIP,
    SimConfig,
    SimRecording,
    make_wav,
    make_zip,
    page_token,
    parse_token,
    sim_time,
)
from .simfiles import StorageListing

__all__ = ["EMPTY_ZIP", "MultiSimulator", "SimConfig", "SimRecording", "Simulator", "main", "make_wav", "make_zip"]

FAULTS = (
    "api_500",  # any API request answers 500
    "api_503",  # /recordingfiles answers 503 (cannot sign storage URLs)
    "api_reset",  # the connection is closed without an answer
    "malformed_json",  # a 200 whose JSON is cut short
    "storage_500",
    "storage_truncate",  # Content-Length promised, half the body sent, connection closed
    "storage_corrupt",  # one byte flipped, hashes of the original
    "storage_bad_hash",  # right body, wrong x-goog-hash
    "storage_expired",  # the signed URL is refused (403)
    "storage_stall",  # half the body, then silence for stall_seconds (a slow body / read timeout)
    "storage_drip",  # one byte every 0.2 s: never silent long enough for a read timeout
    "proxy_html",  # a proxy in front of the API answers 502 with an HTML page
    "proxy_empty",  # a proxy answers 504 with an empty body
    "login_5xx",  # POST /auth/login answers 503
    "delete_500",  # DELETE /recordings/{id} answers 500 (deletes nothing)
)
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# what POST /_sim/control may switch while the simulator runs
CONTROLS = ("refusal", "revoked", "background_rps", "accesskeys_denied", "login_429", "quirk", "delete_stall")
REFUSALS = ("ACCOUNT_FROZEN", "DELETION_SCHEDULED", "PERMISSION_DENIED")
# the server's fixed set of error ``status`` strings, by HTTP status (voipbin-api.md, Calls and transcripts)
STATUS_CODES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "PAYMENT_REQUIRED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL", 503: "UNAVAILABLE",
}


class Simulator:
    """The simulated API. ``await sim.start()`` serves on 127.0.0.1; ``sim.base_url`` is /v1.0."""

    def __init__(self, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg or SimConfig()
        self.accesskey = self.cfg.accesskey or "vb_" + secrets.token_hex(16)
        self.started = time.time()
        self.rng = random.Random(self.cfg.seed)
        self.fault_rng = random.Random(self.cfg.seed + 1)
        self.faults: dict[str, float] = dict(self.cfg.faults)
        self.stats: Counter[str] = Counter()
        self.storage_gets: Counter[str] = Counter()
        self.zips_asked: Counter[str] = Counter()  # GET /recordingfiles/{id} per recording
        self.credential_leaks = 0
        self.tokens: dict[str, float] = {}  # JWT -> expiry
        self.revoked = False
        self.refusal = self.cfg.refusal  # a 403 reason for every API request, "" for none
        self.background_rps = self.cfg.background_rps
        self.accesskeys_denied = self.cfg.accesskeys_denied
        self.login_429 = self.cfg.login_429
        self.accesskey_expires = self.started + self.cfg.accesskey_ttl
        self.api_times: list[float] = []  # when each API request arrived (monotonic), for pacing tests
        self.delete_stall = self.cfg.delete_stall
        self.deletes: Counter[str] = Counter()  # DELETEs that deleted (a later one answers 404)
        self.delete_violations = 0  # DELETEs of a recording never downloaded whole
        self.complete_downloads: Counter[str] = Counter()  # whole final bodies served, per recording
        self.downloading: Counter[str] = Counter()  # storage answers being sent now, per recording
        self.overlapping_downloads = 0  # a storage GET began while another for the same recording ran
        self.store_sizes: dict[str, int] = {}  # the files each recording keeps in the customer's store
        # "repeat_token": pages repeat their token; "result_not_list": newest page is junk;
        # "echo_query" / "key_in_path": the storage redirect carries our credential;
        # "endless": the newest page again and again under ever older tokens; "rising_token"
        self.quirk = ""
        self.extra_listing_items: list[Any] = []  # raw junk added to the newest page
        self.json_override = ""  # a hostile server: this text instead of every JSON answer
        self._rising_pages = 0  # pages served under the "rising_token" quirk
        self.extra_calls: list[Any] = []  # raw calls added to the newest page of GET /calls
        self.calls_delay = 0.0  # seconds each GET /calls answer takes beyond the latency (a slow listing)
        self.recordings: dict[str, SimRecording] = {}
        self._order: list[tuple[float, str]] = []  # (-tm_create epoch, id), newest first
        self._body_cache: dict[tuple[str, str], tuple[bytes, str, str]] = {}
        self._sign_key = secrets.token_bytes(16)
        self._bucket_tokens = float(self.cfg.burst)
        self._bucket_at = time.monotonic()
        self._login_tokens = float(self.cfg.login_burst)
        self._login_at = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.files = StorageListing(self)  # GET /storage_files and the per-file storage URLs
        self._generate()

    # ---- data --------------------------------------------------------------------------------

    def _generate(self) -> None:
        cfg = self.cfg
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        for i in range(cfg.recordings):
            rec_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            conf = cfg.conference_every > 0 and i % cfg.conference_every == cfg.conference_every - 1
            # spread back in time, microseconds distinct, a few hours per 100 recordings
            created = now - timedelta(seconds=i * cfg.spacing, microseconds=self.rng.randrange(1, 999_999))
            rec = SimRecording(
                id=rec_id, tm_create=created, reference_type="confbridge" if conf else "call",
                reference_id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                duration=round(cfg.audio_bytes / 16000, 3),
            )
            self._add(rec)
        ids = [rid for _, rid in self._order]  # newest first
        # a recording still in progress began recently: within 12 hours (the archiver gives up
        # on one not ended a day after tm_create)
        young = sum(1 for ts, _ in self._order if -ts > now.timestamp() - 12 * 3600)
        recent = ids[: max(cfg.pending, young)]
        pending = self.rng.sample(recent, min(len(recent), cfg.pending))
        taken = set(pending)
        rest = [rid for rid in ids if rid not in taken]
        picks = self.rng.sample(rest, min(len(rest), cfg.late_files + cfg.deleted + cfg.no_audio))
        taken |= set(picks)
        calls = [rid for rid in ids if rid not in taken and self.recordings[rid].reference_type == "call"]
        for rid in self.rng.sample(calls, min(len(calls), cfg.missing_member)):
            self.recordings[rid].member_missing = True
        for rid in self.rng.sample(ids, min(len(ids), cfg.slow_builds)):
            self.recordings[rid].build_seconds = cfg.build_seconds
        for rid in pending:
            self.recordings[rid].ends_at = self.started + cfg.end_after
            self.recordings[rid].files_at = self.started + cfg.end_after + cfg.files_after
        for rid in picks[: cfg.late_files]:
            self.recordings[rid].ends_at = self.started
            self.recordings[rid].files_at = self.started + cfg.files_after
        for rid in picks[cfg.late_files : cfg.late_files + cfg.deleted]:
            self.recordings[rid].deleted_at = self.started - 60
        for rid in picks[cfg.late_files + cfg.deleted :]:
            self.recordings[rid].files_never = True
        for _, rid in reversed(self._order):  # oldest first: the store fills up in time order
            self._store_files(self.recordings[rid])

    def _store_files(self, rec: SimRecording) -> None:
        """The storage manager keeps a recording's files, or none if they would pass the cap."""
        if rec.files_never or rec.deleted_at is not None:
            return
        size = len(self.body(rec)[0]) if self.cfg.store_capacity else 0
        if self.cfg.store_capacity and sum(self.store_sizes.values()) + size > self.cfg.store_capacity:
            rec.files_never = True  # stored with no audio at all, for good
            self.stats["store_full"] += 1
            return
        self.store_sizes[rec.id] = size

    def _add(self, rec: SimRecording) -> None:
        self.recordings[rec.id] = rec
        bisect.insort(self._order, (-rec.tm_create.timestamp(), rec.id))

    def add_recording(
        self, *, body: bytes | None = None, raw_overrides: dict[str, Any] | None = None,
        rec_id: str | None = None, reference_type: str = "call", ends_in: float | None = None,
        files_never: bool = False, member_missing: bool = False, build_seconds: float = 0.0,
    ) -> str:
        """Add a recording (newest of all), optionally with a hand-made body or raw fields."""
        newest = max(
            (r.tm_create for r in self.recordings.values()), default=datetime.now(UTC) - timedelta(minutes=10)
        )
        rec = SimRecording(
            id=rec_id or str(uuid.uuid4()), tm_create=newest + timedelta(microseconds=1013),
            reference_type=reference_type, reference_id=str(uuid.uuid4()), duration=1.0,
            raw_overrides=raw_overrides or {}, body_override=body, files_never=files_never,
            member_missing=member_missing, build_seconds=build_seconds,
        )
        if ends_in is not None:
            rec.ends_at = time.time() + ends_in
            rec.files_at = rec.ends_at
        self._add(rec)
        self._store_files(rec)
        return rec.id

    def delete(self, rec_id: str, after: float = 0.0) -> None:
        self.recordings[rec_id].deleted_at = time.time() + after

    def is_deleted(self, rec: SimRecording) -> bool:
        return rec.deleted_at is not None and rec.deleted_at <= time.time()

    def is_ended(self, rec: SimRecording) -> bool:
        return rec.ends_at is None or rec.ends_at <= time.time()

    def tm_end(self, rec: SimRecording) -> datetime | None:
        if not self.is_ended(rec):
            return None
        if rec.ends_at is None:
            return rec.tm_create + timedelta(seconds=2 + rec.duration)
        return datetime.fromtimestamp(rec.ends_at, UTC)

    def recording_json(self, rec: SimRecording) -> dict[str, Any]:
        style = self.cfg.timestamps
        ended = self.is_ended(rec)
        tm_end = self.tm_end(rec)
        raw: dict[str, Any] = {
            "id": rec.id,
            "customer_id": CUSTOMER_ID,
            "owner_type": "customer" if style == "tutorial" else "",  # today always ""
            "owner_id": "00000000-0000-0000-0000-000000000000",
            "activeflow_id": "00000000-0000-0000-0000-000000000000",
            "reference_type": rec.reference_type,
            "reference_id": rec.reference_id,
            "status": "ended" if ended else "recording",
            "format": "wav",
            "on_end_flow_id": "00000000-0000-0000-0000-000000000000",
            "tm_start": sim_time(rec.tm_create + timedelta(seconds=2), style),
            "tm_end": sim_time(tm_end, style),
            "tm_create": sim_time(rec.tm_create, style),
            "tm_update": sim_time(tm_end or rec.tm_create, style),
            "tm_delete": sim_time(datetime.fromtimestamp(rec.deleted_at, UTC) if rec.deleted_at else None, style),
        }
        raw = {k: v for k, v in raw.items() if v is not None}  # today's server omits unset times
        raw.update(rec.raw_overrides)
        return raw

    def call_json(self, rec: SimRecording) -> dict[str, Any]:
        """The call a recording of ``reference_type`` "call" names: created 3 s before the
        recording, incoming or outgoing by turns, a German caller and a US number of ours."""
        rng = random.Random(rec.reference_id)
        incoming = rng.random() < 0.5
        ours = {"type": "tel", "target": f"+1415555{rng.randrange(10000):04d}", "target_name": "", "name": "",
                "detail": ""}
        theirs = {"type": "tel", "target": f"+4930{rng.randrange(10**7):07d}", "target_name": "", "name": "",
                  "detail": ""}
        created = rec.tm_create - timedelta(seconds=3)
        hangup = rec.tm_create + timedelta(seconds=2 + rec.duration)
        style = self.cfg.timestamps
        zero = "00000000-0000-0000-0000-000000000000"
        raw: dict[str, Any] = {
            "id": rec.reference_id, "customer_id": CUSTOMER_ID, "owner_type": "", "owner_id": zero,
            "flow_id": zero, "activeflow_id": zero, "type": "flow", "master_call_id": zero, "chained_call_ids": [],
            "groupcall_id": zero, "recording_id": rec.id, "recording_ids": [rec.id],
            "source": theirs if incoming else ours, "destination": ours if incoming else theirs,
            "status": "hangup", "direction": "incoming" if incoming else "outgoing",
            "hangup_by": rng.choice(("remote", "local")), "hangup_reason": "normal",
            "tm_ringing": sim_time(created + timedelta(seconds=1), style),
            "tm_progressing": sim_time(created + timedelta(seconds=2), style),
            "tm_hangup": sim_time(hangup, style), "tm_create": sim_time(created, style),
            "tm_update": sim_time(hangup, style),
        }
        raw.update(rec.call_overrides)
        return raw

    def transcribes(self, rec: SimRecording) -> list[dict[str, Any]]:
        """The transcription sessions of a recording: none, or one per direction for a call."""
        if not self.cfg.transcribed_every or int(rec.id[:8], 16) % self.cfg.transcribed_every:
            return []
        directions = ("in", "out") if rec.reference_type == "call" else ("in",)
        return [{
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rec.id}/{d}")), "customer_id": CUSTOMER_ID,
            "reference_type": "recording", "reference_id": rec.id, "status": "progressing" if rec.transcribing
            else "done", "language": "en-US", "direction": d, "provider": "gcp",
            "tm_create": sim_time(rec.tm_create + timedelta(seconds=3), self.cfg.timestamps),
        } for d in directions]

    def transcript_lines(self, transcribe_id: str, rec: SimRecording) -> list[dict[str, Any]]:
        n = 3 + int(transcribe_id[:2], 16) % 5
        return [{"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{transcribe_id}/{i}")), "transcribe_id": transcribe_id,
                 "direction": "in", "message": f"line {i} of recording {rec.id[:8]}",
                 "tm_transcript": sim_time(rec.tm_create + timedelta(seconds=2 + i), self.cfg.timestamps)}
                for i in range(n)]

    def keyset_page(self, request: web.Request, items: list[Any]) -> list[Any] | web.Response:
        """The page of ``items`` (newest first, each a tuple starting with its -tm_create epoch)
        that ``page_size`` and ``page_token`` ask for, as the server's keyset pages; a 400 for a
        malformed one."""
        asked = self._page_asked(request)
        if isinstance(asked, web.Response):
            return asked
        size, after = asked
        start = 0 if after is None else bisect.bisect_right([item[0] for item in items], -after)
        return items[start : start + size]

    def _page_asked(self, request: web.Request) -> tuple[int, float | None] | web.Response:
        """A listing's ``page_size`` (1 to 100) and ``page_token`` (the epoch it names, or None
        for the first page), or the server's 400 for a malformed one."""
        try:
            size = max(1, min(100, int(request.query.get("page_size", "100"))))
        except ValueError:
            return self._error(request, 400, "INVALID_ARGUMENT", "page_size")
        token = request.query.get("page_token", "")
        if not token:
            return size, None
        ts = parse_token(token)
        if ts is None:
            return self._error(request, 400, "INVALID_ARGUMENT", "page_token")
        return size, ts.timestamp()

    def _listed_calls(self) -> list[tuple[float, SimRecording]]:
        """(-tm_create epoch of the call, recording) of every listed call, newest first."""
        calls = [(-(r.tm_create - timedelta(seconds=3)).timestamp(), r) for r in self.recordings.values()
                 if r.reference_type == "call" and r.call_listed and not self.is_deleted(r)]
        calls.sort(key=lambda c: (c[0], c[1].reference_id))
        return calls

    def member_names(self, rec: SimRecording) -> list[str]:
        """The files a complete recording has, named as the call manager names them."""
        stamp = rec.tm_create.strftime("%Y-%m-%dT%H:%M:%SZ")
        if rec.reference_type == "call":
            return [f"call_{rec.reference_id}_{stamp}_in.wav", f"call_{rec.reference_id}_{stamp}_out.wav"]
        return [f"confbridge_{rec.reference_id}_{stamp}_in.wav"]

    def stored_names(self, rec: SimRecording) -> list[str]:
        """The files storage ever holds: fewer when an upload failed for good."""
        names = self.member_names(rec)
        if rec.files_never:
            return []
        return names[:-1] if rec.member_missing else names

    def audio(self, rec: SimRecording, name: str, size: int) -> bytes:
        return random.Random(f"{rec.id}/{name}").randbytes(size)

    def variant(self, rec: SimRecording) -> str:
        """What storage holds now: "empty", "partial" (one member) or "full"."""
        now = time.time()
        if rec.files_never or not self.is_ended(rec) or now < rec.files_at - self.cfg.files_after / 2:
            return "empty"
        if now < rec.files_at:
            return "partial"
        return "full"

    def body(self, rec: SimRecording, variant: str = "full") -> tuple[bytes, str, str]:
        """(body, md5 b64, crc32c b64) of what storage serves for ``rec`` in ``variant``."""
        key = (rec.id, variant)
        cached = self._body_cache.get(key)
        if cached:
            return cached
        if rec.body_override is not None:
            data = rec.body_override
        elif self.cfg.mode == "wav":
            size = self.cfg.audio_bytes if variant == "full" else 0
            data = make_wav(self.audio(rec, "wav", size))
        else:
            names = self.stored_names(rec)
            names = {"empty": [], "partial": names[:1], "full": names}[variant]
            data = make_zip([(n, self.files.member_wav(rec, n)) for n in names])
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        entry = (data, md5, crc)
        if variant == "full":
            self._body_cache[key] = entry
        return entry

    def expected_archives(self) -> dict[str, bytes]:
        """Final bodies of every recording the archiver should archive (ended, not deleted, with audio)."""
        return {
            r.id: self.body(r)[0] for r in self.recordings.values()
            if (r.deleted_via_api or not self.is_deleted(r)) and self.is_ended(r) and not r.files_never
        }

    def expected_no_audio(self) -> set[str]:
        """Recordings whose files never arrived: the archiver keeps only their metadata."""
        return {r.id for r in self.recordings.values() if r.files_never and not self.is_deleted(r)}

    def storage_url(self, rec_id: str, variant: str, ttl: float | None = None) -> str:
        expires = int(time.time() + (self.cfg.signed_url_ttl if ttl is None else ttl))
        sig = self._sign(rec_id, variant, expires)
        origin = self.cfg.storage_base or f"http://127.0.0.1:{self.port}"
        return (
            f"{origin}/storage/{rec_id}?v={variant}"
            f"&X-Goog-Expires={expires}&X-Goog-Signature={sig}"
        )

    def _sign(self, rec_id: str, variant: str, expires: int) -> str:
        return hmac.new(self._sign_key, f"{rec_id}:{variant}:{expires}".encode(), "sha256").hexdigest()

    # ---- serving -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1.0"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_id])
        app.router.add_post("/auth/login", self.h_login)
        app.router.add_get("/v1.0/recordings", self.h_list)
        app.router.add_get("/v1.0/recordings/{id}", self.h_detail)
        app.router.add_delete("/v1.0/recordings/{id}", self.h_delete)
        app.router.add_get("/v1.0/storage_account", self.h_storage_account)
        app.router.add_get("/v1.0/recordingfiles/{id}", self.h_files)
        app.router.add_get("/v1.0/calls", self.h_calls)
        app.router.add_get("/v1.0/transcribes", self.h_transcribes)
        app.router.add_get("/v1.0/transcripts", self.h_transcripts)
        app.router.add_get("/v1.0/accesskeys", self.h_accesskeys)
        app.router.add_get("/v1.0/storage_files", self.files.h_storage_files)
        app.router.add_get("/v1.0/storage_files/{id}/file", self.files.h_storage_file_redirect)
        app.router.add_get("/storage/{id}", self.h_storage)
        app.router.add_get("/storage/{id}/{name}", self.files.h_storage_file)
        app.router.add_get("/_sim/stats", self.h_stats)
        app.router.add_post("/_sim/control", self.h_control)
        app.router.add_get("/_sim/urls", self.h_urls)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Simulator:
        # a test ends with handlers still asleep in a slow build or a stall: do not wait 60 s for them
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _fault(self, name: str) -> bool:
        p = self.faults.get(name, 0.0)
        return p > 0 and self.fault_rng.random() < p

    @web.middleware
    async def _request_id(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer carries ``X-Request-Id``; an error body carries the same id."""
        request_id = str(uuid.uuid4())
        _REQUEST_ID.set(request_id)
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            exc.headers["X-Request-Id"] = request_id
            raise
        if not resp.prepared:
            resp.headers["X-Request-Id"] = request_id
        return resp

    @staticmethod
    def _error(
        request: web.Request, status: int, reason: str, message: str = "", details: list[Any] | None = None
    ) -> web.Response:
        """The error envelope of today's server: ``status`` is a string code, not the number."""
        err: dict[str, Any] = {"status": STATUS_CODES.get(status, "UNKNOWN"), "reason": reason, "message": message,
                               "request_id": _REQUEST_ID.get()}
        if details is not None:
            err["details"] = details
        return web.json_response({"error": err}, status=status)

    def _rate_limited(self, request: web.Request) -> web.Response | None:
        """The customer's bucket (16.7/s, burst 33), shared with ``background_rps`` of others."""
        if not self.cfg.rate_limit:
            return None
        now = time.monotonic()
        elapsed = now - self._bucket_at
        tokens = min(self.cfg.burst, self._bucket_tokens + elapsed * self.cfg.rate)
        self._bucket_tokens = max(0.0, tokens - elapsed * self.background_rps)  # the others took theirs
        self._bucket_at = now
        if self._bucket_tokens >= 1:
            self._bucket_tokens -= 1
            return None
        self.stats["http_429"] += 1
        spare = max(0.1, self.cfg.rate - self.background_rps)
        return self._too_many(request, (1 - self._bucket_tokens) / spare, "customer")

    def _too_many(self, request: web.Request, wait: float, limited_by: str) -> web.Response:
        resp = self._error(request, 429, "RATE_LIMIT_EXCEEDED", "too many requests", [{"limited_by": limited_by}])
        resp.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
        return resp

    def _login_limited(self, request: web.Request) -> web.Response | None:
        """``/auth/*`` has its own limit per IP (10/s, burst 20), and ``login_429`` refusals."""
        if self.login_429 > 0:
            self.login_429 -= 1
            self.stats["login_429"] += 1
            return self._too_many(request, 1, "ip")
        now = time.monotonic()
        rate = self.cfg.login_rate
        self._login_tokens = min(self.cfg.login_burst, self._login_tokens + (now - self._login_at) * rate)
        self._login_at = now
        if self._login_tokens >= 1:
            self._login_tokens -= 1
            return None
        self.stats["login_429"] += 1
        return self._too_many(request, (1 - self._login_tokens) / rate, "ip")

    def _authorized(self, request: web.Request) -> bool:
        if self.revoked:
            return False
        key = request.query.get("accesskey") or request.cookies.get("accesskey")
        if key:
            return hmac.compare_digest(key, self.accesskey) and time.time() < self.accesskey_expires
        token = request.query.get("token") or request.cookies.get("token")
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return bool(token) and self.tokens.get(token or "", 0) > time.time()

    async def _api_gate(self, request: web.Request, endpoint: str) -> web.StreamResponse | None:
        """Latency, rate limit, faults and auth shared by every API endpoint."""
        self.stats["api_requests"] += 1
        self.stats[endpoint] += 1
        self.api_times.append(time.monotonic())
        if self.cfg.latency:
            await asyncio.sleep(self.cfg.latency)
        if self._fault("proxy_html"):
            self.stats["fault_proxy_html"] += 1
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html")
        if self._fault("proxy_empty"):
            self.stats["fault_proxy_empty"] += 1
            return web.Response(status=504)
        limited = self._rate_limited(request)
        if limited is not None:
            return limited
        if self._fault("api_reset"):
            self.stats["fault_api_reset"] += 1
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPInternalServerError()  # never sent: the connection is gone
        if self._fault("api_500"):
            self.stats["fault_api_500"] += 1
            return self._error(request, 500, "INTERNAL_ERROR")
        if not self._authorized(request):
            self.stats["http_401"] += 1
            return self._error(request, 401, "AUTHENTICATION_REQUIRED", "invalid or expired credential")
        if self.refusal:  # about the account: every request alike
            self.stats["http_403"] += 1
            return self._error(request, 403, self.refusal, "the account cannot use the API")
        return None

    def _json(self, body: Any) -> web.Response:
        text = self.json_override or json.dumps(body)
        if self._fault("malformed_json"):
            self.stats["fault_malformed_json"] += 1
            text = text[: max(1, len(text) // 2)]
        return web.Response(text=text, content_type="application/json")

    async def h_login(self, request: web.Request) -> web.Response:
        self.stats["login"] += 1
        limited = self._login_limited(request)
        if limited is not None:
            return limited
        if self._fault("login_5xx"):
            self.stats["fault_login_5xx"] += 1
            return self._error(request, 503, "SERVICE_UNAVAILABLE")
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400)
        if self.revoked or body.get("username") != self.cfg.username or body.get("password") != self.cfg.password:
            return web.Response(status=400)
        token = "eyJ" + secrets.token_urlsafe(40)
        self.tokens[token] = time.time() + 7 * 86400
        return web.json_response({"username": self.cfg.username, "token": token})

    async def h_list(self, request: web.Request) -> web.StreamResponse:
        gate = await self._api_gate(request, "list")
        if gate is not None:
            return gate
        asked = self._page_asked(request)
        if isinstance(asked, web.Response):
            return asked
        size, after = asked
        token = request.query.get("page_token", "")  # as sent: the quirks below answer it
        start = 0 if after is None else bisect.bisect_right(self._order, (-after, "\uffff"))
        items: list[Any] = []
        i = start
        while i < len(self._order) and len(items) < size:
            rec = self.recordings[self._order[i][1]]
            i += 1
            if not self.is_deleted(rec):
                items.append(self.recording_json(rec))
        next_token = ""
        if items:
            last = self.recordings[items[-1]["id"]]
            next_token = page_token(last.tm_create, "tutorial" if self.cfg.timestamps == "tutorial" else "token")
        if self.quirk == "endless" and token:  # the same page again, under an ever older token
            first = self.recordings[self._order[0][1]]
            items = [self.recording_json(self.recordings[rid]) for _, rid in self._order[:size]]
            older = (parse_token(token) or first.tm_create) - timedelta(seconds=1)
            return self._json({"result": items, "next_page_token": sim_time(older, "token")})
        if self.quirk == "rising_token":  # each answer the next page, under tokens that go forward in time
            self._rising_pages += 1
            n = self._rising_pages
            items = [self.recording_json(self.recordings[rid]) for _, rid in self._order[(n - 1) * size : n * size]]
            next_token = page_token(datetime.now(UTC) + timedelta(days=n), "token")
            return self._json({"result": items, "next_page_token": next_token})
        if self.quirk == "repeat_token" and items:
            next_token = page_token(self.recordings[items[-1]["id"]].tm_create, "tutorial")
            if token:
                next_token = token
        if not token and self.extra_listing_items:
            items = list(self.extra_listing_items) + items
        if not token and self.quirk == "result_not_list":
            return self._json({"result": {"oops": items[:1]}, "next_page_token": next_token})
        return self._json({"result": items, "next_page_token": next_token})

    async def h_calls(self, request: web.Request) -> web.StreamResponse:
        """``GET /calls``: paged like ``/recordings`` (newest first, the token the last call's
        ``tm_create``). A recording deleted here takes its call with it (the call manager's
        delete cascade is not modelled beyond that); ``call_listed = False``: a deleted call."""
        gate = await self._api_gate(request, "calls")
        if gate is not None:
            return gate
        if self.calls_delay:
            await asyncio.sleep(self.calls_delay)
        token = request.query.get("page_token", "")
        page = self.keyset_page(request, self._listed_calls())
        if isinstance(page, web.Response):
            return page
        items: list[Any] = [self.call_json(rec) for _, rec in page]
        style = "tutorial" if self.cfg.timestamps == "tutorial" else "token"
        next_token = page_token(page[-1][1].tm_create - timedelta(seconds=3), style) if page else ""
        if not token and self.extra_calls:
            items = list(self.extra_calls) + items
        return self._json({"result": items, "next_page_token": next_token})

    async def h_transcribes(self, request: web.Request) -> web.StreamResponse:
        """``GET /transcribes``: the filter needs both ``reference_type`` and ``reference_id``
        (or neither: every session); one page here, as a recording has at most a few."""
        gate = await self._api_gate(request, "transcribes")
        if gate is not None:
            return gate
        ref_type, ref_id = request.query.get("reference_type"), request.query.get("reference_id")
        if (ref_type is None) != (ref_id is None) or ref_type not in (None, "recording", "call", "confbridge"):
            return self._error(request, 400, "INVALID_ARGUMENT", "reference_type and reference_id go together")
        if ref_type == "recording":
            rec = self.recordings.get(ref_id or "")
            items = self.transcribes(rec) if rec is not None and not self.is_deleted(rec) else []
        elif ref_type is None:
            items = [t for r in self.recordings.values() for t in self.transcribes(r)]
        else:
            items = []
        return self._json({"result": items, "next_page_token": ""})

    async def h_transcripts(self, request: web.Request) -> web.StreamResponse:
        """``GET /transcripts?transcribe_id=`` (required): the session's lines, paged by
        ``page_size`` (the token: how many came before, as the server's is opaque anyway)."""
        gate = await self._api_gate(request, "transcripts")
        if gate is not None:
            return gate
        transcribe_id = request.query.get("transcribe_id", "")
        try:
            size = max(1, min(100, int(request.query.get("page_size", "100"))))
            start = int(request.query.get("page_token") or "0")
        except ValueError:
            return self._error(request, 400, "INVALID_ARGUMENT", "page_size or page_token")
        if not transcribe_id:
            return self._error(request, 400, "INVALID_ARGUMENT", "transcribe_id is required")
        for rec in self.recordings.values():
            if any(t["id"] == transcribe_id for t in self.transcribes(rec)):
                lines = self.transcript_lines(transcribe_id, rec)
                page = lines[start : start + size]
                token = str(start + size) if start + size < len(lines) else ""
                return self._json({"result": page, "next_page_token": token})
        return self._json({"result": [], "next_page_token": ""})

    async def h_detail(self, request: web.Request) -> web.StreamResponse:
        gate = await self._api_gate(request, "detail")
        if gate is not None:
            return gate
        rec = self._lookup(request)
        if isinstance(rec, web.Response):
            return rec
        return self._json(self.recording_json(rec))

    async def h_delete(self, request: web.Request) -> web.StreamResponse:
        """A soft delete: gone from the listing, 404 from then on, its files freed from the store."""
        gate = await self._api_gate(request, "delete")
        if gate is not None:
            return gate
        rec = self._lookup(request)
        if isinstance(rec, web.Response):
            return rec
        if self._fault("delete_500"):
            return self._error(request, 500, "INTERNAL_ERROR")
        if self.delete_stall == "before":
            await asyncio.sleep(3600)
        if self.complete_downloads[rec.id] == 0:
            self.delete_violations += 1
        self.deletes[rec.id] += 1
        rec.deleted_at = time.time()
        rec.deleted_via_api = True
        self.store_sizes.pop(rec.id, None)
        if self.delete_stall == "after":
            await asyncio.sleep(3600)
        return self._json(self.recording_json(rec))

    async def h_storage_account(self, request: web.Request) -> web.StreamResponse:
        gate = await self._api_gate(request, "storage_account")
        if gate is not None:
            return gate
        created = sim_time(datetime.fromtimestamp(self.started, UTC), "token")
        return self._json({
            "id": str(uuid.UUID(int=1, version=4)), "customer_id": CUSTOMER_ID,
            "total_file_count": sum(1 for size in self.store_sizes.values() if size) * 2,
            "total_file_size": sum(self.store_sizes.values()), "tm_create": created, "tm_update": created,
        })

    def _lookup(self, request: web.Request) -> SimRecording | web.Response:
        rec_id = request.match_info["id"]
        try:
            uuid.UUID(rec_id)
        except ValueError:
            return self._error(request, 400, "INVALID_ID", "malformed id")
        rec = self.recordings.get(rec_id)
        if rec is None or self.is_deleted(rec):
            return self._error(request, 404, "RESOURCE_NOT_FOUND", "recording not found")
        return rec

    async def h_files(self, request: web.Request) -> web.StreamResponse:
        gate = await self._api_gate(request, "recordingfiles")
        if gate is not None:
            return gate
        rec = self._lookup(request)
        if isinstance(rec, web.Response):
            return rec
        self.zips_asked[rec.id] += 1
        if self._fault("api_503"):
            self.stats["fault_api_503"] += 1
            return self._error(request, 503, "SIGNING_NOT_CONFIGURED", "cannot sign storage URL")
        if rec.build_seconds:  # the server builds the ZIP while the request waits
            self.stats["slow_builds"] += 1
            await asyncio.sleep(min(rec.build_seconds, self.cfg.build_timeout))
            if rec.build_seconds > self.cfg.build_timeout:
                return self._error(request, 503, "REQUEST_TIMEOUT", "building the archive took too long")
        ttl = -10 if self._fault("storage_expired") else None
        if ttl is not None:
            self.stats["fault_storage_expired"] += 1
        location = self.storage_url(rec.id, self.variant(rec), ttl)
        if self.quirk == "echo_query":  # a careless proxy appends the request's query (our key!)
            location += "&" + request.query_string
        elif self.quirk == "key_in_path":
            location = location.replace("/storage/", f"/storage/{self.accesskey}/../", 1)
        return web.Response(status=307, headers={"Location": location})

    async def h_storage(self, request: web.Request) -> web.StreamResponse:
        self.stats["storage_requests"] += 1
        if self.cfg.latency:
            await asyncio.sleep(self.cfg.latency)
        q = request.query
        if "accesskey" in q or "token" in q or "Authorization" in request.headers or request.cookies:
            self.credential_leaks += 1
        rec_id = request.match_info["id"]
        variant = q.get("v", "")
        try:
            expires = int(q.get("X-Goog-Expires", "0"))
        except ValueError:
            return web.Response(status=400, text="<Error><Code>InvalidArgument</Code></Error>")
        if not hmac.compare_digest(q.get("X-Goog-Signature", ""), self._sign(rec_id, variant, expires)):
            return web.Response(status=400, text="<Error><Code>InvalidSignature</Code></Error>")
        if expires < time.time():
            return web.Response(status=403, text="<Error><Code>ExpiredToken</Code></Error>")
        rec = self.recordings.get(rec_id)
        if rec is None:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        if self._fault("storage_500"):
            self.stats["fault_storage_500"] += 1
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")
        self.downloading[rec_id] += 1
        if self.downloading[rec_id] > 1:
            self.overlapping_downloads += 1
        try:
            return await self._send_storage(request, rec, variant)
        finally:
            self.downloading[rec_id] -= 1

    async def _send_storage(self, request: web.Request, rec: SimRecording, variant: str) -> web.StreamResponse:
        data, md5, crc = self.body(rec, variant)
        self.storage_gets[rec.id] += 1
        resp, whole = await self._send_body(request, data, md5, crc)
        if whole and variant == "full":
            self.complete_downloads[rec.id] += 1
        return resp

    async def _send_body(
        self, request: web.Request, data: bytes, md5: str, crc: str
    ) -> tuple[web.StreamResponse, bool]:
        """A storage answer with ``x-goog-hash``, and the storage faults; True: sent whole, unaltered."""
        original = data
        headers = {"x-goog-hash": f"crc32c={crc},md5={md5}", "Content-Type": "application/octet-stream"}
        if self._fault("storage_bad_hash"):
            self.stats["fault_storage_bad_hash"] += 1
            headers["x-goog-hash"] = f"crc32c={crc},md5={base64.b64encode(b'0' * 16).decode()}"
        if self._fault("storage_corrupt") and data:
            self.stats["fault_storage_corrupt"] += 1
            pos = len(data) // 2
            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if self._fault("storage_truncate") and len(data) > 1:
            self.stats["fault_storage_truncate"] += 1
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp, False
        if self._fault("storage_drip"):
            self.stats["fault_storage_drip"] += 1
            for i in range(len(data)):
                try:
                    await resp.write(data[i : i + 1])
                except (ConnectionError, RuntimeError):
                    return resp, False  # the client gave up
                await asyncio.sleep(0.2)
            await resp.write_eof()
            return resp, False
        if self._fault("storage_stall") and len(data) > 1:
            self.stats["fault_storage_stall"] += 1
            await resp.write(data[: len(data) // 2])
            await asyncio.sleep(self.cfg.stall_seconds)
            await resp.write(data[len(data) // 2 :])
            await resp.write_eof()
            return resp, False
        await resp.write(data)
        await resp.write_eof()
        return resp, data is original and headers["x-goog-hash"].endswith(md5)

    async def h_accesskeys(self, request: web.Request) -> web.StreamResponse:
        """``GET /accesskeys``: the customer's keys, each with ``token_prefix`` and ``tm_expire``."""
        gate = await self._api_gate(request, "accesskeys")
        if gate is not None:
            return gate
        if self.accesskeys_denied:
            return self._error(request, 403, "PERMISSION_DENIED", "needs the customer admin permission")
        created = datetime.fromtimestamp(self.started, UTC) - timedelta(days=30)
        keys = [(self.accesskey, datetime.fromtimestamp(self.accesskey_expires, UTC))]
        keys += [("vb_" + random.Random(f"other{i}").randbytes(16).hex(), created + timedelta(days=400 + i))
                 for i in range(2)]
        result = [
            {"id": str(uuid.UUID(int=random.Random(key).getrandbits(128), version=4)), "customer_id": CUSTOMER_ID,
             "name": f"key {i}", "detail": "", "token_prefix": key[:11], "tm_expire": sim_time(expire, "token"),
             "tm_create": sim_time(created, "token"), "tm_update": sim_time(created, "token")}
            for i, (key, expire) in enumerate(keys)
        ]
        return self._json({"result": result, "next_page_token": ""})

    async def h_control(self, request: web.Request) -> web.Response:
        """Switch ``CONTROLS`` while running: ``{"refusal": "ACCOUNT_FROZEN"}``."""
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400, text="a JSON object of switches\n")
        if not isinstance(body, dict) or set(body) - set(CONTROLS):
            return web.Response(status=400, text=f"known switches: {', '.join(CONTROLS)}\n")
        for name, value in body.items():
            setattr(self, name, value)
        return web.json_response({name: getattr(self, name) for name in CONTROLS})

    async def h_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "credential_leaks": self.credential_leaks,
                                  "deletes": sum(self.deletes.values()), "delete_violations": self.delete_violations,
                                  "storage_gets_total": sum(self.storage_gets.values()),
                                  "overlapping_downloads": self.overlapping_downloads})

    async def h_urls(self, request: web.Request) -> web.Response:
        """Direct signed storage URLs of every final body (for the aria2c reference run); with
        ``?files=1`` those of every listed channel file instead (the storage listing's path)."""
        if request.query.get("files"):
            listed = self.files.listed_files()
            lines = [f[2]["uri_download"] for f in listed if f[2].get("reference_type") == "recording"]
            return web.Response(text="\n".join(lines) + "\n")
        lines = [
            self.storage_url(r.id, "full")
            for r in self.recordings.values()
            if not self.is_deleted(r) and self.is_ended(r) and not r.files_never
        ]
        return web.Response(text="\n".join(lines) + "\n")


class MultiSimulator:
    """Several customers' accounts behind one address, told apart by their credential, as the
    real server serves every customer at one base URL. Each account is a ``Simulator`` of its
    own (its recordings, rate bucket, faults and switches); ``/_sim/*`` take ``?account=``."""

    ROUTES = (("POST", "/auth/login", "h_login"), ("GET", "/v1.0/recordings", "h_list"),
              ("GET", "/v1.0/recordings/{id}", "h_detail"), ("DELETE", "/v1.0/recordings/{id}", "h_delete"),
              ("GET", "/v1.0/storage_account", "h_storage_account"), ("GET", "/v1.0/recordingfiles/{id}", "h_files"),
              ("GET", "/v1.0/calls", "h_calls"), ("GET", "/v1.0/transcribes", "h_transcribes"),
              ("GET", "/v1.0/transcripts", "h_transcripts"),
              ("GET", "/v1.0/accesskeys", "h_accesskeys"), ("GET", "/storage/{id}", "h_storage"),
              ("GET", "/v1.0/storage_files", "files.h_storage_files"),
              ("GET", "/v1.0/storage_files/{id}/file", "files.h_storage_file_redirect"),
              ("GET", "/storage/{id}/{name}", "files.h_storage_file"),
              ("GET", "/_sim/stats", "h_stats"), ("POST", "/_sim/control", "h_control"),
              ("GET", "/_sim/urls", "h_urls"))

    def __init__(self, accounts: dict[str, SimConfig]) -> None:
        # each its own seed, so no two accounts list the same recording ids
        self.accounts = {name: Simulator(replace(cfg, seed=cfg.seed + 7919 * n))
                         for n, (name, cfg) in enumerate(accounts.items())}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1.0"

    async def _pick(self, request: web.Request) -> Simulator | None:
        if request.path.startswith("/_sim/"):
            return self.accounts.get(request.query.get("account", ""))
        if request.path.startswith("/storage/"):
            rec_id = request.match_info.get("id", "")
            return next((s for s in self.accounts.values() if rec_id in s.recordings), None)
        if request.path == "/auth/login":
            try:
                body = await request.json()  # aiohttp keeps the body for the handler
            except ValueError:
                return None
            user = body.get("username") if isinstance(body, dict) else None
            return next((s for s in self.accounts.values() if s.cfg.username == user), None)
        key = request.query.get("accesskey") or request.cookies.get("accesskey")
        if key:
            return next((s for s in self.accounts.values() if hmac.compare_digest(key, s.accesskey)), None)
        auth = request.headers.get("Authorization", "")
        token = request.query.get("token") or request.cookies.get("token") or (
            auth[7:].strip() if auth.lower().startswith("bearer ") else "")
        return next((s for s in self.accounts.values() if token and token in s.tokens), None)

    def _route(self, handler: str) -> Any:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            sim = await self._pick(request)
            if sim is None:
                if request.path.startswith("/_sim/"):
                    return web.Response(status=404, text=f"?account= one of {', '.join(self.accounts)}\n")
                return Simulator._error(request, 401, "AUTHENTICATION_REQUIRED", "invalid or expired credential")
            response: web.StreamResponse = await operator.attrgetter(handler)(sim)(request)
            return response

        return dispatch

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> MultiSimulator:
        first = next(iter(self.accounts.values()))
        app = web.Application(middlewares=[first._request_id])
        for method, path, handler in self.ROUTES:
            app.router.add_route(method, path, self._route(handler))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for sim in self.accounts.values():
            sim.port = self.port  # their signed storage URLs point here
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m archiver.simulator", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--recordings", type=int, default=250)
    parser.add_argument("--mode", choices=("zip", "wav"), default="zip")
    parser.add_argument("--timestamps", choices=("rfc3339", "tutorial"), default="rfc3339")
    parser.add_argument("--audio-bytes", type=int, default=169_920)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--no-rate-limit", action="store_true")
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--late-files", type=int, default=0)
    parser.add_argument("--deleted", type=int, default=0)
    parser.add_argument("--no-audio", type=int, default=0, help="recordings whose files never arrive")
    parser.add_argument("--missing-member", type=int, default=0, help="calls whose ZIP lacks a leg for good")
    parser.add_argument("--slow-builds", type=int, default=0, help="recordings whose ZIP takes --build-seconds")
    parser.add_argument("--build-seconds", type=float, default=5.0)
    parser.add_argument("--background-rps", type=float, default=0.0,
                        help="requests/s that someone else of the customer takes from the shared bucket")
    parser.add_argument("--refusal", choices=REFUSALS, help="start with the account refused (403 on every request)")
    parser.add_argument("--login-429", type=int, default=0, help="the first N logins answer 429")
    parser.add_argument("--accesskey-ttl", type=float, default=365 * 86400.0, help="seconds until the key expires")
    parser.add_argument("--accesskeys-denied", action="store_true", help="GET /accesskeys answers 403")
    parser.add_argument("--store-capacity", type=int, default=0,
                        help="bytes of files the customer's store holds (the server's: 10737418240); 0 = no cap")
    parser.add_argument("--spacing", type=float, default=97.0, help="seconds between two recordings' creation")
    parser.add_argument("--accesskey", default="")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=P",
                        help=f"fault probability, repeatable; names: {', '.join(FAULTS)}")
    parser.add_argument("--precompute", action="store_true", help="build every body before serving")
    args = parser.parse_args(argv)
    faults = {}
    for item in args.fault:
        name, _, p = item.partition("=")
        if name not in FAULTS:
            parser.error(f"unknown fault {name!r}")
        faults[name] = float(p)
    cfg = SimConfig(
        recordings=args.recordings, mode=args.mode, timestamps=args.timestamps, audio_bytes=args.audio_bytes,
        latency=args.latency, rate_limit=not args.no_rate_limit, pending=args.pending,
        late_files=args.late_files, deleted=args.deleted, accesskey=args.accesskey, faults=faults,
        no_audio=args.no_audio, missing_member=args.missing_member, slow_builds=args.slow_builds,
        build_seconds=args.build_seconds, background_rps=args.background_rps, refusal=args.refusal or "",
        login_429=args.login_429, accesskey_ttl=args.accesskey_ttl, accesskeys_denied=args.accesskeys_denied,
        store_capacity=args.store_capacity, spacing=args.spacing,
    )

    async def serve() -> None:
        sim = Simulator(cfg)
        if args.precompute:
            sim.expected_archives()
        await sim.start(args.host, args.port)
        if args.precompute:  # its URLs name the port it listens on
            sim.files.warm()
        print(f"simulator: {sim.base_url} accesskey={sim.accesskey}", flush=True)  # bench/run.py reads this line
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
