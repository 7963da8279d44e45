"""The browser upload page and its upload links, over HTTP.

* ``GET <page.path>`` and its assets (``app.js``, ``app.css``, ``LICENSES.txt``) from
  the package (proxy/webui/static/, built from webui/), under a strict
  Content-Security-Policy: the page runs no inline code and talks to its own origin only.
  The page is public; what it can do depends on the credential in its URL fragment.
* ``GET <page.path>api/link``: what the presented credential allows, as the page shows it
  (prefix, expiry, caps, files used, where tus is and in what chunks).  Errors are the
  usual JSON: 401 without a credential, 403 ``ERR_LINK_EXPIRED`` / ``ERR_LINK_REVOKED`` /
  ``ERR_BAD_SIGNATURE`` for a link that cannot be used.
* :func:`file_place`: the link's terms at tus creation (size, type, file cap), used by
  :mod:`proxy.web.tus` and :mod:`proxy.web.resumable`.

Link grants themselves are checked by the authenticator (:mod:`proxy.auth`, with
:class:`~proxy.links.LinkVerifier`) on every request; this module keeps its revocation
list fresh (:func:`links_ctx`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from proxy.auth import Grant
from proxy.config import Config
from proxy.engine.upload import shielded
from proxy.errors import LengthRequired, ProxyError, SignedUrlNotForTus, TooLarge
from proxy.links import Alive, Link, LinkStore, LinkVerifier, Revocations
from proxy.tus import finished
from proxy.tus.service import NewUpload, TusService
from proxy.web.preflight import UPLOADS, authorize

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent.parent / "webui" / "static"
ASSETS = ("app.js", "app.css", "LICENSES.txt")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
# On the page, its assets and api/link, errors included.  no-cache (revalidate every
# time): a fixed page must reach browsers at once, and the files are small.
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# Revocations not read for this many check intervals: links are refused (503) until a
# read succeeds again.
STALE_INTERVALS = 6
FIRST_READ_TIMEOUT_S = 10.0


@dataclass
class UploadPage:
    """What the page's routes use.  ``verifier`` is None without a signing secret (then
    only bearer tokens work on the page: ``#token=``); ``store`` is set once the store
    is open."""

    config: Config
    verifier: LinkVerifier | None
    # The tus service, once the store is open.
    service: Callable[[], TusService]
    store: LinkStore | None = None

    @property
    def links(self) -> LinkStore:
        assert self.store is not None, "the upload page is not started yet"
        return self.store

    def alive(self, link: Link) -> Alive:
        """Is upload ``upload_id`` of ``link`` still there (for the file cap)?"""
        return functools.partial(_alive, self.service(), link)


LINKS = web.AppKey("upload_page", UploadPage)


async def _alive(svc: TusService, link: Link, upload_id: str) -> bool:
    if await svc.store.load(upload_id) is not None:
        return True
    folder = svc.object_key(upload_id, None, "", under=link.prefix)
    return await finished.find(svc.storage, folder, upload_id) is not None


def verifier_for(cfg: Config) -> LinkVerifier | None:
    """The link verifier the authenticator uses; None when links are off (page disabled,
    or no signing secret to check them with)."""
    if not (cfg.page.enabled and cfg.auth.signing_secret):
        return None
    return LinkVerifier(
        cfg.auth.signing_secret,
        max_lifetime_s=cfg.auth.signed_url_max_lifetime_s,
        revocations=Revocations(stale_after_s=STALE_INTERVALS * cfg.page.revocation_check_s),
    )


def verifier_of(app: web.Application) -> LinkVerifier | None:
    """The link verifier of an app the page was added to (None: no links)."""
    page = app.get(LINKS)
    return page.verifier if page is not None else None


# -- handlers ------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name)


async def api_link(request: web.Request) -> web.Response:
    """What the credential allows, for the page to show and to check files against
    before sending them (the server checks again at creation)."""
    grant = authorize(request)
    if grant.via == "signed":
        raise SignedUrlNotForTus("signed URLs are for /uploads; the upload page takes a link")
    page = request.app[LINKS]
    cfg = page.config
    link = grant.link
    files_used = 0
    if link is not None:
        files_used = await page.links.files_used(link, page.alive(link))
    info = {
        "prefix": link.prefix if link else "",
        "expires_at": _iso(link.expires_s) if link else None,
        "max_size_bytes": grant.limit(cfg.upload.max_upload_size_bytes),
        "max_files": link.max_files if link else None,
        "files_used": files_used,
        "note": link.note if link else "",
        "tus_endpoint": cfg.tus.base_path,
        "chunk_size_bytes": cfg.page.chunk_size_bytes,
        "allowed_types": list(cfg.limits.allowed_content_types),
        "allowed_extensions": list(cfg.limits.allowed_extensions),
    }
    return web.json_response(info)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    path = request.app[LINKS].config.page.path
    if request.path.startswith(path):
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(path + "api/"):
            # What a credential allows, or why not: never kept by a cache.
            response.headers["Cache-Control"] = "no-store"


# -- tus creation with a link ------------------------------------------------------------


@contextlib.asynccontextmanager
async def file_place(request: web.Request, grant: Grant, new: NewUpload) -> AsyncIterator[None]:
    """Around a tus creation: with an upload link, check its terms and take one of its
    file places (given back if the creation fails); without one, nothing.

    The object key is already inside the link's prefix
    (:func:`proxy.web.tus_common.new_upload` puts it there; the file name cannot leave
    it).  A link with a size cap needs the length up front, so that no PATCH can take the
    upload past it."""
    link = grant.link
    if link is None:
        yield
        return
    if link.max_size_bytes is not None:
        if new.length is None:
            raise LengthRequired("uploads with this link need Upload-Length")
        if new.length > link.max_size_bytes:
            raise TooLarge(f"this upload link takes files up to {link.max_size_bytes} bytes")
    request.app[UPLOADS].policy.check(new.content_type, new.filename)
    page = request.app[LINKS]
    marker = await page.links.reserve_file(link, new.id, page.alive(link))
    try:
        yield
    except BaseException:
        await shielded(page.links.release(marker), "upload link: give back a file place")
        raise


# -- revocations ------------------------------------------------------------------------


async def _read_revocations(page: UploadPage, verifier: LinkVerifier) -> None:
    ids = await page.links.revoked_ids()
    verifier.revocations.update(ids, time.time())


async def _keep_reading(page: UploadPage, verifier: LinkVerifier, stop: asyncio.Event) -> None:
    # Stopped by the event, never cancelled half-way through a read.
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), page.config.page.revocation_check_s)
            return
        try:
            await _read_revocations(page, verifier)
        except Exception as e:
            log.warning("upload links: could not read the revocation list: %s", e)


async def links_ctx(app: web.Application) -> AsyncIterator[None]:
    """The link store, and the revocation list read at start and every
    ``page.revocation_check_s`` (after the store and tus are set up)."""
    page = app[LINKS]
    svc = page.service()
    page.store = LinkStore(svc.storage, page.config.tus.state_prefix)
    verifier = page.verifier
    if verifier is None:
        yield
        return
    try:
        async with asyncio.timeout(FIRST_READ_TIMEOUT_S):
            await _read_revocations(page, verifier)
    except (ProxyError, TimeoutError) as e:
        # Links wait (503) until a read succeeds; everything else runs.
        log.warning("upload links: could not read the revocation list: %s", e)
    stop = asyncio.Event()
    reader = asyncio.create_task(_keep_reading(page, verifier, stop), name="link-revocations")
    try:
        yield
    finally:
        stop.set()
        await reader


# -- wiring ------------------------------------------------------------------------------


def add_routes(
    app: web.Application,
    config: Config,
    verifier: LinkVerifier | None,
    service: Callable[[], TusService],
) -> None:
    """The page under ``page.path`` (only call when ``page.enabled``)."""
    path = config.page.path
    app[LINKS] = UploadPage(config, verifier, service)
    app.router.add_get(path, index)
    app.router.add_get(path + "api/link", api_link)
    app.router.add_get(path + "{name}", asset)
    # "/upload" -> "/upload/" (the browser keeps the fragment across the redirect).
    app.router.add_get(path.rstrip("/"), _redirect)
    app.on_response_prepare.append(_on_prepare)
    app.cleanup_ctx.append(links_ctx)


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(request.app[LINKS].config.page.path)
