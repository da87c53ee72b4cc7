"""The service as systemd and Prometheus see it: notify protocol, /metrics, /healthz, progress."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import aiohttp

from archiver.notify import Notifier
from tests.conftest import cli_command, cli_env, free_port, http_get, run_cli, wait_until, write_config


async def test_notify_ready_status_watchdog_stopping(tmp_path, make_sim):
    sim = await make_sim(recordings=20, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    async def receive():
        while True:
            messages.append((await loop.sock_recv(sock, 4096)).decode())

    receiver = asyncio.create_task(receive())
    env = cli_env(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=env)
    try:
        def seen(prefix: str) -> bool:
            return any(m.startswith(prefix) for m in messages)

        await wait_until(lambda: seen("READY=1") and seen("STATUS=") and seen("WATCHDOG=1"), 20, "notify messages")
        await wait_until(lambda: any("archived 20" in m for m in messages), 20, "STATUS with progress")
        assert not seen("STOPPING=1")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        await wait_until(lambda: seen("STOPPING=1"), 5, "STOPPING=1")
    finally:
        if proc.returncode is None:
            proc.kill()
        receiver.cancel()
        sock.close()
        log_file.close()
    assert proc.returncode == 0
    assert messages.index("READY=1") < messages.index("STOPPING=1")


def test_notifier_is_a_no_op_without_a_socket():
    n = Notifier(None)
    assert not n.enabled
    n.send("READY=1")  # must not raise


async def test_metrics_and_healthz_over_http(tmp_path, make_sim):
    sim = await make_sim(recordings=15, audio_bytes=2000)
    port = free_port()
    cfg = write_config(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"})
    log_file = open(tmp_path / "run.log", "wb")
    proc = await asyncio.create_subprocess_exec(*cli_command("--config", str(cfg), "run"),
                                                stdout=log_file, stderr=log_file, env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, str]:
                return await http_get(http, base + path)

            state = {"metrics": ""}

            async def poll_metrics() -> None:
                while 'voipbin_archiver_recordings{state="archived"} 15.0' not in state["metrics"]:
                    state["metrics"] = (await get("/metrics"))[1]
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(poll_metrics(), 20)
            text = state["metrics"]
            assert "voipbin_archiver_archived_bytes_total" in text
            assert "voipbin_archiver_download_seconds_bucket" in text
            assert "voipbin_archiver_last_successful_cycle_timestamp_seconds" in text
            assert (await get("/healthz"))[0] == 200
            sim.revoked = True  # the credential is refused from now on

            async def until_unhealthy() -> str:
                while True:
                    status, body = await get("/healthz")
                    if status == 503:
                        return body
                    await asyncio.sleep(0.05)

            body = await asyncio.wait_for(until_unhealthy(), 20)
            assert "the API refuses us" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        log_file.close()
    assert proc.returncode == 0
    log_text = (tmp_path / "run.log").read_text()
    assert "credential_refused" in log_text and sim.accesskey not in log_text


async def test_backfill_logs_progress_and_status_prints_a_table(tmp_path, make_sim):
    sim = await make_sim(recordings=10, audio_bytes=2000)
    cfg = write_config(tmp_path, sim)
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert result.rc == 0, result
    events = [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]
    archived = [e for e in events if e["event"] == "archived"]
    assert len(archived) == 10
    assert all({"recording_id", "attempt", "seconds", "bytes"} <= set(e) for e in archived)
    assert any(e["event"] == "backfill_done" for e in events)
    table = await run_cli("--config", str(cfg), "status")
    assert table.rc == 0
    assert "archived" in table.out and "10" in table.out and "oldest pending" in table.out


async def test_backfill_off_a_terminal_logs_progress_events(tmp_path, make_sim):
    # 40 recordings x 2 requests x 50 ms over 2 workers: about 2 s, several 0.3 s intervals
    sim = await make_sim(recordings=40, audio_bytes=2000, latency=0.05)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 2}, logging={"progress_interval": 0.3})
    result = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert result.rc == 0, result
    events = [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, result
    assert all({"pages", "known", "archived", "waiting", "failed", "mb_per_s", "eta_s"} <= set(e) for e in progress)
    archived = [e["archived"] for e in progress]
    assert archived == sorted(archived) and archived[-1] <= 40

    (tmp_path / "quiet").mkdir()
    cfg = write_config(tmp_path / "quiet", sim, workers={"concurrency": 2}, logging={"progress_interval": 0})
    quiet = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert quiet.rc == 0, quiet
    assert '"progress"' not in quiet.err


async def test_backfill_on_a_terminal_shows_a_live_progress_line(tmp_path, make_sim):
    import os
    import pty

    sim = await make_sim(recordings=40, audio_bytes=2000, latency=0.01)
    cfg = write_config(tmp_path, sim, workers={"concurrency": 2})
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *cli_command("--config", str(cfg), "backfill", "--wait", "1"),
        stdout=asyncio.subprocess.PIPE, stderr=slave, env=cli_env(),
    )
    os.close(slave)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.returncode == 0
    text = screen.decode(errors="replace")
    assert "\r\x1b[K" in text and "ETA" in text and "archived" in text, text[-500:]
    assert '"event"' not in text, "info logs stay quiet under the live line"
    assert "backfill summary" in out.decode()


async def test_metrics_port_in_use_is_a_clean_config_error(tmp_path, make_sim):
    sim = await make_sim(recordings=1, audio_bytes=2000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, sim, metrics={"listen": f"127.0.0.1:{port}"})
        result = await run_cli("--config", str(cfg), "backfill", "--wait", "1")
    assert result.rc == 2, result
    assert "[metrics] listen" in result.err and "Traceback" not in result.err
