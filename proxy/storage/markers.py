"""Counting in the bucket, across instances: one empty marker object per counted thing,
in one folder, and a cap that holds however many instances race for the last place.

Used for the unfinished tus uploads of a principal (:meth:`proxy.tus.state.TusStore.reserve`)
and the files of an upload link (:mod:`proxy.links`).  Only conditional writes and
listings: any S3 store that lists what it acknowledged can do it.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Protocol

from proxy.storage.base import Body, ObjectInfo

# A creation among the first ``limit`` of its folder re-lists this many times, waiting
# about RESERVE_WAIT_S x round, while racing later creations withdraw.
RESERVE_ROUNDS = 5
RESERVE_WAIT_S = 0.05


class MarkerStore(Protocol):
    """What counting needs of a store (:class:`~proxy.storage.base.Storage` has it)."""

    async def put_conditional(
        self, key: str, body: Body, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str: ...

    async def list_objects(self, prefix: str) -> list[ObjectInfo]: ...

    async def delete_object(self, key: str, *, if_match: str | None = None) -> None: ...


async def reserve(storage: MarkerStore, folder: str, marker: str, limit: int) -> bool:
    """Count ``marker`` (a key in ``folder``) against ``limit``; False, and nothing kept,
    if that makes more than ``limit`` markers.

    The marker is written first and the folder listed after, and a reservation is
    admitted only when the listing holds at most ``limit`` markers.  That never admits
    too many: of any set of admitted reservations, the one that listed last saw every one
    of their markers.  So a burst does not lock everyone out, markers sort by creation
    time (their names must start with it): one among the first ``limit`` waits (briefly,
    a few rounds) for the later ones, which withdraw at once, instead of giving up with
    them."""
    await storage.put_conditional(marker, b"", if_none_match=True)
    for attempt in range(RESERVE_ROUNDS):
        keys = [o.key for o in await storage.list_objects(folder)]
        if len(keys) <= limit:
            return True
        ahead = sum(1 for k in keys if k < marker)
        if ahead >= limit or attempt == RESERVE_ROUNDS - 1:
            break
        await asyncio.sleep(RESERVE_WAIT_S * (1 + attempt) * (0.5 + secrets.randbelow(100) / 100))
    await storage.delete_object(marker)
    return False
