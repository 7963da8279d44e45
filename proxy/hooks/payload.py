"""The hook request and response, shaped like tusd v2's (``pkg/hooks``) plus our fields.

Request (JSON, one object)::

    {"Type": "post-finish",
     "EventID": "<32 hex>",                     ours: the same on every redelivery
     "Event": {
       "Upload": {"ID", "Size", "SizeIsDeferred", "Offset", "MetaData": {..},
                  "IsPartial": false, "IsFinal": false, "PartialUploads": null,
                  "Storage": {"Type": "s3store", "Bucket", "Key"}},
       "HTTPRequest": {"Method", "URI", "RemoteAddr", "Header": {name: [values]}},
       "Proxy": {"Protocol": "http" | "tus", "SHA256", "ETag", "Principal",
                 "Reason": {"Code", "Message"} | null, "Time": <unix s>}}}

Response (blocking events; any 2xx with an empty body means "go on")::

    {"RejectUpload": bool, "HTTPResponse": {"StatusCode", "Body", "Header"},
     "ChangeFileInfo": {"MetaData": {..}, "Storage": {"Key": ".."}}}
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

# Request headers a receiver never gets: credentials (a bearer token, a cookie).
_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True)
class HookRequest:
    """The client request an event came from (empty for the proxy's own work)."""

    method: str = ""
    uri: str = ""
    remote_addr: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        header: dict[str, list[str]] = {}
        for name, value in self.headers:
            if name.lower() not in _SECRET_HEADERS:
                header.setdefault(name, []).append(value)
        return {
            "Method": self.method,
            "URI": self.uri,
            "RemoteAddr": self.remote_addr,
            "Header": header,
        }


NO_REQUEST = HookRequest()


@dataclass(frozen=True)
class HookUpload:
    """What an event says about its upload."""

    protocol: str  # "http" (PUT, POST) or "tus"
    id: str  # the logged upload id: a tus upload's storage id, never its URL id
    key: str
    size: int | None  # None: not known yet (a chunked PUT, a tus deferred length)
    offset: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None
    etag: str | None = None
    principal: str = "-"


@dataclass(frozen=True)
class Reason:
    code: str
    message: str


def new_event_id() -> str:
    return secrets.token_hex(16)


def finish_event_id(upload: HookUpload) -> str:
    """The id of an upload's post-finish: derived, so a completion that is redone (a tus
    upload finished again by the sweeper after a crash) records the same event once."""
    return hashlib.sha256(f"post-finish\0{upload.protocol}\0{upload.id}".encode()).hexdigest()[:32]


def event_body(
    event_type: str,
    event_id: str,
    upload: HookUpload,
    *,
    bucket: str,
    request: HookRequest = NO_REQUEST,
    reason: Reason | None = None,
    now_s: float | None = None,
) -> bytes:
    body = {
        "Type": event_type,
        "EventID": event_id,
        "Event": {
            "Upload": {
                "ID": upload.id,
                "Size": upload.size if upload.size is not None else 0,
                "SizeIsDeferred": upload.size is None,
                "Offset": upload.offset,
                "MetaData": dict(upload.metadata),
                "IsPartial": False,
                "IsFinal": False,
                "PartialUploads": None,
                "Storage": {"Type": "s3store", "Bucket": bucket, "Key": upload.key},
            },
            "HTTPRequest": request.to_json(),
            "Proxy": {
                "Protocol": upload.protocol,
                "SHA256": upload.sha256,
                "ETag": upload.etag,
                "Principal": upload.principal,
                "Reason": None
                if reason is None
                else {"Code": reason.code, "Message": reason.message},
                "Time": round(time.time() if now_s is None else now_s, 3),
            },
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class HookReply:
    """A blocking hook's answer, reduced to what the proxy acts on."""

    reject: bool = False
    status: int | None = None
    message: str = ""
    new_key: str | None = None
    new_metadata: dict[str, str] | None = None


GO_ON = HookReply()


def parse_reply(raw: bytes) -> HookReply:
    """A receiver's answer; ``ValueError`` when it is not one (the hook then counts as
    failed).  Unknown fields are ignored, as tusd does; so are ``ChangeFileInfo.ID`` (the
    proxy makes its ids) and ``HTTPResponse.Header`` (a receiver does not set our
    answer's headers), see the README."""
    if len(raw) > MAX_REPLY_BYTES:
        raise ValueError(f"reply larger than {MAX_REPLY_BYTES} bytes")
    if not raw.strip():
        return GO_ON
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("reply is not a JSON object")
    http = data.get("HTTPResponse") or {}
    change = data.get("ChangeFileInfo") or {}
    if not isinstance(http, dict) or not isinstance(change, dict):
        raise ValueError("HTTPResponse and ChangeFileInfo must be objects")
    status = http.get("StatusCode")
    if status is not None and not (isinstance(status, int) and 400 <= status <= 599):
        status = None  # only a refusal's status is taken; a 2xx answer is the proxy's own
    storage = change.get("Storage") or {}
    meta = change.get("MetaData")
    new_key = storage.get("Key") if isinstance(storage, dict) else None
    return HookReply(
        reject=data.get("RejectUpload") is True,
        status=status,
        message=str(http.get("Body") or "")[:1024],
        new_key=new_key if isinstance(new_key, str) and new_key else None,
        new_metadata=(
            {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None
        ),
    )
