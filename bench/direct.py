"""The ``direct`` row of bench/bench.py: one file straight to S3 with aiobotocore.

Run by the bench as a child process, so that its CPU, peak RSS and disk writes are its
own (as the proxy's are): the same multipart upload the proxy makes, with the proxy's S3
client (``proxy.storage.s3``: same botocore configuration), the same part size, per-part
checksum and a given number of parts in flight.  Credentials come from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).

    python bench/direct.py ENDPOINT BUCKET KEY FILE PART_BYTES IN_FLIGHT CHECKSUM

Prints one JSON object: seconds and CPU seconds of the upload alone (start-up and imports
left out), the process's peak RSS and the bytes it wrote to disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import resource
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.storage.base import CompletedPart, PartChecksum
from proxy.storage.s3 import S3Storage

# What upload.part_checksum sends per part, computed here as the proxy does.
DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "crc32": lambda data: zlib.crc32(data).to_bytes(4, "big"),
    "md5": lambda data: hashlib.md5(data).digest(),
    "sha256": lambda data: hashlib.sha256(data).digest(),
}


def part_checksum(algorithm: str, data: bytes) -> PartChecksum | None:
    digest = DIGESTS.get(algorithm)
    return PartChecksum(algorithm, base64.b64encode(digest(data)).decode()) if digest else None


async def upload(
    s3: S3Storage, key: str, path: Path, part_bytes: int, in_flight: int, checksum: str
) -> None:
    upload_id = await s3.create_multipart(key, metadata={}, content_type="application/octet-stream")
    slots = asyncio.Semaphore(in_flight)
    etags: dict[int, str] = {}

    async def send(number: int, data: bytes) -> None:
        try:
            etags[number] = await s3.upload_part(
                key, upload_id, number, data, part_checksum(checksum, data)
            )
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    with path.open("rb") as f:
        # A part is read only when a slot is free: at most in_flight parts in memory.
        while True:
            await slots.acquire()
            data = f.read(part_bytes)
            if not data:
                slots.release()
                break
            tasks.append(asyncio.create_task(send(len(tasks) + 1, data)))
    await asyncio.gather(*tasks)
    parts = [CompletedPart(n, etags[n]) for n in sorted(etags)]
    await s3.complete_multipart(key, upload_id, parts, if_none_match=False)


async def main() -> None:
    endpoint, bucket, key, file, part, in_flight, checksum = sys.argv[1:8]
    s3 = S3Storage(
        bucket=bucket,
        endpoint_url=endpoint,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    async with s3:
        me = psutil.Process()
        disk0 = me.io_counters().write_bytes
        cpu0, t0 = time.process_time(), time.perf_counter()
        await upload(s3, key, Path(file), int(part), int(in_flight), checksum)
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        figures = {
            "seconds": seconds,
            "cpu_s": cpu_s,
            # ru_maxrss is in KiB on Linux: the peak of this whole process.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "disk_write_bytes": me.io_counters().write_bytes - disk0,
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
