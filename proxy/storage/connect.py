"""The configured S3 client, and, for command-line tools that run beside the daemon
(``upload-proxy link --revoke``), a connection to its store that never starts one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.config import StorageConfig
from proxy.errors import StartupError
from proxy.storage.base import OpObserver
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import load_credentials


def s3_storage(
    sc: StorageConfig,
    *,
    endpoint_url: str,
    access_key: str | None = None,
    secret_key: str | None = None,
    observer: OpObserver | None = None,
) -> S3Storage:
    """An (unopened) client for the store of ``sc`` at ``endpoint_url`` ("" for AWS);
    without keys, the configured credentials file, profile or the standard chain.
    ``observer`` sees every S3 request attempt (metrics)."""
    return S3Storage(
        bucket=sc.bucket,
        endpoint_url=endpoint_url or None,
        region=sc.region,
        addressing_style=sc.addressing_style,
        verify=sc.ca_bundle or sc.verify_tls,
        access_key=access_key,
        secret_key=secret_key,
        credentials_file=sc.credentials_file or None,
        profile=sc.profile or None,
        connect_timeout_s=sc.connect_timeout_s,
        read_timeout_s=sc.read_timeout_s,
        retry_attempts=sc.retry_attempts,
        retry_base_delay_s=sc.retry_base_delay_s,
        max_pool_connections=sc.max_pool_connections,
        observer=observer,
    )


@asynccontextmanager
async def connect(sc: StorageConfig) -> AsyncIterator[S3Storage]:
    """The store the daemon uses, opened.  The embedded store is the running daemon's
    (on loopback, ``storage.embedded.s3_port``): it must be up, and its keys readable
    (run as the service user or root)."""
    access = secret = None
    endpoint = sc.endpoint_url
    if sc.backend == "embedded":
        try:
            creds = load_credentials(sc.embedded.data_dir)
        except OSError as e:
            raise StartupError(f"cannot read the embedded store's keys: {e}") from None
        if creds is None:
            raise StartupError(
                f"no embedded store in {sc.embedded.data_dir}: has the daemon run with this "
                "configuration?"
            )
        endpoint = f"http://127.0.0.1:{sc.embedded.s3_port}"
        access, secret = creds.access_key, creds.secret_key
    async with s3_storage(
        sc, endpoint_url=endpoint, access_key=access, secret_key=secret
    ) as storage:
        yield storage
