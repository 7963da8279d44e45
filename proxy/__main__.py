"""argv -> config -> run.  Exit codes: 0 clean stop, 1 failure, 2 usage, 78 bad config."""

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
from proxy.config import ConfigError, LoggingConfig, load

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upload-proxy", description=__doc__)
    parser.add_argument("-c", "--config", default="config.toml", help="path to config.toml")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit (0 ok, 78 bad)")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"upload-proxy: bad configuration\n{e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        print(f"{args.config}: ok")
        return 0
    setup_logging(config.logging)
    # The *_created series double the count of every counter and histogram for a
    # timestamp nobody graphs; a Raspberry Pi's Prometheus is better off without them.
    prometheus_client.disable_created_metrics()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        runner = asyncio.run
    from proxy.server import Server

    try:
        runner(Server(config).serve())
    except Exception:
        logging.getLogger(__name__).exception("fatal error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
