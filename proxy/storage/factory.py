"""The configured store, opened: ``async with open_storage(cfg.storage) as storage``.

The one place that knows the backends: the embedded SeaweedFS (started here, its bucket
created: it is ours) or any S3 endpoint (its bucket checked, never created).  Above it,
everything sees :class:`~proxy.storage.base.Storage` and the capabilities it offers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.config import StorageConfig
from proxy.errors import StorageError, StorageUnavailable
from proxy.storage.base import OpObserver, Storage
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed, load_or_create_credentials

log = logging.getLogger(__name__)

BUCKET_RETRY_S = 0.5


@asynccontextmanager
async def open_storage(
    cfg: StorageConfig, *, observer: OpObserver | None = None
) -> AsyncIterator[Storage]:
    """The store of ``cfg``, started (embedded) and opened, the bucket checked; closed
    (and the embedded store stopped) when the block ends.  ``observer`` sees every S3
    request attempt (metrics)."""
    embedded: EmbeddedSeaweed | None = None
    access = secret = None
    endpoint = cfg.endpoint_url
    if cfg.backend == "embedded":
        ec = cfg.embedded
        creds = load_or_create_credentials(ec.data_dir)
        embedded = EmbeddedSeaweed(
            ec.data_dir,
            bucket=cfg.bucket,
            credentials=creds,
            s3_port=ec.s3_port,
            weed_binary=ec.weed_binary,
            memory_limit_bytes=ec.memory_limit_bytes,
        )
        await embedded.start(ec.start_timeout_s)
        endpoint, access, secret = embedded.endpoint_url, creds.access_key, creds.secret_key
    storage = S3Storage(
        bucket=cfg.bucket,
        endpoint_url=endpoint or None,
        region=cfg.region,
        addressing_style=cfg.addressing_style,
        verify=cfg.ca_bundle or cfg.verify_tls,
        access_key=access,
        secret_key=secret,
        credentials_file=cfg.credentials_file or None,
        profile=cfg.profile or None,
        connect_timeout_s=cfg.connect_timeout_s,
        read_timeout_s=cfg.read_timeout_s,
        retry_attempts=cfg.retry_attempts,
        retry_base_delay_s=cfg.retry_base_delay_s,
        max_pool_connections=cfg.max_pool_connections,
        observer=observer,
    )
    try:
        await storage.open()
        try:
            if embedded is not None:
                await _create_bucket(storage, cfg.embedded.start_timeout_s)
            else:
                await storage.check()
        except (StorageError, StorageUnavailable, TimeoutError) as e:
            # An S3 that is down at boot is not a reason to crash-loop: /readyz reports it.
            log.warning("storage check failed at start-up: %s", e)
        yield storage
    finally:
        # The drain, its aborts and the sweepers are done before the store goes
        # (systemd's KillMode=mixed leaves stopping the embedded store to us).
        await storage.close()
        if embedded is not None:
            await embedded.stop()


async def _create_bucket(storage: S3Storage, timeout_s: float) -> None:
    """The embedded store's bucket, once the fresh store serves requests."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await storage.create_bucket()
                return
            except (StorageError, StorageUnavailable):
                await asyncio.sleep(BUCKET_RETRY_S)
