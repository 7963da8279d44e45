"""``upload-proxy upload`` against the real proxy and SeaweedFS: PUT and tus, several files
at once, the line and JSON output, auth errors that must not be retried."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from proxy.auth import sign_url
from tests.cli_helpers import (
    file_sha256,
    json_results,
    parse_line,
    resume_entries,
    run_cli,
    tus_key,
)
from tests.conftest import MiB, StartProxy, data_path, get_object
from tests.test_auth import SECRET, TOKEN, auth_section
from tests.tus_helpers import tus_sections


async def test_several_files_at_once_put_and_tus(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(**tus_sections(prefix))
    files = {
        "empty.bin": data_path(tmp_path, 0, seed=1),
        "one.txt": data_path(tmp_path, 1, seed=2),
        "small.bin": data_path(tmp_path, 3 * MiB + 5, seed=3),
        "odd.bin": data_path(tmp_path, 12 * MiB + 7, seed=4),  # tus: 3 PATCHes of <= 5 MiB
        "nine.bin": data_path(tmp_path, 9 * MiB, seed=5),  # tus: 2 PATCHes
    }
    named = []
    for name, path in files.items():
        named.append(path.rename(tmp_path / name))
    rc, out, err = await run_cli(
        tmp_path,
        *map(str, named),
        "--url",
        p.url,
        "--jobs",
        "3",
        "--json",
        "--tus-threshold",
        "8MiB",
        "--chunk-size",
        "5MiB",
        "--key-prefix",
        "batch/",
    )
    assert rc == 0, (out, err)
    results, summary = json_results(out)
    assert summary["files"] == summary["ok"] == 5 and summary["failed"] == 0
    assert summary["bytes"] == sum(f.stat().st_size for f in named)
    by_name = {os.path.basename(r["path"]): r for r in results}
    for path in named:
        r = by_name[path.name]
        assert r["event"] == "ok", r
        assert r["sha256"] == file_sha256(path)
        if path.stat().st_size >= 8 * MiB:
            assert r["protocol"] == "tus"
            key = tus_key(prefix, r["upload_url"], path.name)
        else:
            assert r["protocol"] == "put"
            key = r["key"]
            assert key == f"{prefix}batch/{path.name}"
        body, meta = await get_object(s3, key)
        assert body == path.read_bytes()
        assert meta["sha256"] == r["sha256"]
    assert resume_entries(tmp_path) == []  # finished uploads are forgotten


async def test_line_output_is_parseable(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(**tus_sections(prefix))
    path = data_path(tmp_path, 12 * MiB)
    rc, out, err = await run_cli(
        tmp_path,
        str(path),
        "--url",
        p.url,
        "--tus-threshold",
        "1MiB",
        "--chunk-size",
        "4MiB",
        "--limit-rate",
        "8MiB",
        "--progress-interval",
        "0.2",
    )
    assert rc == 0, (out, err)
    events = [parse_line(line) for line in out.splitlines()]
    progress = [f for e, f in events if e == "progress"]
    totals = [f for e, f in events if e == "total"]
    assert len(progress) >= 4 and len(totals) == len(progress)
    sent = [f["sent"] for f in progress]
    assert sent == sorted(sent) and 0 < sent[-1] <= path.stat().st_size
    assert all(f["path"] == str(path) and f["size"] == path.stat().st_size for f in progress)
    assert all(0 <= f["pct"] <= 100 for f in progress)
    # 8 MiB/s is the cap (after a first second of burst); the reported rate must say so.
    rates = sorted(f["rate_mib_s"] for f in progress)
    assert 3 < rates[len(rates) // 2] < 10
    (ok,) = [f for e, f in events if e == "ok"]
    assert ok["sha256"] == file_sha256(path) and ok["protocol"] == "tus"
    assert ok["sent"] == ok["size"] == path.stat().st_size and ok["resumed_from"] == 0
    assert events[-1][0] == "summary" and events[-1][1]["ok"] == 1
    assert ok["url"].startswith(f"{p.url}/files/") and ok["key"] is None
    _, meta = await get_object(s3, tus_key(prefix, ok["url"], path.name))
    assert meta["sha256"] == ok["sha256"]


async def test_wrong_token_is_reported_and_not_retried(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path), **tus_sections(prefix))
    # A spy on the server's authenticator: one call per request (authorize() caches it).
    uploads = p.uploads
    seen: list[str] = []
    real = uploads.auth.authenticate

    def counting(method: str, *a: Any, **kw: Any) -> Any:
        seen.append(method)
        return real(method, *a, **kw)

    uploads.auth.authenticate = counting  # type: ignore[method-assign]
    small, big = data_path(tmp_path, MiB, seed=1), data_path(tmp_path, 3 * MiB, seed=2)
    args = (str(small), str(big), "--url", p.url, "--tus-threshold", "2MiB", "--json")
    rc, out, err = await run_cli(tmp_path, *args, "--token", "not-the-token-0123456789")
    assert rc == 1, (out, err)
    results, summary = json_results(out)
    assert summary["failed"] == 2
    assert {r["protocol"] for r in results} == {"put", "tus"}
    for r in results:
        assert (r["event"], r["status"], r["code"], r["attempts"]) == (
            "failed",
            401,
            "ERR_UNAUTHORIZED",
            1,
        )
        assert r["sent_bytes"] == 0  # Expect: 100-continue: refused before the body
    # The server saw each file's first request once: a 401 is final.
    assert sorted(seen) == ["POST", "PUT"]
    # The right token, from the environment, works for both protocols.
    rc, out, err = await run_cli(tmp_path, *args, UPLOAD_PROXY_TOKEN=TOKEN)
    assert rc == 0, (out, err)
    results, _ = json_results(out)
    assert {r["sha256"] for r in results} == {file_sha256(small), file_sha256(big)}


async def test_too_large_is_413_and_signed_url_puts(
    start_proxy: StartProxy, s3: Any, prefix: str, tmp_path: Path
) -> None:
    p = await start_proxy(auth=auth_section(tmp_path), upload={"max_upload_size": "2MiB"})
    big = data_path(tmp_path, 3 * MiB)
    rc, out, err = await run_cli(tmp_path, str(big), "--url", p.url, "--token", TOKEN, "--json")
    assert rc == 1
    (r,), _ = json_results(out)
    assert (r["status"], r["code"], r["attempts"]) == (413, "ERR_TOO_LARGE", 1)

    small = data_path(tmp_path, MiB + 3)
    query = sign_url(SECRET.encode(), "PUT", key="signed/one.bin", max_size_bytes=2 * MiB)
    url = f"{p.url}/uploads/signed/one.bin?{query}"
    rc, out, err = await run_cli(tmp_path, str(small), "--signed-url", url, "--json")
    assert rc == 0, (out, err)
    (r,), _ = json_results(out)
    assert r["key"] == f"{prefix}signed/one.bin"
    assert r["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    f = data_path(tmp_path, 10)
    for args in (
        (str(f),),  # no --url
        (str(tmp_path / "missing"), "--url", "http://127.0.0.1:9"),
        (str(tmp_path), "--url", "http://127.0.0.1:9"),  # a directory
        (str(f), "--url", "http://127.0.0.1:9", "--jobs", "0"),
        (str(f), "--url", "http://127.0.0.1:9", "--token", "t", "--signed-url", "http://x/u"),
        (str(f), str(f), "--url", "http://127.0.0.1:9"),  # same key twice
    ):
        rc, out, err = await run_cli(tmp_path, *args)
        assert rc == 2, (args, out, err)
        assert err.strip() and out == ""
