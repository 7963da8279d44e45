"""Every ``post-finish`` is kept in the bucket until a receiver acknowledged it.

An outbox entry is a small object ``{state_prefix}hooks/<event id>`` holding the event's
body, written with If-None-Match before the upload's success answer (a PUT's 201, the
tus PATCH that completes; for tus before the upload's state is deleted, so a completion
that crashed in between is redone by the sweeper and records the same event id, which
the condition turns into a no-op).  Then:

* the instance that recorded it delivers it at once;
* every instance lists the outbox every ``outbox_poll_interval_s`` and delivers what is
  due, so a receiver that was down, or an instance that died after recording, loses
  nothing;
* a delivery first **claims** the entry (a conditional write of ``claim_until``, like the
  tus lease), so two instances do not both send it while one is at it; a claim outlives
  one delivery attempt, and one left by a dead instance lapses;
* on acknowledgement the entry is deleted; on failure it is released with the attempt
  counted and the next try pushed back (exponential, at most ``retry_max_delay_s``).

Delivery is at least once: a receiver that acknowledges but whose answer is lost, or a
claim that lapses mid-delivery, sees the event again, with the same ``EventID``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import ConditionFailed, ProxyError
from proxy.storage.base import StateStore, Storage

log = logging.getLogger(__name__)

OUTBOX_FOLDER = "hooks/"
MAX_ENTRY_BYTES = 256 * 1024
FIRST_RETRY_DELAY_S = 1.0
FORMAT_VERSION = 1


class OutboxStorage(Storage, StateStore, Protocol):
    """The core protocol and small conditional objects."""


@dataclass(frozen=True)
class Entry:
    event_id: str
    event_type: str
    body: bytes
    attempts: int = 0
    next_s: float = 0.0
    claim_owner: str | None = None
    claim_until_s: float = 0.0

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "body": json.loads(self.body),
            "attempts": self.attempts,
            "next_s": self.next_s,
            "claim_owner": self.claim_owner,
            "claim_until_s": self.claim_until_s,
        }
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Entry:
        d = json.loads(raw)
        if d.get("v") != FORMAT_VERSION:
            raise ValueError("unknown outbox entry format")
        return cls(
            event_id=str(d["event_id"]),
            event_type=str(d["event_type"]),
            body=json.dumps(d["body"], separators=(",", ":")).encode(),
            attempts=int(d["attempts"]),
            next_s=float(d["next_s"]),
            claim_owner=d["claim_owner"],
            claim_until_s=float(d["claim_until_s"]),
        )


# Sends one event once: returns on acknowledgement, raises on failure.
Deliver = Callable[[str, str, bytes], Awaitable[None]]


class Outbox:
    def __init__(
        self,
        storage: OutboxStorage,
        state_prefix: str,
        *,
        claim_s: float,
        retry_max_delay_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.prefix = state_prefix + OUTBOX_FOLDER
        self.claim_s = claim_s
        self.retry_max_delay_s = retry_max_delay_s
        self.clock = clock
        self.depth = 0  # entries seen at the last listing (a gauge reads it)

    def key(self, event_id: str) -> str:
        return self.prefix + event_id

    async def record(self, event_id: str, event_type: str, body: bytes) -> None:
        """Durably keep the event; recording the same event id again changes nothing."""
        entry = Entry(event_id, event_type, body)
        try:
            await self.storage.put_conditional(
                self.key(event_id), entry.to_json(), if_none_match=True
            )
        except ConditionFailed:
            log.info("hook outbox: event %s was recorded already", event_id)

    async def deliver(self, event_id: str, send: Deliver) -> bool:
        """Claim, send, and delete (or reschedule) one entry; False when it was not due, not
        ours to send now, gone, or not acknowledged."""
        key = self.key(event_id)
        got = await self.storage.get_small(key, MAX_ENTRY_BYTES)
        if got is None:
            return False
        raw, etag = got
        try:
            entry = Entry.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.error("hook outbox: %s is unreadable (%s); left for an operator", key, e)
            return False
        now = self.clock()
        if now < entry.next_s or (entry.claim_owner is not None and now < entry.claim_until_s):
            return False
        owner = secrets.token_hex(8)
        claimed = Entry(
            entry.event_id, entry.event_type, entry.body, entry.attempts, entry.next_s,
            owner, now + self.claim_s,
        )  # fmt: skip
        try:
            etag = await self.storage.put_conditional(key, claimed.to_json(), if_match=etag)
        except ConditionFailed:
            return False  # another instance claimed it (or delivered it) first
        try:
            await send(entry.event_type, entry.event_id, entry.body)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            attempts = entry.attempts + 1
            delay = min(self.retry_max_delay_s, FIRST_RETRY_DELAY_S * 2 ** (attempts - 1))
            delay *= 0.5 + random.random() / 2
            retry = Entry(
                entry.event_id, entry.event_type, entry.body, attempts, self.clock() + delay
            )
            log.warning(
                "hook %s event=%s not delivered (attempt %d): %s; next try in %.1fs",
                entry.event_type, entry.event_id, attempts, e, delay,
            )  # fmt: skip
            try:
                await self.storage.put_conditional(key, retry.to_json(), if_match=etag)
            except (ConditionFailed, ProxyError) as e2:
                log.warning("hook outbox: could not reschedule %s: %s", event_id, e2)
            return False
        try:
            await self.storage.delete_object(key, if_match=etag)
        except ConditionFailed:
            pass  # our claim lapsed and someone else took it: they will send it again
        return True

    async def pending(self) -> list[str]:
        ids = [o.key[len(self.prefix) :] for o in await self.storage.list_objects(self.prefix)]
        self.depth = len(ids)
        return [i for i in ids if i and "/" not in i]

    async def deliver_due(self, send: Deliver) -> int:
        delivered = 0
        for event_id in await self.pending():
            try:
                if await self.deliver(event_id, send):
                    delivered += 1
            except ProxyError as e:
                log.warning("hook outbox: %s: %s", event_id, e)
        return delivered
