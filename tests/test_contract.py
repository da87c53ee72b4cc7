"""The simulator's answers against the JSON shapes in shared/voipbin-api.md, so it cannot drift
from what VoIPbin's server does (every field and type the notes name)."""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archiver.model import KNOWN_STATUSES, parse_timestamp

NOTES = Path(__file__).resolve().parent.parent.parent / "shared" / "voipbin-api.md"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
# field -> the type the notes give it; the timestamps are RFC 3339 when set, omitted when unset
RECORDING_FIELDS = {
    "id": str, "customer_id": str, "owner_type": str, "owner_id": str, "activeflow_id": str,
    "reference_type": str, "reference_id": str, "status": str, "format": str, "on_end_flow_id": str,
    "tm_start": str, "tm_end": str, "tm_create": str, "tm_update": str, "tm_delete": str,
}
OPTIONAL = {"tm_end", "tm_delete", "tm_start", "tm_update"}
ACCESSKEY_FIELDS = {"id", "customer_id", "name", "detail", "token_prefix", "tm_expire", "tm_create", "tm_update"}
MEMBER_NAME = re.compile(
    r"(call_{u}_{t}_(in|out)|confbridge_{u}_{t}_in)\.wav".format(u=UUID.pattern, t=r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
)


def test_the_notes_name_the_fields_the_contract_checks():
    if not NOTES.exists():
        pytest.skip(f"{NOTES} is not beside this checkout")
    text = NOTES.read_text()
    block = text.split("## A recording", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert set(json.loads(block)) == set(RECORDING_FIELDS), "the notes changed: update the simulator and this test"
    for needle in ('"status": "NOT_FOUND"', "X-Request-Id", "limited_by", "token_prefix", "tm_expire",
                   "data descriptors", "zero DOS timestamps", "ACCOUNT_FROZEN"):
        assert needle in text, needle


def _check_recording(rec: dict) -> None:
    assert set(rec) <= set(RECORDING_FIELDS), f"fields the notes do not name: {set(rec) - set(RECORDING_FIELDS)}"
    assert set(RECORDING_FIELDS) - OPTIONAL <= set(rec)
    for name, kind in RECORDING_FIELDS.items():
        if name in rec:
            assert isinstance(rec[name], kind), (name, rec[name])
    assert UUID.fullmatch(rec["id"]) and UUID.fullmatch(rec["reference_id"])
    assert rec["owner_type"] in ("customer", "agent", "")
    assert rec["reference_type"] in ("call", "confbridge") and rec["status"] in KNOWN_STATUSES
    assert rec["format"] == "wav"
    for name in ("tm_start", "tm_end", "tm_create", "tm_update", "tm_delete"):
        if name in rec:
            assert RFC3339.fullmatch(rec[name]), (name, rec[name])  # unset ones are omitted, not "" or null
            assert parse_timestamp(rec[name]) is not None
    assert ("tm_end" in rec) == (rec["status"] == "ended")


async def _get(http: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any, bytes]:
    async with http.get(url, params=params, allow_redirects=False) as resp:
        return resp.status, resp.headers.copy(), await resp.read()  # case-insensitive, as HTTP is


def _check_error(status: int, headers: Any, body: bytes, code: str, reason: str) -> None:
    err = json.loads(body)["error"]
    assert set(err) >= {"status", "reason", "message", "request_id"}
    assert err["status"] == code and isinstance(err["status"], str), "status is a string code, not the number"
    assert err["reason"] == reason and isinstance(err["message"], str)
    assert headers["X-Request-Id"] == err["request_id"] and UUID.fullmatch(err["request_id"])


async def test_answers_have_the_shapes_of_the_notes(make_sim):
    sim = await make_sim(recordings=14, audio_bytes=4000, pending=1, end_after=3600)
    key = {"accesskey": sim.accesskey}
    async with aiohttp.ClientSession() as http:
        status, headers, body = await _get(http, sim.base_url + "/recordings", page_size="100", **key)
        assert status == 200 and UUID.fullmatch(headers["X-Request-Id"])
        page = json.loads(body)
        assert set(page) == {"result", "next_page_token"} and isinstance(page["next_page_token"], str)
        assert len(page["result"]) == 14
        for rec in page["result"]:
            _check_recording(rec)
        assert {r["reference_type"] for r in page["result"]} == {"call", "confbridge"}
        assert any(r["status"] != "ended" for r in page["result"]), "a recording still being recorded"

        one = page["result"][0]
        status, _, body = await _get(http, f"{sim.base_url}/recordings/{one['id']}", **key)
        assert status == 200 and json.loads(body) == one, "the detail is the object alone, not wrapped"

        _check_error(*await _get(http, sim.base_url + "/recordings/00000000-0000-4000-8000-000000000000", **key),
                     "NOT_FOUND", "RESOURCE_NOT_FOUND")
        _check_error(*await _get(http, sim.base_url + "/recordings/nope", **key), "INVALID_ARGUMENT", "INVALID_ID")
        _check_error(*await _get(http, sim.base_url + "/recordings", accesskey="vb_wrong"),
                     "UNAUTHENTICATED", "AUTHENTICATION_REQUIRED")

        status, _, body = await _get(http, sim.base_url + "/accesskeys", **key)
        keys = json.loads(body)["result"]
        assert status == 200 and all(set(k) == ACCESSKEY_FIELDS for k in keys), "never the token itself"
        assert any(sim.accesskey.startswith(k["token_prefix"]) for k in keys)
        assert all(RFC3339.fullmatch(k["tm_expire"]) for k in keys)

        for rec in page["result"]:
            status, headers, _ = await _get(http, f"{sim.base_url}/recordingfiles/{rec['id']}", **key)
            assert status == 307, "redirects whatever the status: to what exists"
            status, headers, body = await _get(http, headers["Location"])
            assert status == 200 and int(headers["Content-Length"]) == len(body)
            assert re.fullmatch(r"crc32c=[A-Za-z0-9+/=]+,md5=[A-Za-z0-9+/=]+", headers["x-goog-hash"])
            _check_go_zip(body, rec)


def _check_go_zip(body: bytes, rec: dict) -> None:
    """Go's archive/zip: deflate, flag bit 3 with a data descriptor, zero DOS time and date."""
    if rec["status"] != "ended":
        assert body == b"PK\x05\x06" + b"\x00" * 18, "not ended: the files that exist, none yet"
        return
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        infos = archive.infolist()
        assert len(infos) == (2 if rec["reference_type"] == "call" else 1)
        for info in infos:
            assert MEMBER_NAME.fullmatch(info.filename), info.filename
            assert info.compress_type == zipfile.ZIP_DEFLATED and info.flag_bits & 0x8
            assert info.date_time == (1980, 0, 0, 0, 0, 0), "zero DOS timestamp"
            local = body[info.header_offset : info.header_offset + 30]
            assert struct.unpack("<I", local[14:18])[0] == 0, "CRC in the data descriptor, not the local header"
            end = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size
            assert body[end : end + 4] == b"PK\x07\x08"
            assert archive.read(info)[:4] == b"RIFF"


async def test_faults_the_notes_describe(make_sim):
    sim = await make_sim(recordings=3, rate_limit=True, rate=1.0, burst=1)
    key = {"accesskey": sim.accesskey}
    async with aiohttp.ClientSession() as http:
        assert (await _get(http, sim.base_url + "/recordings", **key))[0] == 200
        status, headers, body = await _get(http, sim.base_url + "/recordings", **key)
        _check_error(status, headers, body, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["details"] == [{"limited_by": "customer"}]

        sim.cfg.rate_limit = False
        sim.refusal = "ACCOUNT_FROZEN"
        for path in ("/recordings", f"/recordings/{next(iter(sim.recordings))}", "/accesskeys",
                     f"/recordingfiles/{next(iter(sim.recordings))}"):
            _check_error(*await _get(http, sim.base_url + path, **key), "PERMISSION_DENIED", "ACCOUNT_FROZEN")
        async with http.post(f"http://127.0.0.1:{sim.port}/_sim/control", json={"refusal": ""}) as resp:
            assert resp.status == 200
        assert (await _get(http, sim.base_url + "/recordings", **key))[0] == 200, "thawed while running"

        login = f"http://127.0.0.1:{sim.port}/auth/login"
        async with http.post(login, json={"username": sim.cfg.username, "password": sim.cfg.password}) as resp:
            answer = await resp.json()
            assert resp.status == 200 and set(answer) == {"username", "token"}
        async with http.post(login, json={"username": sim.cfg.username, "password": "no"}) as resp:
            assert resp.status == 400 and await resp.read() == b"", "a failed login is a bare 400"
        sim.login_429 = 1
        async with http.post(login, json={"username": sim.cfg.username, "password": sim.cfg.password}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"]


# The server's fixed set of error envelope ``status`` strings (voipbin-api.md, Calls and transcripts).
SERVER_STATUSES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "PAYMENT_REQUIRED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL", 503: "UNAVAILABLE",
}


def test_error_statuses_are_the_servers_fixed_set():
    from archiver.simulator import STATUS_CODES

    assert set(STATUS_CODES.values()) <= set(SERVER_STATUSES.values())
    assert all(SERVER_STATUSES[code] == status for code, status in STATUS_CODES.items()), STATUS_CODES


async def test_server_errors_carry_the_servers_status_strings(make_sim):
    sim = await make_sim(recordings=2, faults={"api_500": 1.0})
    async with aiohttp.ClientSession() as http:
        _check_error(*await _get(http, sim.base_url + "/recordings", accesskey=sim.accesskey),
                     "INTERNAL", "INTERNAL_ERROR")
        sim.faults = {"api_503": 1.0}
        rec_id = next(iter(sim.recordings))
        _check_error(*await _get(http, f"{sim.base_url}/recordingfiles/{rec_id}", accesskey=sim.accesskey),
                     "UNAVAILABLE", "SIGNING_NOT_CONFIGURED")


CALL_FIELDS = {  # the notes' section "Calls and transcripts": what a call carries
    "id": str, "direction": str, "status": str, "source": dict, "destination": dict, "hangup_by": str,
    "hangup_reason": str, "recording_id": str, "recording_ids": list, "master_call_id": str,
    "chained_call_ids": list, "groupcall_id": str, "activeflow_id": str, "tm_ringing": str, "tm_progressing": str,
    "tm_hangup": str, "tm_create": str, "tm_update": str,
}
ADDRESS_FIELDS = {"type", "target", "target_name", "name", "detail"}


async def test_calls_are_paged_like_recordings_and_name_their_recordings(make_sim):
    sim = await make_sim(recordings=150, audio_bytes=1000, conference_every=7)
    gone = next(r for r in sim.recordings.values() if r.reference_type == "call")
    gone.call_listed = False
    key = {"accesskey": sim.accesskey}
    calls: list[dict[str, Any]] = []
    token = ""
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            status, headers, body = await _get(http, sim.base_url + "/calls", page_size="100",
                                               **({"page_token": token} if token else {}), **key)
            assert status == 200 and UUID.fullmatch(headers["X-Request-Id"])
            page = json.loads(body)
            assert set(page) == {"result", "next_page_token"}
            if not page["result"]:
                assert page["next_page_token"] == ""
                break
            assert len(page["result"]) <= 100
            calls += page["result"]
            token = page["next_page_token"]
            assert parse_timestamp(token) == parse_timestamp(page["result"][-1]["tm_create"]), "the last call's time"
        _check_error(*await _get(http, sim.base_url + "/calls", accesskey="vb_wrong"),
                     "UNAUTHENTICATED", "AUTHENTICATION_REQUIRED")
        _check_error(*await _get(http, sim.base_url + "/calls", page_token="nope", **key), "INVALID_ARGUMENT",
                     "INVALID_ARGUMENT")
    expected = [r for r in sim.recordings.values() if r.reference_type == "call" and r is not gone]
    assert len(calls) == len(expected) and len({c["id"] for c in calls}) == len(calls), "each call once"
    created = [parse_timestamp(c["tm_create"]) for c in calls]
    assert created == sorted(created, reverse=True), "newest first"
    by_id = {r.reference_id: r for r in expected}
    for call in calls:
        assert {k: type(call[k]) for k in CALL_FIELDS} == CALL_FIELDS, call
        assert call["direction"] in ("incoming", "outgoing")
        for side in ("source", "destination"):
            assert set(call[side]) == ADDRESS_FIELDS and call[side]["type"] == "tel"
            assert re.fullmatch(r"\+\d{8,15}", call[side]["target"]), "a tel target is E.164 with +"
        rec = by_id[call["id"]]  # a recording's reference_id is its call's id
        assert call["recording_ids"] == [rec.id] and call["recording_id"] == rec.id
        assert RFC3339.fullmatch(call["tm_hangup"]) and parse_timestamp(call["tm_create"]) < rec.tm_create


STORAGE_FILE_FIELDS = {"id", "customer_id", "owner_type", "owner_id", "reference_type", "reference_id", "type",
                       "name", "detail", "filename", "filesize", "uri_download", "tm_download_expire", "tm_create",
                       "tm_update", "tm_delete"}


async def test_the_storage_listing_names_each_recordings_channel_files(make_sim):
    """``GET /storage_files`` as the notes describe it: newest first, paged by ``tm_create``, one
    file per channel with ``filesize`` and a URL signed for 7 days from the file's creation,
    knowledge-base files beside them; a listed URL serves the file with ``x-goog-hash``, an
    expired one answers 400 ``ExpiredToken``, ``/storage_files/{id}/file`` redirects."""
    text = NOTES.read_text() if NOTES.exists() else ""
    for needle in ("GET /storage_files", "tm_download_expire", "uri_download", "ExpiredToken", "_in.wav"):
        assert not text or needle in text, needle
    sim = await make_sim(recordings=80, audio_bytes=2000, conference_every=7)
    key = {"accesskey": sim.accesskey}
    files: list[dict[str, Any]] = []
    token = ""
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            status, _, body = await _get(http, sim.base_url + "/storage_files", page_size="100",
                                         **({"page_token": token} if token else {}), **key)
            assert status == 200
            page = json.loads(body)
            if not page["result"]:
                break
            assert len(page["result"]) <= 100
            files += page["result"]
            token = page["next_page_token"]
            assert parse_timestamp(token) == parse_timestamp(page["result"][-1]["tm_create"])
        created = [parse_timestamp(f["tm_create"]) for f in files]
        assert created == sorted(created, reverse=True), "newest first"
        assert all(set(f) <= STORAGE_FILE_FIELDS and UUID.fullmatch(f["id"]) for f in files)
        ours = [f for f in files if f["reference_type"] == "recording"]
        assert {f["type"] for f in files} == {"recording", "rag"}
        for rec in sim.recordings.values():
            mine = sorted(f["filename"] for f in ours if f["reference_id"] == rec.id)
            assert mine == sorted(sim.member_names(rec)), "one file per channel"
            assert all(MEMBER_NAME.fullmatch(n) for n in mine)
        first = ours[0]
        expires = parse_timestamp(first["tm_download_expire"]) - parse_timestamp(first["tm_create"])
        assert expires.total_seconds() == 7 * 86400
        status, headers, body = await _get(http, first["uri_download"])
        assert status == 200 and len(body) == first["filesize"] and body[:4] == b"RIFF"
        assert "crc32c=" in headers["x-goog-hash"] and "md5=" in headers["x-goog-hash"]
        rec = sim.recordings[first["reference_id"]]
        with zipfile.ZipFile(io.BytesIO(sim.body(rec)[0])) as archive:  # /recordingfiles zips these files
            assert archive.read(first["filename"]) == body
        status, headers, _ = await _get(http, f"{sim.base_url}/storage_files/{first['id']}/file", **key)
        assert status == 307 and headers["Location"].startswith("http://127.0.0.1")
        expired = sim.files.file_url(rec.id, first["filename"], 1000.0)
        status, _, body = await _get(http, expired)
        assert status == 400 and b"ExpiredToken" in body
