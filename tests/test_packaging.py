"""The service unit, the container recipe and the declared dependencies: checked as far as this
machine allows (no Docker engine)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.metadata
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
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


def test_systemd_unit_is_hardened() -> None:
    unit = (ROOT / "systemd" / "ollama-mirror.service").read_text()
    for directive in ("User=ollama-mirror", "CacheDirectory=ollama-mirror", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                      "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "Restart=on-failure", "Environment=OLLAMA_MIRROR_LISTEN=0.0.0.0:80", "KillSignal=SIGTERM"):
        assert directive in unit, directive


def _wheel(dest: Path) -> Path:
    """This tree as a wheel, zipped by hand: the test runs offline, where pip cannot fetch the build
    backend pyproject.toml names. Its console script is pyproject.toml's."""
    info = "ollama_mirror-0.1.0.dist-info"
    files = {str(p.relative_to(ROOT)): p.read_bytes() for p in sorted((ROOT / "mirror").rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}
    scripts = "".join(f"{name} = {target}\n" for name, target in PROJECT["scripts"].items())
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: ollama-mirror\nVersion: 0.1.0\n"
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]).encode()
    wheel = dest / "ollama_mirror-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def _exec_start(unit: str) -> Path:
    match = re.search(r"^ExecStart=(\S+)", unit, re.M)
    assert match, "the unit has no ExecStart"
    return Path(match[1])


def test_documented_install_puts_the_command_where_the_unit_runs_it(tmp_path: Path) -> None:
    """README's install (scripts/install) into a root of its own; then `systemd-analyze verify` of the
    unit as installed there, which fails when ExecStart names a file the install did not make (as
    `pipx install .` did: ~/.local/bin, behind ProtectHome=yes, 203/EXEC)."""
    readme = (ROOT / "README.md").read_text()
    assert "sudo scripts/install" in readme, "README's install must be the one this test runs"
    if shutil.which("systemd-sysusers") is None or shutil.which("systemd-analyze") is None:
        pytest.skip("systemd's tools are not installed (scripts/test installs Debian's systemd)")
    root = tmp_path / "root"
    env = {**os.environ, "ROOT": str(root), "PYTHON": sys.executable,
           "PIP_ARGS": f"--no-index --no-deps {_wheel(tmp_path)}"}
    done = subprocess.run([str(ROOT / "scripts" / "install")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    unit = (root / "etc/systemd/system/ollama-mirror.service").read_text()
    assert unit == (ROOT / "systemd" / "ollama-mirror.service").read_text()
    command = root / _exec_start(unit).relative_to("/")
    assert command.is_file() and os.access(command, os.X_OK), f"{_exec_start(unit)} is not where the install put it"
    assert not str(_exec_start(unit)).startswith(("/home", "/root")), "ProtectHome=yes hides it from the service"
    assert os.readlink(root / "usr/local/bin/ollama-mirror") == str(_exec_start(unit))  # the admins' command
    site = next((root / "opt/ollama-mirror/lib").glob("python3*/site-packages"))
    (site / "test-deps.pth").write_text(next(p for p in map(Path, sys.path) if (p / "starlette").is_dir()).as_posix())
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "ollama-mirror 0.1.0", version.stderr

    user = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert "ollama-mirror" in user, "the unit's User= was not created"
    uid, gid = int(user["ollama-mirror"][2]), int(user["ollama-mirror"][3])
    config = (root / "etc/ollama-mirror/config.toml").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (0, gid, 0o640)  # tokens: not world-readable
    cache = (root / "var/cache/ollama-mirror").stat()
    assert (cache.st_uid, cache.st_gid) == (uid, gid)

    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)  # targets it names
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/ollama-mirror.service"],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr


def _docker_context(paths: list[str], rules: list[str]) -> set[str]:
    """The files `docker build` sends, by .dockerignore's rules: the last matching rule wins, a
    rule matches a path or any folder above it, ``*`` stays within a folder, ``**`` crosses them."""
    def regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(part, re.escape(part)) for part in parts))

    compiled = [(rule.startswith("!"), regex(rule.lstrip("!"))) for rule in rules]
    sent = set()
    for path in paths:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        excluded = False
        for negated, pattern in compiled:
            if any(pattern.fullmatch(prefix) for prefix in prefixes):
                excluded = not negated
        if not excluded:
            sent.add(path)
    return sent


def test_docker_build_context_leaves_out_environments_and_caches() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    made = [".venv/bin/python", ".venv/lib/python3.11/site-packages/httpx/__init__.py",
            ".venv-ollama/lib/python3.11/site-packages/bigdl/cpp/libs/ollama/ollama-lib", ".git/HEAD",
            ".git/objects/pack/pack-1.pack", "mirror/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/x.pyc",
            ".pytest_cache/v/cache/nodeids", ".hypothesis/examples/x", "bench-results.json", "build/lib/mirror/x.py",
            "ollama_mirror.egg-info/PKG-INFO"]
    sent = _docker_context(tracked + made, rules)
    leaked = sorted(path for path in sent if path in made or path.startswith(("tests/", "bench/", "scripts/")))
    assert not leaked, f"the build context carries {leaked}"
    copied = re.findall(r"^COPY (.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    needed = [path for sources in copied for source in sources.split() for path in tracked
              if path == source or path.startswith(f"{source}/")]
    assert needed and set(needed) <= sent, f"the image needs {sorted(set(needed) - sent)}, left out of the context"


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
