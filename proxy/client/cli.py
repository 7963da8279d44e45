"""``upload-proxy upload``: argv -> options -> concurrent uploads -> exit code.

Exit codes: 0 every file uploaded and verified, 1 at least one failed (each failure is
reported), 2 usage (bad flags, a file that is not a readable regular file), 130
interrupted (Ctrl-C; tus uploads continue on the next run of the same command).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from proxy.units import parse_size

if TYPE_CHECKING:
    from proxy.client.transfer import Options

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TOKEN_ENV = "UPLOAD_PROXY_TOKEN"

EPILOG = f"""\
Files at or above --tus-threshold go over tus (resumable: rerun the same command after
an interruption, even a kill -9, and it continues from the server's offset); smaller
ones over one PUT /uploads/<key-prefix><file name>.  Every file's SHA-256 is computed
while it is read and compared with what the server stored.  The token may also come
from ${TOKEN_ENV} (keeps it out of ps and shell history).  Output: bars on a terminal,
line-based progress otherwise (format: see the README, "Client"), --json, --quiet.

exit codes: 0 all uploaded and verified, 1 some failed, 2 usage, 130 interrupted
"""


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type[int] | type[float]) -> object:
    def parse(value: str) -> int | float:
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
        return v

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "upload",
        help="upload files to a running proxy (streams, resumes, verifies)",
        description="Upload files to an upload-proxy: streamed from disk in constant "
        "memory, resumable (tus) above a size, verified by SHA-256.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--url", help="the proxy's base URL, e.g. https://uploads.example.org")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    auth.add_argument("--signed-url", help="a URL from `upload-proxy sign` (PUT only, no tus)")
    p.add_argument(
        "--jobs", "-j", type=_positive(int), default=2, help="files uploaded at once (default 2)"
    )
    p.add_argument("--key-prefix", default="", help="prepended to each file name (PUT keys)")
    p.add_argument(
        "--tus-threshold",
        type=_size,
        default="32MiB",
        help="files this size or larger use tus (default 32MiB)",
    )
    p.add_argument(
        "--chunk-size",
        type=_size,
        default="128MiB",
        help="bytes per tus PATCH (default 128MiB; best a multiple of the server's part_size)",
    )
    p.add_argument("--tus-path", default="/files/", help="tus base path (default /files/)")
    p.add_argument(
        "--chunk-checksum",
        action="store_true",
        help="send Upload-Checksum: sha256 per PATCH (a second read and hash)",
    )
    p.add_argument(
        "--retries",
        type=_positive(int),
        default=10,
        help="attempts without progress before a file fails (default 10)",
    )
    p.add_argument(
        "--retry-time",
        type=_positive(float),
        default=300.0,
        help="seconds without progress before a file fails (default 300)",
    )
    p.add_argument(
        "--stall-timeout",
        type=_positive(float),
        default=120.0,
        help="seconds a request may make no progress (default 120)",
    )
    p.add_argument(
        "--limit-rate",
        type=_size,
        default=None,
        help="cap the total upload rate, bytes per second (e.g. 10MiB)",
    )
    p.add_argument(
        "--progress-interval",
        type=_positive(float),
        default=5.0,
        help="seconds between progress lines when not on a terminal (default 5)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", "-q", action="store_true", help="print failures only")
    out.add_argument(
        "--json", action="store_true", help="one JSON object per file and a summary on stdout"
    )


class UsageError(Exception):
    pass


def _options(args: argparse.Namespace) -> Options:
    # Imported here: `upload-proxy --help` and the daemon never load aiohttp's client.
    from proxy.client.retry import RetryPolicy
    from proxy.client.transfer import Options

    signed_query = signed_key = signed_prefix = None
    if args.signed_url:
        parts = urlsplit(args.signed_url)
        if not parts.scheme or not parts.netloc or not parts.query:
            raise UsageError("--signed-url must be a full URL with its signed query")
        query = parse_qs(parts.query)
        signed_query = parts.query
        if "key" in query:
            signed_key = query["key"][0]
            if len(args.files) != 1:
                raise UsageError("a signed URL for one key uploads exactly one file")
        elif "prefix" in query:
            signed_prefix = query["prefix"][0]
        else:
            raise UsageError("--signed-url has neither key= nor prefix= in its query")
        base_url = args.url or f"{parts.scheme}://{parts.netloc}{_base_path(unquote(parts.path))}"
    elif args.url:
        base_url = args.url
    else:
        raise UsageError("--url is required (or --signed-url)")
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise UsageError(f"--url must be http:// or https://, got {base_url!r}")
    tus_path = args.tus_path if args.tus_path.endswith("/") else args.tus_path + "/"
    if not tus_path.startswith("/"):
        raise UsageError("--tus-path must start with '/'")
    if args.chunk_size < 1:
        raise UsageError("--chunk-size must be at least 1 byte")
    return Options(
        base_url=base_url.rstrip("/"),
        token=None if args.signed_url else (args.token or os.environ.get(TOKEN_ENV) or None),
        signed_query=signed_query,
        signed_key=signed_key,
        signed_prefix=signed_prefix,
        key_prefix=args.key_prefix,
        tus_path=tus_path,
        tus_threshold_bytes=args.tus_threshold,
        chunk_size_bytes=args.chunk_size,
        chunk_checksum=args.chunk_checksum,
        retry=RetryPolicy(max_attempts=args.retries, max_time_s=args.retry_time),
        stall_timeout_s=args.stall_timeout,
    )


def _base_path(path: str) -> str:
    """``/base/uploads/a.bin`` -> ``/base``: the proxy's root behind a path prefix."""
    head, sep, _ = path.rpartition("/uploads")
    return head if sep else ""


def _check_files(paths: list[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: not a regular file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"{path}: not readable")


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    from proxy.client.runner import upload_all

    try:
        options = _options(args)
        _check_files(args.files)
        if not options.signed and len(args.files) > 1:
            keys = [
                options.put_key(p) for p in args.files if not options.use_tus(os.path.getsize(p))
            ]
            if len(set(keys)) != len(keys):
                raise UsageError(
                    "two files would be stored under the same key; "
                    "upload them separately with different --key-prefix"
                )
    except UsageError as e:
        print(f"upload-proxy upload: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = out or sys.stdout
    mode = "quiet" if args.quiet else "json" if args.json else "tty" if out.isatty() else "lines"
    # SIGTERM (kill, systemd, CI cancelling a job) ends the run like Ctrl-C: a clean
    # KeyboardInterrupt path, the resume entries kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    try:
        results = asyncio.run(
            upload_all(
                args.files,
                options,
                mode=mode,
                out=out,
                jobs=args.jobs,
                limit_rate=args.limit_rate,
                progress_interval_s=args.progress_interval,
            )
        )
    except KeyboardInterrupt:
        print(
            f"upload-proxy upload: interrupted after {time.monotonic() - started:.1f}s; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED
