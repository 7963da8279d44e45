"""A completed tus upload, found by its id once its state is gone.

Completion deletes an upload's state, but a client whose last answer was lost (a
restarted daemon, a dropped connection, a reloaded page) asks again with a HEAD: it must
learn that the upload is complete, with the digest of what was stored, and not be told
404 (tus-js-client would then upload the whole file again).  The object itself says: it
sits at a key the upload's id determines (:meth:`~proxy.tus.service.TusService.object_key`)
and carries the id and its owner in its metadata, set at creation (plain uploads cannot
write there, nor set them).
"""

from __future__ import annotations

from proxy.auth import ANONYMOUS, Principal
from proxy.storage.base import ObjectInfo
from proxy.tus.state import TusStorage

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


def owned_by(obj: ObjectInfo, principal: Principal) -> bool:
    """Did ``principal`` create the upload that stored ``obj``?  Objects from before owners
    were recorded count as anonymous (reachable only with auth off), as their state did."""
    return principal.owns(obj.metadata.get(OWNER_METADATA, str(ANONYMOUS)))
