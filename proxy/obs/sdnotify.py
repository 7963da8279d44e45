"""systemd's notify protocol, implemented directly: one datagram per message.

``Type=notify`` units learn from us when we are ready (``READY=1``), what we are
doing (``STATUS=...``, shown by ``systemctl status``), that we are stopping
(``STOPPING=1``) and that the event loop still turns (``WATCHDOG=1``).  The
protocol is a newline-separated ``KEY=value`` datagram sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace), so a
dependency is not worth it.  Without ``$NOTIFY_SOCKET`` every call is a no-op.

The watchdog ping comes from a task on the event loop, not a thread: a loop that
is blocked or starved stops pinging and systemd restarts us, which is the point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s: float | None = None
        if address and address[0] in "@/":
            # "@name" is Linux's abstract namespace: the name starts with a NUL byte.
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        if self._sock is not None and watchdog_usec and watchdog_usec > 0:
            # Ping twice per period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval_s = watchdog_usec / 2e6

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """Read (and by default remove) the variables, so child processes such as the
        embedded SeaweedFS cannot talk to systemd on our behalf."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"])
        if unset and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; never raises (systemd being away
        must not take an upload down).  Returns whether it was sent."""
        if self._sock is None or self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            # A newline in a value would start a new (forged) assignment.
            lines.append(f"{key}={value.replace(chr(10), ' ')}")
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), e)
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    async def run_watchdog(self) -> None:
        """Ping until cancelled; returns at once when no watchdog was asked for."""
        if self.watchdog_interval_s is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
