"""Hooks on the real daemon and SeaweedFS, a receiver in the test process: pre-create
refuses and renames, post-finish is delivered once per upload (after de-duplication by
event id) across a receiver outage and a daemon restart, tus and PUT both fire, the
executable transport, upload.key_template."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest

from proxy.auth import hash_token
from proxy.config import ConfigError, from_dict
from proxy.hooks.payload import HookUpload, event_body
from proxy.hooks.transports import ExecTransport, HookFailed
from proxy.naming import KeyTemplate
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed, free_port
from proxy.tus.state import storage_id
from tests.conftest import BUCKET
from tests.daemon import start_daemon
from tests.hook_receiver import Receiver
from tests.obs_helpers import scrape, value
from tests.tus_helpers import b64

SECRET = b"s" * 40
CHAT_NOTIFY = Path(__file__).resolve().parent.parent / "contrib/hooks/chat-notify.py"
TUS = {"Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"
TOKEN_A = "alice-token-0123456789abcdef"
TOKEN_B = "bob-token-0123456789abcdef00"


def hooks_section(tmp_path: Path, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    secret_file = tmp_path / "hook-secret"
    secret_file.write_bytes(SECRET)
    return {
        "http_url": receiver.url,
        "http_secret_file": str(secret_file),
        "timeout_s": 5,
        "outbox_poll_interval_s": 1,
        "retry_max_delay_s": 1,
        **extra,
    }


@pytest.fixture
async def receiver() -> Any:
    r = Receiver(SECRET)
    await r.start()
    yield r
    await r.stop()


async def tus_upload(url: str, data: bytes, filename: str) -> tuple[int, str]:
    """POST + one PATCH; the status of the PATCH (or of a refused POST) and the URL id."""
    meta = "filename " + base64.b64encode(filename.encode()).decode()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            url + "/files/",
            headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta},
        ) as r:
            if r.status != 201:
                return r.status, ""
            location = r.headers["Location"]
        async with s.patch(
            url + location,
            data=data,
            headers={
                **TUS,
                "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream",
            },
        ) as r:
            return r.status, location.rsplit("/", 1)[-1]


async def test_pre_create_refuses_and_renames_and_both_protocols_fire(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, receiver: Receiver
) -> None:
    def reply(event: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        key = event["Event"]["Upload"]["Storage"]["Key"]
        name = event["Event"]["Upload"]["MetaData"].get("filename", "")
        if event["Type"] == "pre-create" and "refuse" in key + name:
            return 200, {
                "RejectUpload": True,
                "HTTPResponse": {"StatusCode": 403, "Body": "not on a Sunday"},
            }
        if event["Type"] == "pre-create" and key.endswith("rename-me"):
            return 200, {
                "ChangeFileInfo": {
                    "Storage": {"Key": "renamed/by-hook.bin"},
                    "MetaData": {"a": "b"},
                }
            }
        return 200, None

    receiver.reply = reply
    events = ["pre-create", "post-create", "post-finish", "post-fail", "post-terminate"]
    d = await start_daemon(
        tmp_path,
        seaweed,
        prefix,
        hooks=hooks_section(tmp_path, receiver, events=events),
        upload={"key_template": "{yyyy}/{mm}/{id}{ext}"},
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.put(d.url + "/uploads/refuse.bin", data=b"x" * 10) as r:
                assert r.status == 403
                assert (await r.json())["code"] == "ERR_HOOK_REJECTED"
                assert (await r.json())["message"] == "not on a Sunday"
            assert await s3.head(prefix + "refuse.bin") is None
            async with s.put(
                d.url + "/uploads/rename-me?x=1",
                data=b"y" * 100,
                headers={"Authorization": "Bearer t"},
            ) as r:
                assert r.status == 201, await r.text()
                body = await r.json()
            assert body["key"] == prefix + "renamed/by-hook.bin"
            obj = await s3.head(prefix + "renamed/by-hook.bin")
            assert obj is not None and obj.metadata.get("a") == "b"
            assert await s3.head(prefix + "rename-me") is None
            # A generated key follows upload.key_template.
            async with s.post(
                d.url + "/uploads",
                data=b"z" * 10,
                headers={"Content-Disposition": 'attachment; filename="Talk.MP3"'},
            ) as r:
                assert r.status == 201
                generated = (await r.json())["key"]
        assert re.fullmatch(re.escape(prefix) + r"\d{4}/\d{2}/[0-9a-f]{32}\.mp3", generated)

        status, url_id = await tus_upload(d.url, b"t" * 1000, "Sermon.mp3")
        assert status == 204
        sid = storage_id(url_id)
        # tus objects stay in their own folder; the template names the object inside it.
        tus_key = next(o.key for o in await s3.list_objects(f"{prefix}tus/{sid}/"))
        assert re.fullmatch(
            re.escape(f"{prefix}tus/{sid}/") + rf"\d{{4}}/\d{{2}}/{sid}\.mp3", tus_key
        )
        refused, _ = await tus_upload(d.url, b"r" * 10, "refuse-me.mp3")
        assert refused == 403

        await receiver.wait_for(lambda: len(receiver.of_type("post-finish")) >= 3)
        finished = {
            e["Event"]["Upload"]["Storage"]["Key"]: e for e in receiver.of_type("post-finish")
        }
        assert set(finished) == {
            prefix + "renamed/by-hook.bin",
            generated,
            tus_key,
        }
        put_event = finished[prefix + "renamed/by-hook.bin"]
        up = put_event["Event"]["Upload"]
        assert up["Size"] == up["Offset"] == 100 and up["Storage"]["Bucket"] == BUCKET
        assert put_event["Event"]["Proxy"]["SHA256"] == body["sha256"]
        assert put_event["Event"]["Proxy"]["ETag"] == body["etag"]
        assert put_event["Event"]["Proxy"]["Protocol"] == "http"
        req = put_event["Event"]["HTTPRequest"]
        assert (
            req["Method"] == "PUT"
            and "?" not in req["URI"]
            and "Authorization" not in req["Header"]
        )
        tus_event = finished[tus_key]
        # The hook gets the storage id, never the URL id (the upload's secret).
        assert tus_event["Event"]["Upload"]["ID"] == sid
        assert url_id not in str(receiver.events)
        assert tus_event["Event"]["Upload"]["MetaData"]["filename"] == "Sermon.mp3"
        created = {e["Event"]["Upload"]["ID"] for e in receiver.of_type("post-create")}
        assert sid in created and len(receiver.of_type("post-create")) == 3
        assert receiver.bad_signatures == 0
        samples = await scrape(d.url)
        labels = {"event": "post-finish", "transport": "http"}
        assert value(samples, "proxy_hook_invocations_total", **labels) == 3
        assert value(samples, "proxy_hook_failures_total", **labels) == 0
        assert value(samples, "proxy_hook_seconds_count", **labels) == 3
        assert (
            value(samples, "proxy_hook_invocations_total", event="pre-create", transport="http")
            == 5
        )
        assert value(samples, "proxy_hook_outbox_depth") is not None
    finally:
        await d.stop()


async def test_post_finish_delivered_once_across_outage_and_restart(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, receiver: Receiver
) -> None:
    up = False

    def reply(event: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        return (200, None) if up else (503, None)

    receiver.reply = reply
    hooks = hooks_section(tmp_path, receiver, events=["post-finish"])
    d = await start_daemon(tmp_path, seaweed, prefix, hooks=hooks)
    keys = [f"file-{i}.bin" for i in range(3)]
    try:
        async with aiohttp.ClientSession() as s:
            for k in keys:
                async with s.put(d.url + "/uploads/" + k, data=k.encode() * 100) as r:
                    assert r.status == 201
        status, url_id = await tus_upload(d.url, b"q" * 5000, "tus.bin")
        assert status == 204
        # Precondition: the receiver is down, so every event waits in the outbox.
        outbox = await s3.list_objects(f"{prefix}.tus/hooks/")
        assert len(outbox) == 4
        await receiver.wait_for(lambda: receiver.arrived.is_set())  # it was tried
    finally:
        d.signal()
        assert await d.wait() == 0
    # The receiver comes back while no daemon runs; a new daemon delivers what is kept.
    up = True
    d2 = await start_daemon(tmp_path, seaweed, prefix, hooks=hooks)
    try:
        await receiver.wait_for(lambda: len({e["EventID"] for e in receiver.events}) >= 4)
        await outbox_emptied(s3, prefix)
    finally:
        await d2.stop()
    by_id: dict[str, dict[str, Any]] = {e["EventID"]: e for e in receiver.events}
    got = sorted(e["Event"]["Upload"]["Storage"]["Key"] for e in by_id.values())
    assert got == sorted([prefix + k for k in keys] + [f"{prefix}tus/{storage_id(url_id)}/tus.bin"])


async def outbox_emptied(s3: S3Storage, prefix: str, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while await s3.list_objects(f"{prefix}.tus/hooks/"):
            await asyncio.sleep(0.2)


async def test_executable_hook(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str
) -> None:
    log_dir = tmp_path / "events"
    log_dir.mkdir()
    script = tmp_path / "hook.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "event = json.load(sys.stdin)\n"
        f"path = os.path.join({str(log_dir)!r}, os.environ['HOOK_EVENT_ID'])\n"
        "open(path + '.tmp', 'w').write(json.dumps(event))\n"
        "os.replace(path + '.tmp', path)  # whole, for the test that reads it\n"
        "key = event['Event']['Upload']['Storage']['Key']\n"
        "if sys.argv[1] == 'pre-create' and 'bad' in key:\n"
        "    no = {'StatusCode': 422, 'Body': 'bad name'}\n"
        "    print(json.dumps({'RejectUpload': True, 'HTTPResponse': no}))\n"
    )
    script.chmod(0o755)
    d = await start_daemon(
        tmp_path,
        seaweed,
        prefix,
        hooks={"exec_path": str(script), "events": ["pre-create", "post-finish"]},
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.put(d.url + "/uploads/bad.bin", data=b"1") as r:
                assert r.status == 422 and (await r.json())["message"] == "bad name"
            async with s.put(d.url + "/uploads/good.bin", data=b"2") as r:
                assert r.status == 201

        def types() -> list[str]:
            files = [p for p in log_dir.iterdir() if not p.name.endswith(".tmp")]
            return sorted(json.loads(p.read_text())["Type"] for p in files)

        async with asyncio.timeout(30):
            while types() != ["post-finish", "pre-create", "pre-create"]:
                await asyncio.sleep(0.1)
        assert await s3.head(prefix + "bad.bin") is None
    finally:
        await d.stop()


def test_key_template_validated_at_start() -> None:
    base = {"auth": {"mode": "none"}}
    for bad, why in [
        ("{yyyy}/{name}", "unknown placeholder"),
        ("{yyyy}/{filename}", "must contain {id}"),
        ("a/{prefix}{id}", "only stand at the start"),
        ("{id", "malformed"),
        ("/{id}", "does not make a valid key"),
        ("{id:>40}", "no format spec"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            from_dict({**base, "upload": {"key_template": bad}})
    t = KeyTemplate.parse("{prefix}{yyyy}/{id}-{filename}")
    assert (
        t.render("0" * 32, "../a b.JPG", prefix="u/", now_s=0) == "u/1970/" + "0" * 32 + "-a b.JPG"
    )
    # Without {prefix}, a signed prefix still comes first: it is a restriction.
    assert (
        KeyTemplate.parse("{id}{ext}").render("1" * 32, "x.Png", prefix="p/")
        == "p/" + "1" * 32 + ".png"
    )


def test_hooks_config_validated() -> None:
    base = {"auth": {"mode": "none"}}
    with pytest.raises(ConfigError, match=r"hooks\.http_secret_file"):
        from_dict({**base, "hooks": {"http_url": "http://127.0.0.1:1/h"}})
    with pytest.raises(ConfigError, match=r"hooks\.events: unknown event"):
        from_dict({**base, "hooks": {"events": ["post-finnish"]}})
    with pytest.raises(ConfigError, match=r"hooks\.exec_path"):
        from_dict({**base, "hooks": {"exec_path": "/nonexistent/hook"}})


async def test_pre_finish_refuses_and_progress_and_post_fail(
    tmp_path: Path, seaweed: EmbeddedSeaweed, s3: S3Storage, prefix: str, receiver: Receiver
) -> None:
    refused_sizes = {7777, 6 * 1024 * 1024 + 1}

    def reply(event: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        up = event["Event"]["Upload"]
        if event["Type"] == "pre-finish" and up["Offset"] in refused_sizes:
            assert up["Offset"] == up["Size"]
            proxy = event["Event"]["Proxy"]
            assert proxy["Protocol"] == "tus" or len(proxy["SHA256"]) == 64  # PUT: verified
            return 200, {"RejectUpload": True, "HTTPResponse": {"StatusCode": 422, "Body": "virus"}}
        return 200, None

    receiver.reply = reply
    hooks = hooks_section(
        tmp_path,
        receiver,
        events=["pre-finish", "post-receive", "post-fail", "post-finish"],
        progress_interval_s=0.05,
    )
    d = await start_daemon(tmp_path, seaweed, prefix, hooks=hooks)

    async def slow_body() -> Any:
        for _ in range(4):
            yield b"p" * 1000
            await asyncio.sleep(0.2)  # pacing the body, not synchronisation

    try:
        async with aiohttp.ClientSession() as s:
            for size in refused_sizes:  # one PutObject, and a multipart upload
                async with s.put(f"{d.url}/uploads/scan-{size}", data=b"v" * size) as r:
                    assert r.status == 422 and (await r.json())["message"] == "virus"
                assert await s3.head(f"{prefix}scan-{size}") is None
            async with s.put(f"{d.url}/uploads/slow.bin", data=slow_body()) as r:
                assert r.status == 201
        status, url_id = await tus_upload(d.url, b"w" * 7777, "scan.bin")
        assert status == 422
        async with (
            aiohttp.ClientSession() as s,
            s.head(f"{d.url}/files/{url_id}", headers=TUS) as r,
        ):
            assert r.status == 404  # the refused upload is gone, not left to expire
        sid = storage_id(url_id)

        def failed() -> set[str]:
            return {
                e["Event"]["Upload"]["Storage"]["Key"]
                for e in receiver.of_type("post-fail")
                if e["Event"]["Proxy"]["Reason"]["Code"] == "ERR_HOOK_REJECTED"
            }

        await receiver.wait_for(
            lambda: len(failed()) == 3 and bool(receiver.of_type("post-finish"))
        )
        assert {f"{prefix}scan-{n}" for n in refused_sizes} < failed()
        assert any(sid in k for k in failed())
        # The multipart upload of the refused 6 MiB PUT was aborted; the tus state is gone.
        assert not [u for u in await s3.list_multipart(prefix) if "scan-" in u.key]
        assert not await s3.list_objects(f"{prefix}.tus/{sid}/")
        progress = [
            e["Event"]["Upload"]["Offset"]
            for e in receiver.of_type("post-receive")
            if e["Event"]["Upload"]["Storage"]["Key"] == f"{prefix}slow.bin"
        ]
        assert progress and all(0 < o <= 4000 for o in progress)
        assert [e["Event"]["Upload"]["Size"] for e in receiver.of_type("post-finish")] == [4000]
    finally:
        await d.stop()


async def test_contrib_chat_receiver_posts_each_event_once(tmp_path: Path) -> None:
    """contrib/hooks/chat-notify.py as an executable hook: a post-finish becomes one chat
    message, and its redelivery (same EventID) none."""
    posted: list[dict[str, Any]] = []

    async def chat(request: aiohttp.web.Request) -> aiohttp.web.Response:
        posted.append(await request.json())
        return aiohttp.web.Response(status=204)

    app = aiohttp.web.Application()
    app.router.add_post("/webhook", chat)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    event = json.loads(
        event_body(
            "post-finish",
            "e" * 32,
            HookUpload(
                "tus", "a" * 32, "tus/x/talk.mp3", 3 * 2**20, 3 * 2**20, {"filename": "talk.mp3"}
            ),
            bucket=BUCKET,
        )
    )
    script = CHAT_NOTIFY
    env = {
        "CHAT_WEBHOOK_URL": f"http://127.0.0.1:{port}/webhook",
        "SEEN_FILE": str(tmp_path / "seen"),
    }
    try:
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), "post-finish", stdin=asyncio.subprocess.PIPE, env=env
            )
            await proc.communicate(json.dumps(event).encode())
            assert proc.returncode == 0
    finally:
        await runner.cleanup()
    assert posted == [{"content": "New recording arrived: talk.mp3 (3.0 MiB)"}]


async def test_exec_transport_bounds_output_and_time(tmp_path: Path) -> None:
    """A hook that answers too much is refused without its whole output held in memory;
    one that hangs is killed after timeout_s."""
    loud = tmp_path / "loud.py"
    loud.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write('x' * 1_000_000)\n")
    slow = tmp_path / "slow.py"
    slow.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    for script in (loud, slow):
        script.chmod(0o755)
    with pytest.raises(HookFailed, match="larger than"):
        await ExecTransport(str(loud), timeout_s=30).send("post-finish", "e" * 32, b"{}")
    with pytest.raises(HookFailed, match="longer than"):
        await ExecTransport(str(slow), timeout_s=1).send("post-finish", "e" * 32, b"{}")


async def test_a_hook_sets_user_metadata_and_the_proxys_own_stays(
    tmp_path: Path, start_proxy: Any, s3: S3Storage, prefix: str
) -> None:
    """``ChangeFileInfo.MetaData`` replaces the user metadata only: the owner, the tus id
    and the digest the proxy writes and reads back survive it (a hook's MetaData used to
    drop them: the owner's HEAD/GET of the completed tus upload was a 404 and instant
    uploads never hit), and a hook cannot forge them either."""
    script = tmp_path / "hook.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "json.load(sys.stdin)\n"
        "meta = {'speaker': 'ann', 'owner': 'token:forged', 'tus-owner': 'token:forged'}\n"
        "print(json.dumps({'ChangeFileInfo': {'MetaData': meta}}))\n"
    )
    script.chmod(0o755)
    tokens = [hash_token(TOKEN_A), hash_token(TOKEN_B)]
    scoped = [{"tokens": tokens, "scopes": ["upload", "download"]}]
    proxy = await start_proxy(
        auth={"mode": "required", "scoped_tokens": scoped},
        downloads={"enabled": True},
        hooks={"exec_path": str(script), "events": ["pre-create"]},
    )
    data = b"a sermon, twice " * 10_000
    sha = hashlib.sha256(data).hexdigest()
    a, b = {"Authorization": f"Bearer {TOKEN_A}"}, {"Authorization": f"Bearer {TOKEN_B}"}
    async with aiohttp.ClientSession() as s:
        # tus: created, streamed, completed.
        meta = f"filename {b64('talk.mp3')},sha256 {b64(sha)}"
        create = {**TUS, **a, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
        async with s.post(proxy.url + "/files/", headers=create) as r:
            assert r.status == 201 and "Upload-Offset" not in r.headers
            url = proxy.url + r.headers["Location"]
        append = {**TUS, **a, "Upload-Offset": "0", "Content-Type": OCTET}
        async with s.patch(url, data=data, headers=append) as r:
            assert (r.status, r.headers["Upload-SHA256"]) == (204, sha)
        key = f"{prefix}tus/{storage_id(url.rsplit('/', 1)[1])}/talk.mp3"
        obj = await s3.head(key)
        assert obj is not None and obj.metadata["speaker"] == "ann"
        assert "token:forged" not in obj.metadata.values()
        assert obj.metadata["tus-id"] == storage_id(url.rsplit("/", 1)[1])
        # Its owner can HEAD and GET it; anyone else gets the 404 of an unknown id.
        async with s.head(url, headers={**TUS, **a}) as r:
            assert (r.status, r.headers["Upload-Offset"]) == (200, str(len(data)))
        async with s.get(url, headers=a) as r:
            assert r.status == 200 and await r.read() == data
        async with s.head(url, headers={**TUS, **b}) as r:
            assert r.status == 404
        # The same content again is an instant upload (complete in the creation answer).
        async with s.post(proxy.url + "/files/", headers=create) as r:
            assert r.status == 201 and r.headers["Upload-Offset"] == str(len(data))
        # A PUT: its owner stays too, so its content is found again.
        digest = {"Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"}
        async with s.put(proxy.url + "/uploads/p.mp3", data=data, headers=a) as r:
            assert r.status == 201, await r.text()
        put_obj = await s3.head(prefix + "p.mp3")
        assert put_obj is not None and put_obj.metadata["speaker"] == "ann"
        assert "token:forged" not in put_obj.metadata.values()
        async with s.put(proxy.url + "/uploads/q.mp3", data=data, headers={**a, **digest}) as r:
            assert r.status == 201 and (await r.json())["deduplicated"] is True
