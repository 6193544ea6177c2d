"""Mutual TLS between agents: load and check the files given by --tls-cert/--tls-key/--tls-ca.

Every agent presents a certificate signed by the cluster CA and naming the
node (a DNS subject alternative name, or the common name, equal to the node
name); it accepts only peers that do the same, and checks that a peer's
certificate names the node the peer claims to be. The checks here run at
start-up so that a wrong file fails with a clear message, not with a TLS
handshake error on every peer.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class TlsMaterial:
    cert: bytes
    key: bytes
    ca: bytes


def tls_files(cert: str | Path | None, key: str | Path | None,
              ca: str | Path | None) -> TlsFiles | None:
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        return None
    missing = [flag for flag, v in given.items() if not v]
    if missing:
        raise ConfigError(missing[0], "mutual TLS needs all of --tls-cert, --tls-key and "
                          f"--tls-ca (missing: {', '.join(missing)})")
    assert cert and key and ca
    return TlsFiles(Path(cert), Path(key), Path(ca))


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror}") from None


def cert_names(pem: bytes) -> list[str]:
    """The DNS and IP subject alternative names and the common name of a certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    names += [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def load(files: TlsFiles, node: str) -> TlsMaterial:
    """Read and check the files: parseable, the key matches, signed by the CA, valid now,
    and naming `node`."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(files.cert, "--tls-cert")
    key_pem = _read(files.key, "--tls-key")
    ca_pem = _read(files.ca, "--tls-ca")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError("--tls-cert", f"{files.cert} is not a PEM certificate: {exc}") from None
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ConfigError("--tls-ca", f"{files.ca} is not a PEM certificate: {exc}") from None
    try:
        key: Any = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("--tls-key", f"{files.key} is not an unencrypted PEM private key: "
                          f"{exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise ConfigError("--tls-key", f"{files.key} is not the key of {files.cert}")
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise ConfigError("--tls-cert", f"{files.cert} is not signed by the CA in {files.ca}: "
                          "peers would reject it")
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError("--tls-cert", f"{files.cert} is valid only from "
                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    names = cert_names(cert_pem)
    if node not in names:
        raise ConfigError("--tls-cert", f"{files.cert} names {', '.join(names) or 'nothing'}, "
                          f"not this node {node!r}: peers check that a certificate names the "
                          "node it speaks for (put the node name in a DNS subject alternative "
                          "name)")
    return TlsMaterial(cert_pem, key_pem, ca_pem)


def server_credentials(m: TlsMaterial) -> Any:
    import grpc

    return grpc.ssl_server_credentials([(m.key, m.cert)], root_certificates=m.ca,
                                       require_client_auth=True)


def channel_credentials(m: TlsMaterial) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key,
                                        certificate_chain=m.cert)
