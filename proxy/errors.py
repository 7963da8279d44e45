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


# code -> the class that declares it.
_DECLARED: dict[str, str] = {"ERR_INTERNAL": "ProxyError"}


class ProxyError(Exception):
    """An error that maps to one HTTP response: ``{"code": ..., "message": ...}``.

    ``code``, ``status`` and ``reason`` are the class's, declared in its class line
    (``class Busy(ProxyError, code="ERR_BUSY", status=503, reason="busy")``); a subclass
    inherits what it does not name.  Every code is declared by exactly one class below and
    every reason is one of :data:`REASONS`: a class that breaks either fails at import.
    ``status`` may be given where one error answers with another status in one place (a
    411 from aiohttp's parser)."""

    code = "ERR_INTERNAL"
    status = 500
    reason = "internal"

    def __init_subclass__(
        cls,
        *,
        code: str | None = None,
        status: int | None = None,
        reason: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if code is None and isinstance(cls.__dict__.get("code"), str):
            code = cls.__dict__["code"]  # assigned in the class body: held to the same rules
        if code is not None and code in _DECLARED:
            raise TypeError(f"{cls.__name__}: {code} is declared by {_DECLARED[code]} already")
        if (reason or cls.reason) not in REASONS:
            raise TypeError(f"{cls.__name__}: reason {reason!r} is not one of REASONS")
        if code is not None:
            _DECLARED[code] = cls.__name__
            cls.code = code
        if status is not None:
            cls.status = status
        if reason is not None:
            cls.reason = reason

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


class BadRequest(ProxyError, code="ERR_BAD_REQUEST", status=400, reason="bad_request"): ...


class InvalidKey(BadRequest, code="ERR_INVALID_KEY"): ...


class BadHeader(BadRequest, code="ERR_BAD_HEADER"):
    """A header's value is malformed, missing or contradicts the upload."""


class LengthRequired(BadRequest, code="ERR_LENGTH_REQUIRED"):
    """No body length where one is required (tus: neither Upload-Length nor
    Upload-Defer-Length; aiohttp's parser: 411)."""


class BadDigest(BadRequest, code="ERR_BAD_DIGEST"):
    """A declared digest (Content-MD5, Repr-Digest, Upload-Checksum...) is not well formed."""


class ChecksumAlgorithm(BadRequest, code="ERR_CHECKSUM_ALGORITHM"): ...


class BadMetadata(BadRequest, code="ERR_BAD_METADATA"): ...


class BadForm(BadRequest, code="ERR_BAD_FORM"): ...


class BadConcat(BadRequest, code="ERR_BAD_CONCAT"):
    """tus concatenation: a malformed ``Upload-Concat``, or partial uploads that cannot
    make the final upload asked for (a partial named twice, a non-last partial below the
    store's 5 MiB minimum part size, a final with an ``Upload-Length`` or a body)."""


class PartialUnfinished(BadRequest, code="ERR_PARTIAL_UNFINISHED"):
    """tus concatenation: a final upload names a partial upload that has not received
    all its bytes yet (finish it, then create the final upload again)."""


class NoFiles(BadRequest, code="ERR_NO_FILES"): ...


class ChecksumMismatch(BadRequest, code="ERR_CHECKSUM_MISMATCH", reason="checksum_mismatch"): ...


class UploadChecksumMismatch(ChecksumMismatch, status=460):
    """tus: a PATCH body does not match its Upload-Checksum (the checksum extension's 460)."""


class IncompleteBody(BadRequest, code="ERR_INCOMPLETE_BODY", reason="client_disconnect"):
    """The client went away or the body ended before its declared length."""


class MethodNotAllowed(BadRequest, code="ERR_METHOD_NOT_ALLOWED", status=405): ...


class ExpectationFailed(BadRequest, code="ERR_EXPECTATION", status=417):
    """An ``Expect`` header other than ``100-continue``."""


class UnsupportedTransferCoding(BadRequest, code="ERR_TRANSFER_CODING", status=501):
    """A transfer coding other than chunked (``gzip, chunked``): its bytes would be stored
    still encoded.  501 as RFC 9112 section 6.1 asks, and as nginx answers."""


class TusVersion(BadRequest, code="ERR_TUS_VERSION", status=412): ...


class WrongContentType(BadRequest, code="ERR_CONTENT_TYPE", status=415):
    """A tus body without ``Content-Type: application/offset+octet-stream``."""


class InteropVersion(BadRequest, code="ERR_INTEROP_VERSION"):
    """IETF resumable uploads: an ``Upload-Draft-Interop-Version`` we do not speak."""


# The problem types of draft-ietf-httpbis-resumable-upload (RFC 9457 members added to
# our JSON, so one body serves a client that reads either).
_PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"


class CompletedUpload(BadRequest, code="ERR_UPLOAD_COMPLETED"):
    """IETF resumable uploads: an append to an upload that is complete already."""

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "type": _PROBLEM_TYPES + "completed-upload",
            "title": "upload is already completed",
        }


class InconsistentLength(BadRequest, code="ERR_INCONSISTENT_LENGTH"):
    """IETF resumable uploads: ``Upload-Length``, ``Content-Length`` with
    ``Upload-Complete: ?1``, or an earlier request disagree about the upload's length."""

    def to_json(self) -> dict[str, object]:
        return {
            **super().to_json(),
            "type": _PROBLEM_TYPES + "inconsistent-upload-length",
            "title": "inconsistent length values for upload",
        }


class HeadersTooLarge(BadRequest, code="ERR_HEADERS_TOO_LARGE", status=431): ...


class HttpStatusError(ProxyError, reason="bad_request"):
    """An error status aiohttp answered that no class above stands for: ``ERR_HTTP_<status>``."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, status=status)
        self.code = f"ERR_HTTP_{status}"


# -- 401 / 403: who is asking --------------------------------------------------------------


class Unauthorized(ProxyError, code="ERR_UNAUTHORIZED", status=401, reason="unauthorized"):
    """No usable credentials: the client should authenticate."""

    def __init__(self, message: str, *, error: str | None = None) -> None:
        challenge = 'Bearer realm="upload-proxy"' + (f', error="{error}"' if error else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ProxyError, code="ERR_FORBIDDEN", status=403, reason="forbidden"):
    """Credentials were presented and are valid, or carry a signature, but do not allow this."""


class BadSignature(Forbidden, code="ERR_BAD_SIGNATURE"): ...


class FinalNotWritable(Forbidden, code="ERR_FINAL_UPLOAD"):
    """tus concatenation: a PATCH to a final upload (its bytes are its partials')."""


class UrlExpired(Forbidden, code="ERR_URL_EXPIRED"): ...


class UrlLifetime(Forbidden, code="ERR_URL_LIFETIME"):
    """A signed URL that expires further ahead than ``auth.signed_url_max_lifetime_s``."""


class KeyNotAllowed(Forbidden, code="ERR_KEY_NOT_ALLOWED"):
    """A signed URL used for a key (or a route) it was not signed for."""


class SignedUrlNotForTus(Forbidden, code="ERR_SIGNED_URL_NOT_FOR_TUS"): ...


class LinkExpired(Forbidden, code="ERR_LINK_EXPIRED"):
    """An upload link past its expiry."""


class LinkRevoked(Forbidden, code="ERR_LINK_REVOKED"):
    """An upload link the operator revoked (``upload-proxy link --revoke``)."""


class LinkNotForUploads(Forbidden, code="ERR_LINK_NOT_FOR_UPLOADS"):
    """An upload link used outside the upload page's tus uploads (a plain PUT or POST
    would not count against the link's file cap)."""


class TooManyFiles(Forbidden, code="ERR_TOO_MANY_FILES"):
    """An upload link whose ``max_files`` are used up (counted at tus creation)."""


class ScopeNotAllowed(Forbidden, code="ERR_SCOPE_NOT_ALLOWED"):
    """A token without the scope the request needs (an upload-only token on a GET)."""


# -- 404 / 409 / 410 / 423: the resource ----------------------------------------------------


class NotFound(ProxyError, code="ERR_NOT_FOUND", status=404, reason="not_found"): ...


class PreconditionFailed(
    ProxyError, code="ERR_PRECONDITION_FAILED", status=412, reason="bad_request"
):
    """A download's ``If-Match`` / ``If-Unmodified-Since`` does not hold."""


class RangeNotSatisfiable(
    ProxyError, code="ERR_RANGE_NOT_SATISFIABLE", status=416, reason="bad_request"
):
    """A download's ``Range`` starts at or after the object's end."""


class KeyExists(ProxyError, code="ERR_KEY_EXISTS", status=409, reason="conflict"):
    """``identical``: the object at the key holds the body the client declared (its
    SHA-256) and was stored by the same principal; said only to that principal."""

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


class KeyConflict(ProxyError, code="ERR_KEY_CONFLICT", status=409, reason="conflict"):
    """The key collides with a folder (objects exist under ``key/``) on a store that cannot
    hold an object and a folder of the same name (SeaweedFS)."""


class OffsetMismatch(ProxyError, code="ERR_OFFSET_MISMATCH", status=409, reason="conflict"):
    """tus: Upload-Offset is not the upload's offset."""


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


class Gone(ProxyError, code="ERR_GONE", status=410, reason="gone"):
    """The resource existed but has expired."""


class UploadFailed(Gone, code="ERR_UPLOAD_FAILED"):
    """A resumable upload could not be completed as received and was discarded (its parts
    were aborted, its state deleted): the client has to upload the file again."""


class DigestMismatch(
    UploadFailed, code="ERR_REPR_DIGEST_MISMATCH", status=400, reason="checksum_mismatch"
):
    """A resumable upload whose bytes do not have the SHA-256 its client declared
    (``Repr-Digest``): discarded at completion, nothing stored."""


class Terminated(Gone, code="ERR_TERMINATED", reason="terminated"):
    """How a tus upload ends when its client terminates it (DELETE), as its outcome is
    reported: a client's choice, not a failure of ours."""


class Expired(Gone, code="ERR_EXPIRED", reason="expired"):
    """How an unfinished tus upload ends when it expires (the sweeper removes it), as its
    outcome is reported.  Requests for it are answered ``ERR_GONE``."""


class Locked(ProxyError, code="ERR_LOCKED", status=423, reason="locked"):
    """Another request (on this or another instance) holds the resource."""


class LeaseLost(Locked, code="ERR_LEASE_LOST"):
    """Our tus lease was taken over (it expired), or is running out: stop writing."""


# -- 408 / 413 / 415 / 429: limits ----------------------------------------------------------


class ClientTimeout(ProxyError, code="ERR_CLIENT_TIMEOUT", status=408, reason="client_timeout"): ...


class TooSlow(ClientTimeout, code="ERR_TOO_SLOW"):
    """The body arrives below ``limits.min_body_rate_bytes_per_s`` after the grace period."""


class HeaderTimeout(ClientTimeout, code="ERR_HEADER_TIMEOUT"):
    """The request headers were not complete within ``server.header_timeout_s``."""


class TooLarge(ProxyError, code="ERR_TOO_LARGE", status=413, reason="too_large"): ...


class NotAllowed(ProxyError, code="ERR_UNSUPPORTED_MEDIA_TYPE", status=415, reason="not_allowed"):
    """The content type is not on ``limits.allowed_content_types``."""


class ExtensionNotAllowed(NotAllowed, code="ERR_EXTENSION_NOT_ALLOWED"): ...


class ClientLimit(ProxyError, code="ERR_CLIENT_LIMIT", status=429, reason="client_limit"):
    """The client runs ``limits.max_uploads_per_client`` uploads already."""


class TooManyUnfinished(
    ProxyError, code="ERR_TOO_MANY_UNFINISHED_UPLOADS", status=429, reason="client_limit"
):
    """The principal already has ``tus.max_unfinished_per_principal`` uploads unfinished."""


# -- 503: the server ------------------------------------------------------------------------


class Busy(ProxyError, code="ERR_BUSY", status=503, reason="busy"):
    """No part buffer could be had within the admission timeout."""


class TooManyUploads(ProxyError, code="ERR_TOO_MANY_UPLOADS", status=503, reason="busy"):
    """The server runs ``limits.max_concurrent_uploads`` uploads already."""


class Evicted(ProxyError, code="ERR_EVICTED", status=503, reason="busy"):
    """Every upload slot was taken and this client held the most: its newest upload gave
    its slot to a client holding fewer (see :class:`proxy.engine.limits.UploadSlots`)."""


class TooManyConnections(ProxyError, code="ERR_TOO_MANY_CONNECTIONS", status=503, reason="busy"):
    """A listener has ``server.max_connections`` open: a new connection is answered and closed."""


class TooManyDownloads(ProxyError, code="ERR_TOO_MANY_DOWNLOADS", status=503, reason="busy"):
    """The server sends ``downloads.max_concurrent`` downloads already."""


class MemoryPressure(ProxyError, code="ERR_MEMORY_PRESSURE", status=503, reason="memory_pressure"):
    """The process or the machine is close to its memory limit: new uploads wait outside."""


class ShuttingDown(ProxyError, code="ERR_SHUTTING_DOWN", status=503, reason="shutting_down"): ...


class Cancelled(ProxyError, code="ERR_CANCELLED", status=503, reason="cancelled"):
    """The upload was cancelled (the drain timed out, or the server stopped)."""


class PartSizeChanged(ProxyError, code="ERR_PART_SIZE_CHANGED"):
    """tus: an upload's pending bytes exceed ``part_size``, lowered while it ran."""


# -- 502 / 503: the store -------------------------------------------------------------------


class StorageError(ProxyError, code="ERR_STORAGE", status=502, reason="storage_error"):
    """S3 answered, but with an error that retrying will not fix."""


class StorageCredentials(StorageError, code="ERR_STORAGE_CREDENTIALS"):
    """The store cannot be used: no credentials are configured."""


class HookRejected(ProxyError, code="ERR_HOOK_REJECTED", status=400, reason="hook_rejected"):
    """A blocking hook (pre-create, pre-finish) refused the upload; the status and message
    are the hook's (``HTTPResponse``), 400 by default."""


class HookUnavailable(
    ProxyError, code="ERR_HOOK_UNAVAILABLE", status=503, reason="hook_unavailable"
):
    """A blocking hook did not answer (timeout, refused connection, non-2xx, exit code,
    unreadable reply): the upload is refused rather than let through unchecked."""


class StorageUnavailable(
    ProxyError, code="ERR_STORAGE_UNAVAILABLE", status=503, reason="storage_unavailable"
):
    """S3 is down, unreachable or kept failing past the retry budget."""


class ObjectExists(KeyExists, StorageError):
    """Raised by storage when a conditional write finds the key taken: a
    :class:`KeyExists` for the client, a :class:`StorageError` for the code that called."""


class ConditionFailed(ObjectExists, code="ERR_CONFLICT"):
    """A conditional write (If-Match / If-None-Match) lost: someone else wrote first."""


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
