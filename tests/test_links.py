"""Upload links (proxy/links.py): grants minted and verified, revocations, the file cap's
markers in the real bucket, and the ``upload-proxy link`` command."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.auth import Authenticator, hash_token, mac, sign_url
from proxy.errors import (
    BadSignature,
    LinkExpired,
    LinkNotForUploads,
    LinkRevoked,
    StorageUnavailable,
    TooManyFiles,
    UrlLifetime,
)
from proxy.links import (
    FILE_MARKER_GRACE_S,
    GRANT_TAG,
    Link,
    LinkStore,
    LinkVerifier,
    Revocations,
    mint,
    new_link_id,
    unverified_link,
)
from proxy.storage.s3 import S3Storage
from proxy.storage.seaweed import EmbeddedSeaweed
from tests.daemon import write_config

SECRET = b"0123456789abcdef0123456789abcdef-links"
NOW = 1_900_000_000.0
WEEK_S = 7 * 86400.0


def link(**terms: Any) -> Link:
    values: dict[str, Any] = {
        "id": new_link_id(),
        "prefix": "family/",
        "expires_s": int(NOW + 3600),
    }
    values.update(terms)
    return Link(**values)


def flip_last(grant: str) -> str:
    return grant[:-1] + ("1" if grant.endswith("0") else "0")


def verifier(revoked: tuple[str, ...] = (), read_at_s: float = NOW) -> LinkVerifier:
    revocations = Revocations(stale_after_s=60)
    revocations.update(revoked, read_at_s)
    return LinkVerifier(SECRET, max_lifetime_s=WEEK_S, revocations=revocations)


def forged(terms: dict[str, Any], secret: bytes = SECRET) -> str:
    """A grant with any terms, signed as the proxy signs (a web app holding the secret)."""
    raw = json.dumps(terms).encode()
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    sig = mac(secret, b"upload-proxy-link-v1\n" + payload.encode())
    return f"{GRANT_TAG}{payload}.{sig}"


def test_a_minted_grant_verifies_to_its_terms() -> None:
    terms = link(max_size_bytes=20 << 30, max_files=50, note="Sunday's service, ünïcode ok")
    grant = mint(SECRET, terms)
    assert grant.startswith(GRANT_TAG) and grant.isascii() and "=" not in grant
    assert verifier().verify(grant, NOW) == terms
    g = verifier().grant(grant, NOW)
    assert (g.via, g.prefix, g.max_size_bytes, str(g.principal)) == (
        "link",
        "family/",
        20 << 30,
        f"link:{terms.id}",
    )
    # The operator's --revoke reads the id and expiry back from the URL, secret or not.
    assert unverified_link(f"https://x.example/upload/#link={grant}") == terms


@pytest.mark.parametrize(
    ("grant", "error"),
    [
        (mint(b"another secret, just as long as ours", link()), BadSignature),
        (flip_last(mint(SECRET, link())), BadSignature),
        (mint(SECRET, link()) + "0", BadSignature),
        (GRANT_TAG + "e30." + "0" * 64, BadSignature),
        (mint(SECRET, link(expires_s=int(NOW - 1))), LinkExpired),
        (mint(SECRET, link(expires_s=int(NOW + WEEK_S + 60))), UrlLifetime),
    ],
    ids=["other-secret", "sig-changed", "sig-longer", "payload-empty", "expired", "too-long"],
)
def test_grants_that_are_refused(grant: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        verifier().verify(grant, NOW)


def test_changed_terms_break_the_signature() -> None:
    grant = mint(SECRET, link(max_files=1))
    payload, _, sig = grant[len(GRANT_TAG) :].partition(".")
    terms = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    terms["max_files"] = 1000
    changed = forged(terms).rpartition(".")[0] + "." + sig
    with pytest.raises(BadSignature):
        verifier().verify(changed, NOW)
    assert verifier().verify(forged(terms), NOW).max_files == 1000  # the forger's control


@pytest.mark.parametrize(
    "prefix", ["user1", "", "/abs/", "a/../b/", "a//b/", "a\\b/", "x\u202egpj/"]
)
def test_hand_signed_prefixes_are_held_to_the_rules(prefix: str) -> None:
    """A grant signed with the secret by someone else's code still needs a prefix that
    is a folder: "user1" would allow "user10/...", "" everything."""
    terms = {"v": 1, "id": new_link_id(), "prefix": prefix, "exp": int(NOW + 60)}
    terms.update({"max_size": None, "max_files": None, "note": ""})
    with pytest.raises(BadSignature):
        verifier().verify(forged(terms), NOW)
    with pytest.raises(ValueError):
        mint(SECRET, link(prefix=prefix))


def test_a_signed_url_signature_is_no_link_signature() -> None:
    """Each signed thing has its own tag: a signed URL's sig over the same bytes is not a
    link's."""
    query = sign_url(SECRET, "POST", prefix="family/", expires_in_s=60, now=NOW)
    sig = dict(p.split("=", 1) for p in query.split("&"))["sig"]
    grant = mint(SECRET, link())
    with pytest.raises(BadSignature):
        verifier().verify(grant.rpartition(".")[0] + "." + sig, NOW)


def test_revoked_and_unknown_revocation_state() -> None:
    terms = link()
    grant = mint(SECRET, terms)
    with pytest.raises(LinkRevoked):
        verifier(revoked=(terms.id,)).verify(grant, NOW)
    # The list was not read for longer than stale_after_s: refuse (503), never accept.
    with pytest.raises(StorageUnavailable):
        verifier(read_at_s=NOW - 61).verify(grant, NOW)
    never_read = LinkVerifier(
        SECRET, max_lifetime_s=WEEK_S, revocations=Revocations(stale_after_s=60)
    )
    with pytest.raises(StorageUnavailable):
        never_read.verify(grant, NOW)


def test_the_authenticator_takes_links_after_tokens_and_even_with_auth_off() -> None:
    token = "upl1.an-operator-token-that-looks-like-a-link"
    auth = Authenticator(
        enabled=True, token_sha256=(bytes.fromhex(hash_token(token)[7:]),), links=verifier()
    )
    assert auth.authenticate("GET", {"Authorization": f"Bearer {token}"}, {}, NOW).via == "token"
    grant = mint(SECRET, link())
    got = auth.authenticate("POST", {"Authorization": f"Bearer {grant}"}, {}, NOW)
    assert got.via == "link"
    # A link is for the page's tus uploads: plain uploads refuse it before the body.
    with pytest.raises(LinkNotForUploads):
        got.check_key("family/a.jpg")
    with pytest.raises(LinkNotForUploads):
        got.check_generated()
    # Auth off: anyone may upload, but a link keeps its terms and is still checked.
    open_auth = Authenticator(enabled=False, links=verifier())
    assert open_auth.authenticate("POST", {}, {}, NOW).via == "none"
    assert open_auth.authenticate("POST", {"Authorization": f"Bearer {grant}"}, {}, NOW).link
    expired = mint(SECRET, link(expires_s=int(NOW - 1)))
    with pytest.raises(LinkExpired):
        open_auth.authenticate("POST", {"Authorization": f"Bearer {expired}"}, {}, NOW)


# -- state in the bucket -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_the_file_cap_holds_under_a_race_and_frees_places_of_gone_uploads(
    s3: S3Storage, prefix: str
) -> None:
    """12 creations at once for a link of 5 files: exactly 5 are admitted, however the
    markers' writes and listings interleave (proxy.storage.markers.reserve).  Then a place
    is taken back only from an upload that is gone, and only after the grace period."""
    clock = Clock()
    store = LinkStore(s3, f"{prefix}.tus/", clock=clock)
    terms = link(max_files=5)
    gone: set[str] = set()

    async def alive(upload_id: str) -> bool:
        return upload_id not in gone

    async def attempt(n: int) -> str | None:
        try:
            return await store.reserve_file(terms, f"{n:032x}", alive)
        except TooManyFiles:
            return None

    admitted = [m for m in await asyncio.gather(*(attempt(n) for n in range(12))) if m]
    assert len(admitted) == 5
    assert sorted(o.key for o in await s3.list_objects(store.files_folder(terms.id))) == sorted(
        admitted
    )
    assert await store.files_used(terms, alive) == 5

    # One upload is cancelled: its place comes back once its marker is past the grace.
    gone.add(admitted[0].rpartition("-")[2])
    with pytest.raises(TooManyFiles):
        await store.reserve_file(terms, "f" * 32, alive)
    clock.now += FILE_MARKER_GRACE_S + 1
    assert await store.files_used(terms, alive) == 4
    assert await store.reserve_file(terms, "e" * 32, alive)
    with pytest.raises(TooManyFiles):
        await store.reserve_file(terms, "d" * 32, alive)
    for obj in await s3.list_objects(f"{prefix}.tus/"):
        await s3.delete_object(obj.key)


async def test_revocations_are_kept_until_the_link_expires(s3: S3Storage, prefix: str) -> None:
    clock = Clock()
    store = LinkStore(s3, f"{prefix}.tus/", clock=clock)
    a, b = new_link_id(), new_link_id()
    await store.revoke(a, int(clock.now + 60))
    await store.revoke(a, int(clock.now + 60))  # twice: no error
    await store.revoke(b, int(clock.now + 3600))
    assert await store.revoked_ids() == {a, b}
    clock.now += 120
    assert await store.revoked_ids() == {b}  # a has expired: refused as expired anyway
    assert await store.prune_revocations() == 1
    assert [i for i, _ in await store.revoked()] == [b]
    await store.revoke(b, int(clock.now + 3600))
    for obj in await s3.list_objects(f"{prefix}.tus/"):
        await s3.delete_object(obj.key)


# -- the command ---------------------------------------------------------------------------


def link_config(tmp_path: Path, sw: EmbeddedSeaweed, prefix: str, **extra: Any) -> Path:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    return write_config(
        tmp_path / "link.toml",
        {
            "server": {"listen": "127.0.0.1:8080"},
            "storage": {"backend": "s3", "bucket": "test-uploads", "endpoint_url": sw.endpoint_url},
            "auth": {"mode": "required", "signing_secret_file": str(secret)},
            "tus": {"state_prefix": f"{prefix}.tus/"},
            "page": {"enabled": True, "public_url": "https://up.example.org/", **extra},
        },
    )


async def test_link_command_prints_a_link_and_revokes_it(
    seaweed: EmbeddedSeaweed,
    s3: S3Storage,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = str(link_config(tmp_path, seaweed, prefix))
    argv = ["-c", cfg, "link", "--prefix", "family/", "--expires", "2d", "--max-size", "20GiB"]
    assert main([*argv, "--max-files", "50", "--note", "Photos from Sunday"]) == 0
    out, err = capsys.readouterr()
    url = out.strip()
    assert url.startswith("https://up.example.org/upload/#link=upl1.")
    terms = verifier(read_at_s=time.time()).verify(url.partition("#link=")[2], time.time())
    assert (terms.prefix, terms.max_size_bytes, terms.max_files) == ("family/", 20 << 30, 50)
    assert terms.note == "Photos from Sunday"
    assert abs(terms.expires_s - (time.time() + 2 * 86400)) < 60
    assert f"--revoke {terms.id}" in err and "'tus/family/'" in err

    # Longer than auth.signed_url_max_lifetime_s, a prefix that is no folder: refused.
    assert main(["-c", cfg, "link", "--prefix", "family/", "--expires", "8d"]) == 2
    assert main(["-c", cfg, "link", "--prefix", "family", "--expires", "1d"]) == 2
    capsys.readouterr()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.credentials.secret_key)
    # main() runs its own event loop: off this test's loop.
    assert await asyncio.to_thread(main, ["-c", cfg, "link", "--revoke", url]) == 0
    assert f"revoked link {terms.id}" in capsys.readouterr().err
    store = LinkStore(s3, f"{prefix}.tus/")
    assert await store.revoked() == [(terms.id, terms.expires_s)]
    # By id alone: kept for the longest a link can still live.
    other = new_link_id()
    assert await asyncio.to_thread(main, ["-c", cfg, "link", "--revoke", other]) == 0
    until = dict(await store.revoked())[other]
    assert abs(until - (time.time() + WEEK_S)) < 60
    assert await asyncio.to_thread(main, ["-c", cfg, "link", "--revoke", "nonsense"]) == 2
    for obj in await s3.list_objects(f"{prefix}.tus/"):
        await s3.delete_object(obj.key)


def test_revoking_without_a_reachable_store_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The embedded store is the running daemon's: never started by the command, and a
    data dir it never used has no keys to reach it with."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    cfg = write_config(
        tmp_path / "embedded.toml",
        {
            "storage": {"backend": "embedded"},
            "storage.embedded": {"data_dir": str(tmp_path / "d")},
            "auth": {"mode": "required", "signing_secret_file": str(secret)},
        },
    )
    assert main(["-c", str(cfg), "link", "--revoke", new_link_id()]) == 1
    assert "has the daemon run with this configuration" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
