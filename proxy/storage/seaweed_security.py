"""Credentials that lock the embedded SeaweedFS's internal ports to itself.

``weed mini`` opens, besides S3, a master, a volume server, a filer and an admin
server, each with an HTTP and a gRPC port, and by default none of them asks who is
calling: any program on the host could read every object (``.tus/*/info`` included)
and write or delete files through the filer, bypassing the S3 keys.  Loopback
binding keeps other machines out, not other local users.  So every start writes a
fresh ``security.toml`` (SeaweedFS's own mechanism, read by every component) into a
0700 directory of the store's data dir:

* JWT signing keys for volume writes and reads and for filer writes and reads: an
  HTTP request to those ports without a token signed by the store is refused (401);
* gRPC mutual TLS: every gRPC server asks for a client certificate signed by a CA
  that exists only for this run.  The CA's private key is never written anywhere,
  so nobody, us included, can mint another certificate; the store's components
  share one leaf certificate (SeaweedFS does not check host names).

Keys are regenerated at every start: they only ever authenticate the store's
components to one another within one run (JWTs live 10 s), so nothing persisted
depends on them and a leaked file is worthless after a restart.

The daemon runs this module as a child (``python -m proxy.storage.seaweed_security
DIR``): importing ``cryptography`` costs ~9 MiB of RSS that a long-running daemon
would keep for a job done once per start.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

SECURITY_DIR = "security"
CA_CERT = "ca.crt"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"

# Every SeaweedFS component that serves or dials gRPC inside `weed mini`.
_GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")
# Volume writes, volume reads, filer writes, filer reads.
_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
_CERT_LIFETIME = datetime.timedelta(days=3650)


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, readable by the owner only from the first byte on."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _certificates() -> tuple[bytes, bytes, bytes]:
    """(CA certificate, leaf certificate, leaf key), PEM; the CA key is dropped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + _CERT_LIFETIME
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upload-proxy embedded store CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_security_config(data_dir: Path) -> Path:
    """Write fresh keys, certificates and ``security.toml``; return their directory,
    to be handed to ``weed -config_dir``."""
    directory = data_dir / SECURITY_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    directory.chmod(0o700)
    ca_pem, cert_pem, key_pem = _certificates()
    for name, data in ((CA_CERT, ca_pem), (NODE_CERT, cert_pem), (NODE_KEY, key_pem)):
        _write_private(directory / name, data)
    lines = [
        "# Written by upload-proxy at every start of its embedded SeaweedFS; edits are lost.",
        "# See proxy/storage/seaweed_security.py.",
    ]
    for section in _JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{secrets.token_urlsafe(32)}"', ""]
    # No unauthenticated volume status page; no filer directory listings.
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false"]
    lines += ["", "[grpc]", f"ca = {_toml_string(str(directory / CA_CERT))}", ""]
    for component in _GRPC_COMPONENTS:
        lines += [
            f"[grpc.{component}]",
            f"cert = {_toml_string(str(directory / NODE_CERT))}",
            f"key = {_toml_string(str(directory / NODE_KEY))}",
            "",
        ]
    _write_private(directory / "security.toml", "\n".join(lines).encode())
    return directory


if __name__ == "__main__":
    write_security_config(Path(sys.argv[1]))
