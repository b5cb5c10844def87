"""Stand-ins for current Ollama clients (v0.32.15), read from its Go source, for the tests.

The real binary the suite drives is 0.9.3; people pulling through the mirror run
v0.32 and newer. ``GgufClient`` follows server/download.go (the default path),
``TensorClient`` follows x/transfer (models with tensor layers). Each ``pull``
returns a ``PullResult``: the manifest, per blob records (bytes received,
timings), every request as sent, and the events and error the real client
would log. Go constants are options with the Go defaults, so tests can shrink
part sizes and timers.
"""

from .gguf import GgufClient, GgufOptions
from .registry import OLLAMA_USER_AGENT, TENSOR_MEDIA_TYPE
from .tensor import TRANSFER_USER_AGENT, TensorClient, TensorOptions
from .wire import GO_USER_AGENT, BlobRecord, Event, PullResult, WireRequest

__all__ = [
    "GO_USER_AGENT",
    "OLLAMA_USER_AGENT",
    "TENSOR_MEDIA_TYPE",
    "TRANSFER_USER_AGENT",
    "BlobRecord",
    "Event",
    "GgufClient",
    "GgufOptions",
    "PullResult",
    "TensorClient",
    "TensorOptions",
    "WireRequest",
]
