"""Prometheus metrics and ``/healthz``, served over HTTP when ``[metrics] listen`` is set."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from .errors import ConfigError
from .model import FETCH_PATHS
from .state import FLAGS, STATES

if TYPE_CHECKING:  # the server is imported only when it is started ([metrics] listen)
    from aiohttp import web


FALLBACK_REASONS = ("listing", "download")


class Metrics:
    """One registry per engine (not the global one), so tests and embeddings stay independent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.recordings = Gauge("voipbin_archiver_recordings", "Recordings by state", ["state"], registry=r)
        self.bytes = Counter("voipbin_archiver_archived_bytes", "Bytes archived", registry=r)
        self.files = Counter("voipbin_archiver_archived_files", "Recording files (ZIP members) archived", registry=r)
        self.archived = Counter("voipbin_archiver_archived_recordings", "Recordings archived", registry=r)
        self.no_audio = Counter(
            "voipbin_archiver_no_audio_recordings", "Recordings settled with no audio on the server (sidecar only)",
            registry=r,
        )
        self.flagged = Gauge(
            "voipbin_archiver_archived_flagged", "Archived recordings kept imperfect, by flag", ["flag"], registry=r
        )
        self.download_seconds = Histogram(
            "voipbin_archiver_download_seconds", "Time to download and verify one recording", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.retries = Counter("voipbin_archiver_retries", "Recording retries by reason", ["reason"], registry=r)
        self.pending_age = Gauge(
            "voipbin_archiver_oldest_pending_age_seconds", "Age of the oldest recording not archived yet", registry=r
        )
        self.last_cycle = Gauge(
            "voipbin_archiver_last_successful_cycle_timestamp_seconds", "When the last cycle succeeded", registry=r
        )
        self.api_requests = Gauge("voipbin_archiver_api_requests", "HTTP requests sent (API and storage)", registry=r)
        self.budget_requests = Gauge(
            "voipbin_archiver_budget_requests",
            "Requests sent to the API, each from the customer's shared rate budget (storage downloads excluded)",
            registry=r,
        )
        self.fetched = Counter(
            "voipbin_archiver_fetched_recordings",
            "Recordings archived with audio, by the path it came by: storage_files (the storage listing, "
            "no API budget) or recordingfiles (one API request each)", ["path"], registry=r,
        )
        self.listing_fallbacks = Counter(
            "voipbin_archiver_storage_listing_fallbacks",
            "Recent recordings sent to GET /recordingfiles although the storage listing named them: "
            "their listed files were unusable (listing) or failed to download or verify (download)",
            ["why"], registry=r,
        )
        for path in FETCH_PATHS:  # every series from the start: a rate() needs its zero
            self.fetched.labels(path)
        for why in FALLBACK_REASONS:
            self.listing_fallbacks.labels(why)
        self.http_429 = Gauge("voipbin_archiver_rate_limited_responses", "429 answers received", registry=r)
        self.credential_refused = Gauge(
            "voipbin_archiver_credential_refused",
            "1 while the API refuses the credential or the account (401 or 403), by the server's reason",
            ["reason"], registry=r,
        )
        self.accesskey_expiry = Gauge(
            "voipbin_archiver_accesskey_expiry_timestamp_seconds",
            "When the access key expires (from GET /accesskeys); 0 while unknown", registry=r,
        )
        self.budget_shared = Gauge(
            "voipbin_archiver_rate_budget_shared",
            "1 once a 429 came while we were under the customer's rate: others use the budget too", registry=r,
        )
        self.server_storage = Gauge(
            "voipbin_archiver_server_storage_bytes", "Bytes in the customer's store on the server", registry=r
        )
        self.server_capacity = Gauge(
            "voipbin_archiver_server_storage_capacity_bytes", "The server's cap on the customer's store", registry=r
        )
        self.server_deletions = Counter(
            "voipbin_archiver_server_deletions", "Server copies deleted after archiving (404s of retries included)",
            registry=r,
        )
        self.deletion_refused = Counter(
            "voipbin_archiver_server_deletions_refused",
            "Deletions not done: the archive copy failed re-verification", registry=r,
        )
        self.unwritable = Gauge(
            "voipbin_archiver_unwritable",
            "1 while the service is paused because the archive or the state database cannot be written", registry=r,
        )
        self.manifest_ok: Gauge | None = None  # with [archive] signing_key_file (set_manifest)
        self.last_cycle_at = 0.0
        self.refused = ""  # the server's reason while it refuses us, "" otherwise
        for state in STATES:
            self.recordings.labels(state)
        for flag in FLAGS:
            self.flagged.labels(flag)

    def set_counts(self, summary: dict[str, Any], oldest_tm_create: float | None) -> None:
        for state in STATES:
            self.recordings.labels(state).set(summary.get(state, 0))
        for flag, n in summary.get("archived_flagged", {}).items():
            self.flagged.labels(flag).set(n)
        self.accesskey_expiry.set(summary.get("accesskey_expires") or 0)
        self.pending_age.set(max(0.0, time.time() - oldest_tm_create) if oldest_tm_create else 0)

    def set_manifest(self, ok: bool, segments_written: int) -> None:
        """The manifest's chain as the daemon last found it (exported only with the manifest on)."""
        if self.manifest_ok is None:
            self.manifest_ok = Gauge("voipbin_archiver_manifest_ok",
                                     "1 while the signed manifest's chain checks out, 0 once found broken",
                                     registry=self.registry)
            self.manifest_segments = Counter("voipbin_archiver_manifest_segments",
                                             "Manifest segments written by this process", registry=self.registry)
            self._segments_counted = 0
        self.manifest_ok.set(1 if ok else 0)
        self.manifest_segments.inc(segments_written - self._segments_counted)
        self._segments_counted = segments_written

    def set_store(self, size: int, capacity: int) -> None:
        self.server_storage.set(size)
        self.server_capacity.set(capacity)

    def cycle_succeeded(self) -> None:
        self.last_cycle_at = time.time()
        self.last_cycle.set(self.last_cycle_at)
        self.set_refused("")

    def set_refused(self, reason: str) -> None:
        if self.refused:
            self.credential_refused.remove(self.refused)
        self.refused = reason
        if reason:
            self.credential_refused.labels(reason).set(1)

    def healthy(self, poll_interval: float) -> tuple[bool, str]:
        if self.refused:
            return False, f"the API refuses us: {self.refused}"
        if not self.last_cycle_at:
            return False, "no successful cycle yet"
        age = time.time() - self.last_cycle_at
        if age > 3 * poll_interval:
            return False, f"last successful cycle {age:.0f} s ago"
        return True, "ok"


class _ByAccount:
    """Every account's metrics as one exposition, each sample labelled ``account``."""

    def __init__(self, metrics: dict[str, Metrics]) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        families: dict[str, Metric] = {}
        for account, m in self.metrics.items():
            for family in m.registry.collect():
                out = families.get(family.name)
                if out is None:
                    out = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {"account": account, **sample.labels}, sample.value,
                                   sample.timestamp, sample.exemplar)
        return list(families.values())


def exposition(metrics: dict[str, Metrics]) -> bytes:
    """``/metrics``: one account's registry as it is; several, labelled by account."""
    if len(metrics) == 1:
        return generate_latest(next(iter(metrics.values())).registry)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ByAccount(metrics))
    return generate_latest(registry)


def health(metrics: dict[str, Metrics], poll_interval: float) -> tuple[bool, str]:
    """``/healthz``: healthy only while every account is; the reason names each that is not."""
    if len(metrics) == 1:
        return next(iter(metrics.values())).healthy(poll_interval)
    verdicts = {account: m.healthy(poll_interval) for account, m in metrics.items()}
    bad = [f"account {account}: {reason}" for account, (ok, reason) in verdicts.items() if not ok]
    return (False, "; ".join(bad)) if bad else (True, "ok")


async def serve_metrics(metrics: dict[str, Metrics], listen: str, poll_interval: float) -> web.AppRunner:
    """Start ``GET /metrics`` and ``GET /healthz`` on ``host:port``; returns the runner to clean up."""
    from aiohttp import web

    host, _, port = listen.rpartition(":")

    async def h_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=exposition(metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def h_health(_request: web.Request) -> web.Response:
        ok, reason = health(metrics, poll_interval)
        return web.Response(status=200 if ok else 503, text=reason + "\n")

    app = web.Application()
    app.router.add_get("/metrics", h_metrics)
    app.router.add_get("/healthz", h_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"[metrics] listen = {listen!r}: cannot listen there ({exc.strerror})") from None
    return runner
