"""How a user names a model, across the commands and a tier of mirrors: as they type it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mirror.names import ModelRef, Name, typed_name

from .conftest import MirrorFactory
from .fakes import Blob, FakeRegistry, write_blob


def cli(*args: str, cache: Path, upstream: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command with the default registry unless ``upstream`` is given, and no machine settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
    env["OLLAMA_MIRROR_CONFIG"] = os.devnull
    more = ["--upstream", upstream] if upstream else []
    return subprocess.run([sys.executable, "-m", "mirror", *args, "--cache-dir", str(cache), *more],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def tiny(registry: FakeRegistry) -> tuple[bytes, Blob]:
    weights = write_blob(registry.directory, 300_000, seed=91)
    return registry.add_model("library/tiny", "1b", [weights]), weights


def _host(registry: FakeRegistry) -> str:
    return registry.url.removeprefix("http://")


@pytest.mark.parametrize("host,name,tag,typed", [
    ("registry.ollama.ai", "library/qwen2.5", "7b", "qwen2.5:7b"),
    ("registry.ollama.ai", "team/model", "v1", "team/model:v1"),
    ("127.0.0.1:5000", "library/tiny", "1b", "127.0.0.1:5000/library/tiny:1b"),
])
def test_typed_name_parses_back_to_the_same_model(host: str, name: str, tag: str, typed: str) -> None:
    assert typed_name(host, Name.parse(name), tag, "registry.ollama.ai") == typed
    ref = ModelRef.parse(typed)
    assert ((ref.host or "registry.ollama.ai"), str(ref.name), ref.tag) == (host, name, tag)
    assert ModelRef.parse("Registry.Ollama.AI/library/x").host == "registry.ollama.ai"  # as Ollama's paths


def test_commands_find_a_model_stored_under_the_one_other_host(registry: FakeRegistry, tiny: tuple[bytes, Blob],
                                                               tmp_path: Path) -> None:
    """A cache filled through `--upstream URL`, used with default settings: `export tiny:1b` said
    "not in the cache"; now the one host that has it is used, and said."""
    cache, usb = tmp_path / "cache", tmp_path / "usb"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    full = f"{_host(registry)}/library/tiny:1b"
    used = (f"tiny:1b: using {full} (the cache has it under {_host(registry)}, not under the default registry "
            f"registry.ollama.ai)")

    listed = json.loads(cli("ls", "--json", cache=cache).stdout)
    assert [row["name"] for row in listed] == [full]  # another host than the default: named in full
    assert [row["name"] for row in json.loads(cli("ls", "--json", cache=cache, upstream=registry.url).stdout)] \
        == ["tiny:1b"]
    result = cli("export", "tiny:1b", "--to", str(usb), cache=cache)
    assert result.returncode == 0 and used in result.stderr.splitlines()
    assert (usb / "manifests" / _host(registry) / "library" / "tiny" / "1b").is_file()
    result = cli("freeze", "tiny:1b", cache=cache)
    assert list(json.loads(result.stdout)["models"]) == [full]  # lock files name models in full
    assert used in result.stderr.splitlines()
    result = cli("pin", "tiny:1b", cache=cache)
    assert result.returncode == 0 and result.stderr.splitlines() == [used, "pinned tiny:1b"]
    assert json.loads(cli("ls", "--json", cache=cache).stdout)[0]["pinned"]
    assert cli("rm", full, cache=cache).returncode == 0  # the full name, as stored
    result = cli("rm", "tiny:1b", cache=cache)
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror rm: tiny:1b is not in the cache at {cache}: `ollama-mirror ls` lists "
                             f"the names it has\n")


def test_a_name_two_hosts_have_asks_for_the_full_name(registry: FakeRegistry, tiny: tuple[bytes, Blob],
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    other = cache / "manifests" / "other.example" / "library" / "tiny"
    other.mkdir(parents=True)
    (other / "1b").write_bytes(tiny[0])
    result = cli("export", "tiny:1b", "--to", str(tmp_path / "usb"), cache=cache)
    assert result.returncode == 1
    assert result.stderr == (f"ollama-mirror export: tiny:1b is not under the default registry registry.ollama.ai, "
                             f"and 2 hosts in the cache have it: name one in full ({_host(registry)}/library/tiny:1b, "
                             f"other.example/library/tiny:1b)\n")


def test_import_says_which_models_came_under_another_host(registry: FakeRegistry, tiny: tuple[bytes, Blob],
                                                          tmp_path: Path) -> None:
    cache, usb, island = tmp_path / "cache", tmp_path / "usb", tmp_path / "island"
    assert cli("pull", "tiny:1b", cache=cache, upstream=registry.url).returncode == 0
    assert cli("export", "--all", "--to", str(usb), cache=cache).returncode == 0
    result = cli("import", str(usb), cache=island)
    assert result.returncode == 0
    assert result.stderr.splitlines().count(
        f"note: 1 model(s) came in under {_host(registry)}, not under the default registry registry.ollama.ai: "
        f"commands name them in full ({_host(registry)}/...), and `serve` answers them in named mode with "
        f"--upstream http://{_host(registry)} (add --offline where it cannot be reached)") == 1  # log lines may come later


def test_a_mirror_of_a_mirror_keeps_the_registrys_names_through_export_to_an_island(
    registry: FakeRegistry, tiny: tuple[bytes, Blob], start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    """registry -> regional mirror -> site mirror (--upstream <regional>) -> export -> island with
    default settings. The site stored `regional:port/library/...`, which the island never served."""
    manifest, weights = tiny
    regional = start_mirror(registries=f"registry.ollama.ai={registry.url}", cache_dir=tmp_path / "regional")
    v2 = httpx.get(f"{regional.url()}/v2/")
    assert v2.status_code == 200 and v2.headers["ollama-mirror-registry"] == "registry.ollama.ai"

    site = start_mirror(upstream=regional.url(), cache_dir=tmp_path / "site")
    assert httpx.get(f"{site.url()}/v2/library/tiny/manifests/1b").content == manifest
    assert httpx.get(f"{site.url()}/v2/library/tiny/blobs/{weights.digest}").content == weights.path.read_bytes()
    pulled = httpx.post(f"{site.url()}/api/pull", json={"model": "tiny:1b", "stream": False}, timeout=60)
    assert pulled.status_code == 200, pulled.text  # the whole model: the config blob too
    assert (tmp_path / "site" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b").read_bytes() == manifest
    assert not (tmp_path / "site" / "manifests" / regional.url().removeprefix("http://")).exists()

    usb, island = tmp_path / "usb", tmp_path / "island"
    assert [row["name"] for row in json.loads(cli("ls", "--json", cache=tmp_path / "site").stdout)] == ["tiny:1b"]
    result = cli("export", "tiny:1b", "--to", str(usb), cache=tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert cli("import", str(usb), cache=island).returncode == 0
    offline = start_mirror(upstream="https://registry.ollama.ai", offline=True, cache_dir=island)
    r = httpx.get(f"{offline.url()}/v2/library/tiny/manifests/1b")
    assert r.status_code == 200 and r.content == manifest
