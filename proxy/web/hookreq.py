"""The ``HTTPRequest`` part of a hook event, from an aiohttp request.

What a receiver must not learn is left out: credentials (``Authorization``, cookies; see
:mod:`proxy.hooks.payload`), the query string (a signed URL's signature is a credential
for its key) and a tus URL id (the upload's secret: the path shows the storage id
instead, the same id as ``Upload.ID``).
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from proxy.engine.dedup import OWNER_METADATA as CONTENT_OWNER_METADATA
from proxy.hooks.payload import HookRequest
from proxy.tus.concat import CONCAT_METADATA
from proxy.tus.finished import ID_METADATA, OWNER_METADATA
from proxy.web.preflight import request_client

# The object metadata the proxy writes and reads back: who stored it (instant uploads
# trust an object only for its owner), who may HEAD/GET a completed tus upload, its tus
# id and kind, its SHA-256.  Not the hooks' to set or drop.
PROXY_METADATA = frozenset(
    {CONTENT_OWNER_METADATA, OWNER_METADATA, ID_METADATA, CONCAT_METADATA, "sha256"}
)


def hook_request(request: web.Request, *, path: str | None = None) -> HookRequest:
    return HookRequest(
        method=request.method,
        uri=request.path if path is None else path,
        remote_addr=request_client(request).ip,
        headers=tuple((k, v) for k, v in request.headers.items()),
    )


def hook_metadata(own: Mapping[str, str], chosen: Mapping[str, str]) -> dict[str, str]:
    """An object's metadata once a pre-create hook chose ``chosen`` (keys lower-cased,
    values header-safe) for ``ChangeFileInfo.MetaData``: the hook's user metadata, and
    the proxy's own keys as they were in ``own``, whatever the hook said of them."""
    user = {k: v for k, v in chosen.items() if k not in PROXY_METADATA}
    return {**user, **{k: v for k, v in own.items() if k in PROXY_METADATA}}
