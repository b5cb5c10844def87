"""Seeding and air-gap commands, run as a user runs them: pull, import, export, ls, rm, pin, verify, freeze."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, assert_store_verified, blob_from_bytes, wait_for_file, write_blob


def cli(*args: str, cache: Path, upstream: str = "http://127.0.0.1:9", timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--cache-dir", str(cache), "--upstream", upstream],
                          capture_output=True, text=True, timeout=timeout)


def blob_path(cache: Path, blob: Blob) -> Path:
    return cache / "blobs" / blob.digest.replace(":", "-")


@pytest.fixture
def model(registry: FakeRegistry) -> tuple[bytes, Blob, Blob]:
    weights = write_blob(registry.directory, 6_000_000, seed=51)
    template = blob_from_bytes(registry.directory, b"{{ .Prompt }}")
    return registry.add_model("library/tiny", "1b", [weights, (template, "template")]), weights, template


def _host(registry: FakeRegistry) -> str:
    return registry.url.removeprefix("http://")


def test_pull_command_warms_the_cache_for_an_offline_server(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                                            start_mirror: MirrorFactory, tmp_path: Path) -> None:
    manifest, weights, _ = model
    cache = tmp_path / "cache"
    result = cli("pull", "tiny:1b", cache=cache, upstream=registry.url)
    assert result.returncode == 0, result.stderr
    assert blob_path(cache, weights).read_bytes() == weights.path.read_bytes()
    registry.server.stop()
    offline = start_mirror(offline=True)
    assert httpx.get(f"{offline.url()}/v2/library/tiny/manifests/1b").content == manifest
    assert httpx.get(f"{offline.url()}/v2/library/tiny/blobs/{weights.digest}").content == weights.path.read_bytes()


def test_ls_pin_rm_freeze(registry: FakeRegistry, model: tuple[bytes, Blob, Blob], tmp_path: Path) -> None:
    manifest, weights, template = model
    registry.add_model("library/other", "latest", [weights])
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", "other", cache=cache, upstream=registry.url).returncode == 0
    listed = {row["name"]: row for row in json.loads(cli("ls", "--json", cache=cache, upstream=registry.url).stdout)}
    name = f"{_host(registry)}/library/tiny:1b"
    assert listed["tiny:1b"]["full_name"] == name  # named as typed, against the settings' default registry
    assert listed["tiny:1b"]["id"] == hashlib.sha256(manifest).hexdigest()[:12] and not listed["tiny:1b"]["pinned"]
    assert cli("pin", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    assert json.loads(cli("ls", "--json", cache=cache, upstream=registry.url).stdout)[1]["pinned"]
    lock = json.loads(cli("freeze", cache=cache, upstream=registry.url).stdout)
    assert lock["models"][name] == f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    assert cli("rm", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    assert blob_path(cache, weights).exists()  # other still uses it
    assert not blob_path(cache, template).exists()
    assert name not in {r["full_name"] for r in json.loads(cli("ls", "--json", cache=cache, upstream=registry.url).stdout)}
    result = cli("rm", "tiny:1b", cache=cache, upstream=registry.url)
    assert result.returncode != 0 and "not in the cache" in result.stderr


def test_export_dir_import_round_trip_and_resume(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                                 tmp_path: Path) -> None:
    manifest, weights, template = model
    cache, usb, other = tmp_path / "cache", tmp_path / "usb", tmp_path / "isolated"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    result = cli("export", "tiny:1b", "--to", str(usb), cache=cache, upstream=registry.url)
    assert result.returncode == 0, result.stderr
    index = json.loads((usb / "ollama-mirror-index.json").read_text())["files"]
    assert index[f"blobs/{weights.digest.replace(':', '-')}"] == {"sha256": weights.digest[7:], "size": weights.size}
    assert (usb / "manifests" / _host(registry) / "library" / "tiny" / "1b").read_bytes() == manifest

    blob_path(usb, weights).unlink()  # an interrupted export: run it again
    result = cli("export", "tiny:1b", "--to", str(usb), cache=cache, upstream=registry.url)
    report = json.loads(result.stdout)
    assert report["blobs_copied"] == 1 and report["blobs_skipped"] == 2
    assert blob_path(usb, weights).read_bytes() == weights.path.read_bytes()

    result = cli("import", str(usb), cache=other)
    assert result.returncode == 0, result.stderr
    assert blob_path(other, weights).read_bytes() == weights.path.read_bytes()
    assert (other / "manifests" / _host(registry) / "library" / "tiny" / "1b").read_bytes() == manifest
    assert_store_verified(other)
    again = json.loads(cli("import", str(usb), cache=other).stdout)
    assert again["blobs_copied"] == 0 and again["blobs_skipped"] == 3


def test_import_refuses_a_corrupt_blob(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                       tmp_path: Path) -> None:
    _, weights, _ = model
    good = write_blob(registry.directory, 1000, seed=52)
    registry.add_model("library/good", "latest", [good])
    cache, usb, other = tmp_path / "cache", tmp_path / "usb", tmp_path / "isolated"
    assert cli("pull", "tiny:1b", "good", cache=cache, upstream=registry.url).returncode == 0
    assert cli("export", "--all", "--to", str(usb), cache=cache, upstream=registry.url).returncode == 0
    corrupt = blob_path(usb, weights)
    data = bytearray(corrupt.read_bytes())
    data[1000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    result = cli("import", str(usb), cache=other)
    assert result.returncode == 1
    assert weights.digest in result.stderr and "hashes to" in result.stderr
    assert not blob_path(other, weights).exists()
    assert not (other / "manifests" / _host(registry) / "library" / "tiny").exists()
    assert blob_path(other, good).exists()  # the intact model still came in
    assert_store_verified(other)


def test_export_tar_stream_and_import_it(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                        tmp_path: Path) -> None:
    manifest, weights, _ = model
    cache, other = tmp_path / "cache", tmp_path / "isolated"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    bundle = tmp_path / "bundle.tar"
    with open(bundle, "wb") as out:  # through a pipe, as over ssh
        subprocess.run([sys.executable, "-m", "mirror", "export", "--all", "--to", "-", "--cache-dir", str(cache)],
                       stdout=out, check=True, timeout=120)
    assert cli("import", str(bundle), cache=other).returncode == 0
    assert blob_path(other, weights).read_bytes() == weights.path.read_bytes()
    piped = tmp_path / "piped"
    with open(bundle, "rb") as stdin:  # a bundle arriving on a pipe
        subprocess.run([sys.executable, "-m", "mirror", "import", "-", "--cache-dir", str(piped)], stdin=stdin,
                       check=True, timeout=120, capture_output=True)
    assert blob_path(piped, weights).read_bytes() == weights.path.read_bytes()
    assert (other / "manifests" / _host(registry) / "library" / "tiny" / "1b").read_bytes() == manifest


def test_verify_moves_a_bad_blob_aside(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                       tmp_path: Path) -> None:
    _, weights, _ = model
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    assert cli("verify", cache=cache).returncode == 0
    with open(blob_path(cache, weights), "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    result = cli("verify", cache=cache)
    assert result.returncode == 1 and weights.digest in result.stderr and "library/tiny:1b" in result.stderr
    assert not blob_path(cache, weights).exists()
    assert (cache / ".mirror" / "quarantine" / weights.digest.replace(":", "-")).exists()


def test_serve_with_lock_answers_the_locked_manifest(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                                     start_mirror: MirrorFactory, tmp_path: Path) -> None:
    manifest, _, _ = model
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    lock = tmp_path / "models.lock"
    lock.write_text(cli("freeze", cache=cache, upstream=registry.url).stdout)
    registry.add_model("library/tiny", "1b", [write_blob(registry.directory, 500, seed=53)])  # the tag moves
    mirror = start_mirror(lock=lock, manifest_ttl=0)
    r = httpx.get(f"{mirror.url()}/v2/library/tiny/manifests/1b")
    assert r.status_code == 200 and r.content == manifest and r.headers["x-cache"] == "LOCKED"
    assert registry.count("GET", "/manifests/1b") == 1  # only the pull's; the locked server never asked


def test_pull_command_and_server_fill_one_blob_together(registry: FakeRegistry, model: tuple[bytes, Blob, Blob],
                                                        start_mirror: MirrorFactory, tmp_path: Path) -> None:
    _, _, _ = model
    big = write_blob(registry.directory, 30_000_000, seed=54)
    registry.add_model("library/big", "latest", [big])
    registry.cdn.rate = 3_000_000  # per connection: both are at it for a few seconds
    mirror = start_mirror()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(
        httpx.get(f"{mirror.url()}/v2/library/big/blobs/{big.digest}", timeout=120).content))
    reader.start()
    result = cli("pull", "big", cache=tmp_path / "cache", upstream=registry.url)
    reader.join(120)
    assert result.returncode == 0, result.stderr
    assert got == [big.path.read_bytes()]
    assert wait_for_file(blob_path(tmp_path / "cache", big)).read_bytes() == big.path.read_bytes()
    assert registry.cdn.bytes_by_digest[big.digest] <= 1.1 * big.size
    assert_store_verified(tmp_path / "cache")


@pytest.mark.real_client
def test_real_client_models_dir_round_trip(registry: FakeRegistry, model: tuple[bytes, Blob, Blob], ollama,
                                           tmp_path: Path) -> None:
    """Import what the real client wrote; export; the real client lists the export with the same IDs."""
    manifest, weights, _ = model
    source = ollama("source")
    name = f"{_host(registry)}/library/tiny:1b"
    result = source.pull(name)
    assert result.returncode == 0, result.stderr[-1500:]
    cache = tmp_path / "cache"
    result = cli("import", str(source.models), cache=cache)
    assert result.returncode == 0, result.stderr
    assert blob_path(cache, weights).read_bytes() == weights.path.read_bytes()
    usb = tmp_path / "usb"
    assert cli("export", "--all", "--to", str(usb), cache=cache).returncode == 0
    shutil.rmtree(source.models)
    offline = ollama("offline", models=usb)
    assert offline.list_models()[name] == hashlib.sha256(manifest).hexdigest()[:12]


def test_server_streams_a_blob_that_the_pull_command_is_filling(registry: FakeRegistry,
                                                                start_mirror: MirrorFactory, tmp_path: Path) -> None:
    """The pull command owns the fill; the server's clients follow its progress instead of stalling."""
    big = write_blob(registry.directory, 40_000_000, seed=55)
    registry.add_model("library/big", "latest", [big])
    registry.cdn.rate = 1_000_000  # per connection: the pull takes about 5 s
    cache = tmp_path / "cache"
    puller = subprocess.Popen([sys.executable, "-m", "mirror", "pull", "big", "--cache-dir", str(cache),
                               "--upstream", registry.url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_file(cache / ".mirror" / "staging" / f"{big.digest.replace(':', '-')}.data")
        mirror = start_mirror()
        r = httpx.get(f"{mirror.url()}/v2/library/big/blobs/{big.digest}", headers={"Range": "bytes=0-999999"},
                      timeout=60)
        assert r.status_code == 206 and r.content == big.path.read_bytes()[:1_000_000]
        assert not blob_path(cache, big).exists()  # served while the other process was still filling
    finally:
        assert puller.wait(120) == 0, puller.stderr.read() if puller.stderr else ""
    assert blob_path(cache, big).read_bytes() == big.path.read_bytes()
    assert registry.cdn.bytes_by_digest[big.digest] <= 1.05 * big.size
