"""The VoIPbin API client: credentials, pacing, retries, error mapping.

One ``aiohttp`` session talks to the API with our credential; a second one, with no cookies and
no default headers, talks to storage, so a signed storage URL never receives our credential.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import aiohttp
import structlog

from . import __version__
from .config import ApiConfig, is_loopback_host
from .errors import (
    AuthRefused,
    InvalidRecording,
    RecordingGone,
    RecordingRefused,
    TransientError,
)
from .logs import redact, register_secret
from .model import check_id, parse_timestamp
from .ratelimit import Grant, TokenBucket

log = structlog.get_logger("archiver.client")

USER_AGENT = f"voipbin-archiver/{__version__}"
MAX_429_WAITS = 30  # a 429 is the server asking us to wait, not a failure: allow many
CUSTOMER_RATE = 16.7  # the server's budget per customer, requests/s, shared with the customer's other users
RATE_WINDOW = 10.0  # seconds of our own requests looked at when a 429 arrives
CREDENTIAL_PARAMS = {"accesskey", "token"}  # never sent on to storage
MAX_ANSWER_BYTES = 8 * 1024 * 1024  # one API answer; a real page of 100 recordings is about 70 kB

# What to tell the operator for each account-level refusal (HTTP 403); see shared/voipbin-api.md.
ACCOUNT_REFUSALS = {
    "ACCOUNT_FROZEN": (
        "the VoIPbin account is frozen: every API request is refused. Nothing is lost and no recording "
        "was marked failed. Ask VoIPbin to restore the account, then archive at once (run the backfill "
        "again): a frozen account's recordings may not stay on the server for long"
    ),
    "DELETION_SCHEDULED": (
        "the VoIPbin account is scheduled for deletion: every API request is refused, and the server's "
        "recordings go with the account. Ask VoIPbin to cancel the deletion or restore access, then run "
        "the backfill again right away; no recording was marked failed"
    ),
    "PERMISSION_DENIED": (
        "the credential lacks the customer-admin or customer-manager permission that listing and "
        "downloading recordings need: use an access key of a user with one of them"
    ),
}


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's 'Full Jitter')."""
    return random.uniform(0, min(cap, base * (2**attempt)))


def _retry_after(value: str | None) -> float:
    """``Retry-After`` in seconds (1 when absent or unreadable; at most 300)."""
    try:
        return max(0.0, min(300.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0


STORAGE_READ_BUFFER = 1 << 20  # bytes a storage answer may buffer before reading pauses


class ApiClient:
    """Async client for the parts of the VoIPbin API the archiver needs."""

    def __init__(self, cfg: ApiConfig, concurrency: int = 8, grant: Grant | None = None) -> None:
        """``grant``: the account's pace is shared with other daemons (``ratelimit.TokenBucket``)."""
        self.cfg = cfg
        self.bucket = TokenBucket(cfg.requests_per_second, cfg.burst, grant)
        self.stats: Counter[str] = Counter()
        self._jwt = cfg.token
        self._login_lock = asyncio.Lock()
        self._concurrency = concurrency
        self._sent: deque[float] = deque(maxlen=4096)  # when our recent API requests went out
        self.budget_shared = False  # a 429 came while we were under the customer's rate: others use it too
        self._timeout = aiohttp.ClientTimeout(total=None, connect=cfg.timeout, sock_read=cfg.timeout)
        self._files_timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.timeout, sock_read=cfg.recordingfiles_timeout
        )
        self._api: aiohttp.ClientSession | None = None
        self._storage: aiohttp.ClientSession | None = None
        for secret in cfg.secrets():
            register_secret(secret)

    async def __aenter__(self) -> ApiClient:
        limit = self._concurrency * 2 + 4
        self._api = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=limit),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        self._storage = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=limit),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,  # hashes are of the stored bytes
            # a large body is read in the socket's own 256 kB reads, without pausing the
            # transport every 128 kB (aiohttp's default buffer is 64 kB)
            read_bufsize=STORAGE_READ_BUFFER,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._api, self._storage):
            if session is not None:
                await session.close()

    # ---- credentials -------------------------------------------------------------------------

    def _auth(self) -> tuple[dict[str, str], dict[str, str]]:
        """(query params, headers) carrying the credential: access keys only work as a query."""
        if self.cfg.accesskey:
            return {"accesskey": self.cfg.accesskey}, {}
        if self._jwt:
            return {}, {"Authorization": f"Bearer {self._jwt}"}
        return {}, {}

    async def login(self) -> None:
        """``POST /auth/login`` with username/password. A ``4xx`` other than ``429`` is a refused
        credential (``AuthRefused``); ``429``, ``5xx`` and network faults are retried with
        backoff (``Retry-After`` honoured) and end in ``TransientError``, never ``AuthRefused``."""
        assert self._api is not None
        failures = 0
        waits_429 = 0
        while True:
            self.stats["requests"] += 1
            self.stats["login"] += 1
            await self.bucket.acquire()
            try:
                async with self._api.post(
                    self.cfg.login_url,
                    json={"username": self.cfg.username, "password": self.cfg.password},
                    allow_redirects=False,
                ) as resp:
                    body = await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
                    request_id = _request_id(resp.headers, _error_info(body))
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                status, retry_after, request_id = 0, None, ""
                problem = f"{type(exc).__name__}: {redact(str(exc))}"
            else:
                problem = f"HTTP {status} request_id={request_id}"
            if status == 200:
                break
            if status == 429:
                waits_429 += 1
                delay = _retry_after(retry_after)
                log.warning("login_rate_limited", retry_after=delay, request_id=request_id)
                if waits_429 > MAX_429_WAITS:
                    raise TransientError(f"login rate limited {waits_429} times in a row")
                await asyncio.sleep(delay)
                continue
            if 400 <= status < 500:
                raise AuthRefused(f"login refused: {problem} (check username and password)", status=status)
            failures += 1
            if failures > self.cfg.max_retries:
                raise TransientError(f"login failed: {problem}")
            delay = backoff_delay(failures - 1, self.cfg.retry_base, self.cfg.retry_max)
            log.info("login_retry", reason=problem, attempt=failures, delay=round(delay, 3))
            await asyncio.sleep(delay)
        try:
            token = json.loads(body)["token"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise AuthRefused("login answered without a token") from None
        if not isinstance(token, str) or not token:
            raise AuthRefused("login answered an empty token")
        register_secret(token)
        self._jwt = token
        log.info("logged_in", username=self.cfg.username)

    async def _relogin(self, stale: str) -> bool:
        """Log in again after a 401, once per stale token; False when not configured to."""
        if not (self.cfg.username and self.cfg.password):
            return False
        async with self._login_lock:
            if self._jwt == stale:
                await self.login()
        return True

    # ---- requests ----------------------------------------------------------------------------

    async def _request(
        self, path: str, params: dict[str, str] | None = None, *, redirect: bool = False,
        timeout: aiohttp.ClientTimeout | None = None, method: str = "GET",
    ) -> Any:
        """Send an API request (GET unless ``method``) with pacing and retries.

        Returns parsed JSON (with ``method="DELETE"``: the ``X-Request-Id`` of the answer), or
        with ``redirect=True`` the ``Location`` of a 3xx.  Raises the error classes in
        ``archiver.errors``; transient faults are retried here first.
        """
        assert self._api is not None
        if not self._jwt and self.cfg.username and not self.cfg.accesskey:
            async with self._login_lock:
                if not self._jwt:
                    await self.login()
        url = self.cfg.base_url + path
        failures = 0
        waits_429 = 0
        relogged = False
        while True:
            auth_params, headers = self._auth()
            used_jwt = self._jwt
            query = {**(params or {}), **auth_params}
            await self.bucket.acquire()
            self.stats["requests"] += 1
            self._sent.append(time.monotonic())
            reason = ""
            try:
                async with self._api.request(
                    method, url, params=query, headers=headers, allow_redirects=False, timeout=timeout or self._timeout
                ) as resp:
                    status = resp.status
                    body = await _read_bounded(resp, path)
                    if redirect and status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location", "")
                        if not location:
                            raise TransientError(f"{path}: HTTP {status} without Location")
                        return urljoin(url, location)
                    if 200 <= status < 300:
                        if method == "DELETE":
                            return _request_id(resp.headers, ErrorInfo())
                        if redirect:
                            raise TransientError(f"{path}: expected a redirect to storage, got HTTP {status}")
                        try:
                            return json.loads(body)
                        except (ValueError, RecursionError):  # RecursionError: hostile nesting
                            reason = "malformed_json"
                            raise _Retry(f"{path}: malformed JSON in HTTP {status} answer") from None
                    err = _error_info(body)
                    request_id = _request_id(resp.headers, err)
                    detail = f"HTTP {status} {err.reason} request_id={request_id}".replace("  ", " ")
                    if status == 401:
                        if not relogged and await self._relogin(used_jwt):
                            relogged = True
                            continue
                        raise AuthRefused(
                            f"the API refused the credential ({detail}): check or renew it", err.reason, 401
                        )
                    if status == 403:
                        advice = ACCOUNT_REFUSALS.get(err.reason, "the API refuses this account's requests")
                        raise AuthRefused(f"{advice} ({detail})", err.reason, 403)
                    if status == 429:
                        delay = _retry_after(resp.headers.get("Retry-After"))
                        self.bucket.pause(delay)
                        self.stats["http_429"] += 1
                        waits_429 += 1
                        self._note_429(err.limited_by)
                        log.warning("rate_limited", path=path, retry_after=delay, limited_by=err.limited_by,
                                    request_id=request_id)
                        if waits_429 > MAX_429_WAITS:
                            raise TransientError(f"{path}: rate limited {waits_429} times in a row")
                        continue
                    if status in (404, 410):
                        raise RecordingGone(f"{path}: {detail}")
                    if status == 400:
                        raise RecordingRefused(f"{path}: {detail}")
                    reason = f"http_{status}"
                    raise _Retry(f"{path}: {detail}")
            except _Retry as exc:
                message = str(exc)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                reason = type(exc).__name__
                message = f"{path}: {type(exc).__name__}: {redact(str(exc))}"
            failures += 1
            self.stats[f"retry_{reason}"] += 1
            if failures > self.cfg.max_retries:
                raise TransientError(message)
            delay = backoff_delay(failures - 1, self.cfg.retry_base, self.cfg.retry_max)
            log.info("request_retry", path=path, reason=reason, attempt=failures, delay=round(delay, 3))
            await asyncio.sleep(delay)

    def _note_429(self, limited_by: str) -> None:
        """A customer-limited 429 while we sent less than the customer's whole rate means
        someone else of the customer is using the budget: say so once, clearly."""
        self.stats[f"http_429_{limited_by or 'unknown'}"] += 1
        if limited_by != "customer" or self.budget_shared or not self._sent:
            return
        now = time.monotonic()
        window = min(RATE_WINDOW, now - self._sent[0]) or RATE_WINDOW
        ours = sum(1 for t in self._sent if t > now - window)
        if ours < CUSTOMER_RATE * window:
            self.budget_shared = True
            log.warning(
                "rate_budget_shared", our_requests_per_second=round(ours / window, 1),
                customer_budget=CUSTOMER_RATE,
                hint="the customer's other integrations (dialers, CRMs, dashboards) use the same budget; "
                     "lower [api] requests_per_second if they suffer, or raise it only when they are idle",
            )

    async def _page(self, path: str, page_token: str, page_size: int) -> Any:
        """One page of a listing paged by ``page_token`` (``/recordings``, ``/calls``, ...)."""
        params = {"page_size": str(page_size)}
        if page_token:
            params["page_token"] = page_token
        return await self._request(path, params)

    async def list_recordings(self, page_token: str, page_size: int) -> Any:
        self.stats["list"] += 1
        return await self._page("/recordings", page_token, page_size)

    async def transcribes_of(self, recording_id: str, page_token: str = "") -> Any:
        """A page of ``GET /transcribes`` for one recording (the filter needs both parameters)."""
        params = {"reference_type": "recording", "reference_id": check_id(recording_id), "page_size": "100"}
        if page_token:
            params["page_token"] = page_token
        self.stats["transcribes"] += 1
        return await self._request("/transcribes", params)

    async def transcript_lines(self, transcribe_id: str, page_token: str = "") -> Any:
        """A page of ``GET /transcripts?transcribe_id=``: one session's lines."""
        params = {"transcribe_id": check_id(transcribe_id), "page_size": "100"}
        if page_token:
            params["page_token"] = page_token
        self.stats["transcripts"] += 1
        return await self._request("/transcripts", params)

    async def list_calls(self, page_token: str, page_size: int) -> Any:
        """A page of ``GET /calls`` (paged like ``/recordings``): the calls' metadata for ``find``."""
        self.stats["calls"] += 1
        return await self._page("/calls", page_token, page_size)

    async def list_storage_files(self, page_token: str, page_size: int) -> Any:
        """A page of ``GET /storage_files``: the customer's stored files with their signed URLs."""
        self.stats["storage_files"] += 1
        return await self._page("/storage_files", page_token, page_size)

    async def accesskey_expiry(self, max_pages: int = 20) -> float | None:
        """When our access key expires (epoch), from ``GET /accesskeys``: the key whose
        ``token_prefix`` our key starts with. None when the listing does not show it."""
        token = ""
        for _ in range(max_pages):
            params = {"page_size": "100", **({"page_token": token} if token else {})}
            body = await self._request("/accesskeys", params)
            items = body.get("result") if isinstance(body, dict) else None
            for item in items if isinstance(items, list) else []:
                prefix = item.get("token_prefix") if isinstance(item, dict) else None
                if isinstance(prefix, str) and len(prefix) >= 8 and self.cfg.accesskey.startswith(prefix):
                    try:
                        expires = parse_timestamp(item.get("tm_expire"))
                    except ValueError:
                        return None
                    return expires.timestamp() if expires else None
            next_token = body.get("next_page_token") if isinstance(body, dict) else None
            if not items or not isinstance(next_token, str) or not next_token or next_token == token:
                return None
            token = next_token
        return None

    async def delete_recording(self, recording_id: str) -> tuple[int, str]:
        """``DELETE /recordings/{id}`` (frees its files in the server's store): (HTTP status,
        request id). ``404`` means it is already gone, which a retry after a crash expects."""
        self.stats["delete"] += 1
        try:
            return 200, await self._request(f"/recordings/{quote(check_id(recording_id))}", method="DELETE")
        except RecordingGone as exc:
            request_id = str(exc).rpartition("request_id=")[2]
            return 404, request_id

    async def storage_account(self) -> Any:
        """``GET /storage_account``: ``total_file_size`` and ``total_file_count`` of the customer."""
        return await self._request("/storage_account")

    async def get_recording(self, recording_id: str) -> Any:
        self.stats["detail"] += 1
        return await self._request(f"/recordings/{quote(check_id(recording_id))}")

    async def recordingfile_url(self, recording_id: str) -> str:
        """Ask for a fresh signed storage URL (the ``Location`` of the 307)."""
        self.stats["recordingfiles"] += 1
        # the server builds the ZIP while this request waits (up to its own 300 s)
        location = await self._request(
            f"/recordingfiles/{quote(check_id(recording_id))}", redirect=True, timeout=self._files_timeout
        )
        parts = urlsplit(location)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname)):
            raise InvalidRecording(f"storage redirect to a non-HTTPS URL refused ({parts.scheme}://{parts.hostname})")
        return self._without_credentials(location)

    def _without_credentials(self, location: str) -> str:
        """The storage URL with our credential parameters removed (a careless proxy or server may
        echo our query string into ``Location``); the rest is kept byte for byte, so a signature
        still matches. Refused if a credential is still anywhere in it."""
        parts = urlsplit(location)
        pieces = parts.query.split("&") if parts.query else []
        kept = [p for p in pieces if unquote(p.partition("=")[0]).lower() not in CREDENTIAL_PARAMS]
        if len(kept) != len(pieces):
            self.stats["redirect_credentials_stripped"] += 1
            log.warning("redirect_credential_stripped", hint="the storage redirect carried our credential: removed")
            location = urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(kept), parts.fragment))
        # the access key and the JWT travel in our requests and can be echoed; the password is
        # only ever in a login's body, and a short one would match innocent signature text
        secrets = [s for s in (self.cfg.accesskey, self._jwt) if s]
        if parts.username or parts.password or any(s in unquote(location) for s in secrets):
            raise InvalidRecording("storage redirect carries our credential outside its query: refused")
        return location

    @asynccontextmanager
    async def storage_get(self, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET a signed storage URL with no credential of ours (and no redirects followed)."""
        assert self._storage is not None
        self.stats["requests"] += 1
        self.stats["storage"] += 1
        async with self._storage.get(url, allow_redirects=False) as resp:
            yield resp


class _Retry(Exception):
    """Internal: a retryable answer."""


async def _read_bounded(resp: aiohttp.ClientResponse, path: str) -> bytes:
    """The answer's body, refused (``InvalidRecording``) past ``MAX_ANSWER_BYTES``: a hostile
    or broken server must not make us hold, parse and store hundreds of megabytes."""
    if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
        raise InvalidRecording(f"{path}: answer of {resp.content_length} bytes, more than {MAX_ANSWER_BYTES}")
    body = await resp.content.read(MAX_ANSWER_BYTES + 1)
    while len(body) <= MAX_ANSWER_BYTES and not resp.content.at_eof():
        chunk = await resp.content.read(MAX_ANSWER_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_ANSWER_BYTES:
        raise InvalidRecording(f"{path}: answer longer than {MAX_ANSWER_BYTES} bytes")
    return body


@dataclass(frozen=True)
class ErrorInfo:
    """What VoIPbin's error envelope says; every field empty when the body is not one (an
    empty or HTML answer of a proxy in front of the API)."""

    reason: str = ""
    request_id: str = ""
    limited_by: str = ""


def _error_info(body: bytes) -> ErrorInfo:
    """``{"error": {"status": "NOT_FOUND", "reason": ..., "request_id": ..., "details": [...]}}``"""
    try:
        err = json.loads(body)["error"]
        details = err.get("details")
        first = details[0] if isinstance(details, list) and details and isinstance(details[0], dict) else {}
        return ErrorInfo(
            _short(err.get("reason")), _short(err.get("request_id")), _short(first.get("limited_by"))
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return ErrorInfo()


def _short(value: Any) -> str:
    """A printable string of at most 100 characters from an untrusted field ("" for non-strings)."""
    return "".join(c for c in value[:100] if c.isprintable()) if isinstance(value, str) else ""


def _request_id(headers: Any, err: ErrorInfo) -> str:
    """The server's id for this request: the ``X-Request-Id`` header, else the envelope's."""
    return _short(headers.get("X-Request-Id", "")) or err.request_id
