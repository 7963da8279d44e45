"""One error type with a stable code and an HTTP status.

Everything that can go wrong with an upload is raised as a :class:`ProxyError`
(or a subclass) and rendered to JSON in exactly one place (``proxy.app``).
The ``code`` strings are part of the public API: clients and dashboards match
on them, so never rename one.  ``reason`` is the bounded metrics label: every
value used anywhere must be listed in :data:`REASONS` (metrics files anything
else under ``other``, so a typo cannot mint new series).
"""

from __future__ import annotations

REASONS = (
    "bad_request",
    "busy",
    "cancelled",
    "checksum_mismatch",
    "client_disconnect",
    "client_limit",
    "client_timeout",
    "conflict",
    "forbidden",
    "gone",
    "internal",
    "locked",
    "memory_pressure",
    "not_allowed",
    "not_found",
    "shutting_down",
    "storage_error",
    "storage_unavailable",
    "too_large",
    "unauthorized",
)


class ProxyError(Exception):
    """An error that maps to one HTTP response: ``{"code": ..., "message": ...}``."""

    code = "ERR_INTERNAL"
    status = 500
    reason = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(ProxyError):
    code = "ERR_BAD_REQUEST"
    status = 400
    reason = "bad_request"


class InvalidKey(BadRequest):
    code = "ERR_INVALID_KEY"


class ChecksumMismatch(BadRequest):
    code = "ERR_CHECKSUM_MISMATCH"
    reason = "checksum_mismatch"


class IncompleteBody(BadRequest):
    """The client went away or the body ended before its declared length."""

    code = "ERR_INCOMPLETE_BODY"
    reason = "client_disconnect"


class ClientTimeout(ProxyError):
    code = "ERR_CLIENT_TIMEOUT"
    status = 408
    reason = "client_timeout"


class TooSlow(ClientTimeout):
    """The body arrives below ``limits.min_body_rate_bytes_per_s`` after the grace period."""

    code = "ERR_TOO_SLOW"


class HeaderTimeout(ClientTimeout):
    """The request headers were not complete within ``server.header_timeout_s``."""

    code = "ERR_HEADER_TIMEOUT"


class KeyExists(ProxyError):
    code = "ERR_KEY_EXISTS"
    status = 409
    reason = "conflict"


class KeyConflict(ProxyError):
    """The key collides with a folder (objects exist under ``key/``) on a store that cannot
    hold an object and a folder of the same name (SeaweedFS)."""

    code = "ERR_KEY_CONFLICT"
    status = 409
    reason = "conflict"


class TooLarge(ProxyError):
    code = "ERR_TOO_LARGE"
    status = 413
    reason = "too_large"


class Busy(ProxyError):
    """No part buffer could be had within the admission timeout."""

    code = "ERR_BUSY"
    status = 503
    reason = "busy"


class TooManyConnections(ProxyError):
    """A listener has ``server.max_connections`` open: a new connection is answered and closed."""

    code = "ERR_TOO_MANY_CONNECTIONS"
    status = 503
    reason = "busy"


class MemoryPressure(ProxyError):
    """The process or the machine is close to its memory limit: new uploads wait outside."""

    code = "ERR_MEMORY_PRESSURE"
    status = 503
    reason = "memory_pressure"


class StorageError(ProxyError):
    """S3 answered, but with an error that retrying will not fix."""

    code = "ERR_STORAGE"
    status = 502
    reason = "storage_error"


class StorageUnavailable(ProxyError):
    """S3 is down, unreachable or kept failing past the retry budget."""

    code = "ERR_STORAGE_UNAVAILABLE"
    status = 503
    reason = "storage_unavailable"


class ObjectExists(StorageError):
    """Raised by storage when a conditional write finds the key taken."""

    code = "ERR_KEY_EXISTS"
    status = 409
    reason = "conflict"


class ConditionFailed(ObjectExists):
    """A conditional write (If-Match / If-None-Match) lost: someone else wrote first."""

    code = "ERR_CONFLICT"


class NotFound(ProxyError):
    code = "ERR_NOT_FOUND"
    status = 404
    reason = "not_found"


class Gone(ProxyError):
    """The resource existed but has expired."""

    code = "ERR_GONE"
    status = 410
    reason = "gone"


class TooManyUnfinished(ProxyError):
    """The principal already has ``tus.max_unfinished_per_principal`` uploads unfinished."""

    code = "ERR_TOO_MANY_UNFINISHED_UPLOADS"
    status = 429
    reason = "client_limit"


class UploadFailed(Gone):
    """A resumable upload could not be completed as received and was discarded (its parts
    were aborted, its state deleted): the client has to upload the file again."""

    code = "ERR_UPLOAD_FAILED"


class Locked(ProxyError):
    """Another request (on this or another instance) holds the resource."""

    code = "ERR_LOCKED"
    status = 423
    reason = "locked"


class StartupError(Exception):
    """The daemon cannot start; the message tells the operator why and what to change
    (e.g. the port and the config key).  ``python -m proxy`` prints it and exits 1."""
