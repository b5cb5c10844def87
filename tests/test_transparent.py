"""Transparent mode: stock names through HTTPS_PROXY (CONNECT) and through a TLS listener (DNS override).

The fake registry stands in for registry.ollama.ai (``--registry registry.ollama.ai=URL``);
clients trust the mirror's CA through a file, as Go does with SSL_CERT_FILE.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from .fakes import FakeRegistry, MirrorProcess, wait_for_text, write_blob

REGISTRY = "registry.ollama.ai"


class TransparentMirror(MirrorProcess):
    def __init__(self, cache: Path, registry: FakeRegistry, *extra: str) -> None:
        super().__init__(cache, registry.url, "transparent", "--registry", f"{REGISTRY}={registry.url}",
                         "--proxy-listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", *extra)
        text = wait_for_text(self.log, r"tls ready url=(\S+)")
        self.proxy = re.findall(r"proxy ready url=(\S+)", text)[-1]
        self.tls_port = int(re.findall(r"tls ready url=\S+:(\d+)", text)[-1])
        self.ca = cache / ".mirror" / "ca" / "ca.pem"


@pytest.fixture
def transparent(registry: FakeRegistry, tmp_path: Path) -> Iterator[TransparentMirror]:
    mirror = TransparentMirror(tmp_path / "cache", registry, "--manifest-ttl", "0")
    yield mirror
    mirror.stop(signal.SIGTERM)


def _connect(proxy: str, target: str) -> bytes:
    """A raw CONNECT; returns the proxy's whole answer."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return _read_head(sock)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    return data


def test_ca_init_export_and_key_mode(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = [sys.executable, "-m", "mirror", "ca"]
    missing = subprocess.run([*run, "export", "--cache-dir", str(cache)], capture_output=True, text=True)
    assert missing.returncode != 0 and "ca init" in missing.stderr
    created = subprocess.run([*run, "init", "--cache-dir", str(cache)], capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    key = cache / ".mirror" / "ca" / "ca.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (key.parent.stat().st_mode & 0o077) == 0
    first_key = key.read_bytes()
    again = subprocess.run([*run, "init", "--cache-dir", str(cache)], capture_output=True, text=True)
    assert again.returncode == 0 and key.read_bytes() == first_key  # never replaced behind the clients' back

    exported = subprocess.run([*run, "export", "--cache-dir", str(cache), "--proxy-listen", "0.0.0.0:3128"],
                              capture_output=True)
    assert exported.returncode == 0
    cert = x509.load_pem_x509_certificate(exported.stdout)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert exported.stdout == (cache / ".mirror" / "ca" / "ca.pem").read_bytes()
    advice = exported.stderr.decode()
    for needle in ("update-ca-certificates", "update-ca-trust", "add-trusted-cert", "Import-Certificate",
                   "systemctl edit ollama", "HTTPS_PROXY=http://", ":3128"):
        assert needle in advice
    assert b"PRIVATE KEY" not in exported.stdout + exported.stderr


def test_proxy_serves_registry_by_its_own_name_to_httpx_and_curl(
    registry: FakeRegistry, transparent: TransparentMirror, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 3_000_000, seed=61)
    manifest = registry.add_model("library/tiny", "latest", [layer])
    base = f"https://{REGISTRY}/v2/library/tiny"
    with httpx.Client(proxy=transparent.proxy, verify=_trusting(transparent), timeout=30) as client:
        got = client.get(f"{base}/manifests/latest")
        assert got.status_code == 200 and got.content == manifest
        blob = client.get(f"{base}/blobs/{layer.digest}")
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == layer.digest.removeprefix("sha256:")
        ranged = client.get(f"{base}/blobs/{layer.digest}", headers={"Range": "bytes=1000-1999"})
        assert ranged.status_code == 206 and ranged.content == layer.path.read_bytes()[1000:2000]
    out = tmp_path / "curl.bin"
    curl = subprocess.run(["curl", "-sSf", "-x", transparent.proxy, "--cacert", str(transparent.ca),
                           "-o", str(out), f"{base}/blobs/{layer.digest}"], capture_output=True, text=True)
    assert curl.returncode == 0, curl.stderr
    assert out.read_bytes() == layer.path.read_bytes()
    assert registry.cdn.bytes_by_digest[layer.digest] == layer.size  # one fill, then the cache
    # the CDN the registry redirected to is answered from the cache too: nothing bypasses it
    cdn_url = f"{registry.cdn.url}/objects/{layer.digest}?t=signed"
    with httpx.Client(proxy=transparent.proxy, verify=_trusting(transparent), timeout=30) as client:
        via_cdn = client.get(cdn_url.replace("http://", "https://"))
        assert via_cdn.status_code == 200 and via_cdn.content == layer.path.read_bytes()
    assert registry.cdn.bytes_by_digest[layer.digest] == layer.size
    # stored under the real host's name: the cache is a models directory for stock names
    assert (transparent_cache(transparent) / "manifests" / REGISTRY / "library" / "tiny" / "latest").read_bytes() \
        == manifest


def _trusting(mirror: TransparentMirror) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(mirror.ca))


def transparent_cache(mirror: TransparentMirror) -> Path:
    return mirror.ca.parents[2]


def test_proxy_refuses_what_it_does_not_mirror(registry: FakeRegistry, transparent: TransparentMirror) -> None:
    refused = _connect(transparent.proxy, "example.com:443")
    assert refused.startswith(b"HTTP/1.1 403")
    # a reachable host that is not mirrored (the CDN's port on another name) is refused too: not an open proxy
    refused = _connect(transparent.proxy, f"127.0.0.2:{registry.server.port}")
    assert refused.startswith(b"HTTP/1.1 403")
    host, port = transparent.proxy.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert _read_head(sock).startswith(b"HTTP/1.1 405")
    with httpx.Client(proxy=transparent.proxy, verify=_trusting(transparent), timeout=10) as client:
        with pytest.raises(httpx.ProxyError):
            client.get("https://example.com/")
    # no certificate is minted for a name we do not answer for, through the TLS listener either
    context = ssl.create_default_context(cafile=str(transparent.ca))
    with socket.create_connection(("127.0.0.1", transparent.tls_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(raw, server_hostname="example.com").do_handshake()
    wait_for_text(transparent.log, "proxy refused CONNECT example.com:443")
    assert not [p for p in transparent.ca.parent.iterdir() if p.name not in ("ca.pem", "ca.key")]


def test_proxy_tunnels_only_allowed_hosts(registry: FakeRegistry, tmp_path: Path) -> None:
    echo = socket.create_server(("127.0.0.1", 0))
    port = echo.getsockname()[1]

    def serve_echo() -> None:
        conn, _ = echo.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve_echo, daemon=True).start()
    mirror = TransparentMirror(tmp_path / "cache", registry, "--tunnel-allow", f"127.0.0.1:{port}")
    try:
        host, proxy_port = mirror.proxy.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(proxy_port)), timeout=10) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
            assert _read_head(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"hello through the tunnel")
            assert sock.recv(100) == b"HELLO THROUGH THE TUNNEL"
    finally:
        mirror.stop(signal.SIGTERM)
        echo.close()


def test_proxy_honours_allowed_client_networks(registry: FakeRegistry, tmp_path: Path) -> None:
    mirror = TransparentMirror(tmp_path / "cache", registry, "--allow-clients", "10.0.0.0/8")
    try:
        assert _connect(mirror.proxy, f"{REGISTRY}:443").startswith(b"HTTP/1.1 403")
        wait_for_text(mirror.log, "reason=not in --allow-clients")
    finally:
        mirror.stop(signal.SIGTERM)


def test_dns_mode_tls_listener_answers_as_the_registry(
    registry: FakeRegistry, transparent: TransparentMirror, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 500_000, seed=62)
    manifest = registry.add_model("library/dns", "latest", [layer])
    resolve = f"{REGISTRY}:{transparent.tls_port}:127.0.0.1"  # what a LAN DNS override does
    base = f"https://{REGISTRY}:{transparent.tls_port}/v2/library/dns"
    got = subprocess.run(["curl", "-sSf", "--resolve", resolve, "--cacert", str(transparent.ca),
                          f"{base}/manifests/latest"], capture_output=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout == manifest
    blob = subprocess.run(["curl", "-sSf", "--resolve", resolve, "--cacert", str(transparent.ca),
                           f"{base}/blobs/{layer.digest}"], capture_output=True)
    assert blob.returncode == 0 and blob.stdout == layer.path.read_bytes()


def test_slow_connect_head_is_dropped(transparent: TransparentMirror) -> None:
    """A client that never finishes its CONNECT does not hold a connection for ever."""
    host, port = transparent.proxy.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"CONNECT regis")
        began = time.monotonic()
        answer = _read_head(sock)
        assert answer.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - began < 15


@pytest.mark.real_client
def test_real_client_pulls_plain_names_through_https_proxy(
    registry: FakeRegistry, transparent: TransparentMirror, ollama, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 20_000_000, seed=63)
    manifest = registry.add_model("library/tiny", "latest", [layer])
    proxy_env = {"HTTPS_PROXY": transparent.proxy, "SSL_CERT_FILE": str(transparent.ca)}

    first = ollama("proxied-a", start=False)
    first.env.update(proxy_env)
    first.start()
    result = first.pull("tiny", insecure=False)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = first.list_models()
    assert listed["tiny:latest"] == hashlib.sha256(manifest).hexdigest()[:12]  # same ID as a direct pull
    assert (first.models / "manifests" / REGISTRY / "library" / "tiny" / "latest").read_bytes() == manifest
    assert (first.models / "blobs" / layer.digest.replace(":", "-")).read_bytes() == layer.path.read_bytes()

    registry.server.stop()  # upstream gone: the plain name still pulls, from the mirror's disk (stale manifest)
    second = ollama("proxied-b", start=False)
    second.env.update(proxy_env)
    second.start()
    result = second.pull("tiny:latest", insecure=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert second.list_models()["tiny:latest"] == hashlib.sha256(manifest).hexdigest()[:12]
    assert os.path.getsize(second.models / "blobs" / layer.digest.replace(":", "-")) == layer.size


def test_resolve_pins_an_upstream_host_to_an_address(registry: FakeRegistry, tmp_path: Path) -> None:
    """DNS mode: the LAN's DNS sends registry.ollama.ai to us; --resolve names the real address."""
    import asyncio

    from mirror.names import Name
    from mirror.upstream import Upstream

    registry.add_model("library/pinned", "latest", [write_blob(registry.directory, 1000, seed=64)])
    port = registry.server.port

    async def fetch(pinned: dict[str, str]) -> bytes:
        upstream = Upstream(f"http://registry.invalid:{port}", pinned=pinned, connect_timeout=5)
        try:
            return (await upstream.get_manifest(Name.parse("library/pinned"), "latest", {})).data
        finally:
            await upstream.aclose()

    assert asyncio.run(fetch({"registry.invalid": "127.0.0.1"})) == registry.manifests[("library/pinned", "latest")]
    with pytest.raises(Exception, match="registry.invalid"):
        asyncio.run(fetch({}))


def test_one_mirror_serves_several_registries_each_under_its_own_host(
    registry: FakeRegistry, cdn, tmp_path: Path
) -> None:
    """hf.co next to registry.ollama.ai: each host's tags fill from its own upstream and are
    stored under its own name, so the cache stays a models directory for both."""
    from .fakes import ServerThread

    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    hub = FakeRegistry(cdn, cdn.url, hub_dir)
    hub_server = ServerThread(hub).start()
    ours = write_blob(registry.directory, 200_000, seed=65)
    theirs = write_blob(hub_dir, 300_000, seed=66)
    ollama_manifest = registry.add_model("library/same", "latest", [ours])
    hub_manifest = hub.add_model("library/same", "latest", [theirs])  # same name, another registry
    mirror = TransparentMirror(tmp_path / "cache", registry, "--registry", f"hf.co={hub_server.url()}")
    try:
        with httpx.Client(proxy=mirror.proxy, verify=_trusting(mirror), timeout=30) as client:
            a = client.get(f"https://{REGISTRY}/v2/library/same/manifests/latest")
            b = client.get("https://hf.co/v2/library/same/manifests/latest")
            assert a.content == ollama_manifest and b.content == hub_manifest
            assert client.get(f"https://hf.co/v2/library/same/blobs/{theirs.digest}").content == \
                theirs.path.read_bytes()
    finally:
        mirror.stop(signal.SIGTERM)
        hub_server.stop()
    manifests = tmp_path / "cache" / "manifests"
    assert (manifests / REGISTRY / "library" / "same" / "latest").read_bytes() == ollama_manifest
    assert (manifests / "hf.co" / "library" / "same" / "latest").read_bytes() == hub_manifest
    assert hub.count("GET", "/manifests/") == 1 and registry.count("GET", "/manifests/") == 1


def test_dns_mode_with_the_admins_own_certificate(registry: FakeRegistry, tmp_path: Path) -> None:
    """--tls-cert/--tls-key: a certificate from the office's own CA instead of the mirror's."""
    from mirror.ca import CertificateAuthority

    office = CertificateAuthority(tmp_path / "office-ca")
    office.init("office CA")
    cert_pem, key_pem = office.mint(REGISTRY)
    (tmp_path / "tls.pem").write_bytes(cert_pem + office.certificate_pem())
    (tmp_path / "tls.key").write_bytes(key_pem)
    manifest = registry.add_model("library/own", "latest", [write_blob(registry.directory, 1000, seed=67)])
    mirror = TransparentMirror(tmp_path / "cache", registry, "--tls-cert", str(tmp_path / "tls.pem"),
                               "--tls-key", str(tmp_path / "tls.key"))
    try:
        got = subprocess.run(["curl", "-sSf", "--resolve", f"{REGISTRY}:{mirror.tls_port}:127.0.0.1",
                              "--cacert", str(office.cert_path),
                              f"https://{REGISTRY}:{mirror.tls_port}/v2/library/own/manifests/latest"],
                             capture_output=True)
        assert got.returncode == 0, got.stderr
        assert got.stdout == manifest
    finally:
        mirror.stop(signal.SIGTERM)
