"""What a person meets when something is wrong, as the exact line the command prints: a cache
that cannot be written or is not there, a full disk, a port in use, a bad setting, a typo."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``ollama-mirror ARGS`` as a user runs it, with no config file or variables of this machine."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
    clean["OLLAMA_MIRROR_CONFIG"] = os.devnull  # never /etc/ollama-mirror/config.toml of the machine
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})})


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# -- serve: each failure in one line, before it listens -----------------------------------------


def test_serve_on_a_read_only_cache_says_so_in_one_line(small_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run("serve", "--cache-dir", str(small_disk / "cache"), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror: cannot write to the cache at {small_disk / 'cache'}: it is on a "
                             f"read-only file system; give --cache-dir a directory on a writable disk\n")


def test_serve_on_a_full_disk_says_so_in_one_line(small_disk: Path) -> None:
    cache = small_disk / "cache"
    (cache / ".mirror" / "staging").mkdir(parents=True)
    with open(small_disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    result = run("serve", "--cache-dir", str(cache), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror: the disk of the cache at {cache} is full: free space on it "
                             f"(`ollama-mirror gc --max-size SIZE` evicts models), or give --cache-dir a directory "
                             f"on another disk\n")


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--cache-dir", str(tmp_path / "cache"), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert last_line(result) == (
        f"ollama-mirror: cannot listen on 127.0.0.1:{port} (--listen): Address already in use; another process "
        f"listens there (is a mirror already running? `ss -ltnp 'sport = :{port}'` names it): stop it, or choose "
        f"another address with --listen")
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_min_free_larger_than_the_disk(small_disk: Path) -> None:
    result = run("serve", "--cache-dir", str(small_disk / "cache"), "--listen", "127.0.0.1:0", "--min-free", "2T")
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror: --min-free 2T is more than the whole disk of the cache (12.6 MB at "
                             f"{small_disk / 'cache'}), so every fill would be refused: give a smaller one, such "
                             f"as 1.3 MB\n")


# -- settings: named as the user gave them --------------------------------------------------------


def test_a_negative_size_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    result = run("serve", "--max-size", "-5G", "--cache-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == ("ollama-mirror: --max-size: '-5G' is a size below zero: give a number with K, M, G or "
                             "T, such as 500G, or a share of the disk such as 80%\n")


def test_a_bad_setting_names_the_variable_or_the_key_and_file(tmp_path: Path) -> None:
    result = run("serve", env={"OLLAMA_MIRROR_MIN_FREE": "lots"})
    assert result.stderr == ("ollama-mirror: OLLAMA_MIRROR_MIN_FREE: 'lots' is not a size: give a number with K, "
                             "M, G or T, such as 500G\n")
    config = tmp_path / "config.toml"
    config.write_text('listen = "nowhere"\n')
    result = run("serve", "--config", str(config))
    assert result.stderr == (f"ollama-mirror: listen (in {config}): 'nowhere' is not HOST:PORT: give one such as "
                             f"0.0.0.0:11435\n")
    result = run("ls", env={"OLLAMA_MIRROR_CACHEDIR": str(tmp_path)})
    assert result.stderr == ("ollama-mirror: OLLAMA_MIRROR_CACHEDIR: unknown setting (environment): did you mean "
                             "OLLAMA_MIRROR_CACHE_DIR?\n")


@pytest.mark.parametrize("args,line", [
    pytest.param(["serve", "--max-sise", "5G"], "ollama-mirror serve: unknown option --max-sise: did you mean "
                 "--max-size? (`ollama-mirror serve --help` lists what it takes)", id="flag"),
    pytest.param(["exprot", "--all"], "ollama-mirror: unknown command 'exprot': did you mean export? "
                 "(`ollama-mirror --help` lists them)", id="command"),
    pytest.param(["serve", "--log-level", "warn"], "ollama-mirror serve: --log-level: 'warn' is not one of debug, "
                 "info, warning, error: did you mean warning?", id="choice"),
    pytest.param([], "ollama-mirror: name a command: serve, pull, import, export, ls, rm, pin, unpin, verify, "
                 "freeze, gc, config, ca (`ollama-mirror --help` says what each does)", id="none"),
])
def test_a_typo_gets_one_line_with_the_close_match(args: list[str], line: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr == line + "\n"


def test_help_names_each_flags_variable_and_each_command_says_what_it_does() -> None:
    text = " ".join(run("serve", "--help").stdout.split()).split("options:", 1)[1]  # argparse wraps lines
    for flag, variable in (("--max-size", "OLLAMA_MIRROR_MAX_SIZE"), ("--cache-dir", "OLLAMA_MIRROR_CACHE_DIR"),
                           ("--token", "OLLAMA_MIRROR_TOKENS"), ("--registry", "OLLAMA_MIRROR_REGISTRIES"),
                           ("--log-level", "OLLAMA_MIRROR_LOG_LEVEL"), ("--log-format", "OLLAMA_MIRROR_LOG_FORMAT")):
        named = re.search(rf" {flag} \S+ .*?\[env (\w+)\]", text)
        assert named and named[1] == variable, f"{flag} does not name {variable}"
    assert "how much to log" in text and "one JSON object per line" in text
    pin, unpin = (" ".join(run(verb, "--help").stdout.split()) for verb in ("pin", "unpin"))
    assert "never removed to free space" in pin and "remove models again" in unpin


# -- the cache: never created by reading, written only by its owner ---------------------------------


@pytest.mark.parametrize("args", [["ls"], ["freeze"], ["verify"], ["export", "--all", "--to", "out"],
                                  ["rm", "x"], ["pin", "x"], ["gc"]])
def test_a_mistyped_cache_dir_is_said_and_not_created(args: list[str], tmp_path: Path) -> None:
    typo = tmp_path / "cahce"
    result = run(*args, "--cache-dir", str(typo))
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror {args[0]}: there is no cache at {typo} (from --cache-dir): name the "
                             f"mirror's cache with --cache-dir, or fill one with `ollama-mirror pull` or `import`\n")
    assert not typo.exists()


def test_ca_export_without_a_cache_dir_says_where_it_looked(tmp_path: Path) -> None:
    result = run("ca", "export", env={"HOME": str(tmp_path)})
    cache = tmp_path / ".cache" / "ollama-mirror"
    user = "root" if os.geteuid() == 0 else str(os.geteuid())
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror ca: there is no CA in the cache at {cache} (the default for {user}; "
                             f"--cache-dir was not given): name the cache of the mirror that serves transparent mode "
                             f"with --cache-dir (the service's: --cache-dir /var/cache/ollama-mirror); `ollama-mirror "
                             f"ca init` would make a new CA, which every client must then trust\n")
    assert not cache.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the cache to another user needs root")
def test_writing_a_cache_another_user_owns_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert run("ca", "init", "--cache-dir", str(cache)).returncode == 0
    for path in [cache, *cache.rglob("*")]:
        os.chown(path, 4242, 4242)  # as the service's user owns its cache
    result = run("import", "/media/usb/models", "--cache-dir", str(cache))
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror import: the cache at {cache} belongs to 4242, not to root: files root "
                             f"wrote there would be root's, which the mirror running as 4242 could not change; run "
                             f"the command as its owner: sudo -u '#4242' ollama-mirror import /media/usb/models "
                             f"--cache-dir {cache}\n")
    assert not [p for p in cache.rglob("*") if p.stat().st_uid != 4242]
    listed = run("ls", "--cache-dir", str(cache))  # reading is fine
    assert listed.returncode == 0, listed.stderr
