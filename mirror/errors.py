"""The mirror's exception tree. Imports nothing from the package.

Each class carries a registry error ``code``; only ``responses.py`` maps codes
to HTTP statuses, so a status is decided in one place::

    MirrorError
    ├── ClientError                 4xx, logged at INFO
    │   ├── NameInvalid             NAME_INVALID 400
    │   ├── DigestInvalid           DIGEST_INVALID 400
    │   ├── RangeInvalid            RANGE_INVALID 400
    │   ├── RangeNotSatisfiable     RANGE_INVALID 416
    │   ├── Unsupported             UNSUPPORTED 405
    │   ├── RouteUnknown            NOT_FOUND 404
    │   ├── ManifestUnknown         MANIFEST_UNKNOWN 404 (also: offline, not cached)
    │   └── BlobUnknown             BLOB_UNKNOWN 404
    ├── UpstreamError               carries .retryable
    │   ├── UpstreamUnavailable     connect, reset, 5xx: back off and retry
    │   ├── UpstreamStalled         no byte in time: resume from the last byte
    │   ├── UpstreamUrlExpired      CDN 401/403/410: resolve the URL again
    │   ├── UpstreamRefused         412 and other 4xx: passed through (a 412 is remembered per client version)
    │   ├── UpstreamInvalid         bytes that make no sense (bad manifest, short blob)
    │   └── RangeIgnored            the CDN sent the whole blob to a Range request: fill in one stream
    ├── DigestMismatch              staging discarded, waiters failed
    ├── FillFailed                  a fill gave up; readers see this
    ├── StoreFull                   ENOSPC (or a bucket's quota): the fill fails, warm blobs still serve
    ├── StoreUnavailable            the S3 bucket cannot be reached, or refuses us: the cause and the fix
    └── StoreBusy                   another ``ollama-mirror gc`` holds the bucket's gc lock
"""

from __future__ import annotations


class MirrorError(Exception):
    """Base of every error the mirror raises on purpose."""

    code = "UNKNOWN"

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ClientError(MirrorError):
    """The request was wrong; nothing on our side failed."""


class NameInvalid(ClientError):
    code = "NAME_INVALID"


class DigestInvalid(ClientError):
    code = "DIGEST_INVALID"


class RangeInvalid(ClientError):
    code = "RANGE_INVALID"


class RangeNotSatisfiable(ClientError):
    code = "RANGE_INVALID"

    def __init__(self, size: int) -> None:
        super().__init__(f"requested range is outside the blob's {size} bytes", size=size)
        self.size = size


class Unsupported(ClientError):
    code = "UNSUPPORTED"


class RouteUnknown(ClientError):
    code = "NOT_FOUND"


class Unauthorized(ClientError):
    code = "UNAUTHORIZED"


class Denied(ClientError):
    code = "DENIED"


class ManifestUnknown(ClientError):
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(ClientError):
    code = "BLOB_UNKNOWN"


class UpstreamError(MirrorError):
    """Upstream failed us. ``retryable`` says whether trying again may help."""

    code = "UPSTREAM_ERROR"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    """Connection refused or reset, or a 5xx/429 answer."""

    def __init__(self, message: str, retry_after: float | None = None, **detail: object) -> None:
        super().__init__(message, **detail)
        self.retry_after = retry_after


class UpstreamStalled(UpstreamError):
    """No byte arrived within the read timeout."""


class UpstreamUrlExpired(UpstreamError):
    """The CDN refused a URL that worked before (presigned URLs expire)."""


class UpstreamRefused(UpstreamError):
    """Upstream answered a definite 4xx that retrying will not change."""

    retryable = False

    def __init__(self, message: str, status: int, body: bytes = b"", content_type: str = "") -> None:
        super().__init__(message, status=status)
        self.status = status
        self.body = body
        self.content_type = content_type


class UpstreamInvalid(UpstreamError):
    """Upstream sent something that cannot be right (not a manifest, too large, short)."""

    retryable = False


class RangeIgnored(UpstreamError):
    """A Range request was answered 200 with the whole body: splitting the blob would fetch it
    again per part, so the fill reads it in one stream instead."""

    retryable = False


class DigestMismatch(MirrorError):
    code = "DIGEST_INVALID"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"upstream bytes hash to {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class FillFailed(MirrorError):
    """A fill gave up; every reader waiting on it gets this, with the cause chained."""

    code = "BLOB_UNAVAILABLE"


class StoreFull(MirrorError):
    code = "STORE_FULL"


class StoreUnavailable(MirrorError):
    """The shared S3 bucket cannot be reached or refuses us; the message names the cause and the fix."""

    code = "STORE_UNAVAILABLE"


class StoreBusy(MirrorError):
    """Another admin command holds the shared bucket's lock for the work asked; the message says whose."""

    code = "STORE_BUSY"
