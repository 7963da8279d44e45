"""Property test: however a body is split into tus PATCHes, and wherever those PATCHes
break off, the upload completes to the same object with the same SHA-256.

Real S3 and the real tus service; each PATCH runs ``TusService.write`` under its lease
with a body that, at a break point, raises :class:`IncompleteBody` exactly as a
connection that drops mid-body does (``proxy.web.preflight.body_chunks``).  No sockets,
so no timing: what the service kept is read back from its state, as a client's HEAD
would, and the next PATCH resumes there."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tus_helpers import create, service_for, sha256_hex, sid, tus_key, tus_sections

from proxy.errors import IncompleteBody
from proxy.storage.s3 import S3Storage

from conftest import MiB, StartProxy, get_object

PART = 5 * MiB


async def patch_body(piece: bytes, break_at: int | None) -> AsyncIterator[bytes]:
    """``piece`` in uneven chunks; at ``break_at`` the connection drops."""
    sizes = (1, 4093, 1 << 20, 65536)
    off = i = 0
    while off < len(piece):
        end = min(len(piece), off + sizes[i % len(sizes)])
        if break_at is not None and end > break_at:
            yield piece[off:break_at]
            raise IncompleteBody("the request body ended early (injected)")
        yield piece[off:end]
        off, i = end, i + 1
    if break_at is not None:
        raise IncompleteBody("the request body ended early (injected)")


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    size=st.sampled_from([1, 4097, PART - 1, PART, PART + 1, 2 * PART + 333]),
    patches=st.lists(
        st.tuples(st.integers(min_value=1, max_value=PART + 7), st.none() | st.floats(0, 1)),
        min_size=1,
        max_size=6,
    ),
)
async def test_any_split_and_breaks_give_the_same_object(
    start_proxy: StartProxy,
    s3: S3Storage,
    prefix: str,
    size: int,
    patches: list[tuple[int, float | None]],
) -> None:
    """Each PATCH asks for ``want`` bytes and breaks at ``cut`` of them (None: it does
    not break); the last one sends whatever is left, whole."""
    proxy = await start_proxy(**tus_sections(prefix))
    data = hashlib.shake_256(b"split").digest(size)
    async with aiohttp.ClientSession() as http:
        url = await create(http, proxy.url, size)
    svc = service_for(proxy)
    upload_id = sid(url)
    offset = 0
    for n, (want, cut) in enumerate(patches):
        last = n == len(patches) - 1
        piece = data[offset:] if last else data[offset : offset + want]
        break_at = None if cut is None or last else int(cut * len(piece))
        lease = await svc.store.acquire(upload_id, by=None)
        try:
            info = await svc.write(
                lease,
                patch_body(piece, break_at),
                declared_bytes=len(piece) if break_at is None else None,
                checksum=None,
                client_ip=None,
            )
        except IncompleteBody:
            loaded = await svc.store.load(upload_id)
            if loaded is None:  # it broke after its last byte and was completed
                break
            info = loaded[0]
        assert offset <= info.offset <= offset + len(piece)
        offset = info.offset
        if info.completing or offset == size:
            break
    stored, meta = await get_object(s3, tus_key(prefix, url))
    assert stored == data
    assert meta["sha256"] == sha256_hex(data)
    assert await s3.list_multipart(prefix) == []
