"""Throwaway self-signed certificates for TLS tests (``cryptography`` is a test dependency).

Which names a certificate holds matters to the tests: one for ``localhost`` only must fail
verification when reached as ``127.0.0.1``, so there is no default set of names.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import NamedTuple

import pytest


class CertPaths(NamedTuple):
    cert: Path
    key: Path


def make_self_signed(directory: Path, names: tuple[str, ...]) -> CertPaths:
    """Write ``cert.pem`` and ``key.pem`` (EC P-256) into ``directory``: a self-signed CA
    certificate whose common name is ``names[0]`` and whose subjectAltName lists every name, an
    IP address entry for IP literals and a DNS entry for anything else. Valid from an hour ago
    for two days. Skips the test when ``cryptography`` is not installed.
    """
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = CertPaths(directory / "cert.pem", directory / "key.pem")
    paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def server_context(paths: CertPaths) -> ssl.SSLContext:
    """A TLS server context presenting ``paths``' certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.cert, paths.key)
    return context
