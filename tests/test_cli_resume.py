"""The client across interruptions: the CLI killed and run again, the daemon killed and
restarted under it, a resumed run that finds the server holding other bytes, and the
client's memory while it streams 1 GiB."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from proxy.client.resume import ResumeStore, fingerprint
from proxy.client.source import FileIdentity
from proxy.storage.seaweed import EmbeddedSeaweed, free_port
from tests.cli_helpers import (
    file_sha256,
    json_results,
    parse_line,
    resume_entries,
    run_cli,
    start_cli,
    tus_key,
)
from tests.conftest import MiB, StartProxy, data_path, get_object
from tests.daemon import start_daemon
from tests.tus_helpers import OCTET, create, head_offset, tus_sections


async def read_until(
    proc: asyncio.subprocess.Process,
    sent_at_least: int,
    timeout_s: float = 30,
    *,
    event: str = "progress",
) -> list[str]:
    """Lines of a running CLI until an ``event`` line (a progress line: one that reports
    ``sent_at_least`` bytes)."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await proc.stdout.readline()
            assert raw, "the CLI ended early:\n" + "\n".join(lines)
            lines.append(raw.decode().rstrip())
            got, fields = parse_line(lines[-1])
            if got == event and (got != "progress" or fields["sent"] >= sent_at_least):
                return lines


async def settled_offset(url: str) -> int:
    """The server's offset once it has committed what a broken PATCH delivered."""
    async with aiohttp.ClientSession() as http:
        last, stable = -1, 0
        for _ in range(100):
            now = await head_offset(http, url)
            stable = stable + 1 if now == last else 0
            if stable >= 3:
                return now
            last = now
            await asyncio.sleep(0.1)
    raise AssertionError("the offset never settled")


async def test_cli_killed_and_rerun_continues_from_the_server_offset(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, 24 * MiB + 11)
    size = path.stat().st_size
    common = ("--url", p.url, "--tus-threshold", "1MiB", "--chunk-size", "64MiB")
    slow = ("--limit-rate", "8MiB", "--progress-interval", "0.2")
    # Ctrl-C first: a clean stop that keeps the resume entry.
    proc = await start_cli(tmp_path, str(path), *common, *slow)
    await read_until(proc, 4 * MiB)
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 130, err
    assert b"run the same command again" in err
    (entry,) = resume_entries(tmp_path)
    first = await settled_offset(entry["upload_url"])
    assert 2 * MiB <= first < size

    proc = await start_cli(tmp_path, str(path), *common, *slow)
    lines = await read_until(proc, first + 6 * MiB)
    proc.kill()  # SIGKILL: no clean-up of any kind in the client
    await proc.wait()
    assert parse_line(lines[0])[1]["sent"] >= first  # it went on from the server's offset
    assert resume_entries(tmp_path) == [entry]
    offset = await settled_offset(entry["upload_url"])
    assert first + 4 * MiB <= offset < size  # the server kept what arrived before the kill

    rc, out, err = await run_cli(tmp_path, str(path), *common, "--json")
    assert rc == 0, (out, err)
    (r,), _ = json_results(out)
    assert r["upload_url"] == entry["upload_url"]
    assert r["resumed_from"] == offset
    assert r["sent_bytes"] == size - offset  # only the rest went over the wire
    assert r["sha256"] == file_sha256(path)  # the prefix was re-read from disk to verify
    body, meta = await get_object(s3, tus_key(prefix, r["upload_url"], path.name))
    assert body == path.read_bytes() and meta["sha256"] == r["sha256"]
    assert resume_entries(tmp_path) == []


async def test_resumed_run_detects_other_bytes_on_the_server(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    """The file changed between runs although size and mtime did not: the bytes the server
    holds from the first run are not this file's, and only the end-to-end hash can tell."""
    p = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, 6 * MiB)
    identity = FileIdentity.of(str(path))
    async with aiohttp.ClientSession() as http:
        url = await create(http, p.url, identity.size)
        first_run = bytearray(path.read_bytes()[: 2 * MiB])
        first_run[100] ^= 0xFF
        headers = {**OCTET, "Upload-Offset": "0"}
        async with http.patch(url, data=bytes(first_run), headers=headers) as resp:
            assert resp.status == 204
    store = ResumeStore(tmp_path / "cache" / "upload-proxy" / "resume")
    store.put(fingerprint(identity, f"{p.url}/files/"), url, identity)

    rc, out, err = await run_cli(
        tmp_path, str(path), "--url", p.url, "--tus-threshold", "1MiB", "--json"
    )
    assert rc == 1, (out, err)
    (r,), summary = json_results(out)
    assert (r["event"], r["code"], r["resumed_from"]) == ("failed", "ERR_SHA256_MISMATCH", 2 * MiB)
    assert summary["failed"] == 1


async def test_daemon_killed_and_restarted_under_a_running_cli(
    seaweed: EmbeddedSeaweed, s3: Any, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    # A short lease: the killed daemon's lock on the upload must run out for the new one.
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "tus": {"state_prefix": f"{prefix}.tus/", "sweep_interval_s": 0, "lock_lease_s": 3},
    }
    daemon = await start_daemon(tmp_path, seaweed, prefix, **sections)
    url = f"http://127.0.0.1:{port}"
    path = data_path(tmp_path, 32 * MiB + 5)
    cli = await start_cli(
        tmp_path,
        str(path),
        "--url",
        url,
        "--tus-threshold",
        "1MiB",
        "--chunk-size",
        "16MiB",
        "--limit-rate",
        "8MiB",
        "--progress-interval",
        "0.2",
        "--retries",
        "30",
    )
    try:
        lines = await read_until(cli, 12 * MiB)
        daemon.signal(signal.SIGKILL)
        await daemon.wait()
        # The CLI meets the refused connection (and says so) before the daemon is back.
        lines += await read_until(cli, 0, event="retry")
        daemon = await daemon.restart()
        async with asyncio.timeout(60):
            out, err = await cli.communicate()
    finally:
        if cli.returncode is None:
            cli.kill()
        await daemon.stop()
    assert cli.returncode == 0, (out, err)
    events = [parse_line(line) for line in lines + out.decode().splitlines()]
    assert any(e == "retry" for e, _ in events)
    (ok,) = [f for e, f in events if e == "ok"]
    assert ok["sha256"] == file_sha256(path)
    body, meta = await get_object(s3, tus_key(prefix, ok["url"], path.name))
    assert body == path.read_bytes() and meta["sha256"] == ok["sha256"]


def write_gib(path: Path, size: int) -> None:
    """A big file, cheaply: one random MiB written over and over (no holes)."""
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(block)


@pytest.mark.slow
async def test_client_memory_stays_flat_on_1_gib(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    size = 1024 * MiB
    p = await start_proxy(**tus_sections(prefix), upload={"part_size": "8MiB"})
    path = tmp_path / "big.bin"
    write_gib(path, size)
    proc = await start_cli(
        tmp_path,
        str(path),
        "--url",
        p.url,
        "--chunk-size",
        "256MiB",
        "--progress-interval",
        "0.5",
        "--json",
    )
    ps = psutil.Process(proc.pid)
    samples: list[int] = []
    cpu_s = 0.0
    started = time.monotonic()
    try:
        async with asyncio.timeout(120):
            while proc.returncode is None:
                try:
                    samples.append(ps.memory_info().rss)
                    t = ps.cpu_times()
                    cpu_s = t.user + t.system
                except psutil.NoSuchProcess:
                    break
                try:
                    await asyncio.wait_for(proc.wait(), 0.05)
                except TimeoutError:
                    pass
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, (out, err)
    (r,), _ = json_results(out.decode())
    assert r["sha256"] == file_sha256(path)
    key = tus_key(prefix, r["upload_url"], path.name)
    await s3.delete_object(key)
    peak = max(samples)
    early = max(samples[: max(1, len(samples) // 10)])
    print(
        f"\nclient: peak RSS {peak / MiB:.1f} MiB (first tenth {early / MiB:.1f} MiB), "
        f"{size / MiB / seconds:.0f} MiB/s, CPU {cpu_s:.2f} s for 1 GiB"
    )
    assert len(samples) > 20
    assert peak < 120 * MiB  # an interpreter, aiohttp and rich; the file is 1024 MiB
    assert peak - early < 24 * MiB  # flat: what it needs early is what it needs at the end
