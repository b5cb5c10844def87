"""Logging set-up and the access log: one line per request a person can act on."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import zerocopy

access = logging.getLogger("mirror.access")


_listener: logging.handlers.QueueListener | None = None


class JsonLines(logging.Formatter):
    """One JSON object per line for log shippers: time, level, logger, message, and each
    ``key=value`` of the message as a field of its own (``status``, ``bytes``, ``digest``...)."""

    _FIELD = re.compile(r"(\w+)=('[^']*'|\S+)")
    _RESERVED = {"time", "level", "logger", "message", "error"}

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": message,
        }
        for key, value in self._FIELD.findall(message):
            if key not in self._RESERVED:
                line[key] = int(value) if value.isdigit() else value.strip("'")
        line.update(getattr(record, "fields", {}))  # what the text form says by position
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str = "info", log_format: str = "text") -> None:
    """``time level logger message`` lines (or JSON lines) on stderr; httpx's own request lines muted.

    Lines are written by a thread of their own: a write to a log file can block for
    hundreds of milliseconds while the disk flushes, and on the event loop that stalled
    every request (p99 near 1 s at 8k requests/s; 50 ms with the writes moved off it).
    """
    global _listener
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if _listener is not None:
        _listener.stop()
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(lines, handler, respect_handler_level=True)
    _listener.start()
    atexit.register(_listener.stop)  # write out what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(lines)]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_AbortedResponses())


class _AbortedResponses(logging.Filter):
    """A blob response cut short on purpose (its fill failed) is logged by us, as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class AccessLog:
    """``GET /v2/... 206 bytes=N ms=N cache=hit`` after each response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent = {"status": 0, "bytes": 0}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            elif message["type"] == zerocopy.EXTENSION:
                sent["bytes"] += message["count"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            state = scope.get("state", {})
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.request(scope["path"], scope["method"], sent["status"], state.get("cache"), sent["bytes"])
            client = scope.get("client") or ("-", 0)
            access.info(
                "%s %s %d bytes=%d ms=%.0f cache=%s client=%s%s%s",
                scope["method"], scope["path"], sent["status"], sent["bytes"],
                (time.perf_counter() - started) * 1000, state.get("cache", "-"), client[0],
                f" host={_host(scope)}" if scope.get("scheme") == "https" else "",  # transparent mode
                f" outcome={state['outcome']!r}" if "outcome" in state else "",
                extra={"fields": {"method": scope["method"], "path": scope["path"], "status": sent["status"]}},
            )


def _host(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"host":
            return value.decode("latin-1")
    return "-"
