"""The redaction processor: the last step before rendering, so no secret reaches a log line."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os

import structlog

from archiver.logs import LogSink, configure_logging, redact, register_secret
from tests.checks import assert_archive_complete
from tests.conftest import cli_command, cli_env, write_config


def test_redact_removes_credentials_from_urls_headers_and_known_values():
    register_secret("vb_0123456789abcdef0123456789abcdef")
    text = (
        "GET https://api.voipbin.net/v1.0/recordings?page_size=100&accesskey=vb_0123456789abcdef0123456789abcdef"
        " token=eyJhbGciOi.abc.def Authorization: Bearer eyJhbGciOi.abc.def"
        " https://storage.googleapis.com/b/o?X-Goog-Signature=deadbeef&X-Goog-Expires=900"
        ' {"password": "hunter2"} vb_0123456789abcdef0123456789abcdef'
    )
    out = redact(text)
    for secret in ("vb_0123456789abcdef0123456789abcdef", "eyJhbGciOi", "deadbeef", "hunter2"):
        assert secret not in out
    assert "page_size=100" in out and "X-Goog-Expires=900" in out  # the rest stays readable


def test_each_pattern_is_redacted_on_its_own():
    """Each pattern runs only where its literal part occurs: every one alone, in any case."""
    cases = {
        "/recordings?AccessKey=s3cr3t-alone": "s3cr3t-alone",
        "Authorization: BEARER eyJ.alone.sig": "eyJ.alone",
        "authorization: bEaReR\teyJ.tab.sig": "eyJ.tab",
        '{"Password":"hunter-alone"}': "hunter-alone",
    }
    for text, secret in cases.items():
        assert secret not in redact(text), text
    assert redact("2026/12/03/0b1c.zip") == "2026/12/03/0b1c.zip"


def test_the_processor_redacts_every_field_and_exceptions():
    register_secret("s3cr3t-token-value")
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("t")
    try:
        raise RuntimeError("request to /x?token=s3cr3t-token-value failed")
    except RuntimeError:
        log.exception("boom", url="/y?accesskey=s3cr3t-token-value", nested={"h": ["Bearer s3cr3t-token-value"]})
    line = stream.getvalue()
    assert "s3cr3t-token-value" not in line
    event = json.loads(line)
    assert event["event"] == "boom" and "REDACTED" in event["url"] and "RuntimeError" in event["exception"]


async def test_a_backfill_whose_log_stream_broke_archives_everything_and_exits(tmp_path, make_sim):
    """stderr a pipe nobody reads any more (a `| head` gone, journald restarted): each log line
    would raise EPIPE in the task that logs it. Such a backfill once ended with exit 1 (and
    `demo | head` hung, deaf to SIGTERM); now the lines are dropped and the run ends as it would have."""
    sim = await make_sim(recordings=30, audio_bytes=4000)
    cfg = write_config(tmp_path, sim)
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails with EPIPE
    try:
        proc = await asyncio.create_subprocess_exec(
            *cli_command("--config", str(cfg), "--log-level", "debug", "backfill", "--wait", "30"),
            stdout=asyncio.subprocess.DEVNULL, stderr=write_end, env=cli_env())
    finally:
        os.close(write_end)
    try:
        rc = await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the backfill hung once its stderr broke") from None
    assert rc == 0
    assert_archive_complete(sim, tmp_path / "archive", tmp_path / "state.sqlite3")


def test_a_log_sink_gives_up_on_a_broken_pipe_but_tries_again_after_a_full_disk():
    class Stream:
        def __init__(self, error: OSError) -> None:
            self.error, self.lines = error, []

        def write(self, text: str) -> int:
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            self.lines.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    full = Stream(OSError(errno.ENOSPC, "No space left on device"))
    sink = LogSink(full)
    assert sink.write("lost\n") == 5 and sink.write("kept\n") == 5
    assert full.lines == ["kept\n"] and not sink.broken
    gone = Stream(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    sink = LogSink(gone)
    sink.write("lost\n")
    sink.write("dropped too\n")
    assert gone.lines == [] and sink.broken
