"""CPU seconds per GiB of each pass the proxy could make over a body.  Prints figures.

    .venv/bin/python bench/checksums.py [--gib N]

The passes: the whole-body SHA-256 (always done), the per-part checksum choices of
``upload.part_checksum`` (crc32, md5, sha256) and the memcpy from a socket chunk into a
part buffer.  Measured on 8 MiB buffers (one part) with process CPU time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib
from collections.abc import Callable

MiB = 1024 * 1024


def cpu_s_per_gib(fn: Callable[[memoryview], object], data: memoryview, gib: float) -> float:
    total = int(gib * 1024 * MiB)
    done = 0
    t0 = time.process_time()
    while done < total:
        fn(data)
        done += len(data)
    return (time.process_time() - t0) / (done / (1024 * MiB))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="bytes per pass, in GiB")
    args = ap.parse_args()
    data = memoryview(bytearray(os.urandom(8 * MiB)))
    target = bytearray(8 * MiB)

    def copy(d: memoryview) -> None:
        target[:] = d

    passes: dict[str, Callable[[memoryview], object]] = {
        "sha256": lambda d: hashlib.sha256(d).digest(),
        "crc32": zlib.crc32,
        "md5": lambda d: hashlib.md5(d).digest(),
        "memcpy": copy,
    }
    print(f"{'pass':<8} {'CPU s/GiB':>10}")
    for name, fn in passes.items():
        print(f"{name:<8} {cpu_s_per_gib(fn, data, args.gib):>10.3f}", flush=True)


if __name__ == "__main__":
    main()
