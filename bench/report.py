"""The figures of bench/bench.py: one row's sample, medians, the table, the ratios against the
performance targets, S3 requests per tus PATCH, the JSON file and the comparison with an
earlier one."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

# Rows not through the proxy; of the rest, the -8x ones are concurrent and every other one
# is a single upload, whose peak RSS the targets bound by a constant whatever its size.
NOT_PROXY_ROWS = ("sha256-floor", "direct", "peer-tus-server")
RSS_LIMIT_BYTES = 100 * MiB
# In a tus upload every PutObject is a write under tus.state_prefix (the info object or
# the bytes after the last full part): the body itself goes by UploadPart, and only an
# empty upload is stored with PutObject.
STATE_WRITE_OPS = ("put_object",)


@dataclass
class Sample:
    """One row of one round.  ``cpu_s`` and the rest are the server process's (for
    ``direct`` the uploader's, for ``sha256-floor`` the hashing thread's)."""

    row: str
    nbytes: int
    seconds: float
    cpu_s: float
    peak_rss_bytes: int | None = None
    disk_write_bytes: int | None = None
    temp_bytes: int | None = None
    verified: bool | None = None
    patches: int | None = None
    storage_ops: dict[str, float] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.nbytes / GiB)

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "mib_s": round(self.mib_s, 2),
            "cpu_s_per_gib": round(self.cpu_s_per_gib, 3),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Sample:
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median(samples: list[Sample]) -> Sample:
    """Per-figure median over the rounds of one row (verified only if every round was)."""
    ops = {op for s in samples for op in s.storage_ops}
    verified = [s.verified for s in samples]
    return Sample(
        row=samples[0].row,
        nbytes=samples[0].nbytes,
        seconds=_median([s.seconds for s in samples]),
        cpu_s=_median([s.cpu_s for s in samples]),
        peak_rss_bytes=_median([s.peak_rss_bytes for s in samples]),
        disk_write_bytes=_median([s.disk_write_bytes for s in samples]),
        temp_bytes=max((s.temp_bytes for s in samples if s.temp_bytes is not None), default=None),
        verified=None if None in verified else all(verified),
        patches=_median([s.patches for s in samples]),
        storage_ops={op: _median([s.storage_ops.get(op, 0) for s in samples]) for op in ops},
    )


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Sample]) -> str:
    head = (
        f"{'row':<17}{'MiB':>7}{'MiB/s':>9}{'CPU s/GiB':>11}{'peak RSS MiB':>14}"
        f"{'disk B':>12}{'temp B':>12}  sha256"
    )
    lines = [head, "-" * len(head)]
    for s in rows:
        rss = None if s.peak_rss_bytes is None else s.peak_rss_bytes / MiB
        check = {None: "-", True: "ok", False: "WRONG"}[s.verified]
        lines.append(
            f"{s.row:<17}{s.nbytes / MiB:>7.0f}{s.mib_s:>9.1f}{s.cpu_s_per_gib:>11.2f}"
            f"{_num(rss, '.1f'):>14}{_num(s.disk_write_bytes, '.0f'):>12}"
            f"{_num(s.temp_bytes, '.0f'):>12}  {check}"
        )
    return "\n".join(lines)


@dataclass
class Check:
    name: str
    value: float | None
    target: str
    ok: bool | None  # None: informative, no target

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: " "}[self.ok]
        return f"{mark} {self.name:<52}{_num(self.value, '.2f'):>9}  {self.target}"


def _find(rows: dict[str, Sample], prefix: str) -> Sample | None:
    for name, s in rows.items():
        if name == prefix or (prefix.endswith("-8x") and name.startswith(prefix)):
            return s
    return None


def state_writes_per_patch(rows: dict[str, Sample]) -> float | None:
    """State writes per PATCH of tus-8mib, on the common path: what each PATCH beyond the
    first adds, i.e. (writes in tus-8mib - writes in tus-1-patch) / (PATCHes - 1), so the
    POST's and the completion's writes cancel.  Without tus-1-patch: all writes / PATCHes."""
    small = rows.get("tus-8mib")
    if small is None or not small.patches or not small.storage_ops:
        return None
    writes = sum(small.storage_ops.get(op, 0) for op in STATE_WRITE_OPS)
    one = rows.get("tus-1-patch")
    if one is not None and one.storage_ops and one.patches and small.patches > one.patches:
        base = sum(one.storage_ops.get(op, 0) for op in STATE_WRITE_OPS)
        return (writes - base) / (small.patches - one.patches)
    return writes / small.patches


def ops_per_patch(rows: dict[str, Sample]) -> str:
    """Every S3 request the daemon made during tus-8mib, by operation, per PATCH."""
    small, one = rows.get("tus-8mib"), rows.get("tus-1-patch")
    if small is None or not small.patches or not small.storage_ops:
        return ""
    lines = [
        f"S3 requests of the daemon during tus-8mib ({small.patches:.0f} PATCHes), by operation"
        " (daemon /metrics, proxy_storage_request_duration_seconds_count):",
        f"  {'operation':<28}{'count':>8}{'per PATCH':>11}{'per extra PATCH':>17}",
    ]
    for op in sorted(small.storage_ops):
        count = small.storage_ops[op]
        extra = "-"
        if one is not None and one.patches and small.patches > one.patches:
            delta = count - one.storage_ops.get(op, 0)
            extra = f"{delta / (small.patches - one.patches):.2f}"
        lines.append(f"  {op:<28}{count:>8g}{count / small.patches:>11.2f}{extra:>17}")
    lines.append(
        "  per extra PATCH: (tus-8mib - tus-1-patch) / (PATCHes - 1), the common path: the"
        " POST, the completion and (same bytes) the parts cancel out"
    )
    return "\n".join(lines)


def checks(rows: dict[str, Sample], idle_rss_bytes: int, budget_bytes: int) -> list[Check]:
    """The performance issue's targets (ratios within this run), then informative ratios."""
    out: list[Check] = []

    def ratio(name: str, a: float | None, b: float | None, target: float | None, le: bool) -> None:
        if a is None or b is None or b == 0:
            return
        value = a / b
        text = "" if target is None else f"{'≤' if le else '≥'} {target}"
        ok = None if target is None else (value <= target if le else value >= target)
        out.append(Check(name, value, text, ok))

    def get(name: str, attr: str) -> float | None:
        s = _find(rows, name)
        return None if s is None else float(getattr(s, attr))

    put_cpu, floor = get("put", "cpu_s_per_gib"), get("sha256-floor", "cpu_s_per_gib")
    ratio("PUT CPU/GiB ÷ SHA-256 floor", put_cpu, floor, 2.0, True)
    ratio("tus-1-patch MiB/s ÷ PUT", get("tus-1-patch", "mib_s"), get("put", "mib_s"), 0.95, False)
    ratio("tus-8mib MiB/s ÷ PUT", get("tus-8mib", "mib_s"), get("put", "mib_s"), 0.9, False)
    writes = state_writes_per_patch(rows)
    if writes is not None:
        out.append(
            Check("tus-8mib state writes per PATCH (common path)", writes, "≤ 1", writes <= 1)
        )
    ratio(
        "8x PUT aggregate MiB/s ÷ one PUT", get("put-8x", "mib_s"), get("put", "mib_s"), 1.0, False
    )
    ratio(
        "8x tus aggregate MiB/s ÷ one tus-1-patch",
        get("tus-8x", "mib_s"),
        get("tus-1-patch", "mib_s"),
        1.0,
        False,
    )
    # Over the emulated long-distance link (bench/wanlink.py): what parallel uploads buy.
    ratio("wan-4x MiB/s ÷ wan-1 (emulated link)", get("wan-4x", "mib_s"), get("wan-1", "mib_s"),
          None, False)  # fmt: skip
    proxy_rows = [s for name, s in rows.items() if name not in NOT_PROXY_ROWS]
    limit = idle_rss_bytes + budget_bytes
    for s in proxy_rows:
        if s.peak_rss_bytes is None:
            continue
        rss = s.peak_rss_bytes
        if "-8x" in s.row or s.row == "wan-4x":  # concurrent PATCHes (4 partials)
            target = f"≤ idle + budget = {limit / MiB:.0f}"
            out.append(Check(f"{s.row} peak RSS MiB", rss / MiB, target, rss <= limit))
        else:
            out.append(Check(f"{s.row} peak RSS MiB", rss / MiB, "≤ 100", rss <= RSS_LIMIT_BYTES))
    spooled = [(s.disk_write_bytes or 0) + (s.temp_bytes or 0) for s in proxy_rows]
    if spooled:
        worst = float(max(spooled))
        out.append(Check("proxy disk + temp bytes, worst row", worst, "= 0", worst == 0))
    ratio("PUT MiB/s ÷ direct", get("put", "mib_s"), get("direct", "mib_s"), None, False)
    peer_cpu, tus_cpu = get("peer-tus-server", "cpu_s_per_gib"), get("tus-1-patch", "cpu_s_per_gib")
    ratio("tus-1-patch CPU/GiB ÷ peer @tus/server", tus_cpu, peer_cpu, None, True)
    peer_rate = get("peer-tus-server", "mib_s")
    ratio(
        "tus-1-patch MiB/s ÷ peer @tus/server", get("tus-1-patch", "mib_s"), peer_rate, None, False
    )
    return out


def compare(rows: dict[str, Sample], old_path: Path) -> str:
    old_rows = {
        name: Sample.from_json(raw)
        for name, raw in json.loads(old_path.read_text())["median"].items()
    }
    lines = [
        f"compared with {old_path} (old → new):",
        f"  {'row':<17}{'MiB/s':>22}{'CPU s/GiB':>22}{'peak RSS MiB':>24}",
    ]

    def pair(a: float | None, b: float | None, fmt: str = ".1f") -> str:
        if a is None or b is None:
            return "-"
        change = f" ({(b - a) / a:+.0%})" if a else ""
        return f"{a:{fmt}} → {b:{fmt}}{change}"

    for name, new in rows.items():
        old = old_rows.get(name)
        if old is None:
            lines.append(f"  {name:<17}  (not in the old run)")
            continue
        rss_old = old.peak_rss_bytes / MiB if old.peak_rss_bytes else None
        rss_new = new.peak_rss_bytes / MiB if new.peak_rss_bytes else None
        lines.append(
            f"  {name:<17}{pair(old.mib_s, new.mib_s):>22}"
            f"{pair(old.cpu_s_per_gib, new.cpu_s_per_gib, '.2f'):>22}{pair(rss_old, rss_new):>24}"
        )
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


def header(doc: dict[str, Any], seconds: float) -> str:
    """The lines above the table: when, on what, with what settings and versions."""
    m, st, v = doc["machine"], doc["settings"], doc["versions"]
    rounds = f"median of {st['repeat']} rounds" if st["repeat"] > 1 else "one round"
    idle = statistics.median(st["idle_rss_bytes"]) / MiB
    when = doc["started"][:16].replace("T", " ")
    return (
        f"# upload-proxy bench {when} UTC on {m['cpu_model']}, {m['cores']}"
        f" cores, {m['memory_bytes'] / GiB:.0f} GiB; load average"
        f" {' '.join(map(str, m['load_average_start']))} at start,"
        f" {' '.join(map(str, m['load_average_end']))} at the end; took {seconds:.0f} s"
        "\n# Figures are the server process's own (proxy or peer; direct: the uploader's);"
        " the client (curl / node) and SeaweedFS share the same cores."
        f"\n# {st['size_bytes'] / MiB:g} MiB per upload, concurrent {st['concurrent'][0]} x"
        f" {st['concurrent'][1] / MiB:g} MiB; part_size {st['part_size_bytes'] / MiB:g}"
        f" MiB, parts_in_flight {st['parts_in_flight']} (direct: {st['direct_in_flight']}),"
        f" part_checksum {st['part_checksum']}, memory_budget"
        f" {st['memory_budget_bytes'] / MiB:g} MiB; daemon idle RSS {idle:.1f} MiB; {rounds}"
        f"\n# proxy {v['proxy']}; node {v['node']}; tus-js-client {v['tus-js-client']};"
        f" peer @tus/server {v['@tus/server']} + @tus/s3-store {v['@tus/s3-store']}"
        f" (partSize {st['part_size_bytes'] / MiB:g} MiB)"
    )
