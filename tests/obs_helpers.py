"""Helpers for the observability tests: scrape /metrics, read samples, raw-socket clients."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

MiB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(url: str) -> Samples:
    return parse(await scrape_text(url))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def bucket(samples: Samples, name: str, le: float, **labels: str) -> float | None:
    """A histogram bucket's count; ``le`` as a number (the exposition writes 4.194304e+06)."""
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == f"{name}_bucket" and float(d.pop("le", "nan")) == le and d == labels:
            return v
    return None


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of ``name``, by label set."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def eventually(url: str, ok: Callable[[Samples], bool], timeout_s: float = 10.0) -> Samples:
    """Scrape until ``ok`` holds (the server finishes an upload after the client's part)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(url)
        if ok(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


@dataclass
class RawRequest:
    """An HTTP/1.1 request on a raw socket, so a test controls exactly which bytes go out."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, host: str, port: int, head: str) -> RawRequest:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode())
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status_line(self, timeout_s: float = 10.0) -> str:
        async with asyncio.timeout(timeout_s):
            return (await self.reader.readline()).decode().strip()

    async def response(self, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of the next final response."""
        async with asyncio.timeout(timeout_s):
            while True:
                status = int((await self.reader.readline()).split()[1])
                headers: dict[str, str] = {}
                while line := (await self.reader.readline()).decode().strip():
                    name, _, v = line.partition(":")
                    headers[name.strip().lower()] = v.strip()
                if status != 100:
                    break
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def put_head(host: str, key: str, size: int, *extra: str) -> str:
    lines = [f"PUT /uploads/{key} HTTP/1.1", f"Host: {host}", f"Content-Length: {size}", *extra]
    return "\r\n".join(lines) + "\r\n\r\n"


def promtool() -> str:
    """Path of promtool; ``make tools`` installs it (Debian's prometheus package) when root."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing and could not be installed (run `make tools` as root)")
    return found


async def run_promtool(*args: str, stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode())
    assert proc.returncode is not None
    return proc.returncode, out.decode()
