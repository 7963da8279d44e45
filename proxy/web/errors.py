"""The one place a :class:`~proxy.errors.ProxyError` becomes an HTTP response: the app's
error middleware, and the ``Server`` header every answer carries."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from proxy.errors import BadRequest, ProxyError, http_error

log = logging.getLogger(__name__)

# aiohttp answers "Server: Python/3.11 aiohttp/3.x" unless a Server header is set, which
# tells a scanner which CVEs to try.  Every answer carries this bare product token
# instead: aiohttp adds its own banner to any answer without one (after the
# on_response_prepare hooks run), so the header cannot simply be left out.
SERVER_HEADER = "upload-proxy"

# What error lines show for the request's path, when a route's path carries a secret (a
# tus URL id: whoever reads it may continue or terminate the upload).  Set by that
# route's handler; without it the path is shown as it is.
LOG_PATH = web.RequestKey("log_path", str)


def _path(request: web.Request) -> str:
    return request[LOG_PATH] if LOG_PATH in request else request.path


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


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        raise
    except ProxyError as e:
        body_left = not request.content.is_eof()
        if e.status >= 500 and not isinstance(e, BadRequest):  # the client's own: no warning
            log.warning(
                "%s %r -> %d %s: %r", request.method, _path(request), e.status, e.code, e.message
            )
        return error_response(e, close=body_left)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = http_error(e.status, e.reason)
        err.headers.update({k: v for k, v in e.headers.items() if k.lower() == "allow"})
        return error_response(err, close=not request.content.is_eof())
    except Exception:
        log.exception("unhandled error in %s %r", request.method, _path(request))
        return error_response(ProxyError("internal error"), close=True)


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, whose answers to errors before our app sees the
    request (malformed request line, oversized headers, bad chunk framing) are the same
    JSON as every other error.

    ``handle_error`` is the method ``web.RequestHandler`` answers those with; overriding it
    in a subclass of the exported class is the one way in (no hook, no swapped class, no
    private attribute).  tests/test_responses.py pins its signature and the JSON answer,
    so an aiohttp upgrade that changes either fails loudly there."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            text = "internal error"
        else:
            # aiohttp's message quotes the raw bytes it choked on (a bearer token in a bad
            # header line, a URL id or a signature in a bad request line): only what kind
            # of error it was goes to the log and the answer.
            text = f"malformed request: {_malformed_kind(exc)}"
            log.info("rejected malformed request from %s: %d %s", request.remote, status, text)
        return error_response(http_error(status, text), close=True)


# aiohttp.http_exceptions class names -> what the client did wrong, in words.
_MALFORMED_KINDS = {
    "BadHttpMethod": "bad method",
    "BadStatusLine": "bad request line",
    "InvalidURLError": "bad request target",
    "InvalidHeader": "bad header",
    "LineTooLong": "request line or header too long",
    "ContentLengthError": "bad Content-Length",
    "TransferEncodingError": "bad chunked framing",
    "ContentEncodingError": "bad content encoding",
}


def _malformed_kind(exc: BaseException | None) -> str:
    name = type(exc).__name__
    kind = _MALFORMED_KINDS.get(name, "bad HTTP message")
    if name == "LineTooLong" and exc is not None and len(exc.args) > 1:
        kind += f" (over {exc.args[1]} bytes)"  # LineTooLong(line, limit, ...): the limit
    return kind
