"""Running ``upload-proxy upload`` as a subprocess, and reading what it prints."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from proxy.tus.state import storage_id

MiB = 1024 * 1024
EVENT_RE = re.compile(
    r"^(progress|total|retry|ok|failed|summary)((?: \w+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)$"
)
FIELD_RE = re.compile(r"(\w+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UPLOAD_PROXY_TOKEN"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env.update(extra)
    return env


def resume_entries(tmp_path: Path) -> list[dict[str, Any]]:
    d = tmp_path / "cache" / "upload-proxy" / "resume"
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.exists() else []


async def start_cli(tmp_path: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "upload",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(tmp_path, **env),
    )


async def run_cli(
    tmp_path: Path, *args: str, timeout_s: float = 60, **env: str
) -> tuple[int, str, str]:
    proc = await start_cli(tmp_path, *args, **env)
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def parse_line(text: str) -> tuple[str, dict[str, Any]]:
    """One progress line -> (event, fields); asserts it follows the documented format."""
    m = EVENT_RE.match(text)
    assert m, f"not a documented line: {text!r}"
    fields: dict[str, Any] = {}
    for key, raw in FIELD_RE.findall(m.group(2)):
        if raw.startswith('"'):
            fields[key] = json.loads(raw)
        elif raw == "-":
            fields[key] = None
        elif re.fullmatch(r"-?\d+", raw):
            fields[key] = int(raw)
        else:  # the format allows only numbers bare: strings are always JSON-quoted
            fields[key] = float(raw)
    return m.group(1), fields


def json_results(stdout: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    docs = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert docs and docs[-1]["event"] == "summary", stdout
    return docs[:-1], docs[-1]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def tus_key(prefix: str, upload_url: str, name: str) -> str:
    """Where the proxy stores a tus upload: ``<key_prefix><id>/<filename>``."""
    return f"{prefix}tus/{storage_id(upload_url.rsplit('/', 1)[1])}/{name}"
