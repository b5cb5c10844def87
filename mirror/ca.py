"""The mirror's private certificate authority, for answering as the registry hosts it mirrors.

Ollama's own advice behind a proxy is ``HTTPS_PROXY`` plus the proxy's certificate installed
as a system certificate; this is that certificate. The CA key never leaves the state
directory (mode 0600). Leaf certificates are minted in memory, only for hosts the caller
says are intercepted, and never written to disk.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from cachetools import TTLCache
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("mirror.proxy")
CA_YEARS = 10
LEAF_DAYS = 397  # the longest browsers accept; minted per run, and re-minted monthly while it runs
LEAF_REUSE_SECONDS = 30 * 86400


class NotIntercepted(LookupError):
    """A certificate was asked for a host the mirror does not answer for: none is minted."""


class CertificateAuthority:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key_path = directory / "ca.key"
        self.cert_path = directory / "ca.pem"

    @property
    def exists(self) -> bool:
        return self.key_path.exists() and self.cert_path.exists()

    def init(self, common_name: str = "ollama-mirror private CA") -> bool:
        """Create the CA unless it exists; True when created. The key is written 0600 from the start."""
        if self.exists:
            return False
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ollama-mirror")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write_private(self.key_path, key_pem)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return True

    def certificate_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def mint(self, host: str) -> tuple[bytes, bytes]:
        """A leaf certificate and key (PEM) for ``host``, signed by this CA."""
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([_general_name(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


class ServerIdentities:
    """TLS server contexts per intercepted host: minted by our CA on first use, or the admin's files.

    ``intercepted`` is asked every time, so hosts learned at run time (CDNs) count; any other
    name gets no certificate at all.
    """

    def __init__(self, ca: CertificateAuthority | None, intercepted: Callable[[str], bool],
                 cert_file: Path | None = None, key_file: Path | None = None) -> None:
        self._ca, self._intercepted = ca, intercepted
        self._files = (cert_file, key_file) if cert_file and key_file else None
        self._contexts: TTLCache[str, ssl.SSLContext] = TTLCache(maxsize=256, ttl=LEAF_REUSE_SECONDS)
        self._lock = threading.Lock()
        self.minted: list[str] = []  # hosts a certificate was minted for, in order (for the logs and tests)

    def context_for(self, host: str, port: int = 443) -> ssl.SSLContext:
        """The context for ``host`` reached on ``port``; a name we do not answer for gets none."""
        host = host.lower().rstrip(".")
        if not self._intercepted(f"{host}:{port}") and not (port == 443 and self._intercepted(host)):
            raise NotIntercepted(f"{host} is not a host this mirror answers for")
        with self._lock:
            context = self._contexts.get(host)
            if context is None:
                context = self._contexts[host] = self._new_context(host)
            return context

    def _new_context(self, host: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.set_alpn_protocols(["http/1.1"])  # we speak HTTP/1.1 only; Go falls back from h2
        if self._files is not None:
            context.load_cert_chain(*self._files)
            return context
        if self._ca is None:
            raise NotIntercepted("no CA and no certificate files to answer with")
        cert_pem, key_pem = self._ca.mint(host)
        _load_chain_from_memory(context, cert_pem + self._ca.certificate_pem(), key_pem, self._ca.directory)
        self.minted.append(host)
        return context

    def sni_context(self, default_host: str) -> ssl.SSLContext:
        """A listener's context: it switches to the certificate of the name the client asks for
        (SNI) and refuses names it does not answer for; clients without SNI get ``default_host``'s."""
        outer = self.context_for(default_host)
        if self._files is not None:
            return outer  # the admin's certificate answers every name it covers
        outer = self._new_context(default_host.lower())  # its own object: the callback is set on it

        def choose(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
            try:
                if server_name:
                    sock.context = self.context_for(server_name)
            except NotIntercepted:
                log.warning("tls refused server_name=%s reason=not a host this mirror answers for", server_name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        outer.sni_callback = choose  # type: ignore[assignment]
        return outer


def _load_chain_from_memory(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, directory: Path) -> None:
    """ssl loads chains from files only: write a private file next to the CA, load, delete."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=".leaf-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + chain_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
