"""The one place a :class:`~proxy.errors.ProxyError` becomes an HTTP response, and the
``Server`` header every answer carries."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyError

# aiohttp answers "Server: Python/3.11 aiohttp/3.x" unless a Server header is set, which
# tells a scanner which CVEs to try.  Every answer carries this bare product token
# instead: aiohttp adds its own banner to any answer without one (after the
# on_response_prepare hooks run), so the header cannot simply be left out.
SERVER_HEADER = "upload-proxy"


def error_response(error: ProxyError, *, close: bool = False) -> web.Response:
    """JSON ``{"code", "message"}`` with the error's status and headers.

    ``close`` ends the connection after the answer: used when the request body
    was not (fully) read, so the client does not keep streaming a body nobody reads.
    It also serves errors aiohttp's parser raises, which no app hook sees, hence the
    ``Server`` header here too.
    """
    resp = web.json_response(error.to_json(), status=error.status, headers=error.headers)
    resp.headers["Server"] = SERVER_HEADER
    if close:
        resp.force_close()
    return resp


async def hide_server_banner(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: our bare Server header on every answer of an app."""
    response.headers["Server"] = SERVER_HEADER
