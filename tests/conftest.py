"""Shared fixtures: one real SeaweedFS per test session, bound to 127.0.0.1 on free ports.

Each test gets its own key prefix, so tests can share the bucket and still
assert "no object and no open multipart upload" under their prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import POOL, SWEEPER, Runtime, build_app
from proxy.config import Config, from_dict
from proxy.engine.buffers import BufferPool
from proxy.server import Server, bound_port, make_runner, start_site
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import Credentials, EmbeddedSeaweed
from proxy.storage.sweeper import StaleSweeper
from proxy.web.preflight import UPLOADS, Uploads

from browser import Browser, start_browser

BUCKET = "test-uploads"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
async def seaweed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedSeaweed]:
    data = tmp_path_factory.mktemp("seaweed")
    sw = EmbeddedSeaweed(data, bucket=BUCKET, credentials=Credentials("testkey", "testsecret"))
    await sw.start(timeout_s=90)
    async with s3_for(sw) as s3:
        await create_bucket(s3)
    yield sw
    # Its data is thrown away: no need to wait for a clean stop (~14 s) at the end.
    await sw.stop(timeout_s=5)


async def create_bucket(s3: S3Storage, timeout_s: float = 60) -> None:
    """Create the bucket once the fresh store serves requests (it takes a moment)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await s3.create_bucket()
                return
            except Exception:
                await asyncio.sleep(0.2)


def s3_for(sw: EmbeddedSeaweed, **kw: Any) -> S3Storage:
    return S3Storage(
        bucket=BUCKET,
        endpoint_url=sw.endpoint_url,
        access_key=sw.credentials.access_key,
        secret_key=sw.credentials.secret_key,
        **kw,
    )


@pytest.fixture(scope="session")
async def s3(seaweed: EmbeddedSeaweed) -> AsyncIterator[S3Storage]:
    async with s3_for(seaweed) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test, closed after it."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/"


def base_sections(sw: EmbeddedSeaweed, prefix: str) -> dict[str, dict[str, Any]]:
    """The config every test daemon starts from, in-process (make_config) or as a
    subprocess (tests/daemon.py): SeaweedFS on loopback, everything under ``prefix``."""
    return {
        "server": {"listen": "127.0.0.1:0", "drain_timeout_s": 5},
        # 5 MiB parts allow at most ~48 GiB in 10000 parts.
        "upload": {
            "key_prefix": prefix,
            "part_size": "5MiB",
            "memory_budget": "64MiB",
            "max_upload_size": "40GiB",
            "part_checksum": "crc32",
        },
        "storage": {
            "backend": "s3",
            "bucket": BUCKET,
            "endpoint_url": sw.endpoint_url,
            "retry_attempts": 2,
            "retry_base_delay_s": 0.05,
        },
        # Tests that are not about auth run open; tests/test_auth.py turns it on.
        "auth": {"mode": "none"},
        # tus state under the test's prefix too, so tests sharing the bucket stay apart.
        "tus": {"state_prefix": f"{prefix}.tus/"},
        # The content index apart from the test's objects (listings under the prefix stay
        # as they were) and from other tests' (no instant upload across tests).
        "dedup": {"index_prefix": f".dedup/{prefix}"},
    }


def merge_sections(
    base: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``base`` with each section of ``overrides`` updated over it (keys, not whole sections)."""
    data = {name: dict(values) for name, values in base.items()}
    for name, values in overrides.items():
        data.setdefault(name, {}).update(values)
    return data


def make_config(sw: EmbeddedSeaweed, prefix: str, **sections: dict[str, Any]) -> Config:
    return from_dict(merge_sections(base_sections(sw, prefix), sections))


@dataclasses.dataclass
class Proxy:
    url: str
    host: str
    port: int
    runtime: Runtime
    config: Config
    prefix: str
    app: web.Application
    runner: web.AppRunner

    async def stop(self) -> None:
        """Stop it now, half-way through the test (a restart: ``start_proxy(port=...)``
        again); the fixture stops the ones left running at the end."""
        if self.runner.server is not None:
            await self.runner.cleanup()

    # What the running app holds (its AppKeys, set once the store is open).

    @property
    def uploads(self) -> Uploads:
        return self.app[UPLOADS]

    @property
    def pool(self) -> BufferPool:
        return self.app[POOL]

    @property
    def sweeper(self) -> StaleSweeper:
        return self.app[SWEEPER]


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(seaweed: EmbeddedSeaweed, prefix: str) -> AsyncIterator[StartProxy]:
    """Start a proxy in this process (see tests/daemon.py for when a subprocess is needed)
    on a free port, or on ``port`` (a restart on the port of one stopped before); keyword
    sections override the test config.  ``storage`` replaces the store (a wrapper, a
    fault proxy's), ``routes`` may add test-only routes and signals before it starts."""
    proxies: list[Proxy] = []

    async def start(
        *,
        storage: Any = None,
        pool: Any = None,
        memory_reader: Any = None,
        routes: Callable[[web.Application], None] | None = None,
        port: int = 0,
        **sections: dict[str, Any],
    ) -> Proxy:
        config = make_config(seaweed, prefix, **sections)
        owned = None
        if storage is None:
            owned = storage = await s3_for(
                seaweed,
                retry_attempts=config.storage.retry_attempts,
                retry_base_delay_s=config.storage.retry_base_delay_s,
            ).open()
        extra = {} if memory_reader is None else {"memory_reader": memory_reader}
        runtime = Runtime(config, storage=storage, pool=pool, **extra)
        app = build_app(runtime)
        if routes is not None:
            routes(app)
        if owned is not None:

            async def close_owned(_: web.Application) -> None:
                await owned.close()

            app.on_cleanup.append(close_owned)
        runner = make_runner(app, config)
        await runner.setup()
        # Behind the same connection guard as the daemon's listeners.
        await start_site(runner, "127.0.0.1", port, config)
        bound = bound_port(runner)
        proxy = Proxy(
            f"http://127.0.0.1:{bound}", "127.0.0.1", bound, runtime, config, prefix, app, runner
        )
        proxies.append(proxy)
        return proxy

    yield start
    for p in proxies:
        await p.stop()


@contextlib.asynccontextmanager
async def serving(
    sw: EmbeddedSeaweed, prefix: str, **sections: dict[str, Any]
) -> AsyncIterator[Server]:
    """The whole :class:`Server` (main and ``metrics_listen`` listeners, as the daemon runs
    it) in this process, on the test config with ``sections`` over it, until the block ends."""
    config = make_config(sw, prefix, **sections)
    async with s3_for(sw) as storage:
        server = Server(config, Runtime(config, storage=storage))
        task = asyncio.create_task(server.serve(install_signals=False))
        try:
            async with asyncio.timeout(10):
                await server.listening.wait()
            yield server
        finally:
            server.request_stop()
            await task


async def wait_up(url: str, timeout_s: float = 30) -> None:
    """Poll ``url``/healthz until it answers 200."""
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


# -- two workers (make test runs pytest-xdist with --dist loadgroup) -------------------------
#
# Most tests wait on sockets, timeouts and subprocesses rather than on a CPU, so two
# workers halve the suite's time even on 2 cores.  Each worker is its own session: its own
# SeaweedFS (the session fixture above), its own tmp dirs, free ports; tests already keep
# to their own key prefix.  A module whose tests share a module-scoped fixture (a daemon,
# a cluster, a built venv) stays on one worker, so that fixture starts once; other
# modules' tests are spread one by one.  SPREAD modules are spread despite a module
# fixture: theirs is cheap (one daemon, ~1 s) and their tests are many minutes of waiting.
SPREAD = {"test_network_faults.py"}


def _has_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a function item, or a pytest without it: keep the module together
        return True
    return any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name
        if module not in SPREAD and _has_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used a browser keeps its page: screenshot, HTML, console log."""
    report = yield
    b = getattr(item, "funcargs", {}).get("browser")
    if report.failed and report.when == "call" and isinstance(b, Browser):
        saved = b.dump(item.name)
        report.sections.append(("browser", f"page saved in {saved}"))
    return report


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A headless Chromium (tests/browser.py); skipped where none is installed."""
    b = start_browser()
    yield b
    b.stop()


async def until(check: Callable[[], Awaitable[object]], what: str, timeout_s: float = 30) -> None:
    """Poll ``check`` (observable state: the store, a counter) until it answers truthy.

    What tests wait on instead of a sleep; the timeout is generous (a loaded 2-core
    machine) and only bounds a failure."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s}s: {what}") from None


async def assert_nothing_left(s3: S3Storage, prefix: str) -> None:
    """No object and no open multipart upload under ``prefix``."""
    open_uploads = await s3.list_multipart(prefix)
    assert open_uploads == [], f"open multipart uploads left: {open_uploads}"
    objects = await s3.list_objects(prefix)
    assert objects == [], f"objects left: {[o.key for o in objects]}"


async def get_object(s3: S3Storage, key: str) -> tuple[bytes, dict[str, str]]:
    """The object's bytes and its metadata, through the Storage interface."""
    info = await s3.head(key)
    assert info is not None, f"no object {key!r}"
    data = b"".join([chunk async for chunk in s3.iter_object(key, chunk_bytes=MiB)])
    return data, info.metadata


def data_path(tmp_path: Path, size: int, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes, written in 1 MiB steps (constant memory)."""
    import random

    rnd = random.Random(seed)
    p = tmp_path / f"data-{size}-{seed}"
    with p.open("wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rnd.randbytes(n))
            left -= n
    return p
