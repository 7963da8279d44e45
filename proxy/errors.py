"""One error type with a stable code and an HTTP status.

Everything that can go wrong with an upload is raised as a :class:`ProxyError`
(or a subclass) and rendered to JSON in exactly one place (:mod:`proxy.web.errors`).
Every error class, and so every code, is declared here, each code by one class.
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
    "expired",
    "forbidden",
    "gone",
    "hook_rejected",
    "hook_unavailable",
    "internal",
    "locked",
    "memory_pressure",
    "not_allowed",
    "not_found",
    "shutting_down",
    "storage_error",
    "storage_unavailable",
    "terminated",
    "too_large",
    "unauthorized",
)


class ProxyError(Exception):
    """An error that maps to one HTTP response: ``{"code": ..., "message": ...}``.

    ``code`` and ``reason`` are the class's: every code is declared by exactly one class
    below (tests/test_errors.py checks it).  ``status`` may be given where one error
    answers with another status in one place (a 411 from aiohttp's parser)."""

    code = "ERR_INTERNAL"
    status = 500
    reason = "internal"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


# -- 400: the request itself is wrong ----------------------------------------------------


class BadRequest(ProxyError):
    code = "ERR_BAD_REQUEST"
    status = 400
    reason = "bad_request"


class InvalidKey(BadRequest):
    code = "ERR_INVALID_KEY"


class BadHeader(BadRequest):
    """A header's value is malformed, missing or contradicts the upload."""

    code = "ERR_BAD_HEADER"


class LengthRequired(BadRequest):
    """No body length where one is required (tus: neither Upload-Length nor
    Upload-Defer-Length; aiohttp's parser: 411)."""

    code = "ERR_LENGTH_REQUIRED"


class BadDigest(BadRequest):
    """A declared digest (Content-MD5, Repr-Digest, Upload-Checksum...) is not well formed."""

    code = "ERR_BAD_DIGEST"


class ChecksumAlgorithm(BadRequest):
    code = "ERR_CHECKSUM_ALGORITHM"


class BadMetadata(BadRequest):
    code = "ERR_BAD_METADATA"


class BadForm(BadRequest):
    code = "ERR_BAD_FORM"


class NoFiles(BadRequest):
    code = "ERR_NO_FILES"


class ChecksumMismatch(BadRequest):
    code = "ERR_CHECKSUM_MISMATCH"
    reason = "checksum_mismatch"


class UploadChecksumMismatch(ChecksumMismatch):
    """tus: a PATCH body does not match its Upload-Checksum (the checksum extension's 460)."""

    status = 460


class IncompleteBody(BadRequest):
    """The client went away or the body ended before its declared length."""

    code = "ERR_INCOMPLETE_BODY"
    reason = "client_disconnect"


class MethodNotAllowed(BadRequest):
    code = "ERR_METHOD_NOT_ALLOWED"
    status = 405


class ExpectationFailed(BadRequest):
    """An ``Expect`` header other than ``100-continue``."""

    code = "ERR_EXPECTATION"
    status = 417


class TusVersion(BadRequest):
    code = "ERR_TUS_VERSION"
    status = 412


class WrongContentType(BadRequest):
    """A tus body without ``Content-Type: application/offset+octet-stream``."""

    code = "ERR_CONTENT_TYPE"
    status = 415


class InteropVersion(BadRequest):
    """IETF resumable uploads: an ``Upload-Draft-Interop-Version`` we do not speak."""

    code = "ERR_INTEROP_VERSION"


# The problem types of draft-ietf-httpbis-resumable-upload (RFC 9457 members added to
# our JSON, so one body serves a client that reads either).
_PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"


class CompletedUpload(BadRequest):
    """IETF resumable uploads: an append to an upload that is complete already."""

    code = "ERR_UPLOAD_COMPLETED"

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "type": _PROBLEM_TYPES + "completed-upload",
            "title": "upload is already completed",
        }


class InconsistentLength(BadRequest):
    """IETF resumable uploads: ``Upload-Length``, ``Content-Length`` with
    ``Upload-Complete: ?1``, or an earlier request disagree about the upload's length."""

    code = "ERR_INCONSISTENT_LENGTH"

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "type": _PROBLEM_TYPES + "inconsistent-upload-length",
            "title": "inconsistent length values for upload",
        }


class HeadersTooLarge(BadRequest):
    code = "ERR_HEADERS_TOO_LARGE"
    status = 431


class HttpStatusError(ProxyError):
    """An error status aiohttp answered that no class above stands for: ``ERR_HTTP_<status>``."""

    reason = "bad_request"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, status=status)
        self.code = f"ERR_HTTP_{status}"


# -- 401 / 403: who is asking --------------------------------------------------------------


class Unauthorized(ProxyError):
    """No usable credentials: the client should authenticate."""

    code = "ERR_UNAUTHORIZED"
    status = 401
    reason = "unauthorized"

    def __init__(self, message: str, *, error: str | None = None) -> None:
        challenge = 'Bearer realm="upload-proxy"' + (f', error="{error}"' if error else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ProxyError):
    """Credentials were presented and are valid, or carry a signature, but do not allow this."""

    code = "ERR_FORBIDDEN"
    status = 403
    reason = "forbidden"


class BadSignature(Forbidden):
    code = "ERR_BAD_SIGNATURE"


class UrlExpired(Forbidden):
    code = "ERR_URL_EXPIRED"


class UrlLifetime(Forbidden):
    """A signed URL that expires further ahead than ``auth.signed_url_max_lifetime_s``."""

    code = "ERR_URL_LIFETIME"


class KeyNotAllowed(Forbidden):
    """A signed URL used for a key (or a route) it was not signed for."""

    code = "ERR_KEY_NOT_ALLOWED"


class SignedUrlNotForTus(Forbidden):
    code = "ERR_SIGNED_URL_NOT_FOR_TUS"


class LinkExpired(Forbidden):
    """An upload link past its expiry."""

    code = "ERR_LINK_EXPIRED"


class LinkRevoked(Forbidden):
    """An upload link the operator revoked (``upload-proxy link --revoke``)."""

    code = "ERR_LINK_REVOKED"


class LinkNotForUploads(Forbidden):
    """An upload link used outside the upload page's tus uploads (a plain PUT or POST
    would not count against the link's file cap)."""

    code = "ERR_LINK_NOT_FOR_UPLOADS"


class TooManyFiles(Forbidden):
    """An upload link whose ``max_files`` are used up (counted at tus creation)."""

    code = "ERR_TOO_MANY_FILES"


class ScopeNotAllowed(Forbidden):
    """A token without the scope the request needs (an upload-only token on a GET)."""

    code = "ERR_SCOPE_NOT_ALLOWED"


# -- 404 / 409 / 410 / 423: the resource ----------------------------------------------------


class NotFound(ProxyError):
    code = "ERR_NOT_FOUND"
    status = 404
    reason = "not_found"


class PreconditionFailed(ProxyError):
    """A download's ``If-Match`` / ``If-Unmodified-Since`` does not hold."""

    code = "ERR_PRECONDITION_FAILED"
    status = 412
    reason = "bad_request"


class RangeNotSatisfiable(ProxyError):
    """A download's ``Range`` starts at or after the object's end."""

    code = "ERR_RANGE_NOT_SATISFIABLE"
    status = 416
    reason = "bad_request"


class KeyExists(ProxyError):
    """``identical``: the object at the key holds the body the client declared (its
    SHA-256) and was stored by the same principal; said only to that principal."""

    code = "ERR_KEY_EXISTS"
    status = 409
    reason = "conflict"

    def __init__(
        self,
        message: str,
        *,
        identical: bool = False,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, status=status, headers=headers)
        self.identical = identical

    def to_json(self) -> dict[str, object]:
        doc = super().to_json()
        if self.identical:
            doc["identical"] = True
        return doc


class KeyConflict(ProxyError):
    """The key collides with a folder (objects exist under ``key/``) on a store that cannot
    hold an object and a folder of the same name (SeaweedFS)."""

    code = "ERR_KEY_CONFLICT"
    status = 409
    reason = "conflict"


class OffsetMismatch(ProxyError):
    """tus: Upload-Offset is not the upload's offset."""

    code = "ERR_OFFSET_MISMATCH"
    status = 409
    reason = "conflict"


class MismatchingOffset(OffsetMismatch):
    """IETF resumable uploads: the 409 of a wrong ``Upload-Offset``, with the upload's
    offset in the ``Upload-Offset`` header and the draft's problem type."""

    def __init__(self, expected: int, provided: int) -> None:
        super().__init__(
            f"Upload-Offset {provided} does not match the upload's offset {expected}",
            headers={"Upload-Offset": str(expected)},
        )
        self.expected = expected
        self.provided = provided

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "type": _PROBLEM_TYPES + "mismatching-upload-offset",
            "title": "offset from request does not match offset of resource",
            "expected-offset": self.expected,
            "provided-offset": self.provided,
        }


class Gone(ProxyError):
    """The resource existed but has expired."""

    code = "ERR_GONE"
    status = 410
    reason = "gone"


class UploadFailed(Gone):
    """A resumable upload could not be completed as received and was discarded (its parts
    were aborted, its state deleted): the client has to upload the file again."""

    code = "ERR_UPLOAD_FAILED"


class DigestMismatch(UploadFailed):
    """A resumable upload whose bytes do not have the SHA-256 its client declared
    (``Repr-Digest``): discarded at completion, nothing stored."""

    code = "ERR_REPR_DIGEST_MISMATCH"
    status = 400
    reason = "checksum_mismatch"


class Terminated(Gone):
    """How a tus upload ends when its client terminates it (DELETE), as its outcome is
    reported: a client's choice, not a failure of ours."""

    code = "ERR_TERMINATED"
    reason = "terminated"


class Expired(Gone):
    """How an unfinished tus upload ends when it expires (the sweeper removes it), as its
    outcome is reported.  Requests for it are answered ``ERR_GONE``."""

    code = "ERR_EXPIRED"
    reason = "expired"


class Locked(ProxyError):
    """Another request (on this or another instance) holds the resource."""

    code = "ERR_LOCKED"
    status = 423
    reason = "locked"


class LeaseLost(Locked):
    """Our tus lease was taken over (it expired), or is running out: stop writing."""

    code = "ERR_LEASE_LOST"


# -- 408 / 413 / 415 / 429: limits ----------------------------------------------------------


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


class TooLarge(ProxyError):
    code = "ERR_TOO_LARGE"
    status = 413
    reason = "too_large"


class NotAllowed(ProxyError):
    """The content type is not on ``limits.allowed_content_types``."""

    code = "ERR_UNSUPPORTED_MEDIA_TYPE"
    status = 415
    reason = "not_allowed"


class ExtensionNotAllowed(NotAllowed):
    code = "ERR_EXTENSION_NOT_ALLOWED"


class ClientLimit(ProxyError):
    """The client runs ``limits.max_uploads_per_client`` uploads already."""

    code = "ERR_CLIENT_LIMIT"
    status = 429
    reason = "client_limit"


class TooManyUnfinished(ProxyError):
    """The principal already has ``tus.max_unfinished_per_principal`` uploads unfinished."""

    code = "ERR_TOO_MANY_UNFINISHED_UPLOADS"
    status = 429
    reason = "client_limit"


# -- 503: the server ------------------------------------------------------------------------


class Busy(ProxyError):
    """No part buffer could be had within the admission timeout."""

    code = "ERR_BUSY"
    status = 503
    reason = "busy"


class TooManyUploads(ProxyError):
    """The server runs ``limits.max_concurrent_uploads`` uploads already."""

    code = "ERR_TOO_MANY_UPLOADS"
    status = 503
    reason = "busy"


class Evicted(ProxyError):
    """Every upload slot was taken and this client held the most: its newest upload gave
    its slot to a client holding fewer (see :class:`proxy.engine.limits.UploadSlots`)."""

    code = "ERR_EVICTED"
    status = 503
    reason = "busy"


class TooManyConnections(ProxyError):
    """A listener has ``server.max_connections`` open: a new connection is answered and closed."""

    code = "ERR_TOO_MANY_CONNECTIONS"
    status = 503
    reason = "busy"


class TooManyDownloads(ProxyError):
    """The server sends ``downloads.max_concurrent`` downloads already."""

    code = "ERR_TOO_MANY_DOWNLOADS"
    status = 503
    reason = "busy"


class MemoryPressure(ProxyError):
    """The process or the machine is close to its memory limit: new uploads wait outside."""

    code = "ERR_MEMORY_PRESSURE"
    status = 503
    reason = "memory_pressure"


class ShuttingDown(ProxyError):
    code = "ERR_SHUTTING_DOWN"
    status = 503
    reason = "shutting_down"


class Cancelled(ProxyError):
    """The upload was cancelled (the drain timed out, or the server stopped)."""

    code = "ERR_CANCELLED"
    status = 503
    reason = "cancelled"


class PartSizeChanged(ProxyError):
    """tus: an upload's pending bytes exceed ``part_size``, lowered while it ran."""

    code = "ERR_PART_SIZE_CHANGED"


# -- 502 / 503: the store -------------------------------------------------------------------


class StorageError(ProxyError):
    """S3 answered, but with an error that retrying will not fix."""

    code = "ERR_STORAGE"
    status = 502
    reason = "storage_error"


class StorageCredentials(StorageError):
    """The store cannot be used: no credentials are configured."""

    code = "ERR_STORAGE_CREDENTIALS"


class HookRejected(ProxyError):
    """A blocking hook (pre-create, pre-finish) refused the upload; the status and message
    are the hook's (``HTTPResponse``), 400 by default."""

    code = "ERR_HOOK_REJECTED"
    status = 400
    reason = "hook_rejected"


class HookUnavailable(ProxyError):
    """A blocking hook did not answer (timeout, refused connection, non-2xx, exit code,
    unreadable reply): the upload is refused rather than let through unchecked."""

    code = "ERR_HOOK_UNAVAILABLE"
    status = 503
    reason = "hook_unavailable"


class StorageUnavailable(ProxyError):
    """S3 is down, unreachable or kept failing past the retry budget."""

    code = "ERR_STORAGE_UNAVAILABLE"
    status = 503
    reason = "storage_unavailable"


class ObjectExists(KeyExists, StorageError):
    """Raised by storage when a conditional write finds the key taken: a
    :class:`KeyExists` for the client, a :class:`StorageError` for the code that called."""


class ConditionFailed(ObjectExists):
    """A conditional write (If-Match / If-None-Match) lost: someone else wrote first."""

    code = "ERR_CONFLICT"


def http_error(status: int, message: str) -> ProxyError:
    """The error for a status aiohttp answered by itself (routing, its parser)."""
    if status == 411:
        return LengthRequired(message, status=411)
    for cls in _BY_HTTP_STATUS:
        if cls.status == status:
            return cls(message)
    return HttpStatusError(message, status=status)


# The first class of each status stands for it when aiohttp answers with that status.
_BY_HTTP_STATUS: tuple[type[ProxyError], ...] = (
    BadRequest,
    NotFound,
    MethodNotAllowed,
    ClientTimeout,
    TooLarge,
    ExpectationFailed,
    HeadersTooLarge,
)


class StartupError(Exception):
    """The daemon cannot start; the message tells the operator why and what to change
    (e.g. the port and the config key).  ``python -m proxy`` prints it and exits 1."""
