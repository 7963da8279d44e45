"""Instant uploads and rsync-like re-runs, client side.

Before a file is sent it is hashed (:func:`prehash`: a streaming read in the worker
thread, constant memory, its progress on the file's bar) and the SHA-256 goes ahead of
the body: ``X-Content-SHA256`` on a PUT (with ``Expect: 100-continue``, so the server can
answer before any body byte), ``sha256`` in a tus creation's ``Upload-Metadata``.  The
server copies content this token stored before instead of taking the bytes again.

A PUT also says ``If-None-Match: *`` (create-only) unless ``--overwrite``: a key that is
taken is a ``409 ERR_KEY_EXISTS``, and the server adds ``"identical": true`` when the object
there has the declared SHA-256 *and* was stored by the same token; only then the file is
reported ``skipped (identical)`` and counts as done.  Anyone else's object, or another
content, is an error: the server never tells a token what others stored.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from proxy.client.progress import FileProgress
from proxy.client.retry import UploadError
from proxy.client.source import FileSource

if TYPE_CHECKING:
    from proxy.client.transfer import Answer

SHA256_HEADER = "X-Content-SHA256"


async def prehash(source: FileSource, progress: FileProgress) -> str:
    """The file's SHA-256 (hex); the bar shows the read as it goes, then starts over."""
    protocol, progress.protocol = progress.protocol, "hash"
    h = hashlib.sha256()

    def moved(nbytes: int) -> None:
        progress.position += nbytes

    await source.hash_range(h, 0, source.identity.size, moved)
    progress.protocol, progress.position = protocol, 0
    return h.hexdigest()


def put_headers(sha256: str | None, overwrite: bool) -> dict[str, str]:
    headers = {} if overwrite else {"If-None-Match": "*"}
    if sha256 is not None:
        headers[SHA256_HEADER] = sha256
    return headers


def identical(answer: Answer, sha256: str | None) -> str | None:
    """``"identical"`` when a 409 says the key already holds this very file."""
    if sha256 is None:
        return None
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return None
    if isinstance(doc, dict) and doc.get("code") == "ERR_KEY_EXISTS" and doc.get("identical"):
        return "identical"
    return None


def refused(answer: Answer, key: str, overwrite: bool) -> UploadError:
    """The error for a PUT's failure answer; a taken key says what to do about it."""
    error = answer.error()
    if error.code == "ERR_KEY_EXISTS":
        why = (
            "the server does not allow replacing objects"
            if overwrite
            else "use --overwrite to replace it"
        )
        error = UploadError(
            f"409 another file is stored under {key!r}; {why}",
            code=error.code,
            status=409,
            retryable=False,
        )
    return error
