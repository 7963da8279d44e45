"""tus upload URLs remembered across runs, so running the same command again resumes.

One small JSON file per unfinished upload under ``$XDG_CACHE_HOME/upload-proxy/resume/``
(``~/.cache/upload-proxy/resume/`` without it), named by a fingerprint of what makes an
upload the same one: the file's absolute path, size and mtime, and the server's tus URL.
A file edited since (new size or mtime) gets a new fingerprint and starts afresh; an
entry is removed when its upload completes or the server no longer knows it (404/410).
Entries are written atomically (temporary file, then rename), so a CLI killed at any
moment leaves either the old entry or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from proxy.client.source import FileIdentity


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "upload-proxy" / "resume"


def fingerprint(identity: FileIdentity, tus_url: str) -> str:
    material = json.dumps([identity.path, identity.size, identity.mtime_ns, tus_url])
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


class ResumeStore:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_dir()

    def _path(self, fp: str) -> Path:
        return self.directory / f"{fp}.json"

    def get(self, fp: str) -> str | None:
        try:
            entry = json.loads(self._path(fp).read_text())
        except (OSError, ValueError):
            return None  # absent or damaged: start afresh, which is always safe
        url = entry.get("upload_url") if isinstance(entry, dict) else None
        return url if isinstance(url, str) else None

    def put(self, fp: str, upload_url: str, identity: FileIdentity) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self._path(fp)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        entry = {
            "upload_url": upload_url,
            "path": identity.path,
            "size": identity.size,
            "created_s": round(time.time(), 3),
        }
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, target)

    def forget(self, fp: str) -> None:
        try:
            self._path(fp).unlink()
        except FileNotFoundError:
            pass
