"""The one place a :class:`~proxy.errors.ProxyError` becomes an HTTP response."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyError


def error_response(error: ProxyError, *, close: bool = False) -> web.Response:
    """JSON ``{"code", "message"}`` with the error's status and headers.

    ``close`` ends the connection after the answer: used when the request body
    was not (fully) read, so the client does not keep streaming a body nobody reads.
    """
    resp = web.json_response(error.to_json(), status=error.status, headers=error.headers)
    if close:
        resp.force_close()
    return resp
