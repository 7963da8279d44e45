"""How an event reaches its receiver: an HTTP POST or an executable.

A transport sends one event once and returns the receiver's reply, or raises
:class:`HookFailed`; retries are the caller's (:mod:`.dispatch`, :mod:`.outbox`).

* HTTP: ``POST http_url`` with the JSON body, ``Content-Type: application/json``,
  ``Hook-Event-Type``, ``Hook-Event-Id`` and ``Hook-Signature: sha256=<hex>``, the
  HMAC-SHA256 of the exact body bytes under ``http_secret_file``'s secret.  Any 2xx is an
  acknowledgement; its body, if any, is the reply.  Redirects are not followed.
* Executable: ``exec_path <event type>`` without a shell, the JSON on stdin; exit 0 is an
  acknowledgement and stdout the reply.  Its stderr goes to our log (a line or two).
  Killed after ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from typing import Protocol

import aiohttp

from proxy.hooks.payload import MAX_REPLY_BYTES, HookReply, parse_reply

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Hook-Signature"
EVENT_ID_HEADER = "Hook-Event-Id"
EVENT_TYPE_HEADER = "Hook-Event-Type"
STDERR_BYTES = 4096  # of an executable hook's stderr, for our log


class HookFailed(Exception):
    """The receiver did not acknowledge the event (safe to log: no secret in it)."""


class Transport(Protocol):
    name: str  # a metrics label: "http" or "exec"

    async def send(self, event_type: str, event_id: str, body: bytes) -> HookReply: ...

    async def close(self) -> None: ...


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class HttpTransport:
    name = "http"

    def __init__(self, url: str, secret: bytes, timeout_s: float) -> None:
        self.url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, event_type: str, event_id: str, body: bytes) -> HookReply:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {
            "Content-Type": "application/json",
            EVENT_TYPE_HEADER: event_type,
            EVENT_ID_HEADER: event_id,
            SIGNATURE_HEADER: signature(self._secret, body),
        }
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.content.read(MAX_REPLY_BYTES + 1)
                if not 200 <= resp.status < 300:
                    raise HookFailed(f"the receiver answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise HookFailed(f"the receiver did not answer: {type(e).__name__}: {e}") from None
        try:
            return parse_reply(raw)
        except ValueError as e:
            raise HookFailed(f"unreadable reply: {e}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class ExecTransport:
    name = "exec"

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self._timeout_s = timeout_s

    async def send(self, event_type: str, event_id: str, body: bytes) -> HookReply:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.path,
                event_type,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={
                    "HOOK_EVENT_ID": event_id,
                    "HOOK_EVENT_TYPE": event_type,
                    "PATH": "/usr/bin:/bin",
                },
            )
        except OSError as e:
            raise HookFailed(f"cannot run the hook: {e.strerror}") from None
        try:
            async with asyncio.timeout(self._timeout_s):
                out, err = await _exchange(proc, body)
        except TimeoutError:
            raise HookFailed(f"the hook ran longer than {self._timeout_s}s; killed") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if err:
            log.info("hook %s stderr: %r", event_type, err)
        if proc.returncode != 0:
            raise HookFailed(f"the hook exited with {proc.returncode}")
        try:
            return parse_reply(out)
        except ValueError as e:
            raise HookFailed(f"unreadable reply: {e}") from None

    async def close(self) -> None:
        return None


async def _exchange(proc: asyncio.subprocess.Process, body: bytes) -> tuple[bytes, bytes]:
    """Feed ``body`` and read the answers, in bounded memory: stdout up to one byte past
    MAX_REPLY_BYTES (more is refused as a reply), the first STDERR_BYTES of stderr; the
    rest of both is read and dropped so the hook never blocks on a full pipe."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(body)
            await proc.stdin.drain()
        proc.stdin.close()

    out, err, _ = await asyncio.gather(
        _read_capped(proc.stdout, MAX_REPLY_BYTES + 1),
        _read_capped(proc.stderr, STDERR_BYTES),
        feed(),
    )
    await proc.wait()
    return out, err


async def _read_capped(stream: asyncio.StreamReader, cap_bytes: int) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, cap_bytes - len(kept))]
    return bytes(kept)
