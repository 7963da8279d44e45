"""A completed tus upload, found by its id once its state is gone.

Completion deletes an upload's state, but a client whose last answer was lost (a
restarted daemon, a dropped connection, a reloaded page) asks again with a HEAD: it must
learn that the upload is complete, with the digest of what was stored, and not be told
404 (tus-js-client would then upload the whole file again).  The object itself says: it
sits at a key the upload's id determines (:meth:`~proxy.tus.service.TusService.object_key`)
and carries the id and its owner in its metadata, set at creation (plain uploads cannot
write there, nor set them).

An upload begun as a resumable ``PUT /uploads/{key}`` stores its object at the client's
key, which holds no id: a record in the tus state (:meth:`TusStore.record_finished`,
written at completion) leads there, until it expires and the sweep removes it.
"""

from __future__ import annotations

from proxy.auth import ANONYMOUS, Principal
from proxy.storage.base import ObjectInfo
from proxy.tus.state import TusStorage, TusStore

ID_METADATA = "tus-id"
OWNER_METADATA = "tus-owner"


async def find(storage: TusStorage, folder_key: str, upload_id: str) -> ObjectInfo | None:
    """The completed object of upload ``upload_id`` whose key is ``folder_key`` or under
    ``folder_key/`` (its file name), with its metadata; None when there is none."""
    for listed in await storage.list_objects(folder_key):
        if listed.key != folder_key and not listed.key.startswith(folder_key + "/"):
            continue
        obj = await storage.head(listed.key)
        if obj is not None and obj.metadata.get(ID_METADATA) == upload_id:
            return obj
    return None


async def find_owned(
    store: TusStore, folder_key: str, upload_id: str, principal: Principal
) -> ObjectInfo | None:
    """The completed object of ``principal``'s upload ``upload_id``: in its folder
    ``folder_key`` (see :func:`find`), or at the client's key its record names; None for
    an unknown upload and for someone else's alike."""
    obj = await find(store.storage, folder_key, upload_id)
    if obj is None and (key := await store.finished_key(upload_id, principal)) is not None:
        obj = await store.storage.head(key)
        if obj is not None and obj.metadata.get(ID_METADATA) != upload_id:
            obj = None  # deleted or replaced since: the upload's object is gone
    if obj is None or not owned_by(obj, principal):
        return None
    return obj


def owned_by(obj: ObjectInfo, principal: Principal) -> bool:
    """Did ``principal`` create the upload that stored ``obj``?  Objects from before owners
    were recorded count as anonymous (reachable only with auth off), as their state did."""
    return principal.owns(obj.metadata.get(OWNER_METADATA, str(ANONYMOUS)))
