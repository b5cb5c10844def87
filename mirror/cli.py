"""The ``ollama-mirror`` command: the only module that prints or exits."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from . import __version__, logs
from .app import create_app
from .config import DEFAULT_CACHE_DIR, DEFAULT_LISTEN, DEFAULT_UPSTREAM, Settings, SettingsError, load_settings

log = logging.getLogger("mirror")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-mirror", description="A pull-through cache for the Ollama registry.")
    parser.add_argument("--version", action="version", version=f"ollama-mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the registry protocol from the cache, filling from upstream")
    serve.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0 picks one)")
    serve.add_argument("--cache-dir", help=f"the cache, an Ollama models directory (default {DEFAULT_CACHE_DIR})")
    serve.add_argument("--upstream", help=f"registry URL to fill from (default {DEFAULT_UPSTREAM})")
    serve.add_argument("--offline", action="store_const", const=True, help="never contact upstream")
    serve.add_argument("--connections", type=int, help="parallel Range requests per blob (default 8)")
    serve.add_argument("--manifest-ttl", type=float, help="seconds a cached tag is served before revalidating (600)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = load_settings(flags, os.environ)
    except SettingsError as exc:
        sys.exit(f"ollama-mirror: {exc}")
    logs.configure(settings.log_level)
    if args.command == "serve":
        serve(settings)


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps
    the freed 1-8 MiB buffers of the disk threads: RSS then grows with the work done. Two suffice."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def serve(settings: Settings) -> None:
    """Bind first, so the log names the real port (``--listen 127.0.0.1:0`` in tests)."""
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.listen_host, settings.listen_port))
        sock.listen(2048)  # connections queue from now on, even before uvicorn accepts
    except OSError as exc:
        sys.exit(f"ollama-mirror: cannot listen on {settings.listen}: {exc.strerror}")
    host, port = sock.getsockname()[:2]
    _fewer_malloc_arenas()
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = uvicorn.Server(config)
    log.info("listening url=http://%s:%d", f"[{host}]" if family == socket.AF_INET6 else host, port)
    server.run(sockets=[sock])  # uvloop when installed (uvicorn[standard]): a faster event loop
