"""Configuration: defaults, validation messages naming the key, credentials, exit code 2."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from archiver.config import build_config, load_config
from archiver.errors import ConfigError
from tests.conftest import REPO, cli_env, run_cli

KEY = "vb_" + "a" * 32


def _cfg(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, env=env or {})


def test_example_config_documents_every_key_and_loads(tmp_path):
    example = (REPO / "config.example.toml").read_text()
    cfg = _cfg(tmp_path, example, env={"VOIPBIN_ACCESSKEY": KEY})
    assert cfg.api.base_url == "https://api.voipbin.net/v1.0"
    assert cfg.api.accesskey == KEY and cfg.api.page_size == 100 and cfg.api.requests_per_second == 8
    assert cfg.api.timeout == 60 and cfg.api.recordingfiles_timeout == 330 and cfg.api.burst == 8
    assert cfg.workers.concurrency == 8 and cfg.workers.poll_interval == 60 and cfg.workers.store_processes == 2
    assert cfg.archive.unpack is False and cfg.archive.settle_window == 3600
    assert cfg.api.login_url == "https://api.voipbin.net/auth/login"
    # every key the loader knows appears in the example (commented or not)
    data = tomllib.loads(example)
    for section in ("api", "archive", "state", "workers", "logging"):
        assert section in data


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    cfg = _cfg(tmp_path, f'[api]\naccesskey="{KEY}"\n[archive]\ndirectory="rec"\n[state]\ndatabase="s.db"\n')
    assert cfg.archive.directory == tmp_path / "rec"
    assert cfg.state.database == tmp_path / "s.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\n", "no credential"),
        (f'[api]\naccesskey="{KEY}"\ntoken="eyJx"\n', "exactly one credential kind"),
        (f'[api]\naccesskey="{KEY}"\nbase_url="http://api.example.com/v1.0"\n', "plain http is refused"),
        (f'[api]\naccesskey="{KEY}"\nbase_url="ftp://x"\n', "base_url"),
        (f'[api]\naccesskey="{KEY}"\npage_size=0\n', "[api] page_size must be >= 1"),
        (f'[api]\naccesskey="{KEY}"\npage_size="ten"\n', "[api] page_size must be a whole number"),
        (f'[api]\naccesskey="{KEY}"\nbogus=1\n', "[api] unknown key 'bogus'"),
        (f'[api]\naccesskey="{KEY}"\n[nope]\nx=1\n', "unknown section"),
        (f'[api]\naccesskey="{KEY}"\n[workers]\nconcurrency=0\n', "[workers] concurrency"),
        (f'[api]\naccesskey="{KEY}"\n[workers]\nstore_processes=0\n', "[workers] store_processes must be >= 1"),
        (f'[api]\naccesskey="{KEY}"\n[workers]\nstore_processes=64\n', "[workers] store_processes must be <= 32"),
        (f'[api]\naccesskey="{KEY}"\n[archive]\nlayout="../{{id}}.{{ext}}"\n', "[archive] layout"),
        (f'[api]\naccesskey="{KEY}"\n[archive]\nlayout="{{year}}/{{name}}.{{ext}}"\n', "unknown field"),
        (f'[api]\naccesskey="{KEY}"\n[archive]\nunpack="yes"\n', "[archive] unpack must be true or false"),
        ('[api]\nusername="u"\n', "username and password must be set together"),
        (f'[api]\naccesskey="{KEY}"\n[logging]\nlevel="loud"\n', "[logging] level"),
        ("[api\n", "not valid TOML"),
        (f'[api]\nacesskey="{KEY}"\n', "unknown key 'acesskey' (did you mean accesskey?)"),
        ('[api]\ntoken_fiel="/etc/key"\n', "unknown key 'token_fiel' (did you mean token_file?)"),
        (f'[api]\naccesskey="{KEY}"\n[workers]\npoll_interval=inf\n', "[workers] poll_interval must be a finite"),
        (f'[api]\naccesskey="{KEY}"\ntimeout=nan\n', "[api] timeout must be a finite number, got nan"),
        (f'[api]\naccesskey="{KEY}"\nrequests_per_second=nan\n', "[api] requests_per_second must be a finite"),
        (f'[api]\naccesskey="{KEY}"\n[retention]\ndelete_after=-inf\n', "[retention] delete_after must be"),
        (f'[api]\naccesskey="{KEY}"\n[retention]\nstore_warn_ratio=2\n', "store_warn_ratio must be <= 1"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as err:
        _cfg(tmp_path, text)
    assert message in str(err.value)


def test_loopback_http_is_allowed_and_credentials_come_from_env_or_file(tmp_path):
    env = {"VOIPBIN_TOKEN": "eyJabc"}
    cfg = _cfg(tmp_path, '[api]\nbase_url="http://127.0.0.1:9/v1.0"\n', env=env)
    assert cfg.api.token == "eyJabc" and cfg.api.credential_kind == "token"
    (tmp_path / "key").write_text(KEY + "\n")
    cfg = _cfg(tmp_path, '[api]\naccesskey_file="key"\n')
    assert cfg.api.accesskey == KEY
    with pytest.raises(ConfigError, match="accesskey_file"):
        _cfg(tmp_path, '[api]\naccesskey_file="missing"\n')


def test_build_config_defaults():
    cfg = build_config({"api": {"accesskey": KEY}}, base_dir=Path("/x"), env={})
    assert cfg.state.database == Path("/var/lib/voipbin-archiver/state.sqlite3")
    assert cfg.archive.layout == "{year}/{month}/{day}/{id}.{ext}"


async def test_cli_config_errors_exit_2(tmp_path):
    missing = await run_cli("--config", str(tmp_path / "nope.toml"), "status")
    assert missing.rc == 2 and "config file not found" in missing.err
    bad = tmp_path / "bad.toml"
    bad.write_text("[api]\npage_size = 5\n")
    result = await run_cli("--config", str(bad), "backfill")
    assert result.rc == 2 and "no credential" in result.err
    usage = await run_cli("frobnicate")
    assert usage.rc == 2
    nan = tmp_path / "nan.toml"
    nan.write_text(f'[api]\naccesskey="{KEY}"\nrequests_per_second = nan\n')
    result = await run_cli("--config", str(nan), "backfill")
    assert result.rc == 2 and "requests_per_second must be a finite number" in result.err
    assert "Traceback" not in result.err


async def test_config_path_from_environment(tmp_path):
    path = tmp_path / "elsewhere.toml"
    path.write_text(f'[api]\naccesskey="{KEY}"\n[state]\ndatabase="s.db"\n')
    result = await run_cli("status", "--json", env=cli_env(VOIPBIN_ARCHIVER_CONFIG=str(path)))
    assert result.rc == 0, result
    assert '"archived": 0' in result.out


async def test_world_readable_config_with_a_secret_is_warned_about(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[api]\naccesskey="{KEY}"\n[state]\ndatabase="s.db"\n')
    path.chmod(0o644)
    result = await run_cli("--config", str(path), "status")
    assert "config_world_readable" in result.err
    assert KEY not in result.err + result.out


S3 = f'[api]\naccesskey="{KEY}"\n[archive]\ndestination="s3"\n[archive.s3]\nbucket="rec"\n'
S3_KEYS = 'access_key_id="AKIA0000"\nsecret_access_key="s3cr3t-s3cr3t"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (S3 + S3_KEYS + 'endpoint="http://s3.example.com"\n', "[archive.s3] endpoint: plain http is refused"),
        (S3 + S3_KEYS + 'endpoint="https://s3.example.com/bucket"\n', "without a path"),
        (S3, "[archive.s3] access_key_id and secret_access_key must be set"),
        (S3 + S3_KEYS + 'object_lock_mode="FOREVER"\n', "object_lock_mode must be"),
        (S3 + S3_KEYS + 'object_lock_mode="COMPLIANCE"\n', "retain_days must be > 0"),
        (S3 + S3_KEYS + "retain_days=30\n", "retain_days needs object_lock_mode"),
        (S3 + S3_KEYS + "part_size=1024\n", "[archive.s3] part_size must be >="),
        (S3 + S3_KEYS + 'prefix="../up"\n', "[archive.s3] prefix must be relative"),
        (S3 + S3_KEYS + "bogus=1\n", "[archive.s3] unknown key 'bogus'"),
        (S3.replace('bucket="rec"\n', "") + S3_KEYS, "[archive.s3] bucket must be set"),
        (S3.replace('destination="s3"\n', 'directory="x"\n') + S3_KEYS, 'destination is not "s3"'),
        (S3.replace('destination="s3"\n', 'destination="s3"\ndirectory="x"\n') + S3_KEYS, "staging_directory"),
        (S3.replace('destination="s3"\n', 'destination="s3"\nunpack=true\n') + S3_KEYS, "unpack = true is for"),
        (S3.replace('"s3"', '"tape"') + S3_KEYS, "[archive] destination must be one of directory, s3"),
    ],
)
def test_invalid_s3_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, text)
    assert message in str(err.value)


def test_s3_config_defaults_secrets_from_env_or_file_and_redaction(tmp_path):
    cfg = _cfg(tmp_path, S3 + 'object_lock_mode="compliance"\nretain_days=2555\nprefix="voipbin"\n',
               env={"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "from-the-env"})
    s3 = cfg.archive.s3
    assert s3 is not None and s3.access_key_id == "AKIAENV" and s3.secret_access_key == "from-the-env"
    assert s3.object_lock_mode == "COMPLIANCE" and s3.retain_days == 2555 and s3.prefix == "voipbin/"
    assert s3.multipart_threshold == 64 * 1024**2 and s3.endpoint == "https://s3.amazonaws.com"
    assert cfg.archive.directory == cfg.state.database.parent / "s3-staging" == s3.staging_directory
    assert cfg.workers.store_processes == 1, "a bucket's helpers only verify and stage"
    assert "from-the-env" not in repr(cfg), "secrets stay out of repr (and so out of tracebacks)"
    (tmp_path / "secret").write_text("from-a-file\n")
    cfg = _cfg(tmp_path, S3 + 'access_key_id="AKIA1"\nsecret_access_key_file="secret"\n[workers]\nstore_processes=3\n')
    assert cfg.workers.store_processes == 3, "set, it is kept"
    assert cfg.archive.s3 is not None and cfg.archive.s3.secret_access_key == "from-a-file"


def _example_keys() -> dict[str, dict[str, object]]:
    """Every key ``config.example.toml`` shows, set or commented out, by section, with its value."""
    import re

    sections: dict[str, dict[str, object]] = {}
    current = ""
    for line in (REPO / "config.example.toml").read_text().splitlines():
        header = re.fullmatch(r"(?:# )?\[\[?([a-z0-9.]+)\]\]?", line.strip())
        if header:
            current = header.group(1)
            sections.setdefault(current, {})
            continue
        key = re.match(r"(?:# )?([a-z][a-z0-9_]*) = (.+)$", line)
        if key and current:
            assert key.group(1) not in sections[current], f"[{current}] {key.group(1)} is shown twice"
            sections[current][key.group(1)] = tomllib.loads(f"v = {key.group(2)}")["v"]
    return sections


def test_the_example_shows_every_key_of_the_schema_with_its_default_and_nothing_else():
    """One schema (the ``setting()`` fields in config.py): the example must agree with it, key
    for key and default for default; a key added, renamed or re-defaulted on one side fails here."""
    from archiver.config import (
        ApiConfig,
        ArchiveConfig,
        LoggingConfig,
        MetricsConfig,
        RetentionConfig,
        S3Config,
        StateConfig,
        WorkersConfig,
        config_keys,
    )

    schema = {"api": ApiConfig, "archive": ArchiveConfig, "archive.s3": S3Config, "state": StateConfig,
              "workers": WorkersConfig, "retention": RetentionConfig, "logging": LoggingConfig,
              "metrics": MetricsConfig}
    shown = _example_keys()
    assert set(shown) == {*schema, "accounts"}, sorted(shown)
    for section, cls in schema.items():
        expected: dict[str, object] = {}
        for spec in config_keys(cls):
            default = str(spec.default) if isinstance(spec.default, Path) else spec.default
            default = list(default) if isinstance(default, tuple) else default  # a TOML array
            expected[spec.name] = default
            if spec.metadata["secret"]:
                expected[f"{spec.name}_file"] = ""
        assert set(shown[section]) == set(expected), (section, set(shown[section]) ^ set(expected))
        for key, default in expected.items():
            assert shown[section][key] == default, f"[{section}] {key}: the example shows {shown[section][key]!r}, " \
                                                   f"the schema's default is {default!r}"
    credentials = {"accesskey", "accesskey_file", "token", "token_file", "username", "password", "password_file"}
    assert set(shown["accounts"]) <= {"name", "requests_per_second", "burst", *credentials}


def test_errors_name_the_file_as_well_as_the_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _cfg(tmp_path, f'[api]\naccesskey="{KEY}"\n[workers]\nconcurrency=0\n')
    assert str(exc.value).startswith(f"{tmp_path / 'config.toml'}: [workers] concurrency must be >= 1")
