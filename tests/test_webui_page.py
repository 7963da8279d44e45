"""The browser upload page (proxy/webui/static/, built from webui/) in headless Chromium,
against the real proxy and SeaweedFS: the daemon serves the page (page.enabled) and
answers its ``api/link``; the page holds real upload links (proxy/links.py) and sends
real tus uploads.  A test-only hook records which requests the page made.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.auth import hash_token
from proxy.links import Link, mint, new_link_id
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.cli_helpers import file_sha256
from tests.conftest import MiB, StartProxy, data_path, get_object
from tests.daemon import start_daemon

from browser import PHONE, Browser
from obs_helpers import scrape, value

SECRET = b"0123456789abcdef0123456789abcdef-webui"
TOKEN = "operator-0123456789abcdef0123"
NOTE = "Photos from Sunday, please <b>not</b> the blurry ones"
# Set to a directory (e.g. docs/) to save pictures of the page with uploads running.
SHOTS = os.environ.get("UPLOAD_PAGE_SCREENSHOTS")


def grant(expires_in_s: float = 3600, **terms: Any) -> str:
    terms.setdefault("prefix", "family/")
    link = Link(id=new_link_id(), expires_s=int(time.time() + expires_in_s), **terms)
    return mint(SECRET, link)


def page_sections(tmp_path: Path, **page: Any) -> dict[str, Any]:
    """The daemon's config for the page: links signed with SECRET, auth on."""
    secret = tmp_path / "signing-secret"
    secret.write_bytes(SECRET)
    auth = {"mode": "required", "tokens": [hash_token(TOKEN)], "signing_secret_file": str(secret)}
    return {"auth": auth, "page": {"enabled": True, "chunk_size": "16MiB", **page}}


def recorder(seen: list[str]) -> Callable[[web.Application], None]:
    """Test-only: note "METHOD path status" of every answer."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(f"{request.method} {request.path} {response.status}")

    def add(app: web.Application) -> None:
        app.on_response_prepare.append(on_prepare)

    return add


async def page_proxy(
    start_proxy: StartProxy,
    tmp_path: Path,
    seen: list[str],
    *,
    routes: Callable[[web.Application], None] | None = None,
    page: dict[str, Any] | None = None,
    **sections: Any,
) -> Any:
    def add(app: web.Application) -> None:
        recorder(seen)(app)
        if routes is not None:
            routes(app)

    return await start_proxy(routes=add, **page_sections(tmp_path, **(page or {})), **sections)


async def link_info(url: str, credential: str) -> Any:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {credential}"}
        async with http.get(f"{url}/upload/api/link", headers=headers) as r:
            return await r.json()


async def stored_under(s3: S3Storage, prefix: str) -> dict[str, str]:
    """File name -> key of the objects the proxy stored (a link's files:
    ``{prefix}tus/family/{id}/{filename}``)."""
    keys = [o.key for o in await s3.list_objects(prefix) if "/.tus/" not in o.key]
    return {k.rsplit("/", 1)[-1]: k for k in keys}


async def assert_stored(s3: S3Storage, prefix: str, path: Path) -> None:
    key = (await stored_under(s3, prefix))[path.name]
    assert key.startswith(f"{prefix}tus/family/"), key
    data, meta = await get_object(s3, key)
    assert data == await asyncio.to_thread(path.read_bytes), f"{key} differs from {path.name}"
    assert meta["sha256"] == file_sha256(path)


# The n-th file row (arguments[0], from 1), an expression for the scripts below.
ROW = "document.querySelector('#files li:nth-child(' + arguments[0] + ')')"


async def row(browser: Browser, n: int) -> dict[str, str]:
    """The n-th file row's data attributes (state, sent, sha256, resumedFrom, code)."""
    data = await browser.js(f"const r = {ROW}; return r && {{...r.dataset}};", n)
    assert data, f"no file row {n}"
    return data  # type: ignore[no-any-return]


async def wait_rows(browser: Browser, state: str, count: int, timeout_s: float) -> None:
    await browser.wait_for(
        "return document.querySelectorAll('#files li[data-state=' + arguments[0] + ']').length"
        " === arguments[1]",
        state,
        count,
        timeout_s=timeout_s,
        what=f"{count} files in state {state}",
    )


async def open_page(browser: Browser, url: str, phase: str = "ready") -> None:
    await browser.get(url)
    await browser.wait_for(
        "return document.body.dataset.phase === arguments[0]",
        phase,
        timeout_s=30,
        what=f"page phase {phase}",
    )


def received(p: Any) -> float:
    value = p.runtime.registry.get_sample_value("proxy_received_bytes_total")
    return float(value or 0)


async def test_two_files_end_to_end(
    browser: Browser, start_proxy: StartProxy, s3: S3Storage, tmp_path: Path
) -> None:
    seen: list[str] = []
    p = await page_proxy(start_proxy, tmp_path, seen)
    link = grant(note=NOTE)
    small = data_path(tmp_path, 300 * 1024 + 7, seed=1).rename(tmp_path / "notes.txt")
    big = data_path(tmp_path, 64 * MiB + 12345, seed=2).rename(tmp_path / "service.mp4")

    await open_page(browser, f"{p.url}/upload/#link={link}")
    facts = await browser.js("return document.getElementById('link').innerText")
    assert "family/" in facts and "0 sent so far" in facts
    # The note is text, not markup.
    assert await browser.js("return document.getElementById('link-note').textContent") == NOTE

    # An empty file too: tus-js-client completes it with the creation request alone.
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    await browser.choose_files("#picker", [small, big, empty])
    await wait_rows(browser, "done", 3, timeout_s=120)

    for n, path in ((1, small), (2, big), (3, empty)):
        r = await row(browser, n)
        assert r["sha256"] == file_sha256(path), path.name
        await assert_stored(s3, p.prefix, path)
    total = await browser.js("return document.getElementById('total-text').textContent")
    assert total.startswith("3 of 3 files sent")
    assert (await link_info(p.url, link))["files_used"] == 3

    # Every request the page made was to its own origin, and the CSP stopped nothing.
    assert await browser.call(browser.csp_violations) == []
    origins = await browser.js(
        "return [...new Set(performance.getEntries()"
        ".filter(e => ['navigation', 'resource'].includes(e.entryType))"
        ".map(e => new URL(e.name).origin))]"
    )
    assert origins == [p.url]
    patches = [s for s in seen if s.startswith("PATCH /files/")]
    assert len(patches) >= 5  # 16 MiB chunks: 1 + 5 PATCHes at least


async def test_reload_resumes_from_server_offset_and_offline_pauses(
    browser: Browser, start_proxy: StartProxy, s3: S3Storage, tmp_path: Path
) -> None:
    seen: list[str] = []
    p = await page_proxy(start_proxy, tmp_path, seen, page={"chunk_size": "8MiB"})
    size = 64 * MiB + 999
    big = data_path(tmp_path, size, seed=3).rename(tmp_path / "dataset.tar")
    other = data_path(tmp_path, 6 * MiB, seed=4).rename(tmp_path / "recording.wav")
    link = grant(note="Sunday's service: recordings and the photos")
    url = f"{p.url}/upload/#link={link}"

    await open_page(browser, url)
    # A slow uplink, so that there is time to look at the upload while it runs.
    await browser.network(upload_bytes_s=24 * MiB)
    await browser.choose_files("#picker", [big, other])
    await browser.wait_for(
        f"return {ROW}?.dataset.sent > {12 * MiB}",
        1,
        timeout_s=60,
        what="12 MiB of the big file sent",
    )
    if SHOTS:
        await browser.size((1100, 1150))
        await browser.screenshot(Path(SHOTS) / "upload-page.png")
        await browser.size((PHONE[0], 1100))
        await browser.screenshot(Path(SHOTS) / "upload-page-phone.png")

    # Offline: the page says so, the files wait; back online, they go on.
    await browser.network(offline=True, upload_bytes_s=24 * MiB)
    await browser.wait_for(
        f"return !document.getElementById('banner').hidden && {ROW}.dataset.state === 'offline'",
        1,
        timeout_s=30,
        what="offline banner and the big file offline",
    )
    await browser.network(upload_bytes_s=24 * MiB)
    await browser.wait_for(
        "return document.getElementById('banner').hidden", timeout_s=30, what="banner gone"
    )
    await browser.wait_for(
        f"return {ROW}?.dataset.sent > {24 * MiB}",
        1,
        timeout_s=60,
        what="24 MiB of the big file sent",
    )

    # Reload mid-upload: the page lists what did not finish; the same file again
    # continues at the server's offset instead of from zero.
    await browser.call(browser.driver.refresh)
    await open_page(browser, url)
    await browser.network()
    earlier = await browser.js("return document.getElementById('earlier-list').innerText")
    assert "dataset.tar" in earlier
    before = received(p)
    await browser.choose_files("#picker", [big])
    await wait_rows(browser, "done", 1, timeout_s=90)
    r = await row(browser, 1)
    resumed_from = int(r["resumedFrom"])
    assert resumed_from >= 8 * MiB, r
    sent_after_reload = received(p) - before
    # Fewer bytes than the file, and no more than what the server did not have.
    assert sent_after_reload < size - 8 * MiB, (sent_after_reload, resumed_from)
    assert sent_after_reload <= size - resumed_from + 1 * MiB, (sent_after_reload, resumed_from)
    assert r["sha256"] == file_sha256(big)
    await assert_stored(s3, p.prefix, big)


async def test_a_daemon_restarted_mid_upload_and_the_page_finishes(
    browser: Browser, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, tmp_path: Path
) -> None:
    """The real daemon (a subprocess) stopped (SIGTERM, as systemd does) while the page
    sends a file, then started again on the same port: the page retries, asks the new
    daemon where the upload stands and finishes it; the object is the file."""
    sections = page_sections(tmp_path)
    sections["tus"] = {"state_prefix": f"{prefix}.tus/"}
    daemon = await start_daemon(tmp_path, seaweed, prefix, **sections)
    size = 64 * MiB + 4321
    big = data_path(tmp_path, size, seed=9).rename(tmp_path / "video.mov")
    try:
        await open_page(browser, f"{daemon.url}/upload/#link={grant()}")
        await browser.network(upload_bytes_s=16 * MiB)
        await browser.choose_files("#picker", [big])
        await browser.wait_for(
            f"return {ROW}?.dataset.sent > {20 * MiB}", 1, timeout_s=60, what="20 MiB sent"
        )
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        # The page notices (a request fails) and keeps trying while the daemon is away.
        await browser.wait_for(
            f"return ['waiting', 'starting'].includes({ROW}.dataset.state)",
            1,
            timeout_s=30,
            what="the page retrying",
        )
        daemon = await daemon.restart()
        await browser.network()
        await wait_rows(browser, "done", 1, timeout_s=120)
        r = await row(browser, 1)
        assert r["sha256"] == file_sha256(big)
        await assert_stored(s3, prefix, big)
        # It went on from what the first daemon had stored, not from the start.
        received = value(await scrape(daemon.url), "proxy_received_bytes_total")
        assert received is not None and received < size - 16 * MiB, received
    finally:
        await daemon.stop()


async def test_without_a_link_the_page_explains_and_sends_nothing(
    browser: Browser, start_proxy: StartProxy, s3: S3Storage, tmp_path: Path
) -> None:
    seen: list[str] = []
    p = await page_proxy(start_proxy, tmp_path, seen)
    await open_page(browser, f"{p.url}/upload/", phase="nolink")
    text = await browser.js("return document.getElementById('gate').innerText")
    assert "upload link" in text and "upload-proxy link --prefix" in text
    assert await browser.js("return document.getElementById('drop').hidden")
    paths = sorted({" ".join(s.split()[:2]) for s in seen})
    assert paths == ["GET /upload/", "GET /upload/app.css", "GET /upload/app.js"]
    assert await browser.call(browser.csp_violations) == []

    # An expired link: its message, no way to add files, nothing sent to the tus endpoint
    # and nothing stored (the server was asked, and said no).
    await open_page(browser, f"{p.url}/upload/#link={grant(expires_in_s=-60)}", phase="refused")
    text = await browser.js("return document.getElementById('gate').innerText")
    assert "expired" in text
    assert await browser.js("return document.getElementById('drop').hidden")
    assert "GET /upload/api/link 403" in seen
    assert not [s for s in seen if "/files" in s]
    assert await stored_under(s3, p.prefix) == {}


async def test_limits_are_checked_before_sending_and_server_errors_explained(
    browser: Browser, start_proxy: StartProxy, tmp_path: Path
) -> None:
    seen: list[str] = []
    p = await page_proxy(
        start_proxy,
        tmp_path,
        seen,
        limits={"allowed_extensions": [".jpg", ".txt"]},
        # The server's own cap is below the link's: the page is told the lower one.
        upload={"max_upload_size": "1MiB"},
    )
    link = grant(max_size_bytes=4 * MiB, max_files=3)
    too_big = data_path(tmp_path, 2 * MiB, seed=5).rename(tmp_path / "big.jpg")
    wrong_type = data_path(tmp_path, 1000, seed=6).rename(tmp_path / "tool.exe")
    late = data_path(tmp_path, 800 * 1024, seed=7).rename(tmp_path / "log.txt")

    await open_page(browser, f"{p.url}/upload/#link={link}")
    assert "0 of 3 used" in await browser.js("return document.getElementById('link').innerText")
    # Keyboard: the first Tab reaches the button that opens the file picker.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    await browser.call(lambda: ActionChains(browser.driver).send_keys(Keys.TAB).perform())
    assert await browser.js("return document.activeElement.id") == "choose"
    await browser.choose_files("#picker", [too_big, wrong_type])
    await wait_rows(browser, "refused", 2, timeout_s=30)
    assert (await row(browser, 1))["code"] == "ERR_TOO_LARGE"
    assert (await row(browser, 2))["code"] == "ERR_UNSUPPORTED_MEDIA_TYPE"
    assert not [s for s in seen if "/files" in s]

    # Meanwhile the link's other holders used its places: the server refuses the next
    # file at creation, and the page says why.
    async with aiohttp.ClientSession() as http:
        for name in ("a.txt", "b.txt", "c.txt"):
            headers = {
                "Authorization": f"Bearer {link}",
                "Tus-Resumable": "1.0.0",
                "Upload-Length": "0",
                "Upload-Metadata": "filename " + base64.b64encode(name.encode()).decode(),
            }
            async with http.post(f"{p.url}/files/", headers=headers) as r:
                assert r.status == 201
    await browser.choose_files("#picker", [late])
    await wait_rows(browser, "failed", 1, timeout_s=30)
    r = await row(browser, 3)
    assert r["code"] == "ERR_TOO_MANY_FILES"
    status = await browser.js(f"return {ROW}.querySelector('.status').textContent", 3)
    assert "does not allow any more files" in status


async def test_busy_server_is_retried_after_retry_after(
    browser: Browser, start_proxy: StartProxy, s3: S3Storage, tmp_path: Path
) -> None:
    """A 503 with Retry-After on the first creation: the page says the server is busy,
    waits at least that long (a lower bound: a slow machine only waits longer), then sends."""
    seen: list[str] = []
    times: list[float] = []

    @web.middleware
    async def busy_once(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/files/":
            times.append(asyncio.get_running_loop().time())
            if len(times) == 1:
                busy = {"code": "ERR_BUSY", "message": "busy"}
                return web.json_response(busy, status=503, headers={"Retry-After": "2"})
        return await handler(request)

    def add(app: web.Application) -> None:
        app.middlewares.insert(0, busy_once)

    p = await page_proxy(start_proxy, tmp_path, seen, routes=add)
    path = data_path(tmp_path, 100 * 1024, seed=8).rename(tmp_path / "song.mp3")
    await open_page(browser, f"{p.url}/upload/#link={grant()}")
    await browser.choose_files("#picker", [path])
    await wait_rows(browser, "waiting", 1, timeout_s=30)
    status = await browser.js(f"return {ROW}.querySelector('.status').textContent", 1)
    assert "Trying again in" in status
    await wait_rows(browser, "done", 1, timeout_s=60)
    assert len(times) == 2 and times[1] - times[0] >= 1.9
    await assert_stored(s3, p.prefix, path)
