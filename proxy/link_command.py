"""``upload-proxy link``: print an upload link (the upload page's URL with a signed grant
in its fragment), or revoke one.

Minting needs only the configuration (the signing secret).  Revoking writes an entry in
the bucket (:class:`proxy.links.LinkStore`), so it needs the store: the running daemon's
embedded one, or the configured S3 endpoint with its credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from datetime import UTC, datetime

from proxy.config import Config
from proxy.errors import ProxyError, StartupError
from proxy.links import Link, LinkStore, is_link_id, mint, new_link_id, unverified_link
from proxy.units import parse_size

EX_CONFIG = 78
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``1w`` -> seconds (ValueError otherwise)."""
    m = _DURATION_RE.fullmatch(value.strip().lower())
    if m is None:
        raise ValueError(f"not a duration such as 30m, 12h or 7d: {value!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "link",
        help="print an upload link to the upload page, or revoke one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: "upload-proxy link -c X" and "upload-proxy -c X link" both work.
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="path to config.toml")
    p.add_argument(
        "--prefix",
        help="the folder the files go to, relative to upload.key_prefix (must end with '/')",
    )
    p.add_argument(
        "--expires",
        default="7d",
        help="how long the link works: 30m, 12h, 7d... (default 7d; at most "
        "auth.signed_url_max_lifetime_s)",
    )
    p.add_argument("--max-size", help="largest file, e.g. 20GiB (default: the server's limit)")
    p.add_argument("--max-files", type=int, help="how many files the link takes (default: any)")
    p.add_argument("--note", default="", help="a line of text the page shows the sender")
    p.add_argument(
        "--base-url",
        help="public URL of the daemon, e.g. https://uploads.example.org "
        "(default: page.public_url, else the listen address)",
    )
    p.add_argument("--json", action="store_true", help="print the link and its terms as JSON")
    p.add_argument(
        "--revoke",
        metavar="LINK",
        help="revoke a link instead: its URL, its grant or its id (needs the store)",
    )


def _fail(message: str, code: int = 2) -> int:
    print(f"upload-proxy link: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, config: Config) -> int:
    if not config.auth.signing_secret:
        return _fail("auth.signing_secret_file is not set: links are signed with it", EX_CONFIG)
    if args.revoke is not None:
        return _revoke(args.revoke, config)
    if not args.prefix:
        return _fail("--prefix is required (the folder the files go to, e.g. family/)")
    try:
        expires_in_s = parse_duration(args.expires)
        max_size = parse_size(args.max_size) if args.max_size else None
    except ValueError as e:
        return _fail(str(e))
    lifetime = config.auth.signed_url_max_lifetime_s
    if not 0 < expires_in_s <= lifetime:
        return _fail(
            f"--expires must be > 0 and at most auth.signed_url_max_lifetime_s ({lifetime:.0f} s)"
        )
    link = Link(
        id=new_link_id(),
        prefix=args.prefix,
        expires_s=int(time.time() + expires_in_s),
        max_size_bytes=max_size,
        max_files=args.max_files,
        note=args.note,
    )
    try:
        grant = mint(config.auth.signing_secret, link)
    except ValueError as e:
        return _fail(str(e))
    base = args.base_url or config.page.public_url
    if not base:
        base = f"http://{config.server.listen_host}:{config.server.listen_port}"
    url = f"{base.rstrip('/')}{config.page.path}#link={grant}"
    expires_at = datetime.fromtimestamp(link.expires_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if args.json:
        terms = {
            "url": url,
            "id": link.id,
            "prefix": link.prefix,
            "expires_at": expires_at,
            "max_size_bytes": link.max_size_bytes,
            "max_files": link.max_files,
            "note": link.note,
        }
        print(json.dumps(terms, ensure_ascii=False))
    else:
        print(url)
        where = config.upload.key_prefix + config.tus.object_prefix + link.prefix
        print(
            f"link {link.id}: files go to {where!r}, until {expires_at}; "
            f"revoke with: upload-proxy link --revoke {link.id}",
            file=sys.stderr,
        )
    if not config.page.enabled:
        print(
            "upload-proxy link: page.enabled is false: the daemon does not serve the page "
            "this link opens",
            file=sys.stderr,
        )
    return 0


def _revoke(target: str, config: Config) -> int:
    now = time.time()
    if is_link_id(target.strip()):
        # Without the grant its expiry is unknown; no link outlives this from now.
        link_id, until_s = target.strip(), int(now + config.auth.signed_url_max_lifetime_s)
    else:
        link = unverified_link(target)
        if link is None:
            return _fail("--revoke takes a link's URL, its grant or its 16-digit id")
        link_id, until_s = link.id, link.expires_s
        if until_s < now:
            print(f"link {link_id} has expired already; nothing to revoke", file=sys.stderr)
            return 0
    try:
        pruned = asyncio.run(_write_revocation(config, link_id, until_s))
    except (ProxyError, StartupError, OSError) as e:
        return _fail(f"could not reach the store to revoke the link: {e}", 1)
    check_s = config.page.revocation_check_s
    print(
        f"revoked link {link_id}: refused everywhere within {check_s:.0f} s"
        + (f" ({pruned} expired revocations removed)" if pruned else ""),
        file=sys.stderr,
    )
    return 0


async def _write_revocation(config: Config, link_id: str, until_s: int) -> int:
    from proxy.storage.connect import connect

    async with connect(config.storage) as storage:
        store = LinkStore(storage, config.tus.state_prefix)
        await store.revoke(link_id, until_s)
        return await store.prune_revocations()
