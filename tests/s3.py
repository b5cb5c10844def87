"""A real S3 engine for tests: Ceph's RADOS Gateway, started by ``../shared/s3/ceph-rgw-up``.

moto would be faster, but it accepts tampered presigned URLs and forwarded Authorization headers
(``../shared/s3/README.md``), so the bucket is tested against the engine that refuses them.
"""

from __future__ import annotations

import os
import random
import secrets
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from mirror.bucket import Bucket, BucketLocation, client_config

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "s3"  # ../shared/s3 of the project
STORE_BYTES = 4 << 30  # bluestore's sparse block file: big objects without holding them in RAM


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    region: str
    ceph_dir: Path

    def session(self, access_key: str = "", secret_key: str = "") -> boto3.Session:
        return boto3.Session(aws_access_key_id=access_key or self.access_key,
                             aws_secret_access_key=secret_key or self.secret_key, region_name=self.region)

    def client(self) -> Any:
        """A plain boto3 client, to look at the bucket from outside."""
        return self.session().client("s3", endpoint_url=self.url)

    def mirror_client(self) -> Any:
        """A client configured as ``Bucket.connect`` configures its own."""
        return self.session().client("s3", endpoint_url=self.url, config=client_config(path_style=True))

    def connect(self, location: BucketLocation, kind: type[Bucket] = Bucket,
                session: boto3.Session | None = None) -> Bucket:
        """``kind.connect`` to this endpoint, path-style, with these keys unless ``session`` has others."""
        return kind.connect(location, endpoint_url=self.url, path_style=True, session=session or self.session())

    def add_user(self, uid: str) -> tuple[str, str]:
        """Another S3 user, with keys of its own: (access key, secret key)."""
        keys = (f"{uid}accesskey", f"{uid}secretkey0123456789")
        subprocess.run(["radosgw-admin", "user", "create", f"--uid={uid}", f"--display-name={uid}",
                        f"--access-key={keys[0]}", f"--secret-key={keys[1]}"], check=True, capture_output=True,
                       env={**os.environ, "CEPH_CONF": str(self.ceph_dir / "ceph.conf")}, timeout=60)
        return keys


def free_port(avoid: int = 0) -> int:
    """A port free on 127.0.0.1 below the kernel's ephemeral range (32768 on), as the script asks."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port != avoid:
            return port
    raise RuntimeError("no free port between 20000 and 32000 on 127.0.0.1")


def rgw_environ(directory: Path) -> dict[str, str]:
    rgw_port = free_port()
    return {**os.environ, "CEPH_DIR": str(directory), "RGW_PORT": str(rgw_port),
            "MON_PORT": str(free_port(avoid=rgw_port)), "OBJECTSTORE": "bluestore", "STORE_BYTES": str(STORE_BYTES)}


def start_rgw(environ: dict[str, str]) -> S3Endpoint:
    """Run ceph-rgw-up (it installs Debian's packages when missing); raise with its output if it fails."""
    done = subprocess.run([str(SCRIPTS / "ceph-rgw-up")], env=environ, capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("export "):
        raise RuntimeError(f"{SCRIPTS / 'ceph-rgw-up'} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    values = dict(word.split("=", 1) for word in shlex.split(lines[-1])[1:])
    return S3Endpoint(values["S3_ENDPOINT_URL"], values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"],
                      values["AWS_DEFAULT_REGION"], Path(environ["CEPH_DIR"]))


def stop_rgw(environ: dict[str, str]) -> None:
    subprocess.run([str(SCRIPTS / "ceph-rgw-down")], env=environ, capture_output=True, timeout=60)


def create_bucket(s3: Any) -> str:
    """A new bucket with a name of its own."""
    name = f"test-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    return name


def remove_bucket(s3: Any, name: str) -> None:
    """Every object and unfinished upload in the bucket, then the bucket."""
    for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for entry in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=entry["Key"])
    s3.delete_bucket(Bucket=name)


def s3_client() -> Any:
    """A plain client on the endpoint the ``bucket_url`` fixture put in the environment, path-style."""
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                        config=boto3.session.Config(s3={"addressing_style": "path"}))


def bucket_objects(url: str) -> dict[str, int]:
    """Key (under the prefix) -> size of every object of an ``s3://BUCKET/PREFIX`` location."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    found = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix + "/"): o["Size"] for o in found}


def bucket_blob(url: str, digest: str) -> bytes:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return s3_client().get_object(Bucket=bucket, Key=f"{prefix}/blobs/{digest.replace(':', '-')}")["Body"].read()
