"""What every protocol's uploads share, built once the store is open."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.engine.buffers import BufferPool, Buffers
from proxy.engine.dedup import ContentIndex
from proxy.engine.events import UploadEvents
from proxy.engine.limits import client_group
from proxy.engine.pipeline import StreamSettings
from proxy.hooks.dispatch import Hooks
from proxy.storage.base import Storage


@dataclass(frozen=True)
class Engine:
    """The store, the buffer pool (the daemon's memory bound), the streaming settings,
    the outcome reporter, the hooks and the content index; limits that hold for every
    protocol."""

    storage: Storage
    pool: BufferPool
    settings: StreamSettings
    events: UploadEvents
    max_upload_size_bytes: int
    key_prefix: str
    # upload.key_template ("": the built-in naming), validated at start-up.
    key_template: str = ""
    hooks: Hooks = field(default_factory=Hooks.disabled)
    # The content index (instant uploads): every protocol records what it stored there,
    # where its uploads complete.  None when dedup is off or the store cannot hold it.
    dedup: ContentIndex | None = None

    def buffers_for(self, client_ip: str | None) -> Buffers:
        """The pool as this client's address group sees it (its own cap); the whole pool
        for the daemon's own work (``None``: the sweeper finishing an upload)."""
        if client_ip is None:
            return self.pool
        return self.pool.client(client_group(client_ip))
