"""The ``ollama-mirror`` command: the only module that prints or exits."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TextIO
from pathlib import Path


from . import __version__, eviction, logs, models, seeding
from .access import load_keys
from .app import open_mirror
from .ca import CertificateAuthority
from .config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CONFIG,
    DEFAULT_LISTEN,
    DEFAULT_UPSTREAM,
    Settings,
    SettingsError,
    load_settings,
    render,
)
from .errors import MirrorError
from .layout import Layout
from .metadata import Metadata
from .models import CachedModel
from .names import ModelRef
from .progress import Progress, human
from .server import ListenError, build_server
from .store import BlobStore

log = logging.getLogger("mirror")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-mirror", description="A pull-through cache for the Ollama registry.")
    parser.add_argument("--version", action="version", version=f"ollama-mirror {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"a TOML settings file (default {DEFAULT_CONFIG} if present)")
    common.add_argument("--cache-dir", help=f"the cache, an Ollama models directory (default {DEFAULT_CACHE_DIR})")
    common.add_argument("--upstream", help=f"registry URL to fill from (default {DEFAULT_UPSTREAM})")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", choices=["text", "json"])
    common.add_argument("--registry", action="append", dest="registries", metavar="HOST=URL",
                        help="mirror this registry host, filled from URL (repeatable; "
                             "default registry.ollama.ai=https://registry.ollama.ai)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = argparse.ArgumentParser(add_help=False)  # serve's options; `config` takes them too
    serve.add_argument("--listen", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0 picks one)")
    serve.add_argument("--offline", action="store_const", const=True, help="never contact upstream")
    serve.add_argument("--connections", type=int, help="parallel Range requests per blob (default 8)")
    serve.add_argument("--manifest-ttl", type=float, help="seconds a cached tag is served before revalidating (600)")
    serve.add_argument("--lock", help="a lock file from `freeze`: its tags answer exactly its manifests")
    serve.add_argument("--allow-networks", help="CIDRs a public upstream may redirect to although private")
    serve.add_argument("--max-size", help="evict least-recently-used models above this: 500G (K/M/G/T) or 80%%")
    serve.add_argument("--min-free", help="refuse fills (507) that would leave less free disk than this (1G)")
    serve.add_argument("--upstream-connections", type=int, help="upstream connections, all fills together (64)")
    serve.add_argument("--upstream-rate", help="bandwidth cap for all fills together, bytes/s: 50M (none)")
    serve.add_argument("--allow-clients", help="CIDRs that may use the mirror, comma-separated (anyone)")
    serve.add_argument("--manage-clients", help="CIDRs that may pull/delete through Ollama's API besides the "
                                                "mirror's own host, comma-separated (none)")
    serve.add_argument("--token", action="append", dest="tokens", metavar="TOKEN",
                       help="a bearer token that may pull (repeatable; better in the config file)")
    serve.add_argument("--keys-file", help="Ollama public keys (lines of ~/.ollama/id_ed25519.pub) that may pull")
    serve.add_argument("--admin-listen", help="HOST:PORT for /metrics and the status page only")
    serve.add_argument("--proxy-listen", help="HOST:PORT for clients with HTTPS_PROXY (transparent mode)")
    serve.add_argument("--tls-listen", help="HOST:PORT answering TLS as the mirrored hosts (LAN DNS override)")
    serve.add_argument("--tls-cert", help="certificate (PEM) for --tls-listen instead of one from the mirror's CA")
    serve.add_argument("--tls-key", help="its private key (PEM)")
    serve.add_argument("--tunnel-allow", help="hosts the proxy tunnels untouched, comma-separated (ollama.com)")
    serve.add_argument("--resolve", action="append", metavar="HOST=IP",
                       help="reach an upstream host at this address (a LAN DNS override must not loop to us)")

    commands.add_parser("serve", parents=[common, serve], help="serve the registry protocol from the cache")
    models_help = "models as a user types them: qwen2.5:7b, team/model:v1, host:port/ns/model:tag"
    pull = commands.add_parser("pull", parents=[common], help="warm the cache from upstream, without a client")
    pull.add_argument("models", nargs="+", help=models_help)
    imp = commands.add_parser("import", parents=[common], help="ingest an Ollama models directory or a bundle")
    imp.add_argument("path", help="a models directory (~/.ollama/models, a USB copy), an export .tar, or - (stdin)")
    exp = commands.add_parser("export", parents=[common], help="write models as an Ollama models directory or tar")
    exp.add_argument("models", nargs="*", help=models_help)
    exp.add_argument("--to", required=True, help="a directory, a FILE.tar, or - for a tar on stdout")
    exp.add_argument("--all", action="store_true", help="every cached model")
    ls = commands.add_parser("ls", parents=[common], help="the cached models")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rm = commands.add_parser("rm", parents=[common], help="remove a tag; blobs no other model uses go with it")
    rm.add_argument("models", nargs="+", help=models_help)
    for verb in ("pin", "unpin"):
        p = commands.add_parser(verb, parents=[common], help=f"{verb} models (pinned ones survive any cleanup)")
        p.add_argument("models", nargs="+", help=models_help)
    commands.add_parser("verify", parents=[common], help="re-hash every blob; move bad ones aside")
    freeze = commands.add_parser("freeze", parents=[common], help="print tag -> manifest digest for `serve --lock`")
    freeze.add_argument("models", nargs="*", help="only these (default: all cached)")
    gc = commands.add_parser("gc", parents=[common], help="evict down to the low watermark of --max-size now")
    gc.add_argument("--max-size", help="as for serve (default: the configured one; none: only unused blobs)")
    gc.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    commands.add_parser("config", parents=[common, serve], help="print the effective settings (TOML) and their sources")
    ca = commands.add_parser("ca", parents=[common], help="the private CA for transparent (proxy/DNS) mode")
    ca.add_argument("action", choices=["init", "export"],
                    help="init: create it (once); export: print its certificate, and how to trust it")
    ca.add_argument("--proxy-listen", help="the proxy address to show in the instructions")
    return parser


SETTING_FLAGS = {"listen", "cache_dir", "upstream", "offline", "connections", "manifest_ttl", "log_level", "lock",
                 "allow_networks", "registries", "proxy_listen", "tls_listen", "tls_cert", "tls_key",
                 "tunnel_allow", "resolve", "max_size", "min_free", "upstream_connections", "upstream_rate",
                 "allow_clients", "manage_clients", "tokens", "keys_file", "admin_listen", "log_format"}
LIST_FLAGS = {"registries", "resolve", "tokens"}  # repeatable flags, joined into one comma-separated setting


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    flags = {k: (",".join(v) if k in LIST_FLAGS and v else v) for k, v in vars(args).items() if k in SETTING_FLAGS}
    try:
        settings, sources = load_settings(flags, os.environ, Path(args.config) if args.config else None)
    except SettingsError as exc:
        sys.exit(f"ollama-mirror: {exc}")
    if args.command == "config":
        print(render(settings, sources))
        return
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "serve":
        serve(settings)
        return
    try:
        COMMANDS[args.command](settings, args)
    except (MirrorError, ValueError, OSError) as exc:
        sys.exit(f"ollama-mirror {args.command}: {exc}")


# -- seeding commands ---------------------------------------------------------------------


def _layout(settings: Settings) -> Layout:
    layout = Layout(settings.cache_dir, settings.default_host)
    layout.make_dirs()
    return layout


def _store(settings: Settings) -> BlobStore:
    return BlobStore(Layout(settings.cache_dir, settings.default_host))


def _resolve(layout: Layout, text: str) -> CachedModel:
    ref = ModelRef.parse(text)
    found = models.load(layout, ref.host or layout.host, ref.name, ref.tag)
    if found is None:
        raise ValueError(f"{text} is not in the cache at {layout.root}")
    return found


def cmd_pull(settings: Settings, args: argparse.Namespace) -> None:
    asyncio.run(_pull(settings, [ModelRef.parse(text) for text in args.models]))


async def _pull(settings: Settings, refs: list[ModelRef]) -> None:
    async with open_mirror(settings) as mirror:
        for ref in refs:
            bars: dict[str, Progress] = {}
            async for event in mirror.registry(ref.host).pulls.pull(ref, {"User-Agent": f"ollama-mirror/{__version__}"}):
                digest = event.get("digest")
                if isinstance(digest, str):
                    bar = bars.get(digest) or bars.setdefault(
                        digest, Progress(f"{ref} {digest[7:19]}", int(event["total"])))  # type: ignore[arg-type]
                    bar.set(int(event["completed"]))  # type: ignore[arg-type]
                    if bar.done >= bar.total:
                        bar.finish()
                elif event["status"] == "success":
                    print(f"pulled {ref}", file=sys.stderr)


def cmd_import(settings: Settings, args: argparse.Namespace) -> None:
    store = _store(settings)
    if args.path == "-":  # a bundle on stdin: ollama-mirror export --to - | ssh host ollama-mirror import -
        bar = Progress("import from stdin", 0)
        report = seeding.import_tar(store, sys.stdin.buffer, bar.advance)
    else:
        source = Path(args.path).expanduser()
        bar = Progress(f"import {source.name}", _size_of(source))
        report = seeding.import_path(store, source, bar.advance)
    bar.finish()
    _print_report(report)
    if report.refused:
        sys.exit(1)


def _size_of(source: Path) -> int:
    if not source.is_dir():
        return source.stat().st_size
    return sum(p.stat().st_size for p in (source / "blobs").glob("sha256-*") if p.is_file())


def cmd_export(settings: Settings, args: argparse.Namespace) -> None:
    layout = _layout(settings)
    chosen = models.list_models(layout) if args.all else [_resolve(layout, text) for text in args.models]
    if not chosen:
        raise ValueError("name models to export, or --all")
    total = sum(layer.size for layer in {layer for m in chosen for layer in m.blobs})
    bar = Progress(f"export to {args.to}", total)
    if args.to == "-":
        report = seeding.export_tar(layout, chosen, sys.stdout.buffer, bar.advance)
    elif args.to.endswith(".tar"):
        with open(args.to, "wb") as out:
            report = seeding.export_tar(layout, chosen, out, bar.advance)
    else:
        report = seeding.export_dir(layout, chosen, Path(args.to).expanduser(), bar.advance)
    bar.finish()
    _print_report(report, sys.stderr if args.to == "-" else None)


def _print_report(report: seeding.Report, stream: TextIO | None = None) -> None:
    """The outcome, as JSON on stdout (stderr when stdout carries the tar)."""
    print(json.dumps(report.as_dict(), indent=1), file=stream or sys.stdout)


def cmd_ls(settings: Settings, args: argparse.Namespace) -> None:
    layout = _layout(settings)
    meta = Metadata(layout.meta)
    rows = []
    for m in models.list_models(layout):
        record = meta.manifest(m.host, m.name, m.tag)
        rows.append({"name": f"{m.host}/{m.name}:{m.tag}", "id": m.digest.hex[:12], "size": m.size,
                     "last_pulled": record.fetched_at if record else m.modified,
                     "pinned": meta.is_pinned(m.host, m.name, m.tag)})
    meta.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'NAME':60} {'ID':12} {'SIZE':>10} {'LAST PULLED':20} PINNED")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(row["last_pulled"])))  # type: ignore[arg-type]
        print(f"{row['name']:60} {row['id']:12} {human(int(row['size'])):>10} {when:20} "  # type: ignore[arg-type]
              f"{'yes' if row['pinned'] else ''}")


def cmd_rm(settings: Settings, args: argparse.Namespace) -> None:
    """Through the store's one deletion path: a blob another model names or a server is filling stays."""
    store = _store(settings)
    meta = Metadata(store.layout.meta)
    try:
        for text in args.models:
            removed = store.remove([_resolve(store.layout, text)], meta=meta, by="rm")
            print(f"removed {text} and {len(removed.blobs)} blobs no other model uses ({human(removed.freed)})",
                  file=sys.stderr)
    finally:
        meta.close()


def cmd_pin(settings: Settings, args: argparse.Namespace, pinned: bool = True) -> None:
    """Pins live in the metadata database, which a running server's eviction reads on every run."""
    layout = _layout(settings)
    meta = Metadata(layout.meta)
    try:
        for text in args.models:
            model = _resolve(layout, text)
            meta.set_pinned(model.host, model.name, model.tag, pinned)
            print(f"{'pinned' if pinned else 'unpinned'} {text}", file=sys.stderr)
    finally:
        meta.close()


def cmd_verify(settings: Settings, args: argparse.Namespace) -> None:
    layout = _layout(settings)
    bar = Progress("verify", sum(p.stat().st_size for p in layout.blobs.glob("sha256-*")))
    bad = seeding.verify_store(layout, bar.advance)
    bar.finish("bad blobs found" if bad else "all blobs verified")
    for digest, users in bad.items():
        print(f"bad {digest}: moved to {layout.state / 'quarantine'}; breaks {', '.join(users) or 'no model'}",
              file=sys.stderr)
    if bad:
        sys.exit(1)


def cmd_freeze(settings: Settings, args: argparse.Namespace) -> None:
    layout = _layout(settings)
    chosen = [_resolve(layout, text) for text in args.models] if args.models else models.list_models(layout)
    lock = {f"{m.host}/{m.name}:{m.tag}": str(m.digest) for m in chosen}
    print(json.dumps({"lockfileVersion": 1, "models": lock}, indent=1))


def cmd_gc(settings: Settings, args: argparse.Namespace) -> None:
    store = _store(settings)
    high = settings.max_bytes()
    low = int(high * settings.low_watermark) if high is not None else None
    meta = Metadata(store.layout.meta)
    try:
        chosen = eviction.plan(store, meta, high, low, force=True)
        for model in chosen.models:
            print(f"{'would evict' if args.dry_run else 'evict'} {model.display_name}  {human(model.size)}")
        orphans = set(chosen.blobs) - {layer.digest for m in chosen.models for layer in m.blobs}
        for digest in sorted(orphans, key=str):
            print(f"{'would remove' if args.dry_run else 'remove'} unused blob {digest.short}  "
                  f"{human(chosen.blobs[digest])}")
        done = chosen if args.dry_run else eviction.execute(store, meta, chosen, by="gc")
        limit = f", low watermark {human(chosen.low)}" if high is not None else ""
        print(f"store {human(chosen.usage)}{limit}: {'would free' if args.dry_run else 'freed'} "
              f"{human(done.freed)} ({len(done.models)} models, {len(done.blobs)} blobs)", file=sys.stderr)
    finally:
        meta.close()


def cmd_ca(settings: Settings, args: argparse.Namespace) -> None:
    ca = CertificateAuthority(_layout(settings).state / "ca")
    if args.action == "init":
        created = ca.init()
        print(f"{'created' if created else 'already there, kept'}: {ca.cert_path} (key {ca.key_path}, mode 0600)",
              file=sys.stderr)
        return
    if not ca.exists:
        raise ValueError("there is no CA yet: run `ollama-mirror ca init` (or serve with --proxy-listen) first")
    sys.stdout.buffer.write(ca.certificate_pem())
    sys.stdout.flush()
    print(_trust_instructions(settings), file=sys.stderr)


def _trust_instructions(settings: Settings) -> str:
    host, _, port = (settings.proxy_listen or "0.0.0.0:3128").rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.getfqdn()
    proxy = f"http://{host}:{port}"
    return f"""
Save the certificate above as ollama-mirror-ca.crt on each machine running Ollama, trust it, restart Ollama:
  Debian/Ubuntu:  sudo cp ollama-mirror-ca.crt /usr/local/share/ca-certificates/ && sudo update-ca-certificates
  RHEL/Fedora:    sudo cp ollama-mirror-ca.crt /etc/pki/ca-trust/source/anchors/ && sudo update-ca-trust
  macOS:          sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain ollama-mirror-ca.crt
  Windows (admin PowerShell):
                  Import-Certificate -FilePath ollama-mirror-ca.crt -CertStoreLocation Cert:\\LocalMachine\\Root
Proxy mode: point the Ollama server (not the CLI) at the mirror. On Linux with systemd:
  sudo systemctl edit ollama        # and add these lines:
      [Service]
      Environment="HTTPS_PROXY={proxy}"
  sudo systemctl restart ollama
  macOS/Windows: set HTTPS_PROXY={proxy} in the environment Ollama starts with.
DNS mode: point registry.ollama.ai at the mirror in the LAN's DNS; the mirror needs --tls-listen 0.0.0.0:443
and --resolve registry.ollama.ai=<its real address> so it does not loop to itself.
Then `ollama pull qwen2.5:7b` is served by the mirror under its usual name."""


COMMANDS = {
    "pull": cmd_pull, "import": cmd_import, "export": cmd_export, "ls": cmd_ls, "rm": cmd_rm,
    "pin": cmd_pin, "unpin": lambda s, a: cmd_pin(s, a, pinned=False), "verify": cmd_verify, "freeze": cmd_freeze,
    "ca": cmd_ca,
    "gc": cmd_gc,
}


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps
    the freed 1-8 MiB buffers of the disk threads: RSS then grows with the work done. Two suffice."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0 if signum == signal.SIGTERM else 128 + signum)


def serve(settings: Settings) -> None:
    """Bind first, so the log names the real port (``--listen 127.0.0.1:0`` in tests)."""
    if settings.keys_file is not None:
        try:
            load_keys(settings.keys_file)
        except (OSError, ValueError) as exc:
            sys.exit(f"ollama-mirror: keys_file: {exc}")
    try:
        server = build_server(settings)
    except ListenError as exc:
        sys.exit(f"ollama-mirror: {exc}")
    _fewer_malloc_arenas()
    log.info("listening url=%s", server.url)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again with the handlers
    # it found: these make that a clean exit (code 0 for TERM), so queued log lines are written.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    server.run()  # uvloop when installed (uvicorn[standard]): a faster event loop
