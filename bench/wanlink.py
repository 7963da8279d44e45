"""An emulated long-distance link for the bench: a TCP relay on loopback, in user space.

Why not ``tc qdisc ... netem``: the kernel of the project's machine has no sch_netem
("qdisc kind unknown"), so the delay and the loss cannot be made by the kernel.  This
relay stands in for them.  It does not drop packets (TCP over loopback would only
retransmit them at loopback speed); it imposes what a lossy long-RTT path does to one
TCP flow:

* each direction of each connection is delayed by RTT/2 (bytes are delivered RTT/2
  after they were read), and connecting costs one RTT;
* each direction of each connection is paced at the Mathis et al. bound for a
  Reno-like flow, ``MSS / RTT * sqrt(3/2) / sqrt(loss)`` (80 ms and 0.5 % loss:
  about 0.30 MiB/s), with at most one bandwidth-delay product in flight.

Several connections (parallel uploads) each get their own cap, as several TCP flows
over a real lossy path would: that is what parallel uploads buy there.  What it does not
model: slow start, the burstiness of real losses, a shared bottleneck's capacity.

    python bench/wanlink.py HOST PORT [--rtt-ms 80] [--loss 0.005]

prints ``{"port": N, "rate_bytes_s": R}`` once listening on 127.0.0.1, then relays to
HOST:PORT until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time

MSS_BYTES = 1448
READ_BYTES = 16 * 1024


def mathis_rate(rtt_s: float, loss: float) -> float:
    """Throughput bound of one TCP flow (bytes/s) at this RTT and loss rate."""
    return MSS_BYTES / rtt_s * math.sqrt(1.5) / math.sqrt(loss)


class Link:
    def __init__(self, host: str, port: int, rtt_s: float, loss: float) -> None:
        self.target = (host, port)
        self.rtt_s = rtt_s
        self.rate = mathis_rate(rtt_s, loss)
        self.window = max(int(self.rate * rtt_s), READ_BYTES)

    async def serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def _connection(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.rtt_s)  # the handshake
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            down_w.close()
            return
        pumps = [
            asyncio.create_task(self._pump(down_r, up_w)),
            asyncio.create_task(self._pump(up_r, down_w)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        # One side closed: let the other finish what is in flight, then close both.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), 30)
        for w in (up_w, down_w):
            w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        # What is in the pipe: a window's worth, and never less than a few reads (the
        # pacing, not the window, is what caps the rate).
        room = asyncio.Semaphore(max(4, math.ceil(self.window / READ_BYTES)))

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                if not data:
                    with contextlib.suppress(Exception):
                        dst.write_eof()
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                dst.write(data)
                await dst.drain()
                room.release()

        sender = asyncio.create_task(deliver())
        paced = time.monotonic()
        try:
            while True:
                await room.acquire()  # at most a window in flight
                data = await src.read(READ_BYTES)
                if not data:
                    break
                paced = max(paced, time.monotonic()) + len(data) / self.rate
                await asyncio.sleep(max(0.0, paced - time.monotonic()))
                queue.put_nowait((time.monotonic() + self.rtt_s / 2, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(Exception):
            await sender


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rtt-ms", type=float, default=80.0)
    ap.add_argument("--loss", type=float, default=0.005)
    args = ap.parse_args()
    link = Link(args.host, args.port, args.rtt_ms / 1000, args.loss)
    server = await link.serve()
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, "rate_bytes_s": round(link.rate)}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
