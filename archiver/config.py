"""Load and validate the TOML configuration.

Every key has a documented default (see ``config.example.toml``); every error names the key.
Relative paths resolve against the directory of the config file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigError

DEFAULT_BASE_URL = "https://api.voipbin.net/v1.0"
DEFAULT_LAYOUT = "{year}/{month}/{day}/{id}.{ext}"
DEFAULT_ACCOUNT = "default"  # the one account of a config without [[accounts]] (and of state before v5)
STAGING_DIRECTORY = "s3-staging"  # [archive.s3] staging_directory: this, beside the state database
LAYOUT_FIELDS = {"year", "month", "day", "hour", "id", "ext", "reference_type", "account"}
ACCOUNT_NAME = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = DEFAULT_BASE_URL
    accesskey: str = ""
    token: str = ""
    username: str = ""
    password: str = ""
    login_url: str = ""
    page_size: int = 100
    # about half the customer's 16.7/s: the budget is shared with the customer's other integrations
    requests_per_second: float = 8.0
    burst: int = 8
    timeout: float = 60.0
    recordingfiles_timeout: float = 330.0  # the server builds the ZIP while we wait, up to its own 300 s
    min_transfer_rate: float = 1024.0  # bytes/s a storage transfer must keep up over transfer_rate_window
    transfer_rate_window: float = 30.0
    max_retries: int = 5
    retry_base: float = 0.5
    retry_max: float = 30.0

    @property
    def credential_kind(self) -> str:
        if self.accesskey:
            return "accesskey"
        if self.token:
            return "token"
        return "login"

    def secrets(self) -> list[str]:
        return [s for s in (self.accesskey, self.token, self.password) if s]

@dataclass(frozen=True)
class AccountConfig:
    """One VoIPbin customer account: its name (the state key, ``{account}`` in the layout) and
    its API settings: ``[api]``'s with this account's credential and pace."""

    name: str
    api: ApiConfig


@dataclass(frozen=True)
class ArchiveConfig:
    destination: str = "directory"  # or "s3"
    s3: S3Config | None = None  # with destination = "s3"
    directory: Path = Path("/var/lib/voipbin-archiver/recordings")
    layout: str = DEFAULT_LAYOUT
    unpack: bool = False
    settle_window: float = 3600.0
    max_members: int = 1000
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 1000.0
    temp_tag: str = ""  # set by the daemon when its state is shared (layout.set_temp_tag)


@dataclass(frozen=True)
class StateConfig:
    database: Path = Path("/var/lib/voipbin-archiver/state.sqlite3")
    url: str = field(default="", repr=False)  # postgresql://...: the shared state instead of SQLite
    password: str = field(default="", repr=False)  # for url: password_file or env PGPASSWORD
    # seconds a claimed recording stays ours without a heartbeat (url only); renewed every lease/3,
    # so a claim survives two missed renewals (a 30 s database stall) and a dead daemon's work
    # is taken over within 45 s plus one feeder round: under a minute
    lease: float = 45.0


@dataclass(frozen=True)
class S3Config:
    """``[archive.s3]``: the bucket a ``destination = "s3"`` archive goes to."""

    endpoint: str = "https://s3.amazonaws.com"
    region: str = "us-east-1"
    bucket: str = ""
    prefix: str = ""  # then the layout template
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    object_lock_mode: str = ""  # "", "GOVERNANCE" or "COMPLIANCE"
    retain_days: int = 0  # with a lock mode: retain-until = archive time + retain_days
    legal_hold: bool = False
    multipart_threshold: int = 64 * 1024**2  # bodies above this go multipart
    part_size: int = 16 * 1024**2  # S3's minimum part is 5 MiB
    retries: int = 5  # tries per request (ours: a PUT is HEAD-checked before a resend), then the bucket is down
    timeout: float = 60.0
    staging_directory: Path = StateConfig.database.parent / STAGING_DIRECTORY  # bodies over 1 MB in transit

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key_id, self.secret_access_key) if s]


# Store helpers per destination: a directory's do the fsyncs and renames too; a bucket's only
# verify and stage (the gateway's round trips set the pace), so one saves ~25 MB and no time.
STORE_PROCESSES = {"directory": 2, "s3": 1}


@dataclass(frozen=True)
class WorkersConfig:
    concurrency: int = 8
    store_processes: int = STORE_PROCESSES["directory"]
    poll_interval: float = 60.0
    pending_timeout: float = 86400.0
    poll_backoff_min: float = 5.0
    poll_backoff_max: float = 300.0
    max_attempts: int = 10
    retry_backoff_min: float = 10.0
    retry_backoff_max: float = 3600.0
    full_rewalk_interval: float = 86400.0
    overlap: int = 10
    trouble_pause: float = 60.0  # service: pause after a refused credential/account or an unwritable archive


@dataclass(frozen=True)
class RetentionConfig:
    delete_from_server: bool = False  # opt in: deleting the server's copy is irreversible
    delete_after: float = 604800.0  # seconds after archiving (7 days); 0 = as soon as it is safe
    delete_incomplete: bool = False  # also delete recordings archived flagged incomplete or damaged
    store_warn_ratio: float = 0.8
    store_capacity: int = 10 * 1024**3  # the server's cap per customer (10 GB)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"
    progress_interval: float = 10.0  # backfill off a terminal: a "progress" event this often; 0 = off


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "host:port" for /metrics and /healthz; empty = off


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    state: StateConfig = field(default_factory=StateConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    accounts: tuple[AccountConfig, ...] = ()  # [[accounts]], or the one account "default" of [api]
    path: Path | None = None
    warnings: tuple[str, ...] = ()  # logged by the caller once logging is set up


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_config_path() -> Path:
    env = os.environ.get("VOIPBIN_ARCHIVER_CONFIG")
    return Path(env) if env else Path("config.toml")


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    """Read, validate and return the configuration at ``path``."""
    env = dict(os.environ) if env is None else env
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return build_config(data, base_dir=path.resolve().parent, env=env, path=path)


def build_config(
    data: dict[str, Any], base_dir: Path, env: dict[str, str], path: Path | None = None
) -> Config:
    known = {"api", "archive", "state", "workers", "retention", "logging", "metrics", "accounts"}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown section or key [{key}] (known: {', '.join(sorted(known))})")
    data = _lift_subtable(data, "archive", "s3")
    data, account_sections = _lift_accounts(data)
    reader = _Reader(data, base_dir)
    api = _build_api(reader, env, base_dir, need_credential=not account_sections)
    accounts = tuple(_build_account(reader, base_dir, api, sec) for sec in account_sections) or (
        AccountConfig(DEFAULT_ACCOUNT, api),
    )
    names = [a.name for a in accounts]
    if len(set(names)) != len(names):
        raise ConfigError(f"[[accounts]] names must be unique, got {sorted(names)}")
    state = _build_state(reader, env, base_dir)
    destination = reader.choice("archive", "destination", ArchiveConfig.destination, ("directory", "s3"))
    s3 = _build_s3(reader, env, base_dir, state) if destination == "s3" else None
    if s3 is None and "archive.s3" in data:
        raise ConfigError('[archive.s3] is set but [archive] destination is not "s3"')
    if s3 is not None and "directory" in data.get("archive", {}):
        raise ConfigError('[archive] directory is for destination = "directory"; with "s3", transfers are '
                          "staged in [archive.s3] staging_directory")
    archive = ArchiveConfig(
        destination=destination,
        s3=s3,
        directory=s3.staging_directory if s3 else reader.path("archive", "directory", ArchiveConfig.directory),
        layout=_check_layout(reader.text("archive", "layout", default_layout(len(accounts))), len(accounts)),
        unpack=reader.flag("archive", "unpack", False),
        settle_window=reader.number("archive", "settle_window", 3600.0, minimum=0),
        max_members=reader.whole("archive", "max_members", 1000, minimum=1),
        max_member_bytes=reader.whole("archive", "max_member_bytes", 4 * 1024**3, minimum=1),
        max_total_bytes=reader.whole("archive", "max_total_bytes", 16 * 1024**3, minimum=1),
        max_ratio=reader.number("archive", "max_ratio", 1000.0, minimum=1),
    )
    if s3 is not None and archive.unpack:
        raise ConfigError('[archive] unpack = true is for destination = "directory" (in a bucket, the ZIP object '
                          "holds its members)")
    workers = WorkersConfig(
        concurrency=reader.whole("workers", "concurrency", 8, minimum=1, maximum=256),
        store_processes=reader.whole("workers", "store_processes", STORE_PROCESSES[destination], minimum=1, maximum=32),
        poll_interval=reader.number("workers", "poll_interval", 60.0, minimum=0.01),
        pending_timeout=reader.number("workers", "pending_timeout", 86400.0, minimum=0),
        poll_backoff_min=reader.number("workers", "poll_backoff_min", 5.0, minimum=0.01),
        poll_backoff_max=reader.number("workers", "poll_backoff_max", 300.0, minimum=0.01),
        max_attempts=reader.whole("workers", "max_attempts", 10, minimum=1),
        retry_backoff_min=reader.number("workers", "retry_backoff_min", 10.0, minimum=0),
        retry_backoff_max=reader.number("workers", "retry_backoff_max", 3600.0, minimum=0),
        full_rewalk_interval=reader.number("workers", "full_rewalk_interval", 86400.0, minimum=0),
        overlap=reader.whole("workers", "overlap", 10, minimum=0),
        trouble_pause=reader.number("workers", "trouble_pause", WorkersConfig.trouble_pause, minimum=0.1),
    )
    retention = RetentionConfig(
        delete_from_server=reader.flag("retention", "delete_from_server", RetentionConfig.delete_from_server),
        delete_after=reader.number("retention", "delete_after", RetentionConfig.delete_after, minimum=0),
        delete_incomplete=reader.flag("retention", "delete_incomplete", RetentionConfig.delete_incomplete),
        store_warn_ratio=reader.number("retention", "store_warn_ratio", RetentionConfig.store_warn_ratio, minimum=0),
        store_capacity=reader.whole("retention", "store_capacity", RetentionConfig.store_capacity, minimum=1),
    )
    if retention.store_warn_ratio > 1:
        raise ConfigError(f"[retention] store_warn_ratio must be <= 1, got {retention.store_warn_ratio}")
    logging_cfg = LoggingConfig(
        level=reader.choice("logging", "level", "info", ("debug", "info", "warning", "error")),
        format=reader.choice("logging", "format", "auto", ("auto", "json", "console")),
        progress_interval=reader.number("logging", "progress_interval", 10.0, minimum=0),
    )
    metrics = MetricsConfig(listen=_check_listen(reader.text("metrics", "listen", "")))
    reader.reject_unknown()
    warnings = []
    if path is not None and _holds_secret(data) and _world_readable(path):
        warnings.append(f"config_world_readable: {path} holds a credential; chmod 600 it or use accesskey_file")
    return Config(
        api=api, archive=archive, state=state, workers=workers, retention=retention, logging=logging_cfg,
        metrics=metrics, accounts=accounts, path=path,
        warnings=tuple(warnings),
    )


def _build_api(reader: _Reader, env: dict[str, str], base_dir: Path, need_credential: bool = True) -> ApiConfig:
    base_url = reader.text("api", "base_url", DEFAULT_BASE_URL).rstrip("/")
    parts = _check_url("api", "base_url", base_url)
    if need_credential:
        accesskey, token, username, password = _credential(reader, env, base_dir, "api")
    else:
        found = [key for key in _CREDENTIAL_KEYS if reader.data.get("api", {}).get(key)]
        if found:
            raise ConfigError(f"[api] {found[0]}: with [[accounts]], each account has its own credential; "
                              "move it into an [[accounts]] entry")
        accesskey = token = username = password = ""

    login_url = reader.text("api", "login_url", "")
    if not login_url:
        login_url = f"{parts.scheme}://{parts.netloc}/auth/login"
    rps = reader.number("api", "requests_per_second", ApiConfig.requests_per_second, minimum=0)
    return ApiConfig(
        base_url=base_url,
        accesskey=accesskey,
        token=token,
        username=username,
        password=password,
        login_url=login_url,
        page_size=reader.whole("api", "page_size", 100, minimum=1, maximum=100),
        requests_per_second=rps,
        burst=reader.whole("api", "burst", max(1, int(rps)), minimum=1),
        timeout=reader.number("api", "timeout", ApiConfig.timeout, minimum=0.1),
        recordingfiles_timeout=reader.number(
            "api", "recordingfiles_timeout", ApiConfig.recordingfiles_timeout, minimum=0.1
        ),
        min_transfer_rate=reader.number("api", "min_transfer_rate", ApiConfig.min_transfer_rate, minimum=0),
        transfer_rate_window=reader.number(
            "api", "transfer_rate_window", ApiConfig.transfer_rate_window, minimum=0.1
        ),
        max_retries=reader.whole("api", "max_retries", 5, minimum=0, maximum=50),
        retry_base=reader.number("api", "retry_base", 0.5, minimum=0),
        retry_max=reader.number("api", "retry_max", 30.0, minimum=0),
    )


_CREDENTIAL_KEYS = ("accesskey", "accesskey_file", "token", "token_file", "username", "password", "password_file")


def _credential(
    reader: _Reader, env: dict[str, str], base_dir: Path, section: str
) -> tuple[str, str, str, str]:
    """(accesskey, token, username, password): exactly one kind, from ``section``; ``[api]``
    also reads the environment (an account of [[accounts]] does not: each has its own)."""
    env = env if section == "api" else {}
    accesskey = _secret(reader, env, "accesskey", "VOIPBIN_ACCESSKEY", base_dir, section)
    token = _secret(reader, env, "token", "VOIPBIN_TOKEN", base_dir, section)
    username = reader.text(section, "username", "") or env.get("VOIPBIN_USERNAME", "")
    password = _secret(reader, env, "password", "VOIPBIN_PASSWORD", base_dir, section)
    kinds = [name for name, on in (
        ("accesskey", accesskey), ("token", token), ("username/password", username or password)
    ) if on]
    if not kinds:
        names = [f"{kind}{suffix}" for kind in ("accesskey", "token", "password") for suffix in ("", "_file")]
        typos = [
            f"unknown key {key!r} (did you mean {close[0]}?)"
            for key in reader.data.get(section, {})
            if (close := difflib.get_close_matches(key, [*names, "username"], n=1, cutoff=0.75)) and key != close[0]
        ]
        where = "(or accesskey_file, or env VOIPBIN_ACCESSKEY), token (token_file, VOIPBIN_TOKEN)" if (
            section == "api") else "(or accesskey_file), token (or token_file)"
        raise ConfigError(
            f"[{section}] no credential: set accesskey {where} or username and password"
            + "".join(f"; {t}" for t in typos)
        )
    if len(kinds) > 1:
        raise ConfigError(f"[{section}] exactly one credential kind is allowed, found: {', '.join(kinds)}")
    if (username or password) and not (username and password):
        raise ConfigError(f"[{section}] username and password must be set together")
    if accesskey and (not accesskey.isprintable() or " " in accesskey):
        raise ConfigError(f"[{section}] accesskey contains spaces or control characters")
    return accesskey, token, username, password


def _lift_accounts(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``[[accounts]]`` arrives as a list of tables; read entry n as section ``accounts #n``."""
    entries = data.get("accounts")
    if entries is None:
        return data, []
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("[[accounts]] must be one or more tables: [[accounts]] then name = ..., accesskey_file = ...")
    sections = [f"accounts #{n}" for n in range(1, len(entries) + 1)]
    rest = {k: v for k, v in data.items() if k != "accounts"}
    return {**rest, **dict(zip(sections, entries, strict=True))}, sections


def _build_account(reader: _Reader, base_dir: Path, api: ApiConfig, section: str) -> AccountConfig:
    name = reader.text(section, "name", "")
    if not ACCOUNT_NAME.fullmatch(name):
        raise ConfigError(f"[{section}] name must be 1 to 32 of a-z, 0-9 and '-', got {name!r}")
    section_label = f"accounts {name}"
    reader.data[section_label] = reader.data.pop(section)  # errors from here on name the account
    reader.used |= {(section_label, k) for s, k in reader.used if s == section}
    accesskey, token, username, password = _credential(reader, {}, base_dir, section_label)
    rps = reader.number(section_label, "requests_per_second", api.requests_per_second, minimum=0)
    burst = reader.whole(section_label, "burst", max(1, int(rps)) if rps != api.requests_per_second else api.burst,
                         minimum=1)
    return AccountConfig(name, replace(
        api, accesskey=accesskey, token=token, username=username, password=password,
        requests_per_second=rps, burst=burst,
    ))


def default_layout(accounts: int) -> str:
    """The layout when ``[archive] layout`` is not set: with several accounts, each its own directory."""
    return DEFAULT_LAYOUT if accounts <= 1 else "{account}/" + DEFAULT_LAYOUT


def _check_url(section: str, key: str, url: str) -> SplitResult:
    """An https URL (plain http only to loopback) without a query string or user info."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"[{section}] {key} must be an https:// URL, got {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(f"[{section}] {key}: plain http is refused except on loopback; use https://")
    if parts.query or parts.username or parts.password:
        raise ConfigError(f"[{section}] {key} must not carry a query string or user info")
    return parts


def _lift_subtable(data: dict[str, Any], section: str, sub: str) -> dict[str, Any]:
    """``[archive.s3]`` arrives as ``data["archive"]["s3"]``; read it as section ``archive.s3``."""
    body = data.get(section)
    if not isinstance(body, dict) or sub not in body:
        return data
    inner = body[sub]
    if not isinstance(inner, dict):
        raise ConfigError(f"[{section}.{sub}] must be a table")
    return {**data, section: {k: v for k, v in body.items() if k != sub}, f"{section}.{sub}": inner}


def _build_state(reader: _Reader, env: dict[str, str], base_dir: Path) -> StateConfig:
    database = reader.path("state", "database", StateConfig.database)
    url = reader.text("state", "url", "")
    lease = reader.number("state", "lease", StateConfig.lease, minimum=1)
    password = _secret(reader, env, "password", "PGPASSWORD", base_dir, "state")
    if not url:
        if {"password", "password_file", "lease"} & set(reader.data.get("state", {})):
            raise ConfigError("[state] password and lease are for url (PostgreSQL); SQLite needs neither")
        return StateConfig(database=database)
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise ConfigError("[state] url must be postgresql://user@host/database")
    if parts.password:
        raise ConfigError("[state] url must not carry a password: use password_file or env PGPASSWORD")
    return StateConfig(database=database, url=url, password=password, lease=lease)


LOCK_MODES = ("", "GOVERNANCE", "COMPLIANCE")


def _build_s3(reader: _Reader, env: dict[str, str], base_dir: Path, state: StateConfig) -> S3Config:
    sec = "archive.s3"
    endpoint = reader.text(sec, "endpoint", S3Config.endpoint).rstrip("/")
    if _check_url(sec, "endpoint", endpoint).path not in ("", "/"):
        raise ConfigError(f"[{sec}] endpoint must be an https:// URL without a path, got {endpoint!r}")
    bucket = reader.text(sec, "bucket", "")
    if not bucket:
        raise ConfigError(f"[{sec}] bucket must be set")
    prefix = reader.text(sec, "prefix", "")
    if prefix.startswith("/") or "\\" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ConfigError(f"[{sec}] prefix must be relative, without '.', '..' or '\\', got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    key_id = _secret(reader, env, "access_key_id", "AWS_ACCESS_KEY_ID", base_dir, sec)
    secret = _secret(reader, env, "secret_access_key", "AWS_SECRET_ACCESS_KEY", base_dir, sec)
    if not key_id or not secret:
        raise ConfigError(f"[{sec}] access_key_id and secret_access_key must be set (or their _file, or env "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    mode = reader.text(sec, "object_lock_mode", "").upper()
    if mode not in LOCK_MODES:
        raise ConfigError(f'[{sec}] object_lock_mode must be "", "GOVERNANCE" or "COMPLIANCE", got {mode!r}')
    retain_days = reader.whole(sec, "retain_days", 0, minimum=0, maximum=36500)
    if mode and not retain_days:
        raise ConfigError(f"[{sec}] retain_days must be > 0 with object_lock_mode = {mode!r}")
    if retain_days and not mode:
        raise ConfigError(f'[{sec}] retain_days needs object_lock_mode ("GOVERNANCE" or "COMPLIANCE")')
    part_size = reader.whole(sec, "part_size", S3Config.part_size, minimum=5 * 1024**2, maximum=5 * 1024**3)
    return S3Config(
        endpoint=endpoint,
        region=reader.text(sec, "region", S3Config.region),
        bucket=bucket,
        prefix=prefix,
        access_key_id=key_id,
        secret_access_key=secret,
        object_lock_mode=mode,
        retain_days=retain_days,
        legal_hold=reader.flag(sec, "legal_hold", S3Config.legal_hold),
        multipart_threshold=reader.whole(sec, "multipart_threshold", S3Config.multipart_threshold,
                                         minimum=part_size, maximum=5 * 1024**3),
        part_size=part_size,
        retries=reader.whole(sec, "retries", S3Config.retries, minimum=1, maximum=50),
        timeout=reader.number(sec, "timeout", S3Config.timeout, minimum=0.1),
        staging_directory=reader.path(sec, "staging_directory", state.database.parent / STAGING_DIRECTORY),
    )


def _secret(
    reader: _Reader, env: dict[str, str], key: str, env_name: str, base_dir: Path, section: str = "api"
) -> str:
    """A secret from the config key, ``<key>_file`` or the environment (in that order)."""
    value = reader.text(section, key, "")
    file_value = reader.text(section, f"{key}_file", "")
    if value and file_value:
        raise ConfigError(f"[{section}] set {key} or {key}_file, not both")
    if file_value:
        secret_path = Path(os.path.expandvars(file_value))
        if not secret_path.is_absolute():
            secret_path = base_dir / secret_path
        try:
            value = secret_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[{section}] {key}_file: cannot read {secret_path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"[{section}] {key}_file: {secret_path} is empty")
    return value or env.get(env_name, "").strip()


def _check_layout(layout: str, accounts: int = 1) -> str:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(layout) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"[archive] layout: {exc}") from None
    unknown = names - LAYOUT_FIELDS
    if unknown:
        raise ConfigError(
            f"[archive] layout: unknown field(s) {sorted(unknown)}; allowed: {sorted(LAYOUT_FIELDS)}"
        )
    if "id" not in names or "ext" not in names:
        raise ConfigError("[archive] layout must contain {id} and {ext}")
    if accounts > 1 and "account" not in names:
        raise ConfigError("[archive] layout must contain {account} with several [[accounts]] "
                          f"(each account its own directory), e.g. {default_layout(accounts)!r}")
    if layout.startswith("/") or ".." in layout.split("/") or "\\" in layout:
        raise ConfigError("[archive] layout must be a relative path without '..' or '\\'")
    if not layout.endswith("{id}.{ext}"):
        raise ConfigError("[archive] layout must end with {id}.{ext} (the sidecar is {id}.json beside it)")
    return layout


def _check_listen(listen: str) -> str:
    if not listen:
        return ""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[metrics] listen must be host:port, e.g. 127.0.0.1:9464, got {listen!r}")
    return listen


def _holds_secret(data: dict[str, Any]) -> bool:
    credentials = [body for name, body in data.items() if name in ("api", "state") or name.startswith("accounts ")]
    s3 = data.get("archive.s3", {})
    return any(isinstance(body, dict) and any(body.get(k) for k in ("accesskey", "token", "password"))
               for body in credentials) or (isinstance(s3, dict) and bool(s3.get("secret_access_key")))


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


class _Reader:
    """Typed access to the raw TOML with key-naming errors; tracks unknown keys."""

    def __init__(self, data: dict[str, Any], base_dir: Path) -> None:
        self.data = data
        self.base_dir = base_dir
        self.used: set[tuple[str, str]] = set()
        for section, body in data.items():
            if not isinstance(body, dict):
                raise ConfigError(f"[{section}] must be a table")

    def _get(self, section: str, key: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        """The value at [section] key, the default when absent; ``ok`` decides its type."""
        self.used.add((section, key))
        value = self.data.get(section, {}).get(key)
        if value is None:
            return default
        if not ok(value):
            raise ConfigError(f"[{section}] {key} must be {expected}, got {type(value).__name__}")
        return value

    @staticmethod
    def _within(section: str, key: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise ConfigError(f"[{section}] {key} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"[{section}] {key} must be <= {maximum}, got {value}")

    def text(self, section: str, key: str, default: str) -> str:
        return str(self._get(section, key, default, lambda v: isinstance(v, str), "a string"))

    def flag(self, section: str, key: str, default: bool) -> bool:
        return bool(self._get(section, key, default, lambda v: isinstance(v, bool), "true or false"))

    def number(self, section: str, key: str, default: float, minimum: float | None = None) -> float:
        value = self._get(section, key, default, _is_number, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"[{section}] {key} must be a finite number, got {value}")
        self._within(section, key, value, minimum, None)
        return float(value)

    def whole(
        self, section: str, key: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = int(self._get(section, key, default, _is_whole, "a whole number"))
        self._within(section, key, value, minimum, maximum)
        return value

    def choice(self, section: str, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(section, key, default).lower()
        if value not in choices:
            raise ConfigError(f"[{section}] {key} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def path(self, section: str, key: str, default: Path) -> Path:
        value = self.text(section, key, str(default))
        if not value:
            raise ConfigError(f"[{section}] {key} must not be empty")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def reject_unknown(self) -> None:
        secret_files = {("api", "accesskey_file"), ("api", "token_file"), ("api", "password_file"),
                        ("state", "password_file"),
                        ("archive.s3", "access_key_id_file"), ("archive.s3", "secret_access_key_file")}
        for section, body in self.data.items():
            for key in body:
                if (section, key) not in self.used and (section, key) not in secret_files:
                    raise ConfigError(f"[{section}] unknown key {key!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
