"""Real tus clients no one here wrote: tuspy (PyPI) and tus-js-client (npm, on the
machine's Node).  Each uploads empty, 1-byte, odd-sized and multi-part files, in small
chunks and in one PATCH; the stored object and its sha256 must match."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tus_helpers import only_objects, tus_key, tus_sections
from tusclient.client import TusClient

from conftest import MiB, data_path, get_object

JS_DIR = Path(__file__).parent / "js"
SIZES = [0, 1, 777_777, 11 * MiB + 12_345]  # the last spans three 5 MiB parts
SMALL_CHUNK = 300_000  # odd, and small enough that pending segments get merged
MODES = {"small-chunks": SMALL_CHUNK, "one-patch": None}


@pytest.fixture(scope="module")
def node_client() -> Path:
    """tus-js-client from tests/js, installed from its lock file if it is not yet."""
    node = shutil.which("node")
    assert node, "Node.js is required for the tus-js-client tests"
    if not (JS_DIR / "node_modules" / "tus-js-client").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=300
        )
    return JS_DIR / "upload.mjs"


async def check(s3, prefix: str, url: str, name: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    key = tus_key(prefix, url, name)
    body, meta = await get_object(s3, key)
    assert body == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert await only_objects(s3, prefix) == [key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
async def test_tuspy(start_proxy, s3, prefix, tmp_path, size, mode) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, size, seed=size)
    name = f"py {size}.bin"

    def upload() -> str:
        client = TusClient(f"{proxy.url}/files/")
        kwargs = {"chunk_size": MODES[mode]} if MODES[mode] else {}
        # upload_checksum: every PATCH carries a sha1 Upload-Checksum the server verifies.
        uploader = client.uploader(
            str(path), metadata={"filename": name}, upload_checksum=True, **kwargs
        )
        uploader.upload()
        return str(uploader.url)

    url = await asyncio.to_thread(upload)
    await check(s3, prefix, url, name, path.read_bytes())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
async def test_tus_js_client(start_proxy, s3, prefix, tmp_path, size, mode, node_client) -> None:
    proxy = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, size, seed=size + 1)
    name = f"js {size}.bin"
    chunk = str(MODES[mode] or "inf")
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(node_client),
        f"{proxy.url}/files/",
        str(path),
        chunk,
        name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    url = json.loads(out)["url"]
    await check(s3, prefix, url, name, path.read_bytes())
