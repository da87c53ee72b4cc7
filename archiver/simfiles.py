"""The simulator's storage listing: ``GET /storage_files``, ``GET /storage_files/{id}/file`` and
the per-file signed storage URLs (``shared/voipbin-api.md``, "The storage listing as a download
path"), with the faults the archiver must survive.

A recording's audio is registered as one file per channel when its files are uploaded (the
call's ``_in.wav`` and ``_out.wav``, a conference's ``_in.wav``), each signed at creation for
``file_url_ttl`` (7 days) in ``uri_download``. Knowledge-base uploads (``type`` ``rag``) are
listed too. ``/recordingfiles`` builds its ZIP from exactly these files.

Faults, per recording id in ``file_faults``: ``expired_early`` (its URLs answer 400
``ExpiredToken`` before ``tm_download_expire``), ``refused_early`` (403 ``AccessDenied``),
``bad_size`` (``filesize`` one byte more than the file), ``short_size`` (one byte less),
``twice`` (a second file, of another id, listed for its first channel), ``unsigned``
(``uri_download`` empty: signing failed).
``stranger_files`` lists files whose ``reference_id`` names no recording of the account, and the
``files_repeat_token`` switch makes every page answer the token it was asked with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote

import google_crc32c
from aiohttp import web

from .simdata import CUSTOMER_ID, SimConfig, SimRecording, make_wav, page_token, sim_time

LISTING_TTL = 0.25  # seconds a made listing is served again


class SimAccount(Protocol):
    """What the storage listing uses of its ``Simulator`` (one simulated account)."""

    cfg: SimConfig
    recordings: dict[str, SimRecording]
    started: float
    port: int
    stats: Counter[str]
    credential_leaks: int
    storage_gets: Counter[str]
    downloading: Counter[str]
    complete_downloads: Counter[str]

    def is_deleted(self, rec: SimRecording) -> bool: ...
    def variant(self, rec: SimRecording) -> str: ...
    def stored_names(self, rec: SimRecording) -> list[str]: ...
    def member_names(self, rec: SimRecording) -> list[str]: ...
    def tm_end(self, rec: SimRecording) -> datetime | None: ...
    def audio(self, rec: SimRecording, name: str, size: int) -> bytes: ...
    def expected_archives(self) -> dict[str, bytes]: ...
    def _sign(self, rec_id: str, variant: str, expires: int) -> str: ...
    def _fault(self, name: str) -> bool: ...
    def _json(self, body: Any) -> web.Response: ...
    def _error(self, request: web.Request, status: int, reason: str, message: str = "",
               details: list[Any] | None = None) -> web.Response: ...
    def keyset_page(self, request: web.Request, items: list[Any]) -> list[Any] | web.Response: ...
    async def _api_gate(self, request: web.Request, endpoint: str) -> web.StreamResponse | None: ...
    async def _send_body(self, request: web.Request, data: bytes, md5: str,
                         crc: str) -> tuple[web.StreamResponse, bool]: ...



class StorageListing:
    """One simulated account's storage listing and per-file downloads (``sim.files``)."""

    def __init__(self, sim: SimAccount) -> None:
        self.sim = sim
        self.file_faults: dict[str, str] = {}  # recording id -> one of the faults above
        self.stranger_files: list[dict[str, Any]] = []  # listed, of no recording of ours
        self.files_repeat_token = False
        self.file_gets: dict[str, set[str]] = {}  # recording id -> channel files served whole
        self._wav_cache: dict[tuple[str, str], bytes] = {}
        self._items: dict[tuple[Any, ...], dict[str, Any]] = {}  # file_json's, by what they depend on
        self._listing: tuple[Any, float, list[tuple[float, str, dict[str, Any]]]] | None = None
        self._hashes: dict[tuple[str, str], tuple[str, str]] = {}  # (md5, crc32c) of each channel file

    def member_wav(self, rec: SimRecording, name: str) -> bytes:
        """One channel file of ``rec`` as storage holds it (what its ZIP holds as ``name``)."""
        key = (rec.id, name)
        if key not in self._wav_cache:

            each = self.sim.cfg.audio_bytes // max(1, len(self.sim.member_names(rec)))
            self._wav_cache[key] = make_wav(self.sim.audio(rec, name, each))
        return self._wav_cache[key]

    def _hashes_of(self, rec: SimRecording, name: str) -> tuple[str, str]:
        """(md5, crc32c) of a channel file, base64, as storage's ``x-goog-hash`` gives them."""
        if (rec.id, name) not in self._hashes:
            data = self.member_wav(rec, name)
            digest = hashlib.md5(data, usedforsecurity=False).digest()
            self._hashes[(rec.id, name)] = (base64.b64encode(digest).decode(),
                                            base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode())
        return self._hashes[(rec.id, name)]

    def warm(self) -> None:
        """Make every listed item and file hash ahead (``--precompute``: a benchmark measures
        the archiver, not the simulator's first answers)."""
        for rec in self.sim.recordings.values():
            for name, _ in self.registered_files(rec):
                self._hashes_of(rec, name)
        self.listed_files()

    def expected_audio(self) -> dict[str, dict[str, bytes]]:
        """The channel files of every recording ``expected_archives`` names, by member name."""
        return {rec_id: {n: self.member_wav(self.sim.recordings[rec_id], n) for n in
                         self.sim.stored_names(self.sim.recordings[rec_id])}
                for rec_id in self.sim.expected_archives() if self.sim.recordings[rec_id].body_override is None}

    def registered_files(self, rec: SimRecording) -> list[tuple[str, datetime]]:
        """(name, tm_create) of the files of ``rec`` registered in storage now."""
        if self.sim.cfg.mode != "zip" or rec.body_override is not None or self.sim.is_deleted(rec):
            return []
        names = self.sim.stored_names(rec)
        names = {"empty": [], "partial": names[:1], "full": names}[self.sim.variant(rec)]
        tm_end = self.sim.tm_end(rec)
        assert tm_end is not None or not names
        if rec.ends_at is None and rec.files_at == 0.0:  # ended before the simulator started
            base = (tm_end or rec.tm_create) + timedelta(seconds=1)
            return [(n, base + timedelta(milliseconds=i)) for i, n in enumerate(names)]
        first = datetime.fromtimestamp(max(rec.files_at - self.sim.cfg.files_after / 2, rec.ends_at or 0), UTC)
        last = datetime.fromtimestamp(rec.files_at, UTC)
        return [(n, first if i == 0 else max(first + timedelta(milliseconds=1), last)) for i, n in enumerate(names)]

    def file_id(self, rec_id: str, name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rec_id}/{name}"))

    def file_json(self, rec: SimRecording, name: str, created: datetime) -> dict[str, Any]:
        """A listed file's item, made once (signing every URL of every page again each time
        made the simulator, not the archiver, the bound of a benchmark)."""
        key = (rec.id, name, created, self.file_faults.get(rec.id, ""), self.sim.cfg.timestamps, self.sim.port)
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = self._make_file_json(rec, name, created)
        return dict(item)

    def _make_file_json(self, rec: SimRecording, name: str, created: datetime) -> dict[str, Any]:
        fault = self.file_faults.get(rec.id, "")
        expires = created + timedelta(seconds=self.sim.cfg.file_url_ttl)
        size = len(self.member_wav(rec, name)) + {"bad_size": 1, "short_size": -1}.get(fault, 0)
        url = "" if fault == "unsigned" else self.file_url(rec.id, name, expires.timestamp())
        style = self.sim.cfg.timestamps

        return {
            "id": self.file_id(rec.id, name), "customer_id": CUSTOMER_ID, "owner_type": "", "owner_id": "",
            "reference_type": "recording", "reference_id": rec.id, "type": "recording", "name": name,
            "detail": "", "filename": name, "filesize": size, "uri_download": url,
            "tm_download_expire": sim_time(expires, style), "tm_create": sim_time(created, style),
            "tm_update": sim_time(created, style),
        }

    def file_url(self, rec_id: str, name: str, expires: float) -> str:
        stamp = int(expires)
        sig = self.sim._sign(rec_id, f"file:{name}", stamp)
        origin = self.sim.cfg.storage_base or f"http://127.0.0.1:{self.sim.port}"
        return f"{origin}/storage/{rec_id}/{quote(name)}?X-Goog-Expires={stamp}&X-Goog-Signature={sig}"

    def listed_files(self) -> list[tuple[float, str, dict[str, Any]]]:
        """(-tm_create epoch, file id, item) of every listed file, newest first; made again at
        most every ``LISTING_TTL`` seconds (a listing is as fresh as a real one), or at once when
        recordings, strangers or faults were added."""
        key = (len(self.sim.recordings), len(self.stranger_files), tuple(sorted(self.file_faults.items())))
        now = time.monotonic()
        if self._listing is not None and self._listing[0] == key and now - self._listing[1] < LISTING_TTL:
            return self._listing[2]
        out = self._list_files()
        self._listing = (key, now, out)
        return out

    def _list_files(self) -> list[tuple[float, str, dict[str, Any]]]:
        out = []
        for rec in self.sim.recordings.values():
            files = self.registered_files(rec)
            for name, created in files:
                out.append((-created.timestamp(), self.file_id(rec.id, name), self.file_json(rec, name, created)))
            if self.file_faults.get(rec.id) == "twice" and files:  # a second file for the same channel
                name, created = files[0]
                item = {**self.file_json(rec, name, created), "id": self.file_id(rec.id, name + "#2")}
                out.append((-created.timestamp(), item["id"], item))
        started = datetime.fromtimestamp(self.sim.started, UTC)
        for i in range(self.sim.cfg.rag_files):  # knowledge-base uploads of the same customer
            created = started - timedelta(hours=5 * i + 1, microseconds=i)
            item = {"id": str(uuid.UUID(int=i + 77, version=4)), "customer_id": CUSTOMER_ID, "owner_type": "",
                    "owner_id": "", "reference_type": "", "reference_id": "00000000-0000-0000-0000-000000000000",
                    "type": "rag", "name": f"handbook-{i}.pdf", "detail": "", "filename": f"handbook-{i}.pdf",
                    "filesize": 1234 + i, "uri_download": "", "tm_download_expire": None,
                    "tm_create": sim_time(created, self.sim.cfg.timestamps)}
            out.append((-created.timestamp(), str(item["id"]), {k: v for k, v in item.items() if v is not None}))
        for item in self.stranger_files:
            when = datetime.fromisoformat(str(item["tm_create"]).replace("Z", "+00:00"))
            out.append((-when.timestamp(), str(item["id"]), dict(item)))
        out.sort(key=lambda f: (f[0], f[1]))
        return out

    async def h_storage_files(self, request: web.Request) -> web.StreamResponse:
        """``GET /storage_files``: newest first by ``tm_create``, the token the last item's."""

        gate = await self.sim._api_gate(request, "storage_files")
        if gate is not None:
            return gate
        token = request.query.get("page_token", "")
        page = self.sim.keyset_page(request, self.listed_files())
        if isinstance(page, web.Response):
            return page
        style = "tutorial" if self.sim.cfg.timestamps == "tutorial" else "token"
        next_token = page_token(datetime.fromtimestamp(-page[-1][0], UTC), style) if page else ""
        if self.files_repeat_token and token:
            next_token = token
        return self.sim._json({"result": [f[2] for f in page], "next_page_token": next_token})

    async def h_storage_file_redirect(self, request: web.Request) -> web.StreamResponse:
        """``GET /storage_files/{id}/file``: a 307 to a fresh URL for one file (one API request)."""
        gate = await self.sim._api_gate(request, "storage_file_redirect")
        if gate is not None:
            return gate
        file_id = request.match_info["id"]
        for rec in self.sim.recordings.values():
            for name, _ in self.registered_files(rec):
                if self.file_id(rec.id, name) == file_id:
                    location = self.file_url(rec.id, name, time.time() + self.sim.cfg.file_url_ttl)
                    return web.Response(status=307, headers={"Location": location})
        return self.sim._error(request, 404, "RESOURCE_NOT_FOUND", "file not found")

    async def h_storage_file(self, request: web.Request) -> web.StreamResponse:
        """One channel file from storage, with ``x-goog-hash``; an expired URL: 400 ExpiredToken."""
        self.sim.stats["storage_requests"] += 1
        self.sim.stats["storage_file_requests"] += 1
        q = request.query
        if "accesskey" in q or "token" in q or "Authorization" in request.headers or request.cookies:
            self.sim.credential_leaks += 1
        rec_id, name = request.match_info["id"], request.match_info["name"]
        try:
            expires = int(q.get("X-Goog-Expires", "0"))
        except ValueError:
            return web.Response(status=400, text="<Error><Code>InvalidArgument</Code></Error>")
        if not hmac.compare_digest(q.get("X-Goog-Signature", ""), self.sim._sign(rec_id, f"file:{name}", expires)):
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code></Error>")
        rec = self.sim.recordings.get(rec_id)
        if expires < time.time() or (rec is not None and self.file_faults.get(rec_id) == "expired_early"):
            return web.Response(status=400, text="<Error><Code>ExpiredToken</Code></Error>")
        if rec is not None and self.file_faults.get(rec_id) == "refused_early":
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        if rec is None or name not in [n for n, _ in self.registered_files(rec)]:
            return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")
        if self.sim._fault("storage_500"):
            self.sim.stats["fault_storage_500"] += 1
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")
        data = self.member_wav(rec, name)
        md5, crc = self._hashes_of(rec, name)
        self.sim.storage_gets[rec_id] += 1
        self.sim.downloading[rec_id] += 1
        try:
            resp, whole = await self.sim._send_body(request, data, md5, crc)
        finally:
            self.sim.downloading[rec_id] -= 1
        if whole:
            got = self.file_gets.setdefault(rec_id, set())
            got.add(name)
            if got >= set(self.sim.stored_names(rec)):
                self.sim.complete_downloads[rec_id] += 1
        return resp
