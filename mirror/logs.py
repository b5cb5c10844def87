"""Logging set-up and the access log: one line per request a person can act on."""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import zerocopy

access = logging.getLogger("mirror.access")


_writer: _LineWriter | None = None
BATCH = 512  # lines per write at most


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

    Lines are formatted and written by a thread of their own: a write to a log file can block
    for hundreds of milliseconds while the disk flushes, and on the event loop that stalled
    every request (p99 near 1 s at 8k requests/s; 50 ms with the writes moved off it).
    """
    global _writer
    # No line names its caller, thread or process: skip the stack walk and lookups that
    # every record would otherwise pay on the event loop (a tenth of a manifest request).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    formatter = JsonLines() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if _writer is not None:
        _writer.stop()
    lines: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
    _writer = _LineWriter(lines, formatter, sys.stderr)
    atexit.register(_writer.stop)  # write out what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(lines)]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # mirror.bucket logs what the store did
    logging.getLogger("uvicorn.error").addFilter(_AbortedResponses())


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer as they are: formatting happens in its thread, not here."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args and not all(isinstance(a, str | int | float | None) for a in _args(record)):
            record.msg, record.args = record.getMessage(), None  # an object may change before it is written
        return record


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    return tuple(args.values()) if isinstance(args, dict) else tuple(args or ())


class _LineWriter:
    """Formats queued records and writes them in batches: at thousands of requests a second, one
    write per line kept this thread and the event loop trading the GIL at every write."""

    def __init__(self, lines: queue.SimpleQueue[logging.LogRecord | None], formatter: logging.Formatter,
                 stream: TextIO) -> None:
        self._lines, self._formatter, self._stream = lines, formatter, stream
        self._thread: threading.Thread | None = threading.Thread(target=self._run, name="log writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._lines.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            batch = [self._lines.get()]
            while len(batch) < BATCH and batch[-1] is not None:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            self._write([record for record in batch if record is not None])
            if batch[-1] is None:
                return

    def _write(self, records: list[logging.LogRecord]) -> None:
        text = []
        for record in records:
            try:
                text.append(self._formatter.format(record) + "\n")
            except Exception:  # a bad format string must not stop the log
                text.append(f"unformattable log record {record.msg!r} {record.args!r}\n")
        try:
            self._stream.write("".join(text))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nowhere left to say so


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
            try:
                await send(message)
            finally:  # also when a hang-up cancelled the send: what reached the socket by then
                if message["type"] == zerocopy.EXTENSION:
                    sent["bytes"] += message.get("sent", 0)  # what reached the socket, not what was asked

        try:
            await self.app(scope, receive, counting_send)
        finally:
            state = scope.get("state", {})
            metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            if metrics is not None:
                metrics.request(scope["path"], scope["method"], sent["status"], state.get("cache"), sent["bytes"])
            client = scope.get("client") or ("-", 0)
            access.log(
                state.get("log_level", logging.INFO),  # DEBUG for what is routine (Ollama's resolving GET)
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
