"""What the user sees: bars on a terminal, parseable lines elsewhere, JSON for scripts.

The uploads only move numbers in :class:`FileProgress`; a reporter samples them on a
timer (``tick``) and is told about retries and outcomes.  So the display costs nothing
per chunk, and a slow terminal cannot slow an upload.

Line format (stdout is not a TTY, e.g. CI logs): one event per line, a word then
``key=value`` fields.  Numbers are bare, ``-`` means unknown, and every string (paths,
keys, codes, messages) is a JSON string, so ``(\\w+)=("(?:[^"\\\\]|\\\\.)*"|\\S+)`` splits a line
and ``json.loads`` reads quoted values::

    progress path="a.iso" sent=10485760 size=104857600 pct=10.0 rate_mib_s=12.50 eta_s=7
    total sent=10485760 size=115343360 pct=9.1 rate_mib_s=12.50 eta_s=8 done=0 files=2
    retry path="a.iso" attempt=2 delay_s=1.30 code="ERR_NETWORK" status=- message="..."
    ok path="a.iso" protocol="tus" key=- url="http://h/files/0f3c..." size=104857600
       sha256="9f86..." resumed_from=0 sent=104857600 attempts=1 seconds=8.20   (one line)
    failed path="b.bin" protocol="put" code="ERR_UNAUTHORIZED" status=401 attempts=1
       message="401 the bearer token is not valid"                        (one line)
    summary files=2 ok=1 failed=1 bytes=104857600 seconds=8.30 rate_mib_s=12.05

``progress`` and ``total`` come every ``--progress-interval`` seconds while something
moves; ``sent`` is the file's bytes the server has or is receiving (it can go back after
an error, to what the server confirmed).  ``--json`` prints one JSON object per file
(``"event": "ok"``, ``"skipped"`` or ``"failed"``, the fields above) and one
``"event": "summary"``.  ``skipped`` is a success: the key already holds this very file
(``reason="identical"``); ``deduplicated=1`` on ``ok``: the server copied content it held,
nothing was sent.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import IO, Any

MiB = 1024 * 1024
RATE_WINDOW_S = 10.0


@dataclass
class FileProgress:
    path: str  # as the user gave it
    size: int
    protocol: str = "-"
    position: int = 0
    sent_bytes: int = 0  # put on the wire in this run, retries included
    started_s: float | None = None
    done: bool = False
    _samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    def sample(self, now_s: float) -> None:
        self._samples.append((now_s, self.sent_bytes))
        while len(self._samples) > 2 and now_s - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()

    def rate_bytes_s(self) -> float:
        """Recent wire rate (not position: a resumed upload jumping ahead is not speed)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class FileResult:
    path: str
    ok: bool
    protocol: str
    size: int
    sha256: str | None = None
    key: str | None = None
    upload_url: str | None = None
    resumed_from: int = 0
    sent_bytes: int = 0
    attempts: int = 0
    seconds: float = 0.0
    code: str | None = None
    status: int | None = None
    message: str | None = None
    # The server made the object from content it held: no body was sent.
    deduplicated: bool = False
    # Why nothing was uploaded although the file is fine ("identical": the key holds it).
    skipped: str | None = None

    @property
    def event(self) -> str:
        return "failed" if not self.ok else "skipped" if self.skipped else "ok"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["event"] = self.event
        del out["ok"]
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass(frozen=True)
class Summary:
    files: int
    ok: int
    failed: int
    bytes: int
    seconds: float

    def rate_mib_s(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0


class Reporter:
    """Says nothing (``--quiet``), except failures on stderr."""

    tick_interval_s = 1.0

    def __init__(self, files: list[FileProgress], err: IO[str] | None = None) -> None:
        self.files = files
        self.err = err or sys.stderr

    def tick(self, now_s: float) -> None:
        for f in self.files:
            if f.started_s is not None and not f.done:
                f.sample(now_s)

    def retry(self, f: FileProgress, attempt: int, delay_s: float, error: Any) -> None:
        pass

    def finished(self, r: FileResult) -> None:
        if not r.ok:
            print(f"upload-proxy: {r.path}: {r.message} ({r.code})", file=self.err, flush=True)

    def stop(self) -> None:
        """No more ticks; called before :meth:`close`, and instead of it on interruption."""

    def close(self, summary: Summary) -> None:
        pass


def _value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v), ensure_ascii=False)


def line(event: str, **fields: Any) -> str:
    return " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])


def _eta_s(left: int, rate: float) -> int | None:
    return round(left / rate) if rate > 0 else None


class LineReporter(Reporter):
    def __init__(
        self, files: list[FileProgress], out: IO[str], interval_s: float, err: IO[str] | None = None
    ) -> None:
        super().__init__(files, err)
        self.out = out
        self.tick_interval_s = interval_s

    def _emit(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def tick(self, now_s: float) -> None:
        super().tick(now_s)
        active = [f for f in self.files if f.started_s is not None and not f.done]
        if not active:
            return
        for f in active:
            rate = f.rate_bytes_s()
            pct = 100.0 * f.position / f.size if f.size else 100.0
            self._emit(
                line(
                    "progress",
                    path=f.path,
                    sent=f.position,
                    size=f.size,
                    pct=round(pct, 1),
                    rate_mib_s=rate / MiB,
                    eta_s=_eta_s(f.size - f.position, rate),
                )
            )
        size = sum(f.size for f in self.files)
        pos = sum(f.size if f.done else f.position for f in self.files)
        rate = sum(f.rate_bytes_s() for f in active)
        pct = round(100.0 * pos / size if size else 100.0, 1)
        self._emit(
            line(
                "total",
                sent=pos,
                size=size,
                pct=pct,
                rate_mib_s=rate / MiB,
                eta_s=_eta_s(size - pos, rate),
                done=sum(f.done for f in self.files),
                files=len(self.files),
            )
        )

    def retry(self, f: FileProgress, attempt: int, delay_s: float, error: Any) -> None:
        self._emit(
            line(
                "retry",
                path=f.path,
                attempt=attempt,
                delay_s=delay_s,
                code=error.code,
                status=error.status,
                message=error.message,
            )
        )

    def finished(self, r: FileResult) -> None:
        if r.ok:
            self._emit(
                line(
                    r.event,
                    path=r.path,
                    protocol=r.protocol,
                    key=r.key,
                    url=r.upload_url,
                    size=r.size,
                    sha256=r.sha256,
                    resumed_from=r.resumed_from,
                    sent=r.sent_bytes,
                    attempts=r.attempts,
                    seconds=r.seconds,
                    deduplicated=int(r.deduplicated),
                    **({"reason": r.skipped} if r.skipped else {}),
                )
            )
        else:
            self._emit(
                line(
                    "failed",
                    path=r.path,
                    protocol=r.protocol,
                    code=r.code,
                    status=r.status,
                    attempts=r.attempts,
                    message=r.message,
                )
            )

    def close(self, summary: Summary) -> None:
        self._emit(line("summary", **asdict(summary), rate_mib_s=summary.rate_mib_s()))


class JsonReporter(Reporter):
    def __init__(self, files: list[FileProgress], out: IO[str], err: IO[str] | None = None) -> None:
        super().__init__(files, err)
        self.out = out

    def retry(self, f: FileProgress, attempt: int, delay_s: float, error: Any) -> None:
        # stdout stays pure JSON; a human watching stderr still learns why it is slow.
        print(
            f"upload-proxy: {f.path}: {error.message}; retry {attempt} in {delay_s:.1f}s",
            file=self.err,
            flush=True,
        )

    def finished(self, r: FileResult) -> None:
        print(json.dumps(r.to_json()), file=self.out, flush=True)

    def close(self, summary: Summary) -> None:
        out = {"event": "summary", **asdict(summary), "rate_mib_s": round(summary.rate_mib_s(), 2)}
        out["seconds"] = round(summary.seconds, 3)
        print(json.dumps(out), file=self.out, flush=True)


class TtyReporter(Reporter):
    """rich progress bars: one per running file and one for the whole run."""

    tick_interval_s = 0.2

    def __init__(self, files: list[FileProgress], err: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskID,
            TextColumn,
        )

        super().__init__(files, err)
        self._escape = escape
        self.console = Console()
        self.bars = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            # Our rate and ETA, not rich's: the wire rate, which a resumed upload's jump to
            # the server's offset does not inflate (and the same figures as the lines).
            TextColumn("{task.fields[rate]:>11} {task.fields[eta]:>8}"),
            console=self.console,
            auto_refresh=False,
        )
        total = sum(f.size for f in files)
        self._total = self.bars.add_task(self._overall(), total=total, rate="", eta="")
        self._tasks: dict[int, TaskID] = {}
        self.bars.start()

    def _overall(self) -> str:
        return f"total ({sum(f.done for f in self.files)}/{len(self.files)} files)"

    def tick(self, now_s: float) -> None:
        super().tick(now_s)
        for i, f in enumerate(self.files):
            if f.started_s is None or f.done:
                continue
            if i not in self._tasks:
                self._tasks[i] = self.bars.add_task(_short(f.path), total=f.size, rate="", eta="")
            rate, eta = _rate_eta(f.size - f.position, f.rate_bytes_s())
            self.bars.update(self._tasks[i], completed=f.position, rate=rate, eta=eta)
        pos = sum(f.size if f.done else f.position for f in self.files)
        size = sum(f.size for f in self.files)
        rate, eta = _rate_eta(size - pos, sum(f.rate_bytes_s() for f in self.files if not f.done))
        self.bars.update(
            self._total, completed=pos, description=self._overall(), rate=rate, eta=eta
        )
        self.bars.refresh()

    def retry(self, f: FileProgress, attempt: int, delay_s: float, error: Any) -> None:
        self.bars.console.print(
            f"[yellow]{self._escape(f.path)}: {self._escape(error.message)}; "
            f"retry {attempt} in {delay_s:.1f}s",
            highlight=False,
        )

    def finished(self, r: FileResult) -> None:
        for i, f in enumerate(self.files):
            if f.path == r.path and i in self._tasks:
                self.bars.remove_task(self._tasks.pop(i))
        if r.ok:
            where = self._escape(r.key or r.upload_url or "")
            word = f"skipped ({r.skipped})" if r.skipped else "ok"
            how = "  instant (not sent)" if r.deduplicated else ""
            self.bars.console.print(
                f"[green]{word}[/] {self._escape(r.path)} -> {where}  {r.size / MiB:.1f} MiB  "
                f"sha256 {r.sha256}{how}",
                highlight=False,
            )
        else:
            self.bars.console.print(
                f"[red]failed[/] {self._escape(r.path)}: {self._escape(r.message or '')} "
                f"({r.code})",
                highlight=False,
            )

    def stop(self) -> None:
        if self.bars.live.is_started:
            self.tick(time.monotonic())
            self.bars.stop()

    def close(self, summary: Summary) -> None:
        self.console.print(
            f"{summary.ok}/{summary.files} uploaded, {summary.failed} failed, "
            f"{summary.bytes / MiB:.1f} MiB in {summary.seconds:.1f}s "
            f"({summary.rate_mib_s():.1f} MiB/s)",
            highlight=False,
        )


def _rate_eta(left: int, rate: float) -> tuple[str, str]:
    eta = _eta_s(left, rate)
    shown = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
    return f"{rate / MiB:.1f} MiB/s", shown


def _short(path: str, width: int = 30) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]
