"""Safe by default: /healthz for monitors whatever the access settings, and the cache changed
through Ollama's management API only by those the admin let (its own host, the admin listener,
an authenticated request, --manage-clients)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette

from mirror import Settings, __version__, create_app
from mirror.app import create_admin_app

from .conftest import MirrorFactory
from .fakes import FakeRegistry, write_blob

LAN = ("10.1.2.3", 40000)


@contextlib.asynccontextmanager
async def _client(app: Starlette, client: tuple[str, int], serve: Starlette | None = None,
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """Requests from ``client`` to ``serve`` (default: ``app``), with ``app``'s lifespan run."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(serve or app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://mirror.lan", timeout=30) as http:
            yield http


def _run(settings: Settings, client: tuple[str, int], scenario: Callable[[httpx.AsyncClient], Awaitable[Any]],
         admin: bool = False) -> Any:
    """``scenario`` against the main app, or against the admin listener's app when ``admin``."""

    async def main() -> Any:
        app = create_app(settings)
        async with _client(app, client, create_admin_app(app) if admin else None) as http:
            return await scenario(http)

    return asyncio.run(main())


def _keys_file(tmp_path: Path) -> Path:
    line = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    path = tmp_path / "keys"
    path.write_text(f"{line} lab-machine\n")
    return path


# -- /healthz ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("access", "refused"), [
    pytest.param({"allow_clients": "192.168.0.0/16"}, 403, id="allow-clients"),
    pytest.param({"tokens": "s3cret"}, 401, id="tokens"),
    pytest.param("keys", 401, id="keys"),
    pytest.param({"allow_clients": "10.0.0.0/8", "tokens": "s3cret", "admin_listen": "127.0.0.1:0"}, 401,
                 id="office-with-admin-listener"),
])
def test_healthz_answers_whatever_the_access_settings(registry: FakeRegistry, tmp_path: Path,
                                                      access: dict[str, str] | str, refused: int) -> None:
    registry.add_model("library/secret-model", "1", [write_blob(registry.directory, 1000, seed=201)])
    overrides = {"keys_file": _keys_file(tmp_path)} if access == "keys" else access
    settings = Settings(cache_dir=tmp_path / "cache", upstream=registry.url, **overrides)  # type: ignore[arg-type]

    async def probe(http: httpx.AsyncClient) -> tuple[int, httpx.Response, int]:
        await http.post("/api/pull", json={"model": "secret-model:1", "stream": False},
                        headers={"Authorization": "Bearer s3cret"})  # so there is a model it could name
        return (await http.get("/v2/")).status_code, await http.get("/healthz"), (await http.head("/healthz")).status_code

    for admin in (False, True):
        v2, health, head = _run(settings, LAN, probe, admin=admin)
        if not admin:
            assert v2 == refused, v2
        assert health.status_code == 200 and head == 200, (admin, health.status_code, head)
        assert health.content == b"ok\n"  # no version, no model names, nothing about the mirror
        assert __version__ not in health.text and "secret-model" not in health.text


def test_dockerfile_healthcheck_passes_with_the_office_access_settings(start_mirror: MirrorFactory) -> None:
    """The container's own health check command, run against a mirror that refuses /v2/ to it."""
    text = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    command = re.search(r"^HEALTHCHECK .*\\\n\s*CMD (.+)$", text, re.M)
    assert command, "no HEALTHCHECK ... CMD in the Dockerfile"
    mirror = start_mirror(allow_clients="10.0.0.0/8", tokens="s3cret")
    assert httpx.get(f"{mirror.url()}/v2/").status_code == 403
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OLLAMA_MIRROR_LISTEN": f"0.0.0.0:{mirror.port}"}
    result = subprocess.run(["sh", "-c", command[1]], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]


# -- who may change the cache ---------------------------------------------------------------


def _manage(registry: FakeRegistry, tmp_path: Path, client: tuple[str, int], admin: bool = False,
            headers: dict[str, str] | None = None, **access: str) -> dict[str, Any]:
    """Pull and delete a model from ``client``, plus the read-only calls; what each answered."""
    layer = write_blob(registry.directory, 2000, seed=202)
    registry.add_model("library/tiny", "1", [layer])
    settings = Settings(cache_dir=tmp_path / "cache", upstream=registry.url, **access)  # type: ignore[arg-type]

    async def scenario(http: httpx.AsyncClient) -> dict[str, Any]:
        http.headers.update(headers or {})
        pull = await http.post("/api/pull", json={"model": "tiny:1", "stream": False})
        tags = await http.get("/api/tags")
        show = await http.post("/api/show", json={"model": "tiny:1"})
        version = await http.get("/api/version")
        delete = await http.request("DELETE", "/api/delete", json={"model": "tiny:1"})
        return {"pull": pull, "tags": tags.status_code, "show": show.status_code, "version": version.status_code,
                "delete": delete}

    return _run(settings, client, scenario, admin=admin)


@pytest.mark.parametrize(("client", "access"), [
    pytest.param(LAN, {}, id="lan-by-default"),
    pytest.param(LAN, {"allow_clients": "10.0.0.0/8"}, id="lan-allowed-to-pull-not-to-manage"),
    pytest.param(LAN, {"manage_clients": "192.168.0.0/16"}, id="lan-outside-manage-clients"),
    pytest.param(("::ffff:10.1.2.3", 40000), {}, id="dual-stack-lan"),
])
def test_management_writes_from_the_lan_are_refused(registry: FakeRegistry, tmp_path: Path,
                                                    client: tuple[str, int], access: dict[str, str]) -> None:
    got = _manage(registry, tmp_path, client, **access)
    for kind in ("pull", "delete"):
        assert got[kind].status_code == 403, (kind, got[kind].text)
        message = got[kind].json()["error"]  # Ollama's shape: the CLI prints it as it is
        assert set(got[kind].json()) == {"error"}
        assert client[0] in message and "--manage-clients" in message and "--admin-listen" in message
        assert message.count(". ") == 0 and not message.endswith(".")  # one sentence, as Ollama's errors
    assert registry.count("GET", "/manifests/") == 0  # the refused pull never reached upstream
    assert (got["tags"], got["version"], got["show"]) == (200, 200, 404)  # reading stays open (nothing cached)


@pytest.mark.parametrize(("client", "admin", "headers", "access"), [
    pytest.param(LAN, False, {}, {"manage_clients": "10.0.0.0/8"}, id="manage-clients"),
    pytest.param(("::ffff:10.1.2.3", 40000), False, {}, {"manage_clients": "10.0.0.0/8"}, id="dual-stack-manage"),
    pytest.param(LAN, True, {}, {"admin_listen": "127.0.0.1:0"}, id="admin-listener"),
    pytest.param(LAN, True, {}, {"admin_listen": "127.0.0.1:0", "allow_clients": "192.168.0.0/16"},
                 id="admin-listener-outside-allow-clients"),
    pytest.param(LAN, False, {"Authorization": "Bearer s3cret"}, {"tokens": "s3cret"}, id="token"),
    pytest.param(("::1", 40000), False, {}, {}, id="ipv6-loopback"),
])
def test_management_writes_allowed(registry: FakeRegistry, tmp_path: Path, client: tuple[str, int], admin: bool,
                                   headers: dict[str, str], access: dict[str, str]) -> None:
    got = _manage(registry, tmp_path, client, admin=admin, headers=headers, **access)
    assert got["pull"].status_code == 200 and got["pull"].json() == {"status": "success"}, got["pull"].text
    assert (got["tags"], got["show"], got["version"]) == (200, 200, 200)
    assert got["delete"].status_code == 200, got["delete"].text
    assert not list((tmp_path / "cache" / "manifests").rglob("1"))  # the tag is gone from the cache


def test_management_with_tokens_needs_the_token(registry: FakeRegistry, tmp_path: Path) -> None:
    got = _manage(registry, tmp_path, LAN, tokens="s3cret")
    assert got["pull"].status_code == 401 and got["delete"].status_code == 401
    assert registry.count("GET", "/manifests/") == 0


def test_management_from_the_mirrors_own_host_through_a_real_server(registry: FakeRegistry,
                                                                    start_mirror: MirrorFactory) -> None:
    registry.add_model("library/tiny", "1", [write_blob(registry.directory, 2000, seed=203)])
    mirror = start_mirror(allow_clients="127.0.0.0/8")  # the LAN default: nobody else may manage
    with httpx.Client(base_url=mirror.url(), timeout=30) as http:
        pull = http.post("/api/pull", json={"model": "tiny:1", "stream": False})
        assert pull.status_code == 200 and pull.json() == {"status": "success"}, pull.text
        assert http.request("DELETE", "/api/delete", json={"model": "tiny:1"}).status_code == 200
