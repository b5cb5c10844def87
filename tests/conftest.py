"""Fixtures: a fake upstream (registry + CDN) and mirrors on real sockets."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirror import Settings
from mirror import logs as mirror_logs
from mirror.server import build_server

from .fakes import FakeCDN, FakeRegistry, ServerThread
from .real_ollama import OllamaServer, require_venv


@pytest.fixture(autouse=True, scope="session")
def _logging() -> None:
    mirror_logs.configure("info")
    # The fakes raise on purpose to reset connections; uvicorn would print each traceback.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)


@pytest.fixture
def cdn() -> Iterator[FakeCDN]:
    fake = FakeCDN()
    server = ServerThread(fake).start()
    fake.url = server.url("localhost")  # another host name than the registry's, as a real CDN
    yield fake
    server.stop()


@pytest.fixture
def registry(cdn: FakeCDN, tmp_path: Path) -> Iterator[FakeRegistry]:
    directory = tmp_path / "upstream"
    directory.mkdir()
    fake = FakeRegistry(cdn, cdn.url, directory)
    server = ServerThread(fake).start()
    fake.url = server.url()
    fake.server = server
    yield fake
    server.stop()


MirrorFactory = Callable[..., ServerThread]


@pytest.fixture
def start_mirror(registry: FakeRegistry, tmp_path: Path) -> Iterator[MirrorFactory]:
    """Start a mirror on a real uvicorn server: ``start_mirror(**settings)``; stopped at teardown."""
    servers: list[ServerThread] = []

    def start(**overrides: object) -> ServerThread:
        values: dict[str, object] = {"cache_dir": tmp_path / "cache", "upstream": registry.url,
                                     "listen": "127.0.0.1:0"}
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        server = ServerThread.running(build_server(settings)).start()  # the server `serve` runs
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def mirror(start_mirror: MirrorFactory) -> ServerThread:
    return start_mirror()


@pytest.fixture
def ollama(tmp_path: Path) -> Iterator[Callable[..., OllamaServer]]:
    """Real Ollama 0.9.3 instances, one per simulated machine: ``ollama(label, start=True, models=None)``."""
    venv = require_venv()
    servers: list[OllamaServer] = []

    def make(label: str, start: bool = True, models: Path | None = None) -> OllamaServer:
        server = OllamaServer(venv, tmp_path / f"ollama-{label}")
        if models is not None:
            server.env["OLLAMA_MODELS"] = str(models)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB filesystem of its own (tmpfs), skipped only where mounting is impossible."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- a real S3 engine: Ceph RGW (tests/s3.py) ------------------------------------------------------

from mirror.bucket import Bucket, BucketLocation

from .s3 import (
    S3Endpoint,
    create_bucket,
    remove_bucket,
    rgw_environ,
    s3_client,
    start_rgw,
    stop_rgw,
)


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """One Ceph RGW for the session (bluestore on a sparse file, ports of its own); a failed start
    fails the tests that need it, with the script's output: CI must run them, never skip them."""
    environ = rgw_environ(tmp_path_factory.mktemp("ceph"))
    try:
        endpoint = start_rgw(environ)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        failure = f"Ceph RGW did not start: {exc}"
    else:
        failure = ""
    if failure:
        stop_rgw(environ)
        pytest.fail(failure, pytrace=False)
    yield endpoint
    stop_rgw(environ)


@pytest.fixture
def bucket(rgw: S3Endpoint) -> Iterator[Bucket]:
    """A new, empty bucket on the session's RGW, under a prefix, path-style; removed afterwards."""
    s3 = rgw.client()
    name = create_bucket(s3)
    yield rgw.connect(BucketLocation(name, "site/"))
    remove_bucket(s3, name)


@pytest.fixture
def bucket_url(rgw: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; mirror processes find the endpoint and keys in the environment, as any AWS
    SDK does. The endpoint is named ``localhost`` while mirrors are ``127.0.0.1``: Ollama follows a
    redirect to its own host name, and a presigned URL must be another host."""
    endpoint = rgw.url.replace("127.0.0.1", "localhost")
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": rgw.access_key,
                       "AWS_SECRET_ACCESS_KEY": rgw.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = f"mirror-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return f"s3://{name}/models"
