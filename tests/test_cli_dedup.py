"""``upload-proxy upload`` behaves like rsync: files the server already holds are not sent
again (proxy/client/dedup.py), measured as bytes on the wire through a counting relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.cli_helpers import json_results, run_cli
from tests.daemon import start_daemon
from tests.obs_helpers import scrape, value

from conftest import MiB, StartProxy, data_path, get_object

FILES = 20
STORED = 18
FILE_BYTES = MiB


class Relay:
    """A TCP relay that counts the bytes the client sends (the upload's wire bytes)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.client_bytes = 0
        self.port = 0

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if count:
                    self.client_bytes += len(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(c_reader, s_writer, True), self._pipe(s_reader, c_writer, False)
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def named_files(tmp_path: Path, count: int) -> list[Path]:
    out = []
    for n in range(count):
        p = data_path(tmp_path, FILE_BYTES, seed=1000 + n)
        out.append(p.rename(tmp_path / f"rec-{n:02d}.bin"))
    return out


async def test_a_rerun_over_20_files_of_which_18_are_stored_sends_only_the_2_new_ones(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str
) -> None:
    files = named_files(tmp_path, FILES)
    d = await start_daemon(tmp_path, seaweed, prefix)
    try:
        rc, out, err = await run_cli(
            tmp_path, *map(str, files[:STORED]), "--url", d.url, "--json", timeout_s=120
        )
        assert rc == 0, (out, err)
        received_before = value(await scrape(d.url), "proxy_received_bytes_total")
        assert received_before == STORED * FILE_BYTES

        async with Relay(d.port).running() as relay:
            rc, out, err = await run_cli(
                tmp_path,
                *map(str, files),
                "--url",
                f"http://127.0.0.1:{relay.port}",
                "--json",
                timeout_s=120,
            )
        assert rc == 0, (out, err)
        results, summary = json_results(out)
        events = {os.path.basename(r["path"]): r for r in results}
        skipped = [n for n, r in events.items() if r["event"] == "skipped"]
        sent = [n for n, r in events.items() if r["event"] == "ok"]
        assert sorted(skipped) == sorted(f.name for f in files[:STORED])
        assert all(events[n]["skipped"] == "identical" for n in skipped)
        assert sorted(sent) == sorted(f.name for f in files[STORED:])
        assert summary["failed"] == 0
        # On the wire: the 2 new files, plus headers (a few hundred bytes per request).
        new_bytes = (FILES - STORED) * FILE_BYTES
        print(f"re-run of {FILES} files: {relay.client_bytes} bytes sent by the client")
        assert new_bytes <= relay.client_bytes < new_bytes + FILES * 2048
        received = value(await scrape(d.url), "proxy_received_bytes_total")
        assert received == received_before + new_bytes
        for f in files[STORED:]:
            body, _ = await get_object(s3, f"{prefix}{f.name}")
            assert body == f.read_bytes()
    finally:
        await d.stop()


async def test_other_content_at_the_key_fails_unless_overwrite_and_no_dedup_sends_it(
    tmp_path: Path, start_proxy: StartProxy, s3: S3Storage, prefix: str
) -> None:
    p = await start_proxy(upload={"overwrite": True})
    (a,) = named_files(tmp_path, 1)
    assert (await run_cli(tmp_path, str(a), "--url", p.url, "--json"))[0] == 0
    a.write_bytes(b"changed " * 1000)

    rc, out, _ = await run_cli(tmp_path, str(a), "--url", p.url, "--json")
    results, _ = json_results(out)
    assert rc == 1 and results[0]["code"] == "ERR_KEY_EXISTS"
    assert "--overwrite" in results[0]["message"]

    rc, out, _ = await run_cli(tmp_path, str(a), "--url", p.url, "--json", "--overwrite")
    assert rc == 0, out
    assert (await get_object(s3, f"{prefix}{a.name}"))[0] == a.read_bytes()

    # --no-dedup: nothing hashed ahead, so the server cannot say "identical": a 409.
    rc, out, _ = await run_cli(tmp_path, str(a), "--url", p.url, "--json", "--no-dedup")
    results, _ = json_results(out)
    assert rc == 1 and results[0]["code"] == "ERR_KEY_EXISTS"


async def test_tus_uploads_of_known_content_complete_on_creation(
    tmp_path: Path, start_proxy: StartProxy, s3: S3Storage, prefix: str
) -> None:
    p = await start_proxy()
    big = data_path(tmp_path, 6 * MiB, seed=77)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(big.read_bytes())
    args: list[Any] = ["--url", p.url, "--json", "--tus-threshold", "1MiB"]
    assert (await run_cli(tmp_path, str(big), *args))[0] == 0
    received = p.runtime.events.stats.received_bytes

    rc, out, err = await run_cli(tmp_path, str(copy), *args)
    assert rc == 0, (out, err)
    (r,), _ = json_results(out)
    assert (r["event"], r["protocol"], r["deduplicated"], r["sent_bytes"]) == (
        "ok",
        "tus",
        True,
        0,
    )
    assert p.runtime.events.stats.received_bytes == received
