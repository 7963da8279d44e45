"""tus maintenance: expire abandoned uploads, finish interrupted completions, and remove
what a completed upload's URL answered from once its time is up.

Runs every ``tus.sweep_interval_s`` on every instance; the lease in each upload's state
makes sure only one of them handles an upload at a time.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.errors import ConditionFailed, Expired, LeaseLost, ProxyError, UploadFailed
from proxy.tus.service import TusService, no_bytes
from proxy.tus.state import release_quietly

log = logging.getLogger(__name__)


async def sweep_once(svc: TusService) -> int:
    """Expire old uploads and finish interrupted completions; return how many were handled.

    An upload whose lease is held is being written: it is live and left alone
    (:meth:`UploadInfo.expired`), here and in :meth:`TusStore.owns_multipart`."""
    handled = 0
    ids = await svc.store.list_ids()
    for upload_id in ids:
        try:
            loaded = await svc.store.load(upload_id)
            if loaded is None:
                continue
            info = loaded[0]
            now = svc.store.clock()
            # A partial with every byte waits for its final (or its expiry).
            finish = (info.completing or info.reached_length) and not info.concat
            if info.leased(now) or not (finish or info.expired(now)):
                continue
            lease = await svc.store.acquire(upload_id, by=None, allow_expired=True)
            try:
                if lease.info.completing:
                    await svc.completer.complete_leased(lease, lease.info)
                elif lease.info.reached_length and not lease.info.concat:
                    # Every byte is durable but completion was never decided (a final
                    # PATCH that failed after setting a deferred length, or state from
                    # an older version): clients see offset == length and stop, so
                    # finish it as the empty PATCH the spec allows at that offset would.
                    await svc.write(
                        lease, no_bytes(), declared_bytes=0, checksum=None, client_ip=None
                    )
                else:
                    await svc.terminate(lease, why=Expired("the upload expired unfinished"))
            finally:
                await release_quietly(lease)
            handled += 1
        except asyncio.CancelledError:
            raise
        except UploadFailed:
            handled += 1  # it could not complete: failed for good, cleaned up, logged
        except (ProxyError, LeaseLost, ConditionFailed) as e:
            log.warning("tus sweeper: upload %s: %s", upload_id, e)
    await svc.delete_quietly(tuple(await svc.store.stale_markers(set(ids))))
    await svc.delete_quietly(tuple(await svc.store.expired_finished()))
    return handled


async def sweep_forever(svc: TusService) -> None:
    while True:
        await asyncio.sleep(svc.config.sweep_interval_s)
        try:
            await sweep_once(svc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("tus sweeper run failed; trying again next interval")
