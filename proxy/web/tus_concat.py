"""tus ``concatenation`` over HTTP (parallel uploads): creations that carry
``Upload-Concat: partial`` (a slice of a file) or ``Upload-Concat: final;<urls>`` (the
file, made of its finished partials), and what HEAD and PATCH say of them.

:mod:`proxy.web.tus` hands a creation here once it has parsed the core headers, and
offers the extension only where the store can do it (``TusService.concat.supported``).
Groups, placement and the final's assembly are :mod:`proxy.tus.concat`; only headers and
statuses live here.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from aiohttp import web

from proxy.auth import Grant
from proxy.errors import BadConcat, BadHeader, FinalNotWritable, LengthRequired, NotFound
from proxy.storage.base import ObjectInfo
from proxy.tus import concat
from proxy.tus.service import Checksum, NewUpload, TusService, quota_of
from proxy.tus.state import UploadInfo
from proxy.web.preflight import request_client
from proxy.web.tus_common import (
    TUS,
    finished_upload,
    new_upload,
    pre_create,
    service,
    upload_headers,
    write_body,
)

log = logging.getLogger(__name__)

EXTENSION = "concatenation"


def requested(request: web.Request, grant: Grant, length: int | None) -> concat.ConcatHeader | None:
    """The creation's ``Upload-Concat`` (None: none, a plain creation), refused where it
    cannot be honoured: a store that cannot concatenate, an upload link, a partial
    without its length."""
    cat = concat.parse_header(request.headers.get(concat.HEADER), request.app[TUS].config.base_path)
    if cat is None:
        return None
    if not service(request).concat.supported:
        raise BadHeader("this server's store cannot concatenate uploads")
    if grant.link is not None:
        # A link's caps (file size, file count) are per file: the final's size is known
        # only from its partials, after they were taken.  Links upload files whole.
        raise BadConcat("upload links do not take parallel (concatenated) uploads")
    if cat.kind != concat.FINAL and length is None:
        raise LengthRequired("a partial upload needs its Upload-Length")
    return cat


async def create_partial(
    request: web.Request,
    grant: Grant,
    new: NewUpload,
    with_body: bool,
    checksum: Checksum | None,
) -> web.StreamResponse:
    """A partial upload: a tus upload whose bytes a final upload will take (no hooks, no
    instant upload, no file place of an upload link: the final is the file)."""
    svc = service(request)
    # The handler's first await: partials are ranked in the order they arrive
    # (proxy.tus.concat), so nothing may yield before the arrival lock is taken.
    async with svc.concat.arrival(new.quota, new.metadata_header, grant.prefix or ""):
        new = await _place(svc, new, grant)
    client_ip = request_client(request).ip
    try:
        info, lease = await svc.create(new, leased=with_body and new.length != 0, client=client_ip)
    except BaseException:
        if new.group:
            await svc.concat.abandon(new.group, new.id)
        raise
    if lease is not None:
        info = await write_body(
            request, lease, client_ip, checksum=checksum, discard_on_failure=True
        )
    headers = {"Location": request.app[TUS].config.base_path + new.url_id}
    if with_body:
        headers.update(upload_headers(info))
    log.info("tus create partial id=%s length=%s group=%s", info.id, info.length, info.group or "-")
    return web.Response(status=201, headers=headers)


async def _place(svc: TusService, new: NewUpload, grant: Grant) -> NewUpload:
    """The partial in its group: its key and its range of the group's multipart upload."""
    meta = {k: v for k, v in new.object_metadata.items() if k != "tus-id"}
    assert new.length is not None
    where = await svc.concat.place(
        new.url_id, new.id, new.length, new.quota, new.metadata_header, grant.prefix or "", meta
    )
    return replace(
        new,
        key=where.key,
        concat=concat.PARTIAL,
        multipart_id=where.multipart_id,
        group=where.group,
        part_base=where.part_base,
    )


async def create_final(
    request: web.Request, grant: Grant, cat: concat.ConcatHeader
) -> web.StreamResponse:
    """A final upload: made at once from its finished partials (no body, no length)."""
    svc = service(request)
    if "Upload-Length" in request.headers or request.content_length:
        raise BadConcat("a final upload takes neither Upload-Length nor a body")
    client_ip = request_client(request).ip
    quota = quota_of(grant.principal, client_ip)
    header = request.headers.get("Upload-Metadata", "")
    new = new_upload(svc, header, None, grant.principal, quota, grant.prefix or "")
    new = await pre_create(request, svc, new)
    # (Upload links, whose file places file_place takes, were refused in requested.)
    url_id, info = await svc.concat.finalize(
        cat, svc.info_of(new), new.url_id, by=grant.principal, client=client_ip
    )
    headers = {
        "Location": request.app[TUS].config.base_path + url_id,
        **upload_headers(info),
        "Upload-Length": str(info.offset),
    }
    return web.Response(status=201, headers=headers)


async def refuse_final(svc: TusService, upload_id: str, grant: Grant) -> None:
    """A PATCH to one's own final upload is a 403 (tus), not the 404 of a finished one."""
    try:
        obj = await finished_upload(svc, upload_id, grant)
    except NotFound:
        return
    if obj.metadata.get(concat.CONCAT_METADATA) == concat.FINAL:
        raise FinalNotWritable("a final upload is made of its partial uploads: no PATCH")


def state_headers(info: UploadInfo) -> dict[str, str]:
    """What HEAD of an unfinished upload says of concatenation: a partial says so."""
    return {concat.HEADER: concat.PARTIAL} if info.concat else {}


def object_headers(obj: ObjectInfo) -> dict[str, str]:
    """What HEAD of a completed upload says of concatenation: a final says so.  The
    partials' URLs are secrets kept nowhere: the list cannot be echoed."""
    if obj.metadata.get(concat.CONCAT_METADATA) == concat.FINAL:
        return {concat.HEADER: concat.FINAL}
    return {}
