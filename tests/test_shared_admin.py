"""The admin commands on the bucket replicas share (``--store``), run as an admin runs them, on a
real Ceph RGW: ls, rm, gc, verify, pin, import and export; what they say and what the bucket holds after."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mirror.bucket import Bucket, BucketLocation
from mirror.leases import Lease, Leases
from mirror.names import Digest
from mirror.progress import human

from .fakes import MirrorProcess, assert_store_verified
from .s3 import S3Endpoint, bucket_objects, s3_client

HOST = "registry.ollama.ai"  # the default registry: its library models are named as users type them
MB = 1_000_000
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def cli(*args: str, cache: Path, store: str, grace: float | None = None) -> subprocess.CompletedProcess[str]:
    """``ollama-mirror ARGS --store STORE``; ``grace`` lowers gc's age limit for unused blobs and uploads,
    which a test cannot wait out."""
    program = ["-m", "mirror"] if grace is None else [
        "-c", f"import sys; from mirror.shared_admin import SharedAdmin; SharedAdmin.grace = {grace}; "
              f"from mirror.cli import main; main(sys.argv[1:])"]
    return subprocess.run([sys.executable, *program, *args, "--store", store, "--s3-path-style", "--cache-dir",
                           str(cache)], capture_output=True, text=True, timeout=120)


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines the command wrote for the person at the terminal: stderr without the log lines."""
    return [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]


def write_model(root: Path, name: str, tag: str, blobs: list[bytes]) -> bytes:
    """A model in the Ollama models directory ``root`` (config first, then layers); its manifest."""
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for data in blobs:
        (root / "blobs" / f"sha256-{sha(data)}").write_bytes(data)
    config, *layers = blobs
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{sha(config)}",
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha(data)}",
                    "size": len(data)} for data in layers]}).encode()
    path = root / "manifests" / HOST / "library" / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest)
    return manifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_key(data: bytes) -> str:
    return f"blobs/sha256-{sha(data)}"


WEIGHTS = os.urandom(3 * MB)  # shared by both models
TINY_CONFIG, TINY_TEMPLATE = b'{"model_format": "gguf", "n": 1}', b"{{ .Prompt }}"
OTHER_CONFIG = b'{"model_format": "gguf", "n": 2}'


@pytest.fixture
def usb(tmp_path: Path) -> Path:
    """A models directory with tiny:1b and other:latest, which share their weights."""
    root = tmp_path / "usb"
    write_model(root, "tiny", "1b", [TINY_CONFIG, WEIGHTS, TINY_TEMPLATE])
    write_model(root, "other", "latest", [OTHER_CONFIG, WEIGHTS])
    return root


@pytest.fixture
def imported(usb: Path, bucket_url: str, tmp_path: Path) -> Path:
    """Both models imported into a cache and uploaded to the bucket; the cache."""
    cache = tmp_path / "a"
    result = cli("import", str(usb), cache=cache, store=bucket_url)
    assert result.returncode == 0, result.stderr
    return cache


def bucket_of(rgw: S3Endpoint, url: str) -> Bucket:
    return rgw.connect(BucketLocation.parse(url))


def test_import_uploads_and_another_cache_lists_and_a_replica_serves(
        usb: Path, bucket_url: str, tmp_path: Path) -> None:
    result = cli("import", str(usb), cache=tmp_path / "a", store=bucket_url)
    assert result.returncode == 0, result.stderr
    assert f"uploaded 2 models to {bucket_url}/: 4 blobs (3.0 MB), 0 there already" in said(result)
    objects = bucket_objects(bucket_url)
    assert objects[blob_key(WEIGHTS)] == len(WEIGHTS)
    assert {key for key in objects if key.startswith("manifests/")} == {
        f"manifests/{HOST}/library/tiny/1b", f"manifests/{HOST}/library/other/latest"}

    again = cli("import", str(usb), cache=tmp_path / "a", store=bucket_url)
    assert f"uploaded 2 models to {bucket_url}/: 0 blobs (0 B), 4 there already" in said(again)

    empty = tmp_path / "b"  # another admin's machine, no cache of its own
    listed = json.loads(cli("ls", "--json", cache=empty, store=bucket_url).stdout)
    assert [(row["name"], row["full_name"], row["size"], row["complete"], row["pinned"]) for row in listed] == [
        ("other:latest", f"{HOST}/library/other:latest", len(OTHER_CONFIG) + len(WEIGHTS), True, False),
        ("tiny:1b", f"{HOST}/library/tiny:1b", len(TINY_CONFIG) + len(WEIGHTS) + len(TINY_TEMPLATE), True, False)]
    table = cli("ls", cache=empty, store=bucket_url).stdout.splitlines()
    assert table[0].split() == ["NAME", "ID", "SIZE", "LAST", "PULLED", "PINNED", "COMPLETE"]
    assert table[2].split()[0] == "tiny:1b" and table[2].endswith(" yes")
    assert not empty.exists()  # reading the bucket made no cache

    replica = MirrorProcess(tmp_path / "replica" / "cache", "https://registry.ollama.ai", "replica", "--offline",
                            "--store", bucket_url, "--s3-path-style")
    try:
        manifest = httpx.get(f"{replica.url}/v2/library/tiny/manifests/1b", timeout=30)
        assert manifest.status_code == 200 and manifest.content == (usb / "manifests" / HOST / "library" / "tiny" /
                                                                    "1b").read_bytes()
        blob = httpx.get(f"{replica.url}/v2/library/tiny/blobs/sha256:{sha(WEIGHTS)}", timeout=30)
        assert blob.status_code == 200 and blob.content == WEIGHTS
    finally:
        replica.process.kill()
        replica.process.wait()


def test_rm_removes_the_tag_and_blobs_no_other_tag_uses_but_not_a_leased_one(
        imported: Path, rgw: S3Endpoint, bucket_url: str) -> None:
    bucket = bucket_of(rgw, bucket_url)
    lease = Leases(bucket).acquire(Digest(sha(TINY_TEMPLATE)), "replica-b", "http://b:11434", 60)
    assert lease is not None
    result = cli("rm", "tiny:1b", cache=imported, store=bucket_url)
    assert result.returncode == 0, result.stderr
    lines = said(result)
    assert lines[0] == f"removed tiny:1b from {bucket_url}/ and 1 blobs no other model there uses ({human(len(TINY_CONFIG))})"
    assert lines[1].startswith(f"kept blob sha256:{sha(TINY_TEMPLATE)[:12]} in {bucket_url}/: replica replica-b is "
                               f"filling it (its lease runs until ")
    assert lines[2] == f"removed tiny:1b from the cache at {imported} and 2 blobs no other model uses ({human(len(TINY_CONFIG + TINY_TEMPLATE))})"
    objects = bucket_objects(bucket_url)
    assert f"manifests/{HOST}/library/tiny/1b" not in objects
    assert blob_key(TINY_CONFIG) not in objects
    assert blob_key(WEIGHTS) in objects  # other:latest uses it
    assert blob_key(TINY_TEMPLATE) in objects  # a replica is filling it
    assert not (imported / blob_key(TINY_CONFIG)).exists() and (imported / blob_key(WEIGHTS)).exists()

    again = cli("rm", "tiny:1b", cache=imported, store=bucket_url)
    assert again.returncode == 1
    assert said(again) == [f"ollama-mirror rm: tiny:1b is neither in {bucket_url}/ nor in the cache at {imported}: "
                           f"`ollama-mirror ls` lists the names the bucket has (with --store '', the cache's)"]


def test_gc_removes_what_nothing_uses_but_never_a_live_lease_s_blob(
        imported: Path, rgw: S3Endpoint, bucket_url: str) -> None:
    bucket, s3 = bucket_of(rgw, bucket_url), s3_client()
    name, prefix = bucket.location.bucket, bucket.location.prefix
    orphan, filling = b"left by an interrupted import", b"being filled by a replica"
    for data in (orphan, filling):
        s3.put_object(Bucket=name, Key=f"{prefix}{blob_key(data)}", Body=data)
    assert Leases(bucket).acquire(Digest(sha(filling)), "replica-b", "http://b:11434", 60) is not None
    dead = Digest("de" * 32)  # a lease its replica left to expire, and a take-over marker of one that died
    bucket.write_object(bucket.keys.lease(dead), Lease(dead, "replica-c", "http://c", time.time() - 60, 10, "t").to_json())
    bucket.write_object(bucket.keys.takeover(dead), json.dumps({"owner": "replica-d", "expires": time.time() - 1}).encode())
    upload = s3.create_multipart_upload(Bucket=name, Key=f"{prefix}blobs/sha256-{'ab' * 32}")["UploadId"]
    s3.upload_part(Bucket=name, Key=f"{prefix}blobs/sha256-{'ab' * 32}", UploadId=upload, PartNumber=1,
                   Body=b"x" * MB)

    dry = cli("gc", "--dry-run", cache=imported, store=bucket_url)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"would remove the expired lease of blob sha256:{'de' * 6} (replica replica-c, expired ")
    assert lines[1:] == [
        f"would remove the stale take-over marker of blob sha256:{'de' * 6}",
        f"keep unused blob sha256:{sha(filling)[:12]}: replica replica-b is filling it",
        f"keep 1 unused blobs uploaded in the last 60 minutes ({human(len(orphan))}): a replica or import may not have written their "
        "manifest yet"]
    assert said(dry)[-1].endswith(": would free 0 B (0 models, 0 blobs, 0 uploads, 1 leases)")
    assert bucket.read_object(bucket.keys.lease(dead)) is not None  # a dry run removes nothing

    bucket.write_object(bucket.keys.gc_lock, json.dumps({"owner": "ollama-mirror gc on admin2 (pid 7)", "token": "t",
                                                         "started": time.time(), "expires": time.time() + 60}).encode())
    busy = cli("gc", cache=imported, store=bucket_url, grace=0)
    assert busy.returncode == 1
    assert said(busy)[-1].startswith(f"ollama-mirror gc: another gc is running on {bucket_url}/ (ollama-mirror gc on "
                                  f"admin2 (pid 7), since ")
    bucket.write_object(bucket.keys.gc_lock, json.dumps({"owner": "died", "token": "t", "started": time.time() - 900,
                                                         "expires": time.time() - 600}).encode())

    result = cli("gc", cache=imported, store=bucket_url, grace=0)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert f"remove unused blob sha256:{sha(orphan)[:12]}  {human(len(orphan))}" in out
    assert f"abort the unfinished upload of sha256:{'ab' * 6} started " in out[1] and out[1].endswith("  1.0 MB")
    assert f"keep unused blob sha256:{sha(filling)[:12]}: replica replica-b is filling it" in out
    assert said(result)[-1].endswith(": freed 1.0 MB (0 models, 1 blobs, 1 uploads, 1 leases)"), result.stderr
    objects = bucket_objects(bucket_url)
    assert blob_key(orphan) not in objects and blob_key(filling) in objects
    assert blob_key(WEIGHTS) in objects and len([k for k in objects if k.startswith("manifests/")]) == 2
    assert {k for k in objects if k.startswith("leases/")} == {f"leases/sha256-{sha(filling)}"}  # the lock went too
    assert s3.list_multipart_uploads(Bucket=name).get("Uploads", []) == []


def test_gc_max_size_evicts_the_least_recently_written_but_never_a_pinned_one(
        tmp_path: Path, bucket_url: str) -> None:
    cache = tmp_path / "a"
    for seed, name in enumerate(["old", "older", "new"]):  # written in this order: "old" first
        root = tmp_path / name
        write_model(root, name, "latest", [b'{"n": %d}' % seed, os.urandom(MB)])
        assert cli("import", str(root), cache=cache, store=bucket_url).returncode == 0
        time.sleep(1.1)  # LastModified has whole seconds
    assert said(cli("pin", "old", cache=cache, store=bucket_url)) == [f"pinned old in {bucket_url}/"]

    result = cli("gc", "--max-size", "2500K", cache=cache, store=bucket_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["evict older:latest  1.0 MB"]
    assert said(result)[-1] == (f"bucket {bucket_url}/ 3.0 MB, low watermark 2.3 MB: freed 1.0 MB "
                                f"(1 models, 2 blobs, 0 uploads, 0 leases)")
    listed = {row["name"]: row["pinned"] for row in json.loads(cli("ls", "--json", cache=cache, store=bucket_url).stdout)}
    assert listed == {"old:latest": True, "new:latest": False}

    assert said(cli("unpin", "old", cache=cache, store=bucket_url)) == [f"unpinned old in {bucket_url}/"]
    again = cli("gc", "--max-size", "1500K", "--dry-run", cache=cache, store=bucket_url)
    assert again.stdout.splitlines() == ["would evict old:latest  1.0 MB"]
    missing = cli("pin", "gone", cache=cache, store=bucket_url)
    assert missing.returncode == 1 and said(missing) == [
        f"ollama-mirror pin: gone is not in {bucket_url}/: `ollama-mirror ls --store {bucket_url}/` lists the names "
        f"it has"]


def test_verify_moves_a_blob_replaced_behind_the_mirror_s_back_and_export_refuses_it(
        imported: Path, rgw: S3Endpoint, bucket_url: str, tmp_path: Path) -> None:
    bucket = bucket_of(rgw, bucket_url)
    assert cli("verify", cache=imported, store=bucket_url).returncode == 0
    s3_client().put_object(Bucket=bucket.location.bucket, Key=bucket.keys.blob(Digest(sha(TINY_TEMPLATE))),
                     Body=b"{{ .Evil }}!!")
    elsewhere = tmp_path / "b"
    refused = cli("export", "tiny:1b", "--to", str(tmp_path / "out"), cache=elsewhere, store=bucket_url)
    assert refused.returncode == 1
    assert said(refused)[-1].startswith(
        f"ollama-mirror export: blob sha256:{sha(TINY_TEMPLATE)} in {bucket_url}/ is damaged (content hashes to ")
    assert_store_verified(elsewhere)  # nothing unverified took a final name

    result = cli("verify", cache=imported, store=bucket_url)
    assert result.returncode == 1
    assert said(result)[-1] == (
        f"bad sha256:{sha(TINY_TEMPLATE)}: moved to {bucket_url}/bad/sha256-{sha(TINY_TEMPLATE)}; breaks "
        f"{HOST}/library/tiny:1b")
    objects = bucket_objects(bucket_url)
    assert blob_key(TINY_TEMPLATE) not in objects and f"bad/sha256-{sha(TINY_TEMPLATE)}" in objects
    assert cli("verify", cache=imported, store=bucket_url).returncode == 0
    listed = {row["name"]: row for row in json.loads(cli("ls", "--json", cache=imported, store=bucket_url).stdout)}
    assert not listed["tiny:1b"]["complete"] and listed["tiny:1b"]["missing_blobs"] == [f"sha256:{sha(TINY_TEMPLATE)}"]


def test_export_fetches_a_model_only_in_the_bucket_verified(
        imported: Path, bucket_url: str, tmp_path: Path) -> None:
    cache, out = tmp_path / "b", tmp_path / "out"
    result = cli("export", "other", "--to", str(out), cache=cache, store=bucket_url)
    assert result.returncode == 0, result.stderr
    assert f"fetched 1 models from {bucket_url}/ into the cache at {cache} (3.0 MB)" in said(result)
    assert json.loads(result.stdout)["models"] == [f"{HOST}/library/other:latest"]
    for data in (OTHER_CONFIG, WEIGHTS):
        assert sha((out / blob_key(data)).read_bytes()) == sha(data)
        assert (cache / blob_key(data)).exists()
    assert (out / "manifests" / HOST / "library" / "other" / "latest").exists()
    assert_store_verified(cache)
