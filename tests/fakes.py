"""A fake registry.ollama.ai and a fake CDN it redirects to, on real loopback sockets.

The registry behaves like the real one: ``/v2/`` and manifests by digest answer
404, manifests come back as ``text/plain``, blob GETs answer 307 to the CDN,
which lives on another port and host name (``localhost`` vs ``127.0.0.1``).
The CDN serves Range requests, counts every byte it sends and injects faults
on request: resets, stalls, 5xx, 403 for expired URLs, wrong bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

Scope = dict[str, Any]


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a thread of its own (signals stay with the main thread)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config_options: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                                **config_options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def running(cls, server: Any) -> ServerThread:
        """A server built elsewhere (the mirror's ``build_server``), run exactly as ``serve`` runs it."""
        self = cls.__new__(cls)
        self.server = server
        self.sock = server.listeners.main
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=server.run, daemon=True)
        return self

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"


@dataclass
class Fault:
    """What the CDN does wrong to the next ``times`` blob responses (-1: all of them)."""

    kind: str  # "reset", "stall", "status", "corrupt", "expire" (every URL expires, then a reset)
    after: int = 0  # bytes into the response body before the fault strikes
    status: int = 503
    seconds: float = 0.0  # for "stall"
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Blob:
    path: Path
    size: int
    digest: str


def write_blob(directory: Path, size: int, seed: int) -> Blob:
    """``size`` pseudo-random bytes in a file, with their sha256: fast and reproducible."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    tmp = directory / f"blob-{seed}-{size}.tmp"
    with open(tmp, "wb") as f:
        left = size
        while left:
            data = rng.randbytes(min(left, 8 << 20))
            h.update(data)
            f.write(data)
            left -= len(data)
    digest = f"sha256:{h.hexdigest()}"
    path = directory / digest.replace(":", "-")
    tmp.replace(path)
    return Blob(path, size, digest)


def wait_for_text(path: Path, pattern: str, timeout: float = 30.0) -> str:
    """The file's text once ``pattern`` (a regex) appears in it: log lines are written by a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text()[-3000:] if path.exists() else ''}")


def wait_for_file(path: Path, timeout: float = 30.0) -> Path:
    """Clients may finish reading a fill a moment before it is verified and published."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path


def assert_store_verified(cache: Path) -> None:
    """Everything under a final name in the cache is what its name says."""
    for path in (cache / "blobs").glob("*"):
        assert path.name.startswith("sha256-"), path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name.removeprefix("sha256-"), path
    for path in (cache / "manifests").rglob("*"):
        if path.is_file():
            assert json.loads(path.read_bytes())["schemaVersion"] == 2, path


def blob_from_bytes(directory: Path, data: bytes) -> Blob:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = directory / digest.replace(":", "-")
    path.write_bytes(data)
    return Blob(path, len(data), digest)


class MirrorProcess:
    """``python -m mirror serve`` as its own process, as a user runs it."""

    command = ["-m", "mirror"]  # after the interpreter; a benchmark may run a variant

    def __init__(self, cache: Path, upstream: str, label: str, *extra: str) -> None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        self.log = cache.parent / f"mirror-{label}.log"
        self.process = subprocess.Popen(
            [sys.executable, *self.command, "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(cache),
             "--upstream", upstream, *extra],
            stderr=open(self.log, "wb"), stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.findall(r"listening url=([^\s\"]+)", self.log.read_text())
            if found and self.process.poll() is None:
                self.url = found[-1]
                return
            time.sleep(0.05)
        raise RuntimeError(f"mirror did not start:\n{self.log.read_text()}")

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(30)


class FakeCDN:
    """Serves blobs by digest with Range support, like a presigned-URL object store."""

    piece = 256 << 10

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}
        self.faults: list[Fault] = []
        self.bytes_sent = 0
        self.bytes_by_digest: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.tokens: set[str] = set()
        self.rate: float | None = None  # bytes per second per response
        self.shared_rate: float | None = None  # bytes per second for all responses together (one pipe)
        self._shared_next = 0.0  # when the shared pipe is free again (event loop time)
        self.saw_authorization = False  # credentials must never reach the CDN
        self.ignore_range = False  # answer every GET 200 with the whole body, as some CDNs do
        self.redirect: str | None = None  # answer every request 302 to this origin, same path and query
        self._lock = threading.Lock()

    def issue_token(self) -> str:
        token = f"{random.getrandbits(64):016x}"
        with self._lock:
            self.tokens.add(token)
        return token

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times != 0:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.saw_authorization |= "authorization" in headers
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        digest = scope["path"].rsplit("/", 1)[-1]
        blob = self.blobs.get(digest)
        self.requests.append((digest, headers.get("range")))
        if self.redirect is not None:
            target = f"{self.redirect}{scope['path']}?{scope['query_string'].decode()}"
            await _plain(send, 302, b"", {"location": target})
            return
        if blob is None:
            await _plain(send, 404, b"no such object")
            return
        if query.get("t") not in self.tokens:
            await _plain(send, 403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            return
        fault = self._next_fault() if scope["method"] == "GET" else None
        if fault is not None and fault.kind == "status":
            await _plain(send, fault.status, b"injected failure", fault.headers)
            return
        start, stop, status = 0, blob.size, 200
        if "range" in headers and not self.ignore_range:
            first, _, last = headers["range"].removeprefix("bytes=").partition("-")
            start, stop, status = int(first), min(int(last) + 1 if last else blob.size, blob.size), 206
        response_headers = [(b"content-length", str(stop - start).encode()), (b"accept-ranges", b"bytes"),
                            (b"content-type", b"application/octet-stream")]
        if status == 206:
            response_headers.append((b"content-range", f"bytes {start}-{stop - 1}/{blob.size}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        gone = asyncio.Event()  # uvicorn drops sends to a closed connection silently: stop counting then
        watcher = asyncio.ensure_future(_watch_disconnect(receive, gone))
        try:
            await self._send_range(send, blob, start, stop, fault, gone)
        finally:
            watcher.cancel()

    async def _send_range(self, send: Any, blob: Blob, start: int, stop: int, fault: Fault | None,
                          gone: asyncio.Event) -> None:
        strike_at = fault.after if fault is not None else None  # offset into this response
        sent = 0
        with open(blob.path, "rb") as f:
            while start + sent < stop and not gone.is_set():
                corrupt = False
                if strike_at == sent and fault is not None:
                    strike_at = None
                    if fault.kind == "expire":
                        self.expire_tokens()
                    if fault.kind in ("reset", "expire"):
                        raise ConnectionResetError("injected reset")
                    if fault.kind == "stall":
                        await asyncio.sleep(fault.seconds)
                    corrupt = fault.kind == "corrupt"
                n = min(self.piece, stop - start - sent)
                if strike_at is not None and strike_at > sent:
                    n = min(n, strike_at - sent)
                if self.shared_rate:
                    await self._through_shared_pipe(n)  # queued behind every other response's bytes
                data = await asyncio.to_thread(os.pread, f.fileno(), n, start + sent)
                if corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                await send({"type": "http.response.body", "body": data, "more_body": True})
                with self._lock:
                    self.bytes_sent += len(data)
                    self.bytes_by_digest[blob.digest] = self.bytes_by_digest.get(blob.digest, 0) + len(data)
                sent += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


    async def _through_shared_pipe(self, n: int) -> None:
        """Every response's pieces queue for one pipe of ``shared_rate`` bytes per second. A quarter
        second of slack keeps the pipe's rate when this loop runs late (a busy machine): otherwise
        each late wake-up would waste pipe time, and only a queue of many connections hid it, so
        more connections looked faster than the pipe allows."""
        now = asyncio.get_running_loop().time()
        self._shared_next = max(self._shared_next, now - 0.25) + n / (self.shared_rate or 1)
        await asyncio.sleep(self._shared_next - now)


# registry.ollama.ai's answer to an Ollama too old for a model (as `ollama pull` prints it after "412: ").
NEWER_OLLAMA_NEEDED = (b"\nThe model you are attempting to pull requires a newer version of Ollama.\n\n"
                       b"Please download the latest version at:\n\n\thttps://ollama.com/download\n\n")


class FakeRegistry:
    """Manifests and blob redirects, as registry.ollama.ai answers them."""

    def __init__(self, cdn: FakeCDN, cdn_url: str, directory: Path) -> None:
        self.cdn = cdn
        self.cdn_url = cdn_url
        self.directory = directory
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, user-agent)
        self.authorizations: list[str] = []  # every Authorization header it was sent
        self.require_token = False
        self.issued_tokens: set[str] = set()
        self.manifest_status: int | None = None  # force an answer for every manifest request
        self.manifest_delay = 0.0
        self.head_size = True  # HEAD answers 200 with the size; False: 307 like GET
        self.token_realm: str | None = None  # the realm the 401 challenge names; None: this registry's /token
        # (name, tag) -> the oldest Ollama served it; older ones get 412, as the registry decides by User-Agent
        self.min_ollama: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.refused_agents: set[str] = set()  # other products ("curl") refused those tags too

    def add_blob(self, blob: Blob) -> Blob:
        self.cdn.blobs[blob.digest] = blob
        return blob

    def add_model(self, name: str, tag: str, layers: list[Blob | tuple[Blob, str]],
                  config: Blob | None = None) -> bytes:
        """Register a model; returns its manifest bytes (compact JSON, no newline, like the registry's).

        A layer is a blob (a model layer) or (blob, kind) with kind "template", "params", "license"...
        """
        config = config or blob_from_bytes(self.directory, json.dumps({"model_format": "gguf"}).encode())
        typed = [(item, "model") if isinstance(item, Blob) else item for item in layers]
        for blob in [config, *(b for b, _ in typed)]:
            self.add_blob(blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}", "digest": b.digest, "size": b.size}
                       for b, kind in typed],
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        self.manifests[(name, tag)] = data
        return data

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and fragment in p)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((method, path, headers.get("user-agent", "")))
        if "authorization" in headers:
            self.authorizations.append(headers["authorization"])
        if path == "/token":
            token = f"tok{random.getrandbits(32)}"
            self.issued_tokens.add(token)
            await _plain(send, 200, json.dumps({"token": token}).encode(), {"content-type": "application/json"})
            return
        if self.require_token and headers.get("authorization", "").removeprefix("Bearer ") not in self.issued_tokens:
            realm = self.token_realm or f"http://{headers.get('host')}/token"
            challenge = f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"'
            await _plain(send, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"www-authenticate": challenge})
            return
        if "/manifests/" in path:
            await self._manifest(path, send, headers.get("user-agent", ""))
        elif "/blobs/" in path:
            await self._blob(path, method, send)
        else:
            await _plain(send, 404, b"404 page not found")

    async def _manifest(self, path: str, send: Any, user_agent: str = "") -> None:
        name, _, reference = path.removeprefix("/v2/").partition("/manifests/")
        if self.manifest_delay:
            await asyncio.sleep(self.manifest_delay)
        if self.manifest_status is not None:
            await _plain(send, self.manifest_status, b'{"errors":[{"code":"INJECTED","message":"injected"}]}',
                         {"content-type": "application/json"})
            return
        data = self.manifests.get((name, reference))
        if data is None:  # includes every manifest by digest, as the real registry
            await _plain(send, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
            return
        minimum = self.min_ollama.get((name, reference))
        if minimum is not None and self._too_old(user_agent, minimum):
            await _plain(send, 412, NEWER_OLLAMA_NEEDED, {"content-type": "text/plain; charset=utf-8"})
            return
        await _plain(send, 200, data, {"content-type": "text/plain; charset=utf-8"})

    def _too_old(self, user_agent: str, minimum: tuple[int, int, int]) -> bool:
        version = re.match(r"ollama/(\d+)\.(\d+)\.(\d+)", user_agent)
        if version:
            return tuple(map(int, version.groups())) < minimum
        return re.split(r"[/\s]", user_agent, maxsplit=1)[0].lower() in self.refused_agents

    async def _blob(self, path: str, method: str, send: Any) -> None:
        digest = path.rsplit("/", 1)[-1]
        blob = self.cdn.blobs.get(digest)
        if blob is None:
            await _plain(send, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            return
        if method == "HEAD" and self.head_size:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(blob.size).encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        location = f"{self.cdn_url}/objects/{digest}?t={self.cdn.issue_token()}"
        await _plain(send, 307, b"", {"location": location})


async def _plain(send: Any, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _watch_disconnect(receive: Any, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass(frozen=True)
class Seen:
    """One request as it reached a fake server."""

    server: str  # the label given to Recording: "registry", "cdn"
    method: str
    path: str
    headers: dict[str, str]  # lower-case names

    @property
    def digest(self) -> str | None:
        last = self.path.rsplit("/", 1)[-1]
        return last if last.startswith("sha256:") else None


class Recording:
    """An ASGI app that notes each HTTP request in a shared list, then hands it on.

    Wrapping the registry and the CDN in two of these, sharing one list, gives the
    order in which a client's requests reached upstream, across both servers.
    """

    def __init__(self, app: Any, server: str, seen: list[Seen]) -> None:
        self.app = app
        self.server = server
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.seen.append(Seen(self.server, scope["method"], scope["path"], headers))
        await self.app(scope, receive, send)


class PacedCDN(FakeCDN):
    """A FakeCDN that sends chosen blobs slowly: ``pace(digest, rate, times)``, the others at full speed."""

    def __init__(self) -> None:
        super().__init__()
        self._paced: dict[str, tuple[float, int]] = {}  # digest -> (bytes per second, responses left)

    def pace(self, digest: str, rate: float, times: int = 1) -> None:
        self._paced[digest] = (rate, times)

    def _take_rate(self, digest: str) -> float | None:
        with self._lock:
            rate, times = self._paced.get(digest, (0.0, 0))
            if times == 0:
                return None
            self._paced[digest] = (rate, times - 1)
            return rate

    async def _send_range(self, send: Any, blob: Blob, start: int, stop: int, fault: Fault | None,
                          gone: asyncio.Event) -> None:
        rate = self._take_rate(blob.digest)
        if rate is None:
            await super()._send_range(send, blob, start, stop, fault, gone)
            return

        async def paced(message: dict[str, Any]) -> None:
            # Wait before sending, so each piece is counted as soon as it is sent: a test that checks the
            # counts right after its client read the last piece must not beat the count.
            await asyncio.sleep(len(message.get("body", b"")) / rate)
            await send(message)

        await super()._send_range(paced, blob, start, stop, fault, gone)
