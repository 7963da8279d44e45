"""argv -> config -> run.  Exit codes: 0 clean stop, 1 failure, 2 usage, 78 bad config.

Subcommands for operators: ``sign`` mints a signed upload URL or download link with the configured
secret; ``hash-token`` turns a bearer token (read from stdin, so it stays out of
shell history and ``ps``) into the ``sha256:...`` form config.toml stores.  For users:
``upload`` is the client (:mod:`proxy.client`); it needs no config.toml.
``install-service`` installs the daemon as a systemd service (:mod:`proxy.install_service`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

import prometheus_client

from proxy import __version__
from proxy.client.cli import add_parser as add_upload_parser
from proxy.config import Config, ConfigError, LoggingConfig, load
from proxy.errors import StartupError
from proxy.install_service import add_parser as add_install_service_parser
from proxy.units import parse_size

EX_CONFIG = 78


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald / Loki; upload outcomes carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        upload = getattr(record, "upload", None)
        if isinstance(upload, dict):
            out.update(upload)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(cfg: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    # botocore logs request details (never our secrets, but noisy) at debug.
    logging.getLogger("botocore").setLevel(max(logging.INFO, root.level))
    logging.getLogger("aiobotocore").setLevel(max(logging.INFO, root.level))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upload-proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", default="config.toml", help="path to config.toml")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config and exit (0 ok, 78 bad)"
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command")
    sign = sub.add_parser("sign", help="print a signed upload URL or download (share) link")
    # SUPPRESS: "upload-proxy sign -c X" and "upload-proxy -c X sign" both work.
    sign.add_argument("-c", "--config", default=argparse.SUPPRESS, help="path to config.toml")
    scope = sign.add_mutually_exclusive_group(required=True)
    scope.add_argument("--key", help="allow exactly this key (PUT /uploads/<key>)")
    scope.add_argument("--prefix", help="allow keys under this prefix (must end with '/')")
    sign.add_argument(
        "--method",
        default=None,
        choices=("PUT", "POST", "GET"),
        help="default: PUT for --key, POST for --prefix; GET: a download (share) link",
    )
    expiry = sign.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=float, default=3600, help="seconds (default 3600)")
    expiry.add_argument(
        "--expires", dest="expires_in", type=_duration_s, help="a duration: 90s, 30m, 12h, 7d"
    )
    sign.add_argument("--max-size", default=None, help="largest body, e.g. 100MiB")
    sign.add_argument(
        "--base-url",
        default="http://127.0.0.1:8080",
        help="public URL of the proxy, e.g. https://uploads.example.org",
    )
    sub.add_parser("hash-token", help="read a bearer token on stdin, print its sha256: form")
    tus_id = sub.add_parser(
        "tus-id",
        help="print the id a tus upload is stored and logged under, from its URL or URL id",
    )
    tus_id.add_argument("url", help="the upload's URL (https://.../files/<id>) or just <id>")
    add_upload_parser(sub)
    add_install_service_parser(sub)
    return parser


_DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> float:
    """``7d`` -> 604800.0; a bare number is seconds."""
    text = text.strip().lower()
    unit = _DURATION_UNITS_S.get(text[-1:], 0)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration such as 7d, 12h, 30m: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be > 0")
    return value


def _sign(args: argparse.Namespace, config: Config) -> int:
    from urllib.parse import quote

    from proxy.auth import sign_url

    if not config.auth.signing_secret:
        print("upload-proxy: auth.signing_secret_file is not set", file=sys.stderr)
        return EX_CONFIG
    method = args.method or ("PUT" if args.key is not None else "POST")
    if args.expires_in > config.auth.signed_url_max_lifetime_s:
        print(
            f"upload-proxy sign: --expires-in is above auth.signed_url_max_lifetime_s "
            f"({config.auth.signed_url_max_lifetime_s:.0f}); the proxy would refuse the URL",
            file=sys.stderr,
        )
        return 2
    try:
        max_size = parse_size(args.max_size) if args.max_size else None
        query = sign_url(
            config.auth.signing_secret,
            method,
            key=args.key,
            prefix=args.prefix,
            expires_in_s=args.expires_in,
            max_size_bytes=max_size,
        )
    except ValueError as e:
        print(f"upload-proxy sign: {e}", file=sys.stderr)
        return 2
    if method == "GET" and args.key is None:
        print("upload-proxy sign: a GET link is for one --key", file=sys.stderr)
        return 2
    path = f"/uploads/{quote(args.key)}" if method in ("PUT", "GET") and args.key else "/uploads"
    if method == "PUT" and args.key is None:
        path = "/uploads/<key under the prefix>"
    print(f"{method} {args.base_url.rstrip('/')}{path}?{query}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "upload":
        from proxy.client.cli import run as run_upload

        return run_upload(args)
    if args.command == "install-service":
        from proxy.install_service import run as install_service

        return install_service(args)
    if args.command == "tus-id":
        from proxy.tus.state import storage_id, valid_id

        url_id = args.url.rstrip("/").rsplit("/", 1)[-1]
        if not valid_id(url_id):
            print("upload-proxy tus-id: not a tus upload URL or id", file=sys.stderr)
            return 2
        print(storage_id(url_id))
        return 0
    if args.command == "hash-token":
        from proxy.auth import hash_token

        token = sys.stdin.readline().strip()
        if len(token) < 16:
            print("upload-proxy hash-token: a token needs at least 16 characters", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"upload-proxy: bad configuration\n{e}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "sign":
        return _sign(args, config)
    if args.check_config:
        print(f"{args.config}: ok")
        return 0
    setup_logging(config.logging)
    # The *_created series double the count of every counter and histogram for a
    # timestamp nobody graphs; a Raspberry Pi's Prometheus is better off without them.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        runner = asyncio.run
    from proxy.obs.sdnotify import Notifier
    from proxy.server import Server

    try:
        runner(Server(config, notifier=Notifier.from_environ()).serve())
    except StartupError as e:
        # The message says what to change; a traceback would only bury it.
        logging.getLogger(__name__).error("cannot start: %s", e)
        return 1
    except Exception:
        logging.getLogger(__name__).exception("fatal error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
