"""The ``ollama-mirror`` command: the only module that prints or exits."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import difflib
import errno
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO, TypeVar

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
    env_name,
    flag_name,
    load_settings,
    render,
)
from .errors import MirrorError
from .layout import Layout, cache_problem
from .metadata import Metadata
from .models import CachedModel
from .names import ModelRef, tag_key, typed_name
from .progress import Progress, human
from .server import ListenError, build_server
from .store import BlobStore

if TYPE_CHECKING:
    from .shared_admin import Inventory, SharedAdmin, SharedModel

log = logging.getLogger("mirror")
Found = TypeVar("Found", bound=CachedModel)


ENV_NOTE = "Settings: /etc/ollama-mirror/config.toml (or --config), then OLLAMA_MIRROR_* variables, then flags; " \
           "`ollama-mirror config` prints the effective ones and where each came from."


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in one line: what was wrong, and the likely fix (a close match for a
    typo) instead of a screen of usage."""

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            what, typed, options = choice[1], choice[2], re.findall(r"'([^']*)'", choice[3])
            if what == "COMMAND":
                message = f"unknown command {typed!r}{_suggest(typed, options)} (`{self.prog} --help` lists them)"
            else:
                message = f"{what}: {typed!r} is not one of {', '.join(options)}{_suggest(typed, options)}"
        elif message.startswith("the following arguments are required: COMMAND"):
            message = f"name a command: {', '.join(_commands(self))} (`{self.prog} --help` says what each does)"
        elif message.startswith("argument "):
            message = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: {message}\n")


def _suggest(typed: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(typed, options, n=1, cutoff=0.6)
    return f": did you mean {close[0]}?" if close else ""


def _setting(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: object) -> None:
    """A flag that sets a setting: its help names the environment variable that sets it too."""
    dest = str(kwargs.get("dest") or flag.removeprefix("--").replace("-", "_"))
    parser.add_argument(flag, help=f"{help} [env {env_name(dest)}]".replace("%", "%%"), **kwargs)  # type: ignore[arg-type]


def _parser() -> _Parser:
    parser = _Parser(prog="ollama-mirror", description="A pull-through cache for the Ollama registry.",
                     epilog=ENV_NOTE)
    parser.add_argument("--version", action="version", version=f"ollama-mirror {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"a TOML settings file (default {DEFAULT_CONFIG} if present) "
                                         f"[env OLLAMA_MIRROR_CONFIG]")
    _setting(common, "--cache-dir", f"the cache, an Ollama models directory (default {DEFAULT_CACHE_DIR})")
    _setting(common, "--upstream", f"registry URL to fill from (default {DEFAULT_UPSTREAM})")
    _setting(common, "--log-level", "how much to log (default info)", choices=["debug", "info", "warning", "error"])
    _setting(common, "--log-format", "log lines as text, or one JSON object per line for log shippers "
                                     "(default text)", choices=["text", "json"])
    _setting(common, "--registry", "mirror this registry host, filled from URL (repeatable; default "
                                   "registry.ollama.ai=https://registry.ollama.ai; the host given for the "
                                   "--upstream URL names its tags, as for a mirror of a mirror)",
             action="append", dest="registries", metavar="HOST=URL")
    _setting(common, "--store", "a bucket shared by mirror replicas, s3://BUCKET/PREFIX (endpoint and keys as "
                                "for any AWS SDK: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; default: the cache "
                                "directory alone)")
    _setting(common, "--s3-path-style", "address the bucket in the URL path (MinIO, Ceph RGW)",
             action="store_const", const=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = argparse.ArgumentParser(add_help=False)  # serve's options; `config` takes them too
    _setting(serve, "--listen", f"HOST:PORT to listen on (default {DEFAULT_LISTEN}; port 0 picks one)")
    _setting(serve, "--offline", "never contact upstream", action="store_const", const=True)
    _setting(serve, "--connections", "parallel Range requests per blob; 0 (the default): adapt to what upstream gives, up to 32", type=int)
    _setting(serve, "--manifest-ttl", "seconds a cached tag is served before revalidating (600)", type=float)
    _setting(serve, "--lock", "a lock file from `freeze`: its tags answer exactly its manifests")
    _setting(serve, "--allow-networks", "CIDRs a public upstream may redirect to although private")
    _setting(serve, "--max-size", "evict least-recently-used models above this: 500G (K/M/G/T) or 80%")
    _setting(serve, "--min-free", "refuse fills (507) that would leave less free disk than this (1G)")
    _setting(serve, "--upstream-connections", "upstream connections, all fills together (64)", type=int)
    _setting(serve, "--upstream-rate", "bandwidth cap for all fills together, bytes/s: 50M (none)")
    _setting(serve, "--allow-clients", "CIDRs that may use the mirror, comma-separated (anyone)")
    _setting(serve, "--manage-clients", "CIDRs that may pull/delete through Ollama's API besides the "
                                        "mirror's own host, comma-separated (none)")
    _setting(serve, "--token", "a bearer token that may pull (repeatable; better in the config file)",
             action="append", dest="tokens", metavar="TOKEN")
    _setting(serve, "--keys-file", "Ollama public keys (lines of ~/.ollama/id_ed25519.pub) that may pull")
    _setting(serve, "--admin-listen", "HOST:PORT for /metrics and the status page only")
    _setting(serve, "--proxy-listen", "HOST:PORT for clients with HTTPS_PROXY (transparent mode)")
    _setting(serve, "--tls-listen", "HOST:PORT answering TLS as the mirrored hosts (LAN DNS override)")
    _setting(serve, "--tls-cert", "certificate (PEM) for --tls-listen instead of one from the mirror's CA")
    _setting(serve, "--tls-key", "its private key (PEM)")
    _setting(serve, "--tunnel-allow", "hosts the proxy tunnels untouched, comma-separated (ollama.com)")
    _setting(serve, "--resolve", "reach an upstream host at this address (a LAN DNS override must not loop to "
                                 "us; repeatable)", action="append", metavar="HOST=IP")

    _setting(serve, "--advertise-url", "the URL other replicas reach this one at, to stream a blob it is "
                                       "filling (default: from --listen and the host name)")
    _setting(serve, "--blob-redirect", "send a warm blob's bytes from the bucket: a 307 to a presigned URL",
             action="store_const", const=True)
    _setting(serve, "--replica-id", "this replica's name in the bucket (default: host:port)")

    def command(name: str, help: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=parents, help=help, description=help, epilog=ENV_NOTE)

    command("serve", "serve the registry protocol from the cache", [common, serve])
    models_help = "models as a user types them: qwen2.5:7b, team/model:v1, host:port/ns/model:tag"
    pull = command("pull", "warm the cache from upstream, without a client", [common])
    pull.add_argument("models", nargs="+", help=models_help)
    imp = command("import", "ingest an Ollama models directory or a bundle", [common])
    imp.add_argument("path", help="a models directory (~/.ollama/models, a USB copy), an export .tar, or - (stdin)")
    exp = command("export", "write models as an Ollama models directory or tar", [common])
    exp.add_argument("models", nargs="*", help=models_help)
    exp.add_argument("--to", required=True, help="a directory, a FILE.tar, or - for a tar on stdout")
    exp.add_argument("--all", action="store_true", help="every cached model")
    ls = command("ls", "the cached models, named as you would type them", [common])
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rm = command("rm", "remove a tag; blobs no other model uses go with it", [common])
    rm.add_argument("models", nargs="+", help=models_help)
    pin = command("pin", "keep models through eviction and gc: a pinned model is never removed to free space "
                         "(ollama-mirror rm still removes it)", [common])
    pin.add_argument("models", nargs="+", help=models_help)
    unpin = command("unpin", "let eviction and gc remove models again when space is needed", [common])
    unpin.add_argument("models", nargs="+", help=models_help)
    command("verify", "re-hash every blob; move bad ones aside", [common])
    freeze = command("freeze", "print tag -> manifest digest for `serve --lock`", [common])
    freeze.add_argument("models", nargs="*", help="only these (default: all cached)")
    gc = command("gc", "evict down to the low watermark of --max-size now", [common])
    _setting(gc, "--max-size", "as for serve (default: the configured one; none: only unused blobs)")
    gc.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    command("config", "print the effective settings (TOML) and their sources", [common, serve])
    ca = command("ca", "the private CA for transparent (proxy/DNS) mode", [common])
    ca.add_argument("action", choices=["init", "export"],
                    help="init: create it (once); export: print its certificate, and how to trust it")
    ca.add_argument("--proxy-listen", help="the proxy address to show in the instructions")
    return parser


SETTING_FLAGS = {"listen", "cache_dir", "upstream", "offline", "connections", "manifest_ttl", "log_level", "lock",
                 "allow_networks", "registries", "proxy_listen", "tls_listen", "tls_cert", "tls_key",
                 "tunnel_allow", "resolve", "max_size", "min_free", "upstream_connections", "upstream_rate",
                 "allow_clients", "manage_clients", "tokens", "keys_file", "admin_listen", "log_format",
                 "store", "s3_path_style", "advertise_url", "blob_redirect", "replica_id"}
LIST_FLAGS = {"registries", "resolve", "tokens"}  # repeatable flags, joined into one comma-separated setting


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only there
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser, *, taking_a_value: bool = False) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings
            if not taking_a_value or action.nargs is None]


def _glue_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--max-size -5G``: argparse takes ``-5G`` for an option and answers with its usage; glued as
    ``--max-size=-5G``, the value reaches the setting's own check, which says what is wrong with it."""
    sub = _commands(parser).get(argv[0]) if argv else None
    if sub is None:
        return argv
    valued, known = set(_options(sub, taking_a_value=True)), set(_options(sub))
    glued: list[str] = []
    rest = iter(argv)
    for token in rest:
        following = next(rest, None) if token in valued else None
        if following is not None and following.startswith("-") and len(following) > 1 \
                and following.partition("=")[0] not in known:
            glued.append(f"{token}={following}")
        else:
            glued.extend([token] if following is None else [token, following])
    return glued


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> NoReturn:
    sub = _commands(parser)[command]
    typed = unknown[0]
    if typed.startswith("-"):
        flag = typed.partition("=")[0]
        message = f"unknown option {flag}{_suggest(flag, _options(sub))}"
    else:
        message = f"unexpected argument {typed!r}"
    sub.exit(2, f"{sub.prog}: {message} (`{sub.prog} --help` lists what it takes)\n")


def _tell(text: object) -> None:
    """A line for the person at the terminal, in one write: log lines come from a thread of their
    own, and print's two writes (the text, then the newline) let one land in between."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(_glue_dash_values(parser, given))
    if unknown:
        _refuse_unknown(parser, args.command, unknown)
    flags = {k: (",".join(v) if k in LIST_FLAGS and v else v) for k, v in vars(args).items() if k in SETTING_FLAGS}
    try:
        settings, sources = load_settings(flags, os.environ, Path(args.config) if args.config else None)
    except SettingsError as exc:
        sys.exit(f"ollama-mirror: {exc}")
    if args.command == "config":
        print(render(settings, sources))
        return
    logs.configure(settings.log_level, settings.log_format)
    cache = Cache(settings, sources, given)
    if args.command == "serve":
        serve(settings, cache)
        return
    try:
        COMMANDS[args.command](settings, args, cache)
    except CacheProblem as exc:
        sys.exit(f"ollama-mirror {args.command}: {exc}")
    except OSError as exc:
        sys.exit(f"ollama-mirror {args.command}: {cache.explain(exc)}")
    except (MirrorError, ValueError) as exc:
        sys.exit(f"ollama-mirror {args.command}: {exc}")


def named(key: str, sources: Mapping[str, str]) -> str:
    """A setting as the user gave it: the flag, the variable, the key in a file, or its default."""
    source = sources.get(key, "default")
    if source == "command line":
        return flag_name(key)
    if source == "environment":
        return env_name(key)
    if source == "default":
        return f"the default {flag_name(key)}"
    return f"{key} in {source}"


# -- the cache a command works on -----------------------------------------------------------


class CacheProblem(Exception):
    """The cache cannot be used as the command needs: the message is the sentence to print."""


class Cache:
    """The cache a command works on. Commands that only read never create one (a mistyped
    ``--cache-dir`` says so); commands that write check first that they can, and that they
    write as the cache's owner, so no file is left that the mirror's own user cannot change."""

    DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range

    def __init__(self, settings: Settings, sources: Mapping[str, str], argv: list[str]) -> None:
        self.sources, self.argv = sources, argv
        self.root = settings.cache_dir
        self.layout = Layout(self.root, settings.default_host)

    @property
    def where(self) -> str:
        """Where the path came from, for messages: a typo'd flag and a surprising default read differently."""
        if self.sources.get("cache_dir", "default") == "default":
            user = _user_name(os.geteuid())
            return f"the default for {user}; --cache-dir was not given"
        return f"from {named('cache_dir', self.sources)}"

    def existing(self) -> Layout:
        """A cache that is there, for commands that read (and those that change what is there)."""
        if not (self.layout.manifests.is_dir() or self.layout.blobs.is_dir()):
            raise CacheProblem(f"there is no cache at {self.root} ({self.where}): name the mirror's cache with "
                               f"--cache-dir, or fill one with `ollama-mirror pull` or `import`")
        return self.layout

    def writable(self, *, create: bool = False) -> Layout:
        """The cache, checked for writing: ours to write (see ``owner_problem``), and writable now."""
        if not create:
            self.existing()
        if self.root.exists():
            problem = self.owner_problem()
            if problem:
                raise CacheProblem(problem)
        try:
            self.layout.make_dirs()
            _probe_write(self.layout.staging)
        except OSError as exc:
            raise CacheProblem(cache_problem(self.root, exc)) from None
        return self.layout

    def owner_problem(self) -> str | None:
        owner = self.root.stat().st_uid
        me = os.geteuid()
        if owner == me:
            return None
        name, mine = _user_name(owner), _user_name(me)
        command = shlex.join(["ollama-mirror", *self.argv])
        if self.sources.get("cache_dir", "default") in ("default", "environment"):  # not seen by `sudo -u`
            command += f" --cache-dir {shlex.quote(str(self.root))}"
        if owner in self.DYNAMIC_UIDS:
            run = (f"sudo systemd-run --pipe --wait --quiet -p DynamicUser=yes -p User={name} "
                   f"-p CacheDirectory={self.root.name} {command}")
        else:
            run = f"sudo -u {shlex.quote(name if name != str(owner) else f'#{owner}')} {command}"
        return (f"the cache at {self.root} belongs to {name}, not to {mine}: files {mine} wrote there would be "
                f"{mine}'s, which the mirror running as {name} could not change; run the command as its owner: {run}")

    def explain(self, exc: OSError) -> str:
        """An OSError in one sentence; one met inside the cache, with what to do about it."""
        where = Path(str(exc.filename)) if exc.filename else None
        if where is not None and (where == self.root or self.root in where.parents):
            return cache_problem(self.root, exc)
        return f"{where}: {exc.strerror}" if where is not None and exc.strerror else str(exc)


def _probe_write(directory: Path) -> None:
    """Write (and remove) a little data, so a read-only, unwritable or full disk shows now, in one line."""
    fd, path = tempfile.mkstemp(prefix="tmp-probe-", dir=directory)
    try:
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# -- seeding commands ---------------------------------------------------------------------


def _stored_hosts(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.manifests.iterdir() if p.is_dir()) if layout.manifests.is_dir() else []


def _resolve(layout: Layout, text: str) -> CachedModel:
    found = _find_local(layout, text)
    if found is None:
        raise ValueError(f"{text} is not in the cache at {layout.root}: `ollama-mirror ls` lists the names it has")
    return found


def _find_local(layout: Layout, text: str) -> CachedModel | None:
    return _lookup(text, layout.host, lambda host, ref: models.load(layout, host, ref.name, ref.tag),
                   _stored_hosts(layout), "the cache")


def _lookup(text: str, default_host: str, load: Callable[[str, ModelRef], Found | None], hosts: Sequence[str],
            where: str) -> Found | None:
    """A model as the user typed it. A full name (``host/ns/model:tag``) is looked up as stored. A
    name without a host means the default registry's; if it is not there but exactly one other host
    in ``where`` has it, that one, said on stderr: a cache filled through another upstream still
    answers to the names its users type."""
    ref = ModelRef.parse(text)
    found = load(ref.host or default_host, ref)
    if found is None and ref.host is None:
        others = [m for host in hosts if host != default_host if (m := load(host, ref)) is not None]
        if len(others) > 1:
            raise ValueError(f"{text} is not under the default registry {default_host}, and {len(others)} hosts "
                             f"in {where} have it: name one in full ({', '.join(map(str, others))})")
        if others:
            found = others[0]
            _tell(f"{text}: using {found} ({where} has it under {found.host}, not under the default registry "
                  f"{default_host})")
    return found


def cmd_pull(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    refs = [ModelRef.parse(text) for text in args.models]
    cache.writable(create=True)
    asyncio.run(_pull(settings, refs))


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
                    _tell(f"pulled {ref}")


def cmd_import(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """With --store, every model imported whole goes to the bucket too, for every replica to serve."""
    admin = _shared(settings, "import") if settings.store else None
    store = BlobStore(cache.writable(create=True))
    if args.path == "-":  # a bundle on stdin: ollama-mirror export --to - | ssh host ollama-mirror import -
        bar = Progress("import from stdin", 0)
        report = seeding.import_tar(store, sys.stdin.buffer, bar.advance)
    else:
        source = Path(args.path).expanduser()
        bar = Progress(f"import {source.name}", _size_of(source))
        report = seeding.import_path(store, source, bar.advance)
    bar.finish()
    _print_report(report)
    _note_other_hosts(report, settings)
    if admin is not None and report.models:
        _upload(admin, store, report.models)
    if report.refused:
        sys.exit(1)


def _upload(admin: SharedAdmin, store: BlobStore, names: list[str]) -> None:
    chosen = [m for ref in map(ModelRef.parse, names)
              if (m := models.load(store.layout, ref.host or store.layout.host, ref.name, ref.tag)) is not None]
    absent = admin.absent(chosen)
    bar = Progress(f"upload to {admin.where}", sum(absent.values()))
    done = admin.upload(store, chosen, absent, bar.advance)
    bar.finish()
    _tell(f"uploaded {len(done.models)} models to {admin.where}: {done.blobs} blobs ({human(done.bytes)}), "
          f"{done.skipped} there already")


def _note_other_hosts(report: seeding.Report, settings: Settings) -> None:
    """Models imported under another registry host than this cache's default are served in named
    mode only by a mirror whose upstream is that host: say so, with the flag that does it."""
    hosts = sorted({name.partition("/")[0] for name in report.models} - {settings.default_host})
    for host in hosts:
        count = sum(1 for name in report.models if name.startswith(f"{host}/"))
        _tell(f"note: {count} model(s) came in under {host}, not under the default registry "
              f"{settings.default_host}: commands name them in full ({host}/...), and `serve` answers them in named "
              f"mode with --upstream http://{host} (add --offline where it cannot be reached)")


def _size_of(source: Path) -> int:
    if not source.is_dir():
        return source.stat().st_size
    return sum(p.stat().st_size for p in (source / "blobs").glob("sha256-*") if p.is_file())


def cmd_export(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """With --store, models the local cache lacks are fetched from the bucket into it first."""
    if settings.store:
        layout, chosen = cache.layout, _fetch_shared(settings, args, cache)
    else:
        layout = cache.existing()
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


def _fetch_shared(settings: Settings, args: argparse.Namespace, cache: Cache) -> list[CachedModel]:
    from .shared_admin import SharedModel

    admin = _shared(settings, "export")
    inventory = admin.inventory()
    if args.all:
        chosen: list[CachedModel] = models.list_models(cache.layout)
        held = {tag_key(m.host, m.name, m.tag) for m in chosen}
        for model in inventory.models:
            if tag_key(model.host, model.name, model.tag) in held:
                continue
            if model.complete:
                chosen.append(model)
            else:
                _tell(f"note: {model} is not whole in {admin.where} ({len(model.missing)} blobs missing): left out")
    else:
        chosen = [_find_local(cache.layout, text) or _resolve_shared(admin, inventory, text, settings)
                  for text in args.models]
    fetch = [m for m in chosen if isinstance(m, SharedModel)]
    if fetch:
        store = BlobStore(cache.writable(create=True))
        bar = Progress(f"fetch from {admin.where}", sum(admin.lacking(store, fetch).values()))
        copied = sum(admin.fetch(store, model, bar.advance) for model in fetch)
        bar.finish()
        _tell(f"fetched {len(fetch)} models from {admin.where} into the cache at {store.layout.root} "
              f"({human(copied)})")
    return chosen


def _print_report(report: seeding.Report, stream: TextIO | None = None) -> None:
    """The outcome, as JSON on stdout (stderr when stdout carries the tar)."""
    print(json.dumps(report.as_dict(), indent=1), file=stream or sys.stdout)


def cmd_ls(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """Names as the user types them to the other commands: ``qwen2.5:7b`` for the default
    registry's library, the full name for another host's models. With --store, the bucket's
    models, and whether the bucket holds every blob of each."""
    if settings.store:
        admin = _shared(settings, "ls")
        rows = [{**_row(m, settings.default_host, m.modified, m.pinned), "complete": m.complete,
                 "missing_blobs": [str(layer.digest) for layer in m.missing]} for m in admin.inventory().models]
    else:
        layout = cache.existing()
        meta = Metadata(layout.meta)
        rows = []
        for m in models.list_models(layout):
            record = meta.manifest(m.host, m.name, m.tag)
            rows.append(_row(m, layout.host, record.fetched_at if record else m.modified,
                             meta.is_pinned(m.host, m.name, m.tag)))
        meta.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    complete = " COMPLETE" if settings.store else ""
    print(f"{'NAME':60} {'ID':12} {'SIZE':>10} {'LAST PULLED':20} {'PINNED':6}{complete}".rstrip())
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(row["last_pulled"])))  # type: ignore[arg-type]
        line = (f"{row['name']:60} {row['id']:12} {human(int(row['size'])):>10} {when:20} "  # type: ignore[arg-type]
                f"{'yes' if row['pinned'] else '':6}")
        if "complete" in row:
            missing = len(row["missing_blobs"])  # type: ignore[arg-type]
            line += f" {'yes' if row['complete'] else f'no, {missing} blobs missing'}"
        print(line.rstrip())


def _row(m: CachedModel, default_host: str, last_pulled: float, pinned: bool) -> dict[str, object]:
    return {"name": typed_name(m.host, m.name, m.tag, default_host), "full_name": str(m), "id": m.digest.hex[:12],
            "size": m.size, "last_pulled": last_pulled, "pinned": pinned}


def cmd_rm(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """Through the store's one deletion path: a blob another model names or a server is filling stays."""
    if settings.store:
        _rm_shared(settings, args, cache)
        return
    store = BlobStore(cache.writable())
    for text in args.models:
        _rm_local(store, _resolve(store.layout, text), text)


def _rm_local(store: BlobStore, model: CachedModel, text: str, place: str = "") -> None:
    meta = Metadata(store.layout.meta)
    try:
        removed = store.remove([model], meta=meta, by="rm")
    finally:
        meta.close()
    _tell(f"removed {text}{place} and {len(removed.blobs)} blobs no other model uses ({human(removed.freed)})")


def _rm_shared(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """From the bucket (tag, then the blobs no other tag there names and no replica is filling), and
    from this machine's cache where it has the model too."""
    admin = _shared(settings, "rm")
    inventory = admin.inventory()
    for text in args.models:
        shared = _lookup(text, settings.default_host, inventory.get, inventory.hosts, admin.where)
        local = _find_local(cache.layout, text)
        if shared is None and local is None:
            raise ValueError(f"{text} is neither in {admin.where} nor in the cache at {cache.root}: "
                             f"`ollama-mirror ls` lists the names the bucket has (with --store '', the cache's)")
        store = BlobStore(cache.writable()) if local is not None else None  # checked before the bucket changes
        if shared is None:
            _tell(f"{text} is not in {admin.where}")
        else:
            removed = admin.remove(shared, inventory)
            _tell(f"removed {text} from {admin.where} and {len(removed.blobs)} blobs no other model there uses "
                  f"({human(removed.freed)})")
            for digest, lease in removed.leased.items():
                _tell(f"kept blob {digest.short} in {admin.where}: replica {lease.owner} is filling it "
                      f"(its lease runs until {_clock(lease.expires)})")
        if store is not None and local is not None:
            _rm_local(store, local, text, f" from the cache at {cache.root}")


def _shared(settings: Settings, command: str) -> SharedAdmin:
    """The bucket the replicas share, checked first: a wrong bucket, endpoint or key is one line now.
    boto3 is imported only by commands given a --store."""
    from .bucket import Bucket, BucketLocation
    from .shared_admin import SharedAdmin

    bucket = Bucket.connect(BucketLocation.parse(settings.store), path_style=settings.s3_path_style)
    bucket.check()
    return SharedAdmin(bucket, f"ollama-mirror {command} on {socket.gethostname()} (pid {os.getpid()})")


def _resolve_shared(admin: SharedAdmin, inventory: Inventory, text: str, settings: Settings) -> SharedModel:
    found = _lookup(text, settings.default_host, inventory.get, inventory.hosts, admin.where)
    if found is None:
        raise ValueError(f"{text} is not in {admin.where}: `ollama-mirror ls --store {admin.where}` lists the "
                         f"names it has")
    return found


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def cmd_pin(settings: Settings, args: argparse.Namespace, cache: Cache, pinned: bool = True) -> None:
    """Pins live in the metadata database, which a running server's eviction reads on every run;
    with --store, in the bucket (``pins/``), which ``gc --store`` honours."""
    if settings.store:
        admin = _shared(settings, "pin" if pinned else "unpin")
        inventory = admin.inventory()
        for text in args.models:
            admin.set_pinned(_resolve_shared(admin, inventory, text, settings), pinned)
            _tell(f"{'pinned' if pinned else 'unpinned'} {text} in {admin.where}")
        return
    layout = cache.writable()
    meta = Metadata(layout.meta)
    try:
        for text in args.models:
            model = _resolve(layout, text)
            meta.set_pinned(model.host, model.name, model.tag, pinned)
            _tell(f"{'pinned' if pinned else 'unpinned'} {text}")
    finally:
        meta.close()


def cmd_verify(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """With --store, the bucket's blobs, streamed from it (the local cache is verified without)."""
    if settings.store:
        admin = _shared(settings, "verify")
        inventory = admin.inventory()
        bar = Progress(f"verify {admin.where}", inventory.usage)
        found = {str(digest): (moved, [str(m) for m in users])
                 for digest, (moved, users) in admin.verify(inventory, bar.advance).items()}
    else:
        layout = cache.writable()  # a bad blob is moved aside
        bar = Progress("verify", sum(p.stat().st_size for p in layout.blobs.glob("sha256-*")))
        found = {digest: (str(layout.state / "quarantine"), users)
                 for digest, users in seeding.verify_store(layout, bar.advance).items()}
    bar.finish("bad blobs found" if found else "all blobs verified")
    for digest, (moved, users) in found.items():
        _tell(f"bad {digest}: moved to {moved}; breaks {', '.join(users) or 'no model'}")
    if found:
        sys.exit(1)


def cmd_freeze(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    """Lock files name models in full (``host/ns/model:tag``): ``serve --lock`` reads them whatever
    its default registry, and ``freeze MODEL`` finds them as the other commands do."""
    layout = cache.existing()
    chosen = [_resolve(layout, text) for text in args.models] if args.models else models.list_models(layout)
    lock = {f"{m.host}/{m.name}:{m.tag}": str(m.digest) for m in chosen}
    print(json.dumps({"lockfileVersion": 1, "models": lock}, indent=1))


def cmd_gc(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    if settings.store:
        _gc_shared(settings, args, cache.sources)
        return
    store = BlobStore(cache.existing() if args.dry_run else cache.writable())
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
        _tell(f"store {human(chosen.usage)}{limit}: {'would free' if args.dry_run else 'freed'} "
              f"{human(done.freed)} ({len(done.models)} models, {len(done.blobs)} blobs)")
    finally:
        meta.close()


def _gc_shared(settings: Settings, args: argparse.Namespace, sources: Mapping[str, str]) -> None:
    """The bucket alone (each replica's eviction keeps its own cache); one gc at a time, under its lock."""
    admin = _shared(settings, "gc")
    high = _bucket_max_size(settings, sources)
    low = int(high * settings.low_watermark) if high is not None else None
    if args.dry_run:
        done = admin.plan_gc(high, low)
    else:
        with admin.gc_lock():
            done = admin.collect(admin.plan_gc(high, low))
    would = "would " if args.dry_run else ""
    for model in done.models:
        print(f"{would}evict {model.display_name}  {human(model.size)}")
    evicted = {digest for model in done.models for digest in model.manifest.sizes}
    for digest, size in sorted(done.blobs.items(), key=lambda item: item[0].hex):
        if digest not in evicted:
            print(f"{would}remove unused blob {digest.short}  {human(size)}")
    for upload, size in done.uploads:
        blob = admin.bucket.keys.blob_digest(upload.key)
        print(f"{would}abort the unfinished upload of {blob.short if blob else upload.key} started "
              f"{_clock(upload.started)}  {human(size)}")
    for lease in done.leases:
        print(f"{would}remove the expired lease of blob {lease.digest.short} (replica {lease.owner or 'unknown'}, "
              f"expired {_clock(lease.expires)})")
    for digest in done.markers:
        print(f"{would}remove the stale take-over marker of blob {digest.short}")
    for digest, lease in done.leased.items():
        print(f"keep unused blob {digest.short}: replica {lease.owner} is filling it")
    if done.young:
        print(f"keep {len(done.young)} unused blobs uploaded in the last {admin.grace / 60:.0f} minutes "
              f"({human(sum(done.young.values()))}): a replica or import may not have written their manifest yet")
    limit = f", low watermark {human(done.low)}" if high is not None else ""
    _tell(f"bucket {admin.where} {human(done.usage)}{limit}: {'would free' if args.dry_run else 'freed'} "
          f"{human(done.freed)} ({len(done.models)} models, {len(done.blobs)} blobs, {len(done.uploads)} uploads, "
          f"{len(done.leases)} leases)")


def _bucket_max_size(settings: Settings, sources: Mapping[str, str]) -> int | None:
    """Only a --max-size given to gc itself sizes the bucket: a configured max_size is each
    replica's own cache's, which would evict a large bucket to a small disk's size."""
    if sources.get("max_size") != "command line":
        if settings.max_size:
            _tell(f"note: {named('max_size', sources)} ({settings.max_size}) is the size of each replica's cache, "
                  f"not of the bucket: give gc --max-size SIZE to evict from the bucket")
        return None
    if settings.max_size.strip().endswith("%"):
        raise ValueError(f"--max-size {settings.max_size} is a share of a disk, and a bucket has none: give a "
                         f"size, such as 500G")
    return settings.max_bytes()


SERVICE_CACHE = Path("/var/cache/ollama-mirror")  # the systemd unit's


def cmd_ca(settings: Settings, args: argparse.Namespace, cache: Cache) -> None:
    if args.action == "init":
        ca = CertificateAuthority(cache.writable(create=True).state / "ca")
        created = ca.init()
        _tell(f"{'created' if created else 'already there, kept'}: {ca.cert_path} (key {ca.key_path}, mode 0600)")
        return
    ca = CertificateAuthority(cache.layout.state / "ca")
    if not ca.exists:
        service = f" (the service's: --cache-dir {SERVICE_CACHE})" if cache.root != SERVICE_CACHE else ""
        raise CacheProblem(f"there is no CA in the cache at {cache.root} ({cache.where}): name the cache of the "
                           f"mirror that serves transparent mode with --cache-dir{service}; `ollama-mirror ca "
                           f"init` would make a new CA, which every client must then trust")
    sys.stdout.buffer.write(ca.certificate_pem())
    sys.stdout.flush()
    _tell(_trust_instructions(settings))


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


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace, Cache], None]] = {
    "pull": cmd_pull, "import": cmd_import, "export": cmd_export, "ls": cmd_ls, "rm": cmd_rm,
    "pin": cmd_pin, "unpin": lambda s, a, c: cmd_pin(s, a, c, pinned=False), "verify": cmd_verify,
    "freeze": cmd_freeze, "ca": cmd_ca, "gc": cmd_gc,
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


def serve(settings: Settings, cache: Cache) -> None:
    """Check what a person can get wrong first, each in one line, then bind (so the log names the
    real port: ``--listen 127.0.0.1:0`` in tests), then serve."""
    try:
        layout = cache.writable(create=True)
    except CacheProblem as exc:
        sys.exit(f"ollama-mirror: {exc}")
    _check_min_free(settings, cache.sources, layout)
    if settings.keys_file is not None:
        try:
            load_keys(settings.keys_file)
        except (OSError, ValueError) as exc:
            sys.exit(f"ollama-mirror: {named('keys_file', cache.sources)}: {exc}")
    if settings.store:
        try:
            _check_bucket(settings)
        except (MirrorError, ValueError) as exc:
            sys.exit(f"ollama-mirror: {named('store', cache.sources)} {settings.store}: {exc}")
    try:
        server = build_server(settings)
    except ListenError as exc:
        sys.exit(f"ollama-mirror: {_listen_problem(exc, cache.sources)}")
    _fewer_malloc_arenas()
    log.info("listening url=%s", server.url)
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again with the handlers
    # it found: these make that a clean exit (code 0 for TERM), so queued log lines are written.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    server.run()  # uvloop when installed (uvicorn[standard]): a faster event loop


def _check_bucket(settings: Settings) -> None:
    """The shared bucket: there, ours to use, and able to hold a lease (each failure in one line)."""
    from .replicas import Replicas  # boto3 is loaded only by replicas on a bucket

    Replicas(settings).start()


def _check_min_free(settings: Settings, sources: Mapping[str, str], layout: Layout) -> None:
    """A --min-free the disk can never satisfy would refuse every fill: refuse it now instead."""
    disk = shutil.disk_usage(layout.root)
    if settings.min_free_bytes >= disk.total:
        sys.exit(f"ollama-mirror: {named('min_free', sources)} {settings.min_free} is more than the whole disk of "
                 f"the cache ({human(disk.total)} at {layout.root}), so every fill would be refused: give a smaller "
                 f"one, such as {human(disk.total // 10)}")
    if settings.min_free_bytes >= disk.free:
        log.warning("disk low free=%s min_free=%s cache=%s: fills are refused (507) until space is freed "
                    "(ollama-mirror gc --max-size SIZE) or --min-free is lowered", human(disk.free),
                    settings.min_free, layout.root)


def _listen_problem(exc: ListenError, sources: Mapping[str, str]) -> str:
    """Port in use, or a privileged port: the cause and the fix, naming the setting as it was given."""
    key = exc.flag.replace("-", "_")
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    port = exc.address.rpartition(":")[2]
    if cause.errno == errno.EADDRINUSE:
        fix = (f"another process listens there (is a mirror already running? `ss -ltnp 'sport = :{port}'` "
               f"names it): stop it, or choose another address with {flag_name(key)}")
    elif cause.errno == errno.EACCES:
        fix = ("ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit grants it): choose a port "
               f"above 1023 with {flag_name(key)}, or run it as the service")
    elif cause.errno == errno.EADDRNOTAVAIL:
        fix = f"no interface of this machine has that address: choose one it has with {flag_name(key)}"
    else:
        fix = f"choose another address with {flag_name(key)}"
    return f"cannot listen on {exc.address} ({named(key, sources)}): {cause.strerror or cause}; {fix}"
