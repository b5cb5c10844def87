"""The service unit, the container recipe and the declared dependencies: checked as far as this
machine allows (no Docker engine)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.metadata
import inspect
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCAL = {"mirror", "tests", "bench"}  # this repository's own packages


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "ollama-mirror.service").read_text()
    for directive in ("DynamicUser=yes", "CacheDirectory=ollama-mirror", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                      "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "Restart=on-failure",
                      "Environment=OLLAMA_MIRROR_LISTEN=0.0.0.0:80", "KillSignal=SIGTERM"):
        assert directive in unit, directive
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Verify the unit as installed: ExecStart pointing at this environment's console script.
    script = Path(sys.executable).parent / "ollama-mirror"
    copy = tmp_path / "ollama-mirror.service"
    copy.write_text(re.sub(r"ExecStart=\S+", f"ExecStart={script}", unit))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_unprivileged_with_a_cache_volume_and_healthcheck() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'VOLUME ["/var/cache/ollama-mirror"]' in text
    assert "OLLAMA_MIRROR_CACHE_DIR=/var/cache/ollama-mirror" in text
    assert re.search(r"HEALTHCHECK .*\n?.*CMD .*/healthz", text)  # /v2/ is refused under access control
    assert 'ENTRYPOINT ["ollama-mirror"]' in text and 'CMD ["serve"]' in text


# -- dependencies -----------------------------------------------------------------------------


def _declared(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(r.name): r for r in parsed}


def _third_party_imports(folder: Path) -> set[tuple[str, str]]:
    """(top-level module, file) for every import of another project, at any depth in the file."""
    found = set()
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL:
                    found.add((top, str(path.relative_to(ROOT))))
    return found


def test_every_imported_package_is_declared() -> None:
    runtime = set(_declared(PROJECT["dependencies"]))
    testing = runtime | set(_declared(PROJECT["optional-dependencies"]["test"]))
    providers = importlib.metadata.packages_distributions()
    problems = []
    for folder, declared, where in (("mirror", runtime, "dependencies"), ("bench", testing, "dependencies or [test]"),
                                    ("tests", testing, "dependencies or [test]")):
        for module, path in sorted(_third_party_imports(ROOT / folder)):
            distributions = {canonicalize_name(d) for d in providers.get(module, [])}
            if not distributions & declared:
                problems.append(f"{path} imports {module} ({', '.join(sorted(distributions)) or 'not installed'}), "
                                f"which pyproject.toml does not declare in {where}")
    assert not problems, "\n".join(problems)


FRAGILE = ("uvicorn", "starlette", "httpx", "httpcore")  # the mirror reaches past their documented API


def test_fragile_dependencies_are_bounded_and_the_tested_versions_fit() -> None:
    declared = _declared(PROJECT["dependencies"])
    for name in FRAGILE:
        assert name in declared, f"{name} is not declared in pyproject.toml"
        assert any(spec.operator == "<" for spec in declared[name].specifier), \
            f"{name} has no upper bound in pyproject.toml: a release that moves an internal would install"
    for name, requirement in declared.items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = importlib.metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), \
            f"{name} {installed} is installed and tested, but pyproject.toml asks for {requirement}"


# -- the internals of uvicorn, httpx and httpcore the mirror relies on ----------------------------

PROTOCOL = "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol"
CYCLE = "uvicorn.protocols.http.httptools_impl.RequestResponseCycle"

# One list, to change with the seam: (owner, attribute, who relies on it). An owner in <brackets>
# is an object met while serving a request the way mirror/server.py serves it (see _probe below).
INTERNALS: tuple[tuple[str, str, str], ...] = (
    (PROTOCOL, "connection_made", "mirror/protocol.py overrides it (head timer, zero-copy check)"),
    (PROTOCOL, "data_received", "mirror/protocol.py overrides it (head size limit)"),
    (PROTOCOL, "on_message_begin", "mirror/protocol.py overrides it (head timer per request)"),
    (PROTOCOL, "on_headers_complete", "mirror/protocol.py overrides it (installs zerocopy on the new cycle)"),
    (PROTOCOL, "connection_lost", "mirror/protocol.py overrides it"),
    ("<an HttpToolsProtocol>", "loop", "mirror/protocol.py (head timer)"),
    ("<an HttpToolsProtocol>", "transport", "mirror/protocol.py (refusals, closing)"),
    ("<an HttpToolsProtocol>", "cycle", "mirror/protocol.py (the request's RequestResponseCycle)"),
    (CYCLE, "send", "mirror/zerocopy.py wraps it"),
    ("<its RequestResponseCycle>", "send", "mirror/zerocopy.py wraps it"),
    ("<its RequestResponseCycle>", "transport", "mirror/zerocopy.py replaces it with one that holds the head back"),
    ("<its RequestResponseCycle>", "scope", "mirror/zerocopy.py offers the http.response.zerocopysend extension in it"),
    ("<its RequestResponseCycle>", "response_started", "mirror/zerocopy.py"),
    ("<its RequestResponseCycle>", "response_complete", "mirror/zerocopy.py"),
    ("<its RequestResponseCycle>", "chunked_encoding", "mirror/zerocopy.py"),
    ("<its RequestResponseCycle>", "expected_content_length", "mirror/zerocopy.py counts sendfile bytes against it"),
    ("<its RequestResponseCycle>", "disconnected", "mirror/zerocopy.py stops sending when it is set"),
    ("uvicorn.Server", "startup", "mirror/server.py: startup(sockets=[]) runs the lifespan only"),
    ("uvicorn.Server", "shutdown", "mirror/server.py pauses fills, then calls it"),
    ("<a uvicorn.Server>", "servers", "mirror/server.py adds its Acceptors; uvicorn's shutdown closes them"),
    ("<a uvicorn.Server>", "lifespan", "mirror/server.py gives lifespan.state to the protocols it builds"),
    ("<a uvicorn.Server>", "server_state", "mirror/server.py: its connections count in the graceful shutdown"),
    ("<its uvicorn.Config>", "http_protocol_class", "mirror/server.py builds protocols for its own listeners"),
)


class _Listener:
    """Stands in ``Server.servers`` as mirror/acceptor.py's Acceptor does: the two calls shutdown makes."""

    closed = waited = False

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        self.waited = True


class _ProbeProtocol(HttpToolsProtocol):
    seen: list[tuple[Any, Any]] = []

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        _ProbeProtocol.seen.append((self, self.cycle))


class _ProbeServer(uvicorn.Server):
    """uvicorn.Server driven as mirror/server.py's MirrorServer drives it."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        self.after_startup = list(self.servers)
        config = self.config

        def protocol() -> Any:
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state)

        self.listener = _Listener()
        listening = await asyncio.get_running_loop().create_server(protocol, sock=(sockets or [])[0])
        self.servers.extend([listening, self.listener])


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        for _ in ("startup", "shutdown"):
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _probe() -> dict[str, Any]:
    """One request through uvicorn's protocol on a listener of our own, as the mirror serves."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _ProbeServer(uvicorn.Config(_app, http=_ProbeProtocol, log_config=None, access_log=False,
                                         lifespan="on", timeout_graceful_shutdown=2))
    _ProbeProtocol.seen = []
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{sock.getsockname()[1]}/", timeout=5)
        assert answer.content == b"ok", answer
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    protocol, cycle = _ProbeProtocol.seen[0]
    return {"<an HttpToolsProtocol>": protocol, "<its RequestResponseCycle>": cycle, "<a uvicorn.Server>": server,
            "<its uvicorn.Config>": server.config}


def _owner(name: str, live: dict[str, Any]) -> Any:
    if name in live:
        return live[name]
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute, None)


def _missing(internals: tuple[tuple[str, str, str], ...], live: dict[str, Any]) -> str:
    """One line per internal that is not there, naming it and what relies on it."""
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in ("uvicorn", "httpx", "httpcore"))
    return "\n".join(f"{owner}.{attribute} is gone ({versions}): {user}" for owner, attribute, user in internals
                     if not hasattr(_owner(owner, live), attribute))


def test_uvicorn_and_httpcore_internals_the_mirror_relies_on_are_there() -> None:
    """If this fails, a dependency moved an internal the mirror builds on: read the message, adapt the
    module it names, and keep pyproject.toml's upper bound below that release until then."""
    classes = tuple(entry for entry in INTERNALS if not entry[0].startswith("<"))
    missing = _missing(classes, {})
    assert not missing, missing
    parameters = inspect.signature(HttpToolsProtocol.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(parameters), \
        f"{PROTOCOL}(config=, server_state=, app_state=) changed: mirror/server.py builds protocols with them"
    try:
        live = asyncio.run(_probe())
    except Exception as exc:
        raise AssertionError(f"a request through {PROTOCOL}, served the way mirror/server.py serves it, "
                             f"failed: {exc!r}") from exc
    missing = _missing(INTERNALS, live)
    assert not missing, missing
    server = live["<a uvicorn.Server>"]
    assert server.after_startup == [], "uvicorn.Server.startup(sockets=[]) opened listeners of its own; " \
                                       "mirror/server.py relies on it running only the lifespan"
    assert server.listener.closed and server.listener.waited, \
        "uvicorn.Server.shutdown no longer calls close() and wait_closed() on each of Server.servers: " \
        "mirror/acceptor.py's Acceptors would stay open"
