"""Hostile input, generated: every request gets a well-formed answer, and nothing lands outside the store."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fakes import FakeRegistry, ServerThread, write_blob


@pytest.fixture
def warm_blob(mirror: ServerThread, registry: FakeRegistry) -> tuple[ServerThread, str, bytes]:
    blob = write_blob(registry.directory, 3000, seed=61)
    registry.add_model("library/tiny", "latest", [blob])
    assert httpx.get(f"{mirror.url()}/v2/library/tiny/blobs/{blob.digest}").status_code == 200
    return mirror, blob.digest, blob.path.read_bytes()

PART = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40)
SEGMENT = st.one_of(PART, st.sampled_from(["..", ".", "%2e%2e", "%2f", "\\", "library", "latest", "sha256:" + "a" * 64,
                                           "manifests", "blobs", "uploads", "x" * 300]))
METHOD = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
RANGE = st.one_of(st.none(), st.text(max_size=40), st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 10**20),
                                                              st.integers(-5, 10**20)))


def _request(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHOD, segments=st.lists(SEGMENT, min_size=0, max_size=6), range_header=RANGE)
def test_any_request_gets_a_well_formed_answer(mirror: ServerThread, tmp_path: Path, method: str,
                                               segments: list[str], range_header: str | None) -> None:
    path = "/v2/" + "/".join(urllib.parse.quote(s, safe="%:.\\") for s in segments)
    headers = {"Range": range_header} if range_header is not None and range_header.isprintable() else {}
    try:
        headers = {k: v.encode("latin-1").decode("latin-1") for k, v in headers.items()}
    except UnicodeEncodeError:
        headers = {}
    status, body, response_headers = _request(mirror.port, method, path, headers)
    assert status < 500 or status in (502, 504), (status, path, body[:300])
    if status >= 400 and method != "HEAD":
        document = json.loads(body)
        assert document["errors"][0]["code"] and document["errors"][0]["message"]
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.relative_to(tmp_path).parts[:1]
               and "upstream" not in p.relative_to(tmp_path).parts[:1]]
    assert not outside, outside


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(range_header=st.one_of(
    st.text(alphabet="bytes=0123456789-, ", max_size=30),
    st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 3000)), st.one_of(st.none(), st.integers(0, 3000))),
             min_size=1, max_size=4).map(
        lambda spans: "bytes=" + ",".join(f"{'' if a is None else a}-{'' if b is None else b}" for a, b in spans)),
))
def test_any_range_header_on_a_blob(warm_blob: tuple[ServerThread, str, bytes], range_header: str) -> None:
    mirror, digest, data = warm_blob
    status, body, headers = _request(mirror.port, "GET", f"/v2/library/tiny/blobs/{digest}", {"Range": range_header})
    assert status in (200, 206, 400, 416), (status, range_header, body[:200])
    if status == 206 and not headers.get("content-type", "").startswith("multipart/"):
        first, last, total = map(int, headers["content-range"].removeprefix("bytes ").replace("/", "-").split("-"))
        assert total == len(data) and body == data[first:last + 1]
    if status == 200:
        assert body == data
    if status in (400, 416):
        assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
