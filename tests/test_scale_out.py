"""Scale-out: three daemons behind nginx (round robin, no stickiness) on a SeaweedFS
cluster of separate processes (master, two volume servers, filer, S3 gateway).

All state is in the bucket (docs/scale-out.md), so any instance serves any request: a tus
upload whose PATCHes land on different instances, a resume after an instance is
SIGKILLed mid-PATCH, concurrent PUTs, and the sweepers running on every instance at once.
The clock-skew tests run one more daemon with its clock offset by libfaketime (the Debian
``faketime`` package; ``make test-deps`` installs it).

One cluster, one nginx and one set of daemons for the module (state is per key prefix);
the orphan multipart upload is made at the start and its test comes last, so that the
stale sweeper's 60 s minimum age passes while the other tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.errors import Locked
from proxy.storage.s3 import S3Storage
from proxy.tus.state import TusStore
from tests.cluster import NGINX, Balancer, SeaweedCluster
from tests.conftest import BUCKET, MiB
from tests.daemon import Daemon, start_daemon
from tests.hook_receiver import Receiver
from tests.obs_helpers import scrape, value
from tests.tus_helpers import OCTET, TUS, create, head_offset, metadata, patch, sid, tus_key

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
if not FAKETIME_LIB.exists():
    FAKETIME_LIB = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"), FAKETIME_LIB)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx missing (make test-deps installs it)")

PART = 8 * MiB
LEASE_S = 3.0  # tus.lock_lease_s: the minimum, so a takeover after a crash is quick
EXPIRE_S = 10.0  # tus.expire_after_s: above the lease and a resume's wait for it
SWEEP_S = 1.0  # both sweepers' interval
STALE_S = 60.0  # upload.stale_upload_after_s: the minimum the config allows
INSTANCES = 3
HOOK_SECRET = b"h" * 40


def sections(prefix: str) -> dict[str, dict[str, Any]]:
    """What every instance shares (docs/scale-out.md): bucket, prefixes, lease, expiry."""
    return {
        "upload": {
            "key_prefix": prefix,
            "part_size": "8MiB",
            "memory_budget": "128MiB",
            "max_upload_size": "1GiB",
            "stale_upload_after_s": STALE_S,
            "sweep_interval_s": SWEEP_S,
        },
        # 20 PUTs at once through one nginx: about 7 per instance, all from 127.0.0.1.
        "limits": {"max_uploads_per_client": 32},
        "tus": {
            "state_prefix": f"{prefix}.tus/",
            "expire_after_s": EXPIRE_S,
            "sweep_interval_s": SWEEP_S,
            "lock_lease_s": LEASE_S,
            "max_unfinished_per_principal": 50,
        },
    }


@dataclass
class Farm:
    base: Path
    cluster: SeaweedCluster
    s3: S3Storage
    prefix: str
    daemons: list[Daemon]
    nginx: Balancer
    orphan_key: str
    orphan_id: str
    orphan_made_s: float
    receiver: Receiver
    # Logs of instances that were killed and replaced, so no line is lost to a check.
    retired: list[Daemon] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nginx.url

    def env(self) -> dict[str, str]:
        creds = self.cluster.credentials
        return {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}

    def all_logs(self) -> list[str]:
        return [line for d in [*self.retired, *self.daemons] for line in d.log]

    async def restart(self, i: int) -> None:
        """Start instance ``i`` again on its port and config (it was killed)."""
        old = self.daemons[i]
        await old.stop()
        self.retired.append(old)
        self.daemons[i] = await old.restart()


@pytest.fixture(scope="module")
async def farm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Farm]:
    base = tmp_path_factory.mktemp("scale-out")
    (base / "seaweed").mkdir()
    (base / "nginx").mkdir()
    cluster = SeaweedCluster(base / "seaweed", BUCKET)
    await cluster.start(timeout_s=60)
    print(f"\nSeaweedFS cluster (5 processes) up in {cluster.started_in_s:.1f}s")
    try:
        async with cluster.s3() as s3:
            prefix = f"t-{uuid.uuid4().hex[:12]}/"
            # A multipart upload a crashed instance left behind: the last test waits for
            # the instances' stale sweepers to abort it.
            orphan_key = f"{prefix}crashed/left-behind.bin"
            orphan_id = await s3.create_multipart(
                orphan_key, metadata={}, content_type="application/octet-stream"
            )
            await s3.upload_part(orphan_key, orphan_id, 1, b"x" * 1024, None)
            assert [u.upload_id for u in await s3.list_multipart(orphan_key)] == [orphan_id]
            made = time.monotonic()
            nginx = Balancer(base / "nginx", [])
            # Every instance sends post-finish hooks to one receiver (the hooks test).
            receiver = Receiver(HOOK_SECRET)
            await receiver.start()
            (base / "hook-secret").write_bytes(HOOK_SECRET)
            hooks = {
                "http_url": receiver.url,
                "http_secret_file": str(base / "hook-secret"),
                "events": ["post-finish"],
                "timeout_s": 5,
                "outbox_poll_interval_s": 1,
                "retry_max_delay_s": 1,
            }
            farm = Farm(base, cluster, s3, prefix, [], nginx, orphan_key, orphan_id, made, receiver)
            try:
                farm.daemons = list(
                    await asyncio.gather(
                        *(
                            start_daemon(base, cluster, prefix, **sections(prefix), hooks=hooks)
                            for _ in range(INSTANCES)
                        )
                    )
                )
                print(f"{INSTANCES} daemons up in {time.monotonic() - made:.1f}s")
                nginx.upstream_ports = [d.port for d in farm.daemons]
                await nginx.start()
                yield farm
            finally:
                await nginx.stop()
                for d in [*farm.retired, *farm.daemons]:
                    await d.stop()
                await receiver.stop()
    finally:
        await cluster.stop()


# -- helpers ---------------------------------------------------------------------------------


def lines_about(daemon: Daemon, needle: str) -> list[str]:
    return [line for line in daemon.log if needle in line]


async def logged(check: Callable[[], bool], what: str) -> None:
    """Until ``check`` (on the daemons' logs) holds: a daemon logs a line before it
    answers, but its stderr is read here on its own, so the answer may come first."""

    async def holds() -> bool:
        return check()

    await until(holds, 10, what)


def errors_in(lines: list[str]) -> list[str]:
    return [line for line in lines if " ERROR " in line or "Traceback" in line]


async def chunks(data: bytes | memoryview, step: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield bytes(data[i : i + step])


async def patch_stream(
    http: aiohttp.ClientSession, url: str, offset: int, body: AsyncIterator[bytes], length: int
) -> tuple[int, dict[str, str]]:
    """One PATCH whose body comes from ``body`` (``length`` bytes, declared)."""
    headers = {**OCTET, "Upload-Offset": str(offset), "Content-Length": str(length)}
    async with http.patch(url, data=body, headers=headers) as r:
        await r.read()
        return r.status, dict(r.headers)


async def assert_stored(s3: S3Storage, key: str, data: bytes) -> str:
    """The object at ``key`` holds exactly ``data`` (read back) and carries its SHA-256 as
    metadata; that digest."""
    expected = hashlib.sha256(data).hexdigest()
    info = await s3.head(key)
    assert info is not None, f"no object at {key!r}"
    h = hashlib.sha256()
    async for chunk in s3.iter_object(key, chunk_bytes=MiB):
        h.update(chunk)
    assert (info.size, h.hexdigest(), info.metadata.get("sha256")) == (
        len(data),
        expected,
        expected,
    ), key
    return expected


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took.  ``timeout_s`` is generous: a loaded
    2-core machine runs the cluster, three daemons, nginx and the test."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def in_flight(daemon: Daemon) -> float:
    return value(await scrape(daemon.url), "proxy_uploads_in_flight") or 0.0


async def streaming(daemon: Daemon) -> bool:
    return await in_flight(daemon) > 0


async def resume_until_done(
    http: aiohttp.ClientSession, url: str, data: bytes, timeout_s: float
) -> tuple[dict[str, str], int]:
    """HEAD and PATCH the rest (through nginx: any instance) until the upload completes;
    the completing answer's headers and how many 423s (a dead holder's lease) were met."""
    locked = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with http.head(url, headers=TUS) as r:
            assert r.status == 200, r.status
            offset = int(r.headers["Upload-Offset"])
        status, headers = await patch_stream(
            http, url, offset, chunks(memoryview(data)[offset:]), len(data) - offset
        )
        if status == 204:
            assert int(headers["Upload-Offset"]) == len(data)
            return headers, locked
        # 423: the killed instance's lease has not run out yet.  502: nginx met the dead
        # instance on a kept-alive connection.  Anything else is a failure.
        assert status in (423, 502), (status, headers)
        locked += status == 423
        await asyncio.sleep(0.2)
    raise AssertionError(f"the upload did not complete within {timeout_s}s")


# -- tests -----------------------------------------------------------------------------------


async def test_cluster_is_separate_processes_and_refuses_strangers(farm: Farm) -> None:
    """Five weed processes, each on its own ports; S3 answers only our identity."""
    nodes = farm.cluster.nodes
    assert sorted(nodes) == ["filer", "master", "s3", "volume1", "volume2"]
    pids = {n.proc.pid for n in nodes.values() if n.proc is not None}
    assert len(pids) == 5
    wrong = S3Storage(
        bucket=BUCKET,
        endpoint_url=farm.cluster.endpoint_url,
        access_key=farm.cluster.credentials.access_key,
        secret_key="not-the-secret",
        retry_attempts=1,
    )
    async with wrong:
        with pytest.raises(Exception, match=r"(?i)signature|denied|403"):
            await wrong.list_objects(farm.prefix)


async def test_tus_patches_on_different_instances_make_one_object(farm: Farm) -> None:
    size = 64 * MiB
    data = random.Random(1).randbytes(size)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        url = await create(
            http, farm.url, size, **{"Upload-Metadata": metadata(filename="big.bin")}
        )
        for offset in range(0, size, PART):
            r = await patch(http, url, offset, data[offset : offset + PART])
            assert r.status == 204, r.status
        final = r.headers
    seconds = time.monotonic() - started
    upload = sid(url)
    done = f"upload id={upload} key="
    await logged(lambda: any(lines_about(d, done) for d in farm.daemons), "the completion")
    # Which instances served a PATCH of this upload (each logs its PATCH or the completion).
    served = [
        i
        for i, d in enumerate(farm.daemons)
        if any(("tus patch" in x or "result=ok" in x) for x in lines_about(d, f"id={upload}"))
    ]
    assert len(served) >= 2, served
    assert len(set(farm.nginx.upstreams_used("PATCH"))) >= 2
    expected = await assert_stored(farm.s3, tus_key(farm.prefix, url, "big.bin"), data)
    assert final["Upload-SHA256"] == expected
    assert await farm.s3.list_objects(f"{farm.prefix}.tus/{upload}/") == []
    print(f"\n64 MiB in 8 PATCHes over instances {served}: {seconds:.1f}s")


async def test_instance_killed_mid_patch_resumes_on_another(farm: Farm) -> None:
    size = 40 * MiB
    data = random.Random(2).randbytes(size)
    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, size, MiB):
            if i == 20 * MiB:
                await gate.wait()  # two parts stored, a third half full: hold here
            yield data[i : i + MiB]

    async with aiohttp.ClientSession() as http:
        url = await create(http, farm.url, size, **{"Upload-Metadata": metadata(filename="k.bin")})
        running = asyncio.create_task(patch_stream(http, url, 0, body(), size))
        # The instance serving the PATCH is the one with an upload in flight.
        serving: list[int] = []

        async def found() -> bool:
            counts = [await in_flight(d) for d in farm.daemons]
            serving[:] = [i for i, n in enumerate(counts) if n > 0]
            return len(serving) == 1

        await until(found, 30, "one instance streams the PATCH")
        victim = serving[0]
        other = farm.daemons[(victim + 1) % INSTANCES]
        # Its lease keeper checkpoints the stored parts every third of the lease: wait until
        # another instance sees them, so the resume starts past 0.
        with_parts: list[int] = []

        async def checkpointed() -> bool:
            with_parts[:] = [await head_offset(http, other.url + url[len(farm.url) :])]
            return with_parts[0] >= 2 * PART

        await until(checkpointed, 30, "the parts stored before the kill are checkpointed")
        farm.daemons[victim].signal(signal.SIGKILL)  # no drain, no lease release
        killed_at = time.monotonic()
        gate.set()
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await running
            assert status != 204
        resumed_from = await head_offset(http, url)
        assert resumed_from == with_parts[0]
        headers, locked = await resume_until_done(http, url, data, timeout_s=60)
        waited_s = time.monotonic() - killed_at
    expected = await assert_stored(farm.s3, tus_key(farm.prefix, url, "k.bin"), data)
    assert headers["Upload-SHA256"] == expected
    done = f"upload id={sid(url)} key="
    await logged(lambda: any(lines_about(d, done) for d in farm.daemons), "the completion")
    finished_by = [i for i, d in enumerate(farm.daemons) if lines_about(d, done)]
    assert finished_by and victim not in finished_by
    print(
        f"\nkilled instance {victim} at offset {resumed_from // MiB} MiB; completed by "
        f"{finished_by} {waited_s:.1f}s after the kill, after {locked} 423s (lease {LEASE_S}s)"
    )
    await farm.restart(victim)


async def test_concurrent_puts_spread_over_instances(farm: Farm) -> None:
    # The restarted instance is back in nginx's rotation once its fail_timeout passed:
    # wait until a few health checks through nginx have reached every instance.
    ports = {f"127.0.0.1:{d.port}" for d in farm.daemons}

    async def balanced() -> bool:
        async with aiohttp.ClientSession() as http:
            for _ in range(INSTANCES):
                async with http.get(f"{farm.url}/healthz") as r:
                    await r.read()
        return ports <= set(farm.nginx.upstreams_used("GET")[-INSTANCES:])

    await until(balanced, 30, "nginx sends requests to all three instances")
    count = 20
    sizes = [(i % 5) * 3 * MiB + 1000 * i + 1 for i in range(count)]  # 1 B to ~12 MiB
    bodies = [random.Random(100 + i).randbytes(n) for i, n in enumerate(sizes)]

    async def put(http: aiohttp.ClientSession, i: int) -> dict[str, object]:
        async with http.put(f"{farm.url}/uploads/put/{i}.bin", data=bodies[i]) as r:
            answer = await r.json()
            assert r.status == 201, answer
            return dict(answer)

    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(put(http, i) for i in range(count)))
    seconds = time.monotonic() - started
    for i, answer in enumerate(answers):
        expected = await assert_stored(farm.s3, f"{farm.prefix}put/{i}.bin", bodies[i])
        assert (answer["size"], answer["sha256"]) == (sizes[i], expected)
    outcome = re.compile(rf"key='{re.escape(farm.prefix)}put/\d+\.bin'.*result=ok")

    def per_instance() -> list[int]:
        return [sum(1 for x in d.log if outcome.search(x)) for d in farm.daemons]

    await logged(lambda: sum(per_instance()) == count, "every PUT's outcome")
    assert all(per_instance()), per_instance()
    assert await farm.s3.list_multipart(f"{farm.prefix}put/") == []
    total_mib = sum(sizes) / MiB
    print(f"\n{count} PUTs ({total_mib:.0f} MiB) in {seconds:.1f}s, per instance {per_instance()}")


async def test_tus_expiry_sweeps_once_across_instances_and_loses_nothing(farm: Farm) -> None:
    """Every instance runs the tus sweeper every second over the same state.  Uploads left
    alone expire and are cleaned up exactly once (the lease decides who); uploads kept
    alive, by PATCHes on any instance or by one long PATCH, are never touched."""
    log_start = [len(d.log) for d in farm.daemons]
    size = 3 * PART
    kept_data = [random.Random(300 + i).randbytes(size) for i in range(2)]
    doomed_data = [random.Random(200 + i).randbytes(size) for i in range(3)]
    done = asyncio.Event()
    async with aiohttp.ClientSession() as http:

        async def keep_patching(url: str, data: bytes) -> int:
            """Small PATCHes through nginx (so on every instance), each pushing the expiry."""
            offset = 0
            while not done.is_set():
                r = await patch(http, url, offset, data[offset : offset + MiB // 4])
                assert r.status == 204, r.status
                offset += MiB // 4
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), EXPIRE_S / 4)
            return offset

        async def one_long_patch(url: str, data: bytes) -> int:
            """One PATCH streaming slowly for longer than expire_after_s: its lease, renewed
            by the instance serving it, keeps the upload live on every instance."""
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                while not done.is_set() and sent < 2 * PART:
                    yield data[sent : sent + 64 * 1024]
                    sent += 64 * 1024
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.1)

            headers = {**OCTET, "Upload-Offset": "0"}  # chunked: the length is not known
            async with http.patch(url, data=body(), headers=headers) as r:
                assert r.status == 204, await r.text()
                return int(r.headers["Upload-Offset"])

        # The kept uploads first: left alone they would expire before the doomed ones, so
        # once those are swept, every instance has swept past the kept ones' expiry.
        kept = [
            await create(http, farm.url, size, **{"Upload-Metadata": metadata(filename=f"k{i}")})
            for i in range(2)
        ]
        keepers = [
            asyncio.create_task(keep_patching(kept[0], kept_data[0])),
            asyncio.create_task(one_long_patch(kept[1], kept_data[1])),
        ]
        doomed = []
        for i, data in enumerate(doomed_data):
            url = await create(
                http, farm.url, size, **{"Upload-Metadata": metadata(filename=f"d{i}")}
            )
            # A full part (so a multipart upload to abort) and a pending tail.
            assert (await patch(http, url, 0, data[: PART + MiB])).status == 204
            doomed.append(url)
        doomed_keys = {tus_key(farm.prefix, u, f"d{i}") for i, u in enumerate(doomed)}
        assert doomed_keys <= {u.key for u in await farm.s3.list_multipart(farm.prefix)}
        doomed_state = {f"{farm.prefix}.tus/{sid(u)}/info" for u in doomed}

        async def all_expired() -> bool:
            left = {o.key for o in await farm.s3.list_objects(f"{farm.prefix}.tus/")}
            return not left & doomed_state

        waited = await until(all_expired, EXPIRE_S + 30, "the uploads left alone are swept")
        done.set()
        offsets = await asyncio.gather(*keepers)
        for url in doomed:
            async with http.head(url, headers=TUS) as r:
                assert r.status == 404, r.status
        # The kept uploads are whole: finish them and compare the bytes.
        for i, (url, data) in enumerate(zip(kept, kept_data, strict=True)):
            assert await head_offset(http, url) == offsets[i]
            status, _ = await patch_stream(
                http, url, offsets[i], chunks(memoryview(data)[offsets[i] :]), size - offsets[i]
            )
            assert status == 204
            await assert_stored(farm.s3, tus_key(farm.prefix, url, f"k{i}"), data)
    assert not doomed_keys & {u.key for u in await farm.s3.list_multipart(farm.prefix)}

    def expiry_of(upload: str, line: str) -> bool:
        return f"upload id={upload} " in line and "result=ERR_EXPIRED" in line

    await logged(
        lambda: all(
            any(expiry_of(sid(url), x) for d in farm.daemons for x in d.log) for url in doomed
        ),
        "each expiry",
    )
    new_lines = [d.log[n:] for d, n in zip(farm.daemons, log_start, strict=True)]
    everything = [x for lines in new_lines for x in lines]
    expired_by = {
        sid(url): [i for i, lines in enumerate(new_lines) for x in lines if expiry_of(sid(url), x)]
        for url in doomed
    }
    assert all(len(by) == 1 for by in expired_by.values()), expired_by
    assert not [x for x in everything for url in kept if expiry_of(sid(url), x)]
    assert errors_in(everything) == []
    # An instance whose sweep meets another's on the same upload loses the lease race and
    # says so at WARNING (harmless: the winner cleans up; see docs/scale-out.md).  Nothing
    # else may warn.
    races = [x for x in everything if "WARNING" in x]
    race = re.compile(r"tus sweeper: upload (\w+): (the upload is in use|no such upload)")
    assert all((m := race.search(x)) and m[1] in expired_by for x in races), races
    print(
        f"\nswept {len(doomed)} uploads in {waited:.1f}s (expire_after_s={EXPIRE_S}), by "
        f"instances {sorted(by[0] for by in expired_by.values())}; lost races logged: {len(races)}"
    )


# -- clock skew ------------------------------------------------------------------------------


def skewed_env(offset_s: float) -> dict[str, str]:
    """libfaketime: the daemon's wall clock (time.time, datetime.now) runs ``offset_s``
    ahead; its monotonic clock (asyncio's timers, the lease keeper's rhythm) is left true."""
    if not FAKETIME_LIB.exists():
        pytest.skip("libfaketime missing (make test-deps installs the faketime package)")
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": f"{offset_s:+}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@contextlib.asynccontextmanager
async def skewed_instance(farm: Farm, offset_s: float) -> AsyncIterator[Daemon]:
    """One more instance on the farm's bucket and prefixes, its clock ``offset_s`` ahead.
    Its stale-multipart sweeper is off (these tests are about the tus lease; the orphan
    is the pool's to find)."""
    config = sections(farm.prefix)
    config["upload"] = {**config["upload"], "stale_upload_after_s": 0}
    daemon = await start_daemon(
        farm.base,
        farm.cluster,
        farm.prefix,
        env=skewed_env(offset_s),
        **config,
    )
    try:
        yield daemon
    finally:
        await daemon.stop()


@dataclass
class SteppedClock:
    """A wall clock that moves only when the test says: ``start_s + elapsed_s``, read by
    each party with its own offset."""

    start_s: float
    elapsed_s: float = 0.0

    def at(self, offset_s: float) -> Callable[[], float]:
        return lambda: self.start_s + self.elapsed_s + offset_s


async def measured_skew_s(farm: Farm, upload_url: str) -> float:
    """How far ahead the clock of the instance that created ``upload_url`` was: its
    creation time as written in the upload's state, against ours right after."""
    now = time.time()
    got = await farm.s3.get_small(f"{farm.prefix}.tus/{sid(upload_url)}/info", 1 << 20)
    assert got is not None
    return float(json.loads(got[0])["created_s"]) - now


async def slowly(data: bytes, step: int, pause_s: float) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]
        await asyncio.sleep(pause_s)  # the pace of a slow client, not a synchronisation


async def test_skew_below_a_third_of_the_lease_never_breaks_a_live_lease(farm: Farm) -> None:
    """An instance whose clock is L/4 ahead sees every live lease as live: while another
    instance streams a PATCH for more than two leases (renewing every L/3), each of its
    PATCHes on the upload gets 423."""
    delta = LEASE_S / 4
    size = 3 * PART
    data = random.Random(400).randbytes(size)
    holder = farm.daemons[0]
    async with skewed_instance(farm, delta) as skewed, aiohttp.ClientSession() as http:
        path = (
            await create(http, skewed.url, size, **{"Upload-Metadata": metadata(filename="s")})
        )[len(skewed.url) :]
        assert delta - 0.5 < await measured_skew_s(farm, path) <= delta + 0.05
        started = time.monotonic()
        running = asyncio.create_task(
            patch_stream(http, holder.url + path, 0, slowly(data, MiB, 0.3), size)
        )
        await until(lambda: streaming(holder), 30, "the PATCH runs")
        probes: list[int] = []
        while not running.done():
            r = await patch(http, skewed.url + path, 0, data[:1])
            probes.append(r.status)
            await asyncio.sleep(0.1)
        status, headers = await running
        streamed_s = time.monotonic() - started
    assert status == 204
    assert streamed_s > 2 * LEASE_S
    # A probe between the completion (state deleted) and the client's answer gets 404.
    while probes and probes[-1] == 404:
        probes.pop()
    assert len(probes) > 10 and set(probes) == {423}, probes
    expected = await assert_stored(farm.s3, tus_key(farm.prefix, path, "s"), data)
    assert headers["Upload-SHA256"] == expected
    print(
        f"\nskew +{delta}s: {len(probes)} PATCHes of the skewed instance in {streamed_s:.1f}s: 423"
    )


async def test_skew_beyond_the_lease_lets_another_instance_take_a_live_upload(farm: Farm) -> None:
    """What the tolerance means: an instance 2L ahead sees every lease as run out, so its
    PATCH takes over an upload another instance is streaming.  The holder notices at its
    next renewal and its PATCH fails; nothing is damaged: the client resumes from what is
    durable and the object is right, or, if a late part of the holder landed over a new
    one, the upload fails whole (410) with nothing left behind."""
    delta = 2 * LEASE_S
    size = 3 * PART
    data = random.Random(500).randbytes(size)
    holder = farm.daemons[0]
    log_from = len(holder.log)
    async with skewed_instance(farm, delta) as skewed, aiohttp.ClientSession() as http:
        path = (
            await create(http, skewed.url, size, **{"Upload-Metadata": metadata(filename="b")})
        )[len(skewed.url) :]
        assert delta - 0.5 < await measured_skew_s(farm, path) <= delta + 0.05
        running = asyncio.create_task(
            patch_stream(http, holder.url + path, 0, slowly(data, MiB, 0.3), size)
        )
        durable: list[int] = []

        async def part_checkpointed() -> bool:
            durable[:] = [await head_offset(http, skewed.url + path)]
            return durable[0] >= PART

        await until(part_checkpointed, 30, "a part of the running PATCH is checkpointed")
        assert not running.done()
        taken_at = offset = durable[0]
        taken = await patch(http, skewed.url + path, offset, data[offset : offset + 64 * 1024])
        assert taken.status == 204  # the live lease was taken over
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await running
            assert status != 204
        await logged(lambda: any("lease lost" in x for x in holder.log[log_from:]), "lease lost")
        async with http.head(holder.url + path, headers=TUS) as r:
            offset = int(r.headers["Upload-Offset"])
        status, _ = await patch_stream(
            http, holder.url + path, offset, chunks(memoryview(data)[offset:]), size - offset
        )
    key = tus_key(farm.prefix, path, "b")
    if status == 204:
        await assert_stored(farm.s3, key, data)
    else:
        assert status == 410, status
        assert await farm.s3.head(key) is None
        assert [u for u in await farm.s3.list_multipart(farm.prefix) if u.key == key] == []
    print(f"\nskew +{delta}s: live lease taken over at {taken_at}; resumed at {offset}: {status}")


async def test_stale_sweeper_leaves_a_long_put_on_another_instance_alone(farm: Farm) -> None:
    """Two instances on their own prefix: one runs a PUT, the other sweeps stale multipart
    uploads every second with its clock 2 x stale_upload_after_s ahead.  Ages are taken on
    the store's clock, so the skewed instance sees the PUT's upload as young and leaves it
    alone.  (A PUT that has really run longer than the window is kept alive by the parts
    it keeps adding: tests/test_sweeper.py, on a window of seconds.)"""
    prefix = f"t-{uuid.uuid4().hex[:12]}-long/"
    config = sections(prefix)
    config["tus"] = {**config["tus"], "sweep_interval_s": 0}
    runner = await start_daemon(farm.base, farm.cluster, prefix, **config)
    sweeper = await start_daemon(
        farm.base,
        farm.cluster,
        prefix,
        env=skewed_env(2 * STALE_S),
        **config,
    )
    size = 3 * PART
    data = random.Random(600).randbytes(size)
    gate = asyncio.Event()
    put_key = f"{prefix}long.bin"

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, size, MiB):
            if i == PART + 2 * MiB:
                await gate.wait()  # the first part is stored: the multipart upload exists
            yield data[i : i + MiB]

    try:
        async with aiohttp.ClientSession() as http:
            put = asyncio.create_task(
                http.put(
                    f"{runner.url}/uploads/long.bin",
                    data=body(),
                    headers={"Content-Length": str(size)},
                )
            )

            async def open_upload() -> bool:
                return bool(await farm.s3.list_multipart(prefix))

            await until(open_upload, 30, "the PUT's multipart upload exists")

            # Two sweeps that began after the upload existed have seen it in their listing.
            def listings(samples: Any) -> float:
                name = "proxy_storage_request_duration_seconds_count"
                return value(samples, name, operation="list_multipart_uploads") or 0.0

            seen = listings(await scrape(sweeper.url))

            async def swept_twice() -> bool:
                return listings(await scrape(sweeper.url)) >= seen + 2

            await until(swept_twice, 30, "the skewed instance sweeps twice")
            assert [u.key for u in await farm.s3.list_multipart(prefix)] == [put_key]
            gate.set()
            async with await put as r:
                answer = await r.json()
            assert r.status == 201, (answer, [x for x in sweeper.log if "aborted" in x])
            assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        await runner.stop()
        await sweeper.stop()


async def test_lease_fence_and_takeover_times_give_the_skew_bound(farm: Farm) -> None:
    """The bound itself, in-process on the real store with injected clocks (the daemon
    tests above cannot make renewals fail on cue): a holder whose renewals stop fences
    itself 2L/3 after its last write, on its own clock; an instance whose clock is delta
    ahead takes the upload over L - delta after that write.  The fence comes first exactly
    while delta < L/3."""
    async with aiohttp.ClientSession() as http:
        url = await create(http, farm.url, PART, **{"Upload-Metadata": metadata(filename="f")})
    upload = sid(url)
    state = f"{farm.prefix}.tus/"
    step = LEASE_S / 60
    for delta, fence_first in ((0.30 * LEASE_S, True), (0.36 * LEASE_S, False)):
        clock = SteppedClock(time.time())
        holder = TusStore(farm.s3, state, LEASE_S, clock=clock.at(0.0))
        other = TusStore(farm.s3, state, LEASE_S, clock=clock.at(delta))
        lease = await holder.acquire(upload, by=None)
        fenced_at = took_at = None
        while clock.elapsed_s < LEASE_S + step:
            clock.elapsed_s += step
            if fenced_at is None and lease.fenced():
                fenced_at = clock.elapsed_s
            if took_at is None:
                with contextlib.suppress(Locked):
                    taken = await other.acquire(upload, by=None)
                    took_at = clock.elapsed_s
        assert fenced_at is not None and abs(fenced_at - 2 * LEASE_S / 3) <= step
        assert took_at is not None and abs(took_at - (LEASE_S - delta)) <= step
        assert (fenced_at < took_at) is fence_first, (delta, fenced_at, took_at)
        await taken.release()


async def test_post_finish_hook_fires_once_per_upload_across_instances(farm: Farm) -> None:
    """tus uploads whose PATCHes and completions land on different instances, and PUTs,
    while the receiver refuses everything: every instance's outbox loop polls (each every
    second) and competes for the same entries.  Once the receiver is back, each upload's
    post-finish arrives acknowledged exactly once: the claim keeps instances from sending
    one entry at the same time (de-duplication by EventID is not even needed here)."""
    receiver = farm.receiver
    refused = 0

    def down(_: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        nonlocal refused
        refused += 1
        return 503, None

    receiver.reply = down
    keys: set[str] = set()
    async with aiohttp.ClientSession() as http:
        for i in range(6):
            name = f"hooked-{i}.bin"
            data = random.Random(i).randbytes(PART + MiB)
            url = await create(
                http, farm.url, len(data), **{"Upload-Metadata": metadata(filename=name)}
            )
            assert (await patch(http, url, 0, data[:PART])).status == 204
            assert (await patch(http, url, PART, data[PART:])).status == 204
            keys.add(tus_key(farm.prefix, url, name))
            async with http.put(f"{farm.url}/uploads/hooked/put-{i}.bin", data=data[:MiB]) as r:
                assert r.status == 201
                keys.add((await r.json())["key"])
    outbox = f"{farm.prefix}.tus/hooks/"
    assert len(await farm.s3.list_objects(outbox)) >= len(keys)  # waiting there

    async def tried() -> bool:
        return refused >= 2 * len(keys)  # each event refused, some more than once

    await until(tried, 60, "delivery attempts")
    receiver.reply = lambda _: (200, None)

    def ours() -> list[dict[str, Any]]:
        return [
            e
            for e in receiver.of_type("post-finish")
            if e["Event"]["Upload"]["Storage"]["Key"] in keys
        ]

    await receiver.wait_for(
        lambda: {e["Event"]["Upload"]["Storage"]["Key"] for e in ours()} == keys
    )

    async def emptied() -> bool:
        return not await farm.s3.list_objects(outbox)

    await until(emptied, 30, "the outbox is emptied")
    delivered = ours()
    assert len({e["EventID"] for e in delivered}) == len(keys)
    assert len(delivered) == len(keys), "an event was acknowledged twice"
    completing = [
        i
        for i, d in enumerate(farm.daemons)
        if any("result=ok" in x and "hooked" in x for x in d.log)
    ]
    assert len(completing) >= 2, completing
    print(
        f"\n{len(keys)} post-finish events over instances {completing}: "
        f"{refused} refused attempts, {len(delivered)} acknowledged deliveries"
    )


async def test_orphan_multipart_upload_is_aborted_by_the_sweepers(farm: Farm) -> None:
    """Last, so the orphan made at the start is past stale_upload_after_s (60 s, the
    least the config allows) by now, or soon.  The stale sweeper takes no lease: its abort
    is idempotent, so when two instances' sweeps meet both may abort it, and neither fails."""

    async def aborted() -> bool:
        return await farm.s3.list_multipart(farm.orphan_key) == []

    age_s = time.monotonic() - farm.orphan_made_s
    waited = await until(aborted, STALE_S - age_s + 30, "an instance aborts the orphan")
    line = f"aborted stale multipart upload key='{farm.orphan_key}'"
    await logged(lambda: any(line in x for x in farm.all_logs()), "the abort")
    by = [x for x in farm.all_logs() if line in x]
    assert not [x for x in farm.all_logs() if "sweep failed" in x]
    print(f"\norphan aborted {age_s + waited:.0f}s after it was made, by {len(by)} instance(s)")
