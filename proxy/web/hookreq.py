"""The ``HTTPRequest`` part of a hook event, from an aiohttp request.

What a receiver must not learn is left out: credentials (``Authorization``, cookies; see
:mod:`proxy.hooks.payload`), the query string (a signed URL's signature is a credential
for its key) and a tus URL id (the upload's secret: the path shows the storage id
instead, the same id as ``Upload.ID``).
"""

from __future__ import annotations

from aiohttp import web

from proxy.hooks.payload import HookRequest
from proxy.web.preflight import request_client


def hook_request(request: web.Request, *, path: str | None = None) -> HookRequest:
    return HookRequest(
        method=request.method,
        uri=request.path if path is None else path,
        remote_addr=request_client(request).ip,
        headers=tuple((k, v) for k, v in request.headers.items()),
    )
