"""What the exact SHA-256 of a concatenated tus upload costs (not a test).

tus concatenation (proxy/tus/concat.py) continues the first partial's saved SHA-256
state over a ranged read-back of the rest of the final object.  This measures exactly
that function, :func:`proxy.tus.concat.continue_sha256`, on an object stored in a
SeaweedFS of its own on loopback: the worst case (the whole object read back, as when
the first partial's state is lost) and the usual one (4 partials: the first quarter's
state saved, three quarters read back).  Wall seconds and this process's CPU seconds.

    .venv/bin/python bench/concat_sha256.py [SIZE_MIB]      # default 256
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.storage.base import CompletedPart
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import Credentials, EmbeddedSeaweed
from proxy.tus.concat import continue_sha256
from proxy.tus.hash import new_sha256
from proxy.tus.state import UploadInfo

BUCKET = "concat-bench"
MiB = 1024 * 1024
PART = 8 * MiB


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(size_mib: int) -> None:
    size = size_mib * MiB
    with tempfile.TemporaryDirectory() as work:
        creds = Credentials("bench", "benchsecret0123456789")
        sw = EmbeddedSeaweed(Path(work), bucket=BUCKET, credentials=creds)
        await sw.start(90)
        try:
            async with S3Storage(
                bucket=BUCKET, endpoint_url=sw.endpoint_url,
                access_key=creds.access_key, secret_key=creds.secret_key,
            ) as s3:  # fmt: skip
                async with asyncio.timeout(60):
                    while True:  # a fresh store takes a moment to serve requests
                        try:
                            await s3.create_bucket()
                            break
                        except Exception:
                            await asyncio.sleep(0.2)
                data = os.urandom(size)
                mpu = await s3.create_multipart("obj", metadata={}, content_type="x/y")
                parts = []
                for n, start in enumerate(range(0, size, PART), start=1):
                    etag = await s3.upload_part("obj", mpu, n, data[start : start + PART], None)
                    parts.append(CompletedPart(n, etag))
                etag = await s3.complete_multipart("obj", mpu, parts, if_none_match=False)
                want = hashlib.sha256(data).hexdigest()
                quarter = size // 4
                first = new_sha256()
                first.update(data[:quarter])
                del data
                cases = {
                    "whole object read back": UploadInfo("x", "obj", "", "", {}, quarter, "", 0),
                    "3/4 read back (4 partials)": UploadInfo(
                        "x",
                        "obj",
                        "",
                        "",
                        {},
                        quarter,
                        "",
                        0,
                        sha256_state=first.export(),
                        parts=(),
                    ),
                }
                for name, info in cases.items():
                    if info.sha256_state is None:
                        info = UploadInfo("x", "obj", "", "", {}, 0, "", 0)
                    c0, t0 = cpu_s(), time.perf_counter()
                    got = await continue_sha256(s3, _with_offset(info), "obj", etag, size)
                    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
                    assert got == want, name
                    print(f"{size_mib} MiB, {name:<28} {wall:6.2f} s  {cpu:6.2f} CPU s")
        finally:
            await sw.stop(timeout_s=5)


def _with_offset(info: UploadInfo) -> UploadInfo:
    """The first partial as the final sees it: ``length`` bytes, all in its parts."""
    from dataclasses import replace

    from proxy.tus.state import Part

    n = info.length or 0
    return replace(info, parts=(Part("e", n),) if n else ())


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 256))
