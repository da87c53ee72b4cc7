"""The VoIPbin API client: credentials, pacing, retries, error mapping.

One ``aiohttp`` session talks to the API with our credential; a second one, with no cookies and
no default headers, talks to storage, so a signed storage URL never receives our credential.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

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
from .model import check_id
from .ratelimit import TokenBucket

log = structlog.get_logger("archiver.client")

USER_AGENT = f"voipbin-archiver/{__version__}"
MAX_429_WAITS = 30  # a 429 is the server asking us to wait, not a failure: allow many


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's 'Full Jitter')."""
    return random.uniform(0, min(cap, base * (2**attempt)))


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, min(300.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0


class ApiClient:
    """Async client for the parts of the VoIPbin API the archiver needs."""

    def __init__(self, cfg: ApiConfig, concurrency: int = 8) -> None:
        self.cfg = cfg
        self.bucket = TokenBucket(cfg.requests_per_second, cfg.burst)
        self.stats: Counter[str] = Counter()
        self._jwt = cfg.token
        self._login_lock = asyncio.Lock()
        self._concurrency = concurrency
        self._api: aiohttp.ClientSession | None = None
        self._storage: aiohttp.ClientSession | None = None
        for secret in cfg.secrets():
            register_secret(secret)

    async def __aenter__(self) -> ApiClient:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.timeout, sock_read=self.cfg.timeout)
        limit = self._concurrency * 2 + 4
        self._api = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=limit),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        self._storage = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=limit),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,  # hashes are of the stored bytes
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
        """``POST /auth/login`` with username/password; a refusal is ``AuthRefused``."""
        assert self._api is not None
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
                if resp.status != 200:
                    raise AuthRefused(f"login refused: HTTP {resp.status}")
        except aiohttp.ClientError as exc:
            raise TransientError(f"login failed: {redact(str(exc))}") from None
        try:
            token = json.loads(body)["token"]
        except (ValueError, KeyError, TypeError):
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

    async def _request(self, path: str, params: dict[str, str] | None = None, *, redirect: bool = False) -> Any:
        """GET an API path with pacing and retries.

        Returns parsed JSON, or with ``redirect=True`` the ``Location`` of a 3xx.  Raises the
        error classes in ``archiver.errors``; transient faults are retried here first.
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
            reason = ""
            try:
                async with self._api.get(url, params=query, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    body = await resp.read()
                    if redirect and status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location", "")
                        if not location:
                            raise TransientError(f"{path}: HTTP {status} without Location")
                        return urljoin(url, location)
                    if 200 <= status < 300:
                        if redirect:
                            raise TransientError(f"{path}: expected a redirect to storage, got HTTP {status}")
                        try:
                            return json.loads(body)
                        except ValueError:
                            reason = "malformed_json"
                            raise _Retry(f"{path}: malformed JSON in HTTP {status} answer") from None
                    err_reason, request_id = _error_info(body)
                    if status == 401:
                        if not relogged and await self._relogin(used_jwt):
                            relogged = True
                            continue
                        raise AuthRefused(
                            f"the API refused the credential (HTTP 401 {err_reason}, request_id={request_id})"
                        )
                    if status == 429:
                        delay = _retry_after(resp.headers.get("Retry-After"))
                        self.bucket.pause(delay)
                        self.stats["http_429"] += 1
                        waits_429 += 1
                        log.warning("rate_limited", path=path, retry_after=delay, request_id=request_id)
                        if waits_429 > MAX_429_WAITS:
                            raise TransientError(f"{path}: rate limited {waits_429} times in a row")
                        continue
                    detail = f"HTTP {status} {err_reason} request_id={request_id}".strip()
                    if status in (404, 410):
                        raise RecordingGone(f"{path}: {detail}")
                    if status in (400, 403):
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

    async def list_recordings(self, page_token: str, page_size: int) -> Any:
        params = {"page_size": str(page_size)}
        if page_token:
            params["page_token"] = page_token
        self.stats["list"] += 1
        return await self._request("/recordings", params)

    async def get_recording(self, recording_id: str) -> Any:
        self.stats["detail"] += 1
        return await self._request(f"/recordings/{quote(check_id(recording_id))}")

    async def recordingfile_url(self, recording_id: str) -> str:
        """Ask for a fresh signed storage URL (the ``Location`` of the 307)."""
        self.stats["recordingfiles"] += 1
        location = await self._request(f"/recordingfiles/{quote(check_id(recording_id))}", redirect=True)
        parts = urlsplit(location)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname)):
            raise InvalidRecording(f"storage redirect to a non-HTTPS URL refused ({parts.scheme}://{parts.hostname})")
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


def _error_info(body: bytes) -> tuple[str, str]:
    """(reason, request_id) from VoIPbin's error envelope; empty strings when absent."""
    try:
        err = json.loads(body).get("error", {})
        return str(err.get("reason", ""))[:100], str(err.get("request_id", ""))[:100]
    except (ValueError, AttributeError):
        return "", ""
