"""The registry requests both pull paths share (server/images.go, server/auth.go, v0.32.15).

Every request to the registry carries ``User-Agent: ollama/<version> (<arch> <os>) Go/<go>``
and the Bearer token learnt from a 401, if any. A 401 fetches a token from the
challenge's realm (which must be on the request's host:port) and retries once;
404 is "file does not exist"; any other status from 400 up is an error with
the body as its text; anything else (3xx that was not followed, 2xx) is returned.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from .wire import CheckRedirect, GoHttp, go_default_redirects, host_port

VERSION = "0.32.15"
# v0.32.15's go.mod says go 1.26.0, and its Dockerfile and release workflow build with that version.
OLLAMA_USER_AGENT = f"ollama/{VERSION} (amd64 linux) Go/go1.26.0"
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


class RegistryError(Exception):
    """An error the real client reports as the pull's failure, with its message."""


class NotExist(RegistryError):
    def __init__(self) -> None:
        super().__init__("file does not exist")  # os.ErrNotExist


@dataclass
class RegistryOptions:
    """server/images.go: registryOptions (the token is shared by every later request of the pull)."""

    user_agent: str = OLLAMA_USER_AGENT
    token: str = ""


def parse_registry_challenge(header: str) -> dict[str, str]:
    """server/images.go: parseRegistryChallenge and getValue (values are quoted; a quote not followed
    by a comma belongs to the value)."""
    text = header.removeprefix("Bearer ")

    def value(key: str) -> str:
        at = text.find(key + "=")
        if at == -1:
            return ""
        start = end = at + len(key) + 2
        while end < len(text):
            if text[end] == '"' and (end + 1 >= len(text) or text[end + 1] == ","):
                break
            end += 1
        return text[start:end]

    return {"realm": value("realm"), "service": value("service"), "scope": value("scope")}


async def get_authorization_token(http: GoHttp, challenge: dict[str, str], original_host: str,
                                  user_agent: str) -> str:
    """server/auth.go: getAuthorizationToken. The realm must be on ``original_host`` (host:port).

    The real client signs the request with its ed25519 key; the stand-in sends a placeholder
    signature (the fakes check none).
    """
    realm = urlsplit(challenge["realm"])
    query = [(k, v) for k, v in httpx.QueryParams(realm.query).multi_items()]
    query += [("service", challenge["service"]), *(("scope", s) for s in challenge["scope"].split(" ")),
              ("ts", str(int(time.time()))), ("nonce", secrets.token_urlsafe(16))]
    encoded = urlencode(sorted(query, key=lambda kv: kv[0]))  # url.Values.Encode sorts by key
    url = urlunsplit((realm.scheme, realm.netloc, realm.path, encoded, ""))
    if host_port(url) != original_host:
        raise RegistryError(f'realm host "{host_port(url)}" does not match original host "{original_host}"')
    headers = {"Authorization": "standin:unsigned", "User-Agent": user_agent}
    response = await http.open("GET", url, headers, check_redirect=go_default_redirects)
    try:
        body = await response.aread()
    finally:
        await response.aclose()
    if response.status_code >= 400:
        raise RegistryError(f"{response.status_code}: {body.decode(errors='replace')}" if body
                            else str(response.status_code))
    try:
        return str(json.loads(body)["token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"token response: {exc}") from exc


async def make_request_with_retry(http: GoHttp, method: str, url: str, headers: dict[str, str] | None,
                                  options: RegistryOptions, *, check_redirect: CheckRedirect = go_default_redirects,
                                  digest: str | None = None) -> httpx.Response:
    """server/images.go: makeRequestWithRetry over makeRequest. Returns a streaming response."""
    for _ in range(2):
        sent = dict(headers or {})
        if options.token:
            sent["Authorization"] = f"Bearer {options.token}"
        sent["User-Agent"] = options.user_agent
        response = await http.open(method, url, sent, check_redirect=check_redirect, digest=digest)
        if response.status_code == 401:
            await response.aclose()
            challenge = parse_registry_challenge(response.headers.get("www-authenticate", ""))
            options.token = await get_authorization_token(http, challenge, host_port(url), options.user_agent)
        elif response.status_code == 404:
            await response.aclose()
            raise NotExist()
        elif response.status_code >= 400:
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            raise RegistryError(f"{response.status_code}: {body.decode(errors='replace')}")
        else:
            return response
    raise RegistryError("unauthorized: access denied")


async def pull_model_manifest(http: GoHttp, base: str, name: str, tag: str, options: RegistryOptions) -> bytes:
    """server/images.go: pullModelManifest. The raw bytes are what the client stores (since v0.19.0)."""
    url = f"{base}/v2/{name}/manifests/{tag}"
    response = await make_request_with_retry(http, "GET", url, {"Accept": MANIFEST_ACCEPT}, options)
    try:
        data = await response.aread()
    finally:
        await response.aclose()
    json.loads(data)  # a body that is not JSON fails the pull
    return data


def manifest_blobs(manifest: bytes) -> list[tuple[str, int, str]]:
    """server/images.go: PullModel's order: the layers, then the config. (digest, size, media type)."""
    doc = json.loads(manifest)
    layers = [(x["digest"], int(x.get("size", 0)), x.get("mediaType", "")) for x in doc.get("layers", [])]
    config = doc.get("config") or {}
    if config.get("digest"):
        layers.append((config["digest"], int(config.get("size", 0)), config.get("mediaType", "")))
    return layers


TENSOR_MEDIA_TYPE = "application/vnd.ollama.image.tensor"


def has_tensor_layers(blobs: list[tuple[str, int, str]]) -> bool:
    """server/images.go: hasTensorLayers: one tensor layer sends the whole pull down x/transfer."""
    return any(media_type == TENSOR_MEDIA_TYPE for _, _, media_type in blobs)
