"""Load and validate the TOML configuration.

The schema is declared once, here: each key is a dataclass field made with ``setting()``, which
holds its default, its bounds and its allowed values; the reader takes the key's type from the
field's annotation, so the types, the defaults and the error messages all come from that one
place (``config.example.toml`` shows every key with the same default: ``tests/test_config.py``
fails when the two disagree). Rules between keys (one credential kind, a lock mode with its
retention, ...) are code below the schema. Every error names the key and the file.
Relative paths resolve against the directory of the config file.

Why dataclasses and not pydantic or msgspec: the per-key part is small (a type, a default, a
range or a set of values), the rules between keys are most of the work and are plain code
either way, and the embedded default must need nothing but Python and the daemon's own
libraries.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
import stat
import string
import tomllib
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .errors import ConfigError

DEFAULT_BASE_URL = "https://api.voipbin.net/v1.0"
DEFAULT_LAYOUT = "{year}/{month}/{day}/{id}.{ext}"
DEFAULT_ACCOUNT = "default"  # the one account of a config without [[accounts]] (and of state before v5)
LOCK_MODES = ("", "GOVERNANCE", "COMPLIANCE")
STAGING_DIRECTORY = "s3-staging"  # [archive.s3] staging_directory: this, beside the state database
LAYOUT_FIELDS = {"year", "month", "day", "hour", "id", "ext", "reference_type", "account"}
ACCOUNT_NAME = re.compile(r"[a-z0-9-]{1,32}")


def setting(
    default: Any, *, minimum: float | None = None, maximum: float | None = None, choices: tuple[str, ...] = (),
    derived: str = "", secret: bool = False, show: bool = True,
) -> Any:
    """A configuration key: its default and what it accepts, stated once. ``derived``: when the
    key is absent, the value comes from another (it says which) instead of ``default``;
    ``secret``: also read from ``<key>_file`` and never shown (``repr``)."""
    return field(default=default, repr=show and not secret, metadata={
        "key": True, "minimum": minimum, "maximum": maximum, "choices": choices, "derived": derived,
        "secret": secret,
    })


def config_keys(cls: type) -> list[Field[Any]]:
    """The fields of a config section that are keys of the file (not computed ones)."""
    return [f for f in fields(cls) if f.metadata.get("key")]


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = setting(DEFAULT_BASE_URL)
    accesskey: str = setting("", secret=True)
    token: str = setting("", secret=True)
    username: str = setting("")
    password: str = setting("", secret=True)
    login_url: str = setting("", derived="<scheme://host of base_url>/auth/login")
    page_size: int = setting(100, minimum=1, maximum=100)
    # about half the customer's 16.7/s: the budget is shared with the customer's other integrations
    requests_per_second: float = setting(8.0, minimum=0)
    burst: int = setting(8, minimum=1, derived="requests_per_second")
    timeout: float = setting(60.0, minimum=0.1)
    # the server builds the ZIP while we wait, up to its own 300 s
    recordingfiles_timeout: float = setting(330.0, minimum=0.1)
    # fetch a recent recording's channel files from GET /storage_files' signed URLs (no API budget)
    storage_listing: bool = setting(True)
    # bytes/s a storage transfer must keep up over transfer_rate_window
    min_transfer_rate: float = setting(1024.0, minimum=0)
    transfer_rate_window: float = setting(30.0, minimum=0.1)
    max_retries: int = setting(5, minimum=0, maximum=50)
    retry_base: float = setting(0.5, minimum=0)
    retry_max: float = setting(30.0, minimum=0)

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
    destination: str = setting("directory", choices=("directory", "s3"))
    s3: S3Config | None = None  # [archive.s3], with destination = "s3"
    directory: Path = setting(Path("/var/lib/voipbin-archiver/recordings"))
    layout: str = setting(DEFAULT_LAYOUT, derived="with several [[accounts]]: {account}/ + the default")
    unpack: bool = setting(False)
    settle_window: float = setting(3600.0, minimum=0)
    max_members: int = setting(1000, minimum=1)
    max_member_bytes: int = setting(4 * 1024**3, minimum=1)
    max_total_bytes: int = setting(16 * 1024**3, minimum=1)
    max_ratio: float = setting(1000.0, minimum=1)
    call_metadata: bool = setting(True)  # walk GET /calls: who spoke to whom, for find and the sidecar
    transcripts: bool = setting(False)  # fetch each archived recording's transcripts: <id>.transcript.json
    # the signed manifest (manifest.py): off without a key; `voipbin-archiver keygen --out FILE` makes one
    signing_key_file: str = setting("")
    manifest_interval: float = setting(3600.0, minimum=0.1)  # at most one segment per this many seconds
    # days a recording is kept in the archive from its tm_start (0: forever); `expire` removes older ones
    keep_days: int = setting(0, minimum=0, maximum=36500)
    # age X25519 recipients ("age1..."): every body and sidecar encrypted to them (seal.py); empty: none
    encrypt_to: tuple[str, ...] = setting(())
    temp_tag: str = ""  # set by the daemon when its state is shared (layout.set_temp_tag)


@dataclass(frozen=True)
class StateConfig:
    database: Path = setting(Path("/var/lib/voipbin-archiver/state.sqlite3"))
    url: str = setting("", show=False)  # postgresql://...: the shared state instead of SQLite
    password: str = setting("", secret=True)  # for url: password_file or env PGPASSWORD
    # seconds a claimed recording stays ours without a heartbeat (url only); renewed every lease/3,
    # so a claim survives two missed renewals (a 30 s database stall) and a dead daemon's work
    # is taken over within 45 s plus one feeder round: under a minute
    lease: float = setting(45.0, minimum=1)


@dataclass(frozen=True)
class S3Config:
    """``[archive.s3]``: the bucket a ``destination = "s3"`` archive goes to."""

    endpoint: str = setting("https://s3.amazonaws.com")
    region: str = setting("us-east-1")
    bucket: str = setting("")  # required
    prefix: str = setting("")  # then the layout template
    access_key_id: str = setting("", secret=True)
    secret_access_key: str = setting("", secret=True)
    object_lock_mode: str = setting("", choices=LOCK_MODES)
    retain_days: int = setting(0, minimum=0, maximum=36500)  # with a lock mode: retain until archive time + this
    legal_hold: bool = setting(False)
    # bodies above this go multipart (and it is at least part_size)
    multipart_threshold: int = setting(64 * 1024**2, maximum=5 * 1024**3)
    part_size: int = setting(16 * 1024**2, minimum=5 * 1024**2, maximum=5 * 1024**3)  # S3's minimum is 5 MiB
    # tries per request (ours: a PUT is HEAD-checked before a resend), then the bucket is down
    retries: int = setting(5, minimum=1, maximum=50)
    timeout: float = setting(60.0, minimum=0.1)
    # bodies over 1 MB in transit
    staging_directory: Path = setting(StateConfig.database.parent / STAGING_DIRECTORY,
                                      derived=f"{STAGING_DIRECTORY} beside [state] database")

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key_id, self.secret_access_key) if s]


# Store helpers per destination: a directory's do the fsyncs and renames too; a bucket's only
# verify and stage (the gateway's round trips set the pace), so one saves ~25 MB and no time.
STORE_PROCESSES = {"directory": 2, "s3": 1}


@dataclass(frozen=True)
class WorkersConfig:
    concurrency: int = setting(8, minimum=1, maximum=256)
    store_processes: int = setting(STORE_PROCESSES["directory"], minimum=1, maximum=32,
                                   derived=f"by destination: {STORE_PROCESSES}")
    poll_interval: float = setting(60.0, minimum=0.01)
    pending_timeout: float = setting(86400.0, minimum=0)
    poll_backoff_min: float = setting(5.0, minimum=0.01)
    poll_backoff_max: float = setting(300.0, minimum=0.01)
    max_attempts: int = setting(10, minimum=1)
    retry_backoff_min: float = setting(10.0, minimum=0)
    retry_backoff_max: float = setting(3600.0, minimum=0)
    full_rewalk_interval: float = setting(86400.0, minimum=0)
    overlap: int = setting(10, minimum=0)
    # service: pause after a refused credential/account or an unwritable archive
    trouble_pause: float = setting(60.0, minimum=0.1)


@dataclass(frozen=True)
class RetentionConfig:
    delete_from_server: bool = setting(False)  # opt in: deleting the server's copy is irreversible
    delete_after: float = setting(604800.0, minimum=0)  # seconds after archiving (7 days); 0 = once safe
    delete_incomplete: bool = setting(False)  # also delete recordings archived flagged incomplete or damaged
    store_warn_ratio: float = setting(0.8, minimum=0, maximum=1)
    store_capacity: int = setting(10 * 1024**3, minimum=1)  # the server's cap per customer (10 GB)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = setting("info", choices=("debug", "info", "warning", "error"))
    format: str = setting("auto", choices=("auto", "json", "console"))
    progress_interval: float = setting(10.0, minimum=0)  # backfill off a terminal: a "progress" event; 0 = off


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = setting("")  # "host:port" for /metrics and /healthz; empty = off


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
    try:
        return build_config(data, base_dir=path.resolve().parent, env=env, path=path)
    except ConfigError as exc:  # every error names the file as well as the key
        raise ConfigError(f"{path}: {exc}") from None


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
    destination = reader.key("archive", ArchiveConfig, "destination")
    s3 = _build_s3(reader, env, base_dir, state) if destination == "s3" else None
    if s3 is None and "archive.s3" in data:
        raise ConfigError('[archive.s3] is set but [archive] destination is not "s3"')
    if s3 is not None and "directory" in data.get("archive", {}):
        raise ConfigError('[archive] directory is for destination = "directory"; with "s3", transfers are '
                          "staged in [archive.s3] staging_directory")
    archive = ArchiveConfig(
        **reader.keys("archive", ArchiveConfig,
                      skip=("destination", "directory", "layout", "signing_key_file", "encrypt_to")),
        encrypt_to=_recipients(reader),
        signing_key_file=_optional_path(reader.key("archive", ArchiveConfig, "signing_key_file"), base_dir),
        destination=destination,
        s3=s3,
        directory=s3.staging_directory if s3 else reader.key("archive", ArchiveConfig, "directory"),
        layout=_check_layout(reader.key("archive", ArchiveConfig, "layout", default_layout(len(accounts))),
                             len(accounts)),
    )
    if s3 is not None and archive.keep_days and s3.object_lock_mode and archive.keep_days < s3.retain_days:
        raise ConfigError(f"[archive] keep_days = {archive.keep_days} is shorter than the bucket's lock "
                          f"([archive.s3] retain_days = {s3.retain_days}): nothing could be removed when it is due")
    if s3 is not None and archive.keep_days and s3.legal_hold:
        raise ConfigError("[archive] keep_days: [archive.s3] legal_hold = true holds every object for good, so "
                          "nothing could expire; hold single recordings with `voipbin-archiver hold add` instead")
    if archive.encrypt_to and archive.unpack:
        raise ConfigError("[archive] unpack = true would leave the members in plain audio beside the encrypted "
                          "body: with encrypt_to, keep unpack = false")
    if s3 is not None and archive.unpack:
        raise ConfigError('[archive] unpack = true is for destination = "directory" (in a bucket, the ZIP object '
                          "holds its members)")
    workers = WorkersConfig(**reader.keys("workers", WorkersConfig, store_processes=STORE_PROCESSES[destination]))
    retention = RetentionConfig(**reader.keys("retention", RetentionConfig))
    logging_cfg = LoggingConfig(**reader.keys("logging", LoggingConfig))
    metrics = MetricsConfig(listen=_check_listen(reader.key("metrics", MetricsConfig, "listen")))
    reader.reject_unknown()
    warnings = []
    if path is not None and _holds_secret(data) and _world_readable(path):
        warnings.append(f"config_world_readable: {path} holds a credential; chmod 600 it or use accesskey_file")
    return Config(
        api=api, archive=archive, state=state, workers=workers, retention=retention, logging=logging_cfg,
        metrics=metrics, accounts=accounts, path=path,
        warnings=tuple(warnings),
    )


def _recipients(reader: _Reader) -> tuple[str, ...]:
    """``[archive] encrypt_to``: a list of age recipients, each checked now (a malformed one
    stops the start, named, before anything is archived)."""
    value = reader._get("archive", "encrypt_to", [], lambda v: isinstance(v, list) and all(
        isinstance(x, str) for x in v), 'a list of age recipients (["age1..."])')
    if value:  # (pyrage is imported only for an archive that encrypts)
        from .seal import recipients_of

        recipients_of(value)
    if len(set(value)) != len(value):
        raise ConfigError("[archive] encrypt_to names a recipient twice")
    return tuple(value)


def _optional_path(value: str, base_dir: Path) -> str:
    """A file key that may be left empty (off), resolved against the config's directory."""
    if not value:
        return ""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def _build_api(reader: _Reader, env: dict[str, str], base_dir: Path, need_credential: bool = True) -> ApiConfig:
    base_url = reader.key("api", ApiConfig, "base_url").rstrip("/")
    parts = _check_url("api", "base_url", base_url)
    if need_credential:
        accesskey, token, username, password = _credential(reader, env, base_dir, "api")
    else:
        found = [key for key in _CREDENTIAL_KEYS if reader.data.get("api", {}).get(key)]
        if found:
            raise ConfigError(f"[api] {found[0]}: with [[accounts]], each account has its own credential; "
                              "move it into an [[accounts]] entry")
        accesskey = token = username = password = ""

    login_url = reader.key("api", ApiConfig, "login_url") or f"{parts.scheme}://{parts.netloc}/auth/login"
    rps = reader.key("api", ApiConfig, "requests_per_second")
    return ApiConfig(
        **reader.keys("api", ApiConfig, skip=("base_url", "username", "login_url", "requests_per_second"),
                      burst=max(1, int(rps))),
        base_url=base_url, accesskey=accesskey, token=token, username=username, password=password,
        login_url=login_url, requests_per_second=rps,
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
    rps = reader.key(section_label, ApiConfig, "requests_per_second", api.requests_per_second)
    burst = reader.key(section_label, ApiConfig, "burst",
                       max(1, int(rps)) if rps != api.requests_per_second else api.burst)
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
    database = reader.key("state", StateConfig, "database")
    url = reader.key("state", StateConfig, "url")
    lease = reader.key("state", StateConfig, "lease")
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



def _build_s3(reader: _Reader, env: dict[str, str], base_dir: Path, state: StateConfig) -> S3Config:
    sec = "archive.s3"
    values = reader.keys(sec, S3Config, staging_directory=state.database.parent / STAGING_DIRECTORY)
    endpoint = values["endpoint"] = values["endpoint"].rstrip("/")
    if _check_url(sec, "endpoint", endpoint).path not in ("", "/"):
        raise ConfigError(f"[{sec}] endpoint must be an https:// URL without a path, got {endpoint!r}")
    if not values["bucket"]:
        raise ConfigError(f"[{sec}] bucket must be set")
    prefix = values["prefix"]
    if prefix.startswith("/") or "\\" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ConfigError(f"[{sec}] prefix must be relative, without '.', '..' or '\\', got {prefix!r}")
    if prefix and not prefix.endswith("/"):
        values["prefix"] = prefix + "/"
    key_id = _secret(reader, env, "access_key_id", "AWS_ACCESS_KEY_ID", base_dir, sec)
    secret = _secret(reader, env, "secret_access_key", "AWS_SECRET_ACCESS_KEY", base_dir, sec)
    if not key_id or not secret:
        raise ConfigError(f"[{sec}] access_key_id and secret_access_key must be set (or their _file, or env "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    mode, retain_days = values["object_lock_mode"], values["retain_days"]
    if mode and not retain_days:
        raise ConfigError(f"[{sec}] retain_days must be > 0 with object_lock_mode = {mode!r}")
    if retain_days and not mode:
        raise ConfigError(f'[{sec}] retain_days needs object_lock_mode ("GOVERNANCE" or "COMPLIANCE")')
    if values["multipart_threshold"] < values["part_size"]:
        raise ConfigError(f"[{sec}] multipart_threshold must be >= part_size ({values['part_size']}), "
                          f"got {values['multipart_threshold']}")
    return S3Config(**values, access_key_id=key_id, secret_access_key=secret)


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

    def number(
        self, section: str, key: str, default: float, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        value = self._get(section, key, default, _is_number, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"[{section}] {key} must be a finite number, got {value}")
        self._within(section, key, value, minimum, maximum)
        return float(value)

    def whole(
        self, section: str, key: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = int(self._get(section, key, default, _is_whole, "a whole number"))
        self._within(section, key, value, minimum, maximum)
        return value

    def choice(self, section: str, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``, in any case (and then spelt as the choice is)."""
        value = self.text(section, key, default)
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        shown = ", ".join(c or '""' for c in choices)
        raise ConfigError(f"[{section}] {key} must be one of {shown}, got {value!r}")

    def key(self, section: str, cls: type, name: str, default: Any = MISSING) -> Any:
        """Schema key ``name`` of ``cls`` (a ``setting()`` field) read from [section] and checked as
        its field says; ``default`` stands in for the field's own (a derived default)."""
        spec = {f.name: f for f in config_keys(cls)}[name]
        meta = spec.metadata
        if default is MISSING:
            default = spec.default
        kind = _key_types(cls)[name]
        if meta["choices"]:
            return self.choice(section, name, default, meta["choices"])
        if kind is bool:
            return self.flag(section, name, default)
        if kind is int:
            return self.whole(section, name, default, meta["minimum"], meta["maximum"])
        if kind is float:
            return self.number(section, name, default, meta["minimum"], meta["maximum"])
        if kind is Path:
            return self.path(section, name, default)
        return self.text(section, name, default)

    def keys(self, section: str, cls: type, skip: tuple[str, ...] = (), **defaults: Any) -> dict[str, Any]:
        """Every key of ``cls`` but the secrets and ``skip``, read from [section]; ``defaults``
        are the derived ones, by name."""
        return {f.name: self.key(section, cls, f.name, defaults.get(f.name, MISSING))
                for f in config_keys(cls) if not f.metadata["secret"] and f.name not in skip}

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


@functools.cache
def _key_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
