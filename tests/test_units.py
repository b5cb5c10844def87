"""Pure parts: names, digests, Range headers, the chunk map's choices."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.chunks import SPLIT_MIN, ChunkMap
from mirror.errors import DigestInvalid, NameInvalid, RangeInvalid, RangeNotSatisfiable
from mirror.layout import registry_host
from mirror.names import Digest, Name, parse_tag
from mirror.ranges import Span, parse_range

HEX = "a" * 64


def test_name_bare_model_means_library() -> None:
    assert Name.parse("qwen2.5") == Name("library", "qwen2.5")
    assert str(Name.parse("team/my-model_1.0")) == "team/my-model_1.0"


@pytest.mark.parametrize("text", [
    pytest.param("..", id="dotdot"),
    pytest.param("library/..", id="dotdot-model"),
    pytest.param("a/b/c", id="three-parts"),
    pytest.param("/etc", id="absolute"),
    pytest.param("lib.rary/x", id="dot-in-namespace"),
    pytest.param("library/x\\y", id="backslash"),
    pytest.param("library/x\x00", id="nul"),
    pytest.param("library/.hidden", id="leading-dot"),
    pytest.param("library/" + "x" * 200, id="too-long"),
    pytest.param("", id="empty"),
    pytest.param("library/", id="empty-model"),
])
def test_name_rejects(text: str) -> None:
    with pytest.raises(NameInvalid):
        Name.parse(text)


@pytest.mark.parametrize("tag", ["..", ".x", "a/b", "a b", "", "x" * 81, "a..b"])
def test_tag_rejects(tag: str) -> None:
    with pytest.raises(NameInvalid):
        parse_tag(tag)


def test_digest_parse_and_forms() -> None:
    assert Digest.parse(f"sha256:{HEX}").hex == HEX
    assert Digest.parse(f"sha256-{HEX}") == Digest(HEX)
    assert Digest(HEX).short == "sha256:aaaaaaaaaaaa"


@pytest.mark.parametrize("text", [f"sha512:{HEX}", f"sha256:{HEX[:-1]}", f"sha256:{HEX.upper()}", "sha256:../x",
                                  HEX, ""])
def test_digest_rejects(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


@pytest.mark.parametrize("header,spans", [
    ("bytes=0-9", [Span(0, 10)]),
    ("bytes=90-", [Span(90, 100)]),
    ("bytes=-10", [Span(90, 100)]),
    ("bytes=95-200", [Span(95, 100)]),
    ("bytes=0-0,50-59", [Span(0, 1), Span(50, 60)]),
    ("bytes=200-300, 0-4", [Span(0, 5)]),
])
def test_parse_range(header: str, spans: list[Span]) -> None:
    assert parse_range(header, 100) == spans


@pytest.mark.parametrize("header", ["bytes=" + ",".join(["0-"] * 32), "bytes=0-60,40-99"])
def test_parse_range_ignores_ranges_adding_up_to_more_than_the_blob(header: str) -> None:
    """One request must not cost many blobs: such a header is ignored, and the whole blob sent once."""
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-160", "bytes=-0"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


@pytest.mark.parametrize("header", ["items=0-1", "bytes=a-b", "bytes=5-1", "bytes=-", "bytes", "bytes=1-2-3",
                                    "bytes=" + ",".join(["0-1"] * 40), "bytes=٣-٤"])
def test_parse_range_malformed(header: str) -> None:
    with pytest.raises(RangeInvalid):
        parse_range(header, 100)


def test_registry_host_as_ollama_writes_it() -> None:
    assert registry_host("https://registry.ollama.ai") == "registry.ollama.ai"
    assert registry_host("http://127.0.0.1:5000/") == "127.0.0.1:5000"
    assert registry_host("https://example.com:443") == "example.com"


def test_chunks_fresh_fill_is_a_sliding_window_from_the_start() -> None:
    m = ChunkMap.empty(64 << 20, 4 << 20)  # 16 chunks
    claimed = [m.claim(i, [], [], []) for i in range(8)]
    assert [c.start for c in claimed] == [i * (4 << 20) for i in range(8)]
    claimed[0].advance(4 << 20)
    m.release(0)
    assert m.claim(0, [], [], []).start == 8 * (4 << 20)  # the window moves on


def test_chunks_demand_first_and_split_mid_chunk() -> None:
    m = ChunkMap.empty(64 << 20, 16 << 20)
    first = m.claim("a", [], [], [])
    assert first.start == 0
    wanted = 40 << 20  # inside chunk 2, not at its start
    assert m.claim("b", [], [], [wanted - 1]).start == 48 << 20  # read-ahead: the chunk after a reader
    c = m.claim("b", [wanted], [wanted], [])  # a reader waiting too long cuts in
    assert c.start == wanted and m.available(wanted, 1) == 0
    assert m.chunk_at(wanted - 1).stop == wanted


def test_chunks_read_ahead_goes_to_the_reader_with_least_ahead_of_it() -> None:
    """Ollama reads a blob as parts at once: spare connections go to the part that is furthest
    behind, whatever order its reader came in, so the parts finish together."""
    m = ChunkMap.empty(256 << 20, 16 << 20)  # 16 chunks
    first, second = 0, 128 << 20  # two readers, each reading its own chunk
    for c in (m.chunk_at(first), m.chunk_at(second), m.chunks[1], m.chunks[2]):
        c.owner = "busy"  # the first reader has two chunks in flight ahead of it, the second none
    picks = [m.claim(f"w{i}", [], [], [first, second]).start for i in range(3)]
    assert picks == [(128 + 16) << 20, (128 + 32) << 20, 48 << 20]  # level with the first, then alternating
    m.chunks[3].owner = None
    m.chunks[3].advance(16 << 20)  # done: it counts as ahead of the first reader as chunks in flight do
    assert m.claim("w3", [], [], [first, second]).start == (128 + 48) << 20


def test_chunks_a_reader_can_cut_in_only_where_claim_would_cut() -> None:
    m = ChunkMap.empty(32 << 20, 16 << 20)
    m.chunks[0].owner = "busy"  # fetching from 0
    assert m.can_cut_in(8 << 20)  # well past the edge, with a piece worth a request after it
    assert not m.can_cut_in((16 << 20) - 1000)  # too close to the chunk's end: nothing to give it
    assert m.can_cut_in(20 << 20)  # an idle chunk
    m.chunks[0].advance(9 << 20)
    assert not m.can_cut_in(8 << 20)  # its bytes are there
    assert m.claim("w", [(16 << 20) - 1000], [], []).start == 16 << 20  # what claim does agrees


def test_chunks_available_follows_filled_bytes() -> None:
    m = ChunkMap.empty(10 << 20, 4 << 20)
    a, b = m.chunks[0], m.chunks[1]
    a.advance(4 << 20)
    b.advance(100)
    assert m.available(0, 1 << 30) == (4 << 20) + 100
    assert m.available(4 << 20, 1 << 30) == 100
    assert m.available((4 << 20) + 100, 1 << 30) == 0
    assert m.done_bytes == (4 << 20) + 100 and not m.complete


def test_chunks_steal_tail_and_state_round_trip() -> None:
    m = ChunkMap.empty(64 << 20, 64 << 20)
    only = m.claim("a", [], [], [])
    stolen = m.claim("b", [], [], [])
    assert stolen is not None and stolen.start == 32 << 20 and only.stop == 32 << 20
    only.advance(SPLIT_MIN)
    m.release("a")
    assert only.owner is None and only.filled == SPLIT_MIN
    restored = ChunkMap.from_state(64 << 20, m.to_state())
    assert restored is not None and restored.done_bytes == SPLIT_MIN
    assert ChunkMap.from_state(65 << 20, m.to_state()) is None
    assert ChunkMap.from_state(8 << 20, [[0, 10, 20]]) is None


def test_settings_from_environment_and_flags() -> None:
    from pathlib import Path

    from mirror.config import SettingsError, load_settings

    env = {"OLLAMA_MIRROR_LISTEN": "127.0.0.1:9000", "OLLAMA_MIRROR_OFFLINE": "yes",
           "OLLAMA_MIRROR_CACHE_DIR": "/tmp/c", "OLLAMA_MIRROR_CONNECTIONS": "4"}
    settings, sources = load_settings({"listen": "127.0.0.1:9001", "upstream": None}, env)
    assert sources["listen"] == "command line" and sources["offline"] == "environment"
    assert settings.listen_port == 9001  # a flag beats the environment
    assert settings.offline and settings.connections == 4 and settings.cache_dir == Path("/tmp/c")
    with pytest.raises(SettingsError, match="OLLAMA_MIRROR_CONNECTIONS"):
        load_settings({}, {"OLLAMA_MIRROR_CONNECTIONS": "many"})
    with pytest.raises(SettingsError, match="upstream"):
        load_settings({"upstream": "ftp://x"}, {})
    with pytest.raises(SettingsError, match="listen"):
        load_settings({"listen": "nowhere"}, {})
    with pytest.raises(SettingsError, match="OLLAMA_MIRROR_CONECTIONS: unknown"):
        load_settings({}, {"OLLAMA_MIRROR_CONECTIONS": "4"})


def test_settings_from_toml_with_env_and_flags_above_it(tmp_path) -> None:
    from mirror.config import SettingsError, load_settings, render

    config = tmp_path / "config.toml"
    config.write_text('''
listen = "0.0.0.0:80"
connections = 12
max-size = "500G"
allow_clients = ["10.0.0.0/8", "192.168.1.0/24"]
[registries]
"hf.co" = "https://hf.co"
''')
    settings, sources = load_settings({"connections": 6}, {"OLLAMA_MIRROR_MANIFEST_TTL": "60"}, config)
    assert settings.listen == "0.0.0.0:80" and sources["listen"] == str(config)
    assert settings.connections == 6 and sources["connections"] == "command line"
    assert settings.manifest_ttl == 60 and settings.max_bytes() == 500 << 30
    assert settings.registry_urls["hf.co"] == "https://hf.co"
    assert len(settings.client_networks) == 2
    shown = render(settings, sources)
    assert 'listen = "0.0.0.0:80"  # ' + str(config) in shown and "connections = 6  # command line" in shown
    assert "manifest_ttl = 60.0  # environment" in shown and 'log_format = "text"  # default' in shown
    # what `config` prints is itself a config file giving the same settings
    again = tmp_path / "again.toml"
    again.write_text("\n".join(line for line in shown.splitlines() if not line.startswith("#")))
    assert load_settings({}, {}, again)[0] == settings
    for text, key in (('conections = 4', "conections"), ('connections = "many"', "connections"),
                      ('max_size = "lots"', "max_size"), ('log_format = "xml"', "log_format"),
                      ('listen = ', "config")):
        config.write_text(text)
        with pytest.raises(SettingsError, match=key):
            load_settings({}, {}, config)


def test_log_lines_are_written_whole_in_order_as_they_were_at_logging_time() -> None:
    """The writer thread formats later: a mutable argument must still read as it was, and
    a burst of lines and a traceback all reach stderr by the time the process exits."""
    program = """
import logging
from mirror import logs
logs.configure("info")
log = logging.getLogger("mirror")
state = ["before"]
log.info("state=%s", state)
state[0] = "after"
for i in range(3000):
    log.info("line %d digest=%s", i, "abc")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it broke")
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    lines = result.stderr.splitlines()
    assert "state=['before']" in lines[0]
    assert [int(line.split("mirror: line ")[1].split()[0]) for line in lines if "mirror: line " in line] == list(range(3000))
    assert "it broke" in result.stderr and "ZeroDivisionError" in result.stderr


@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(0, 4000), st.integers(0, 50))
def test_pieces_written_at_an_offset_land_back_to_back(pieces: list[bytes], cap: int, offset: int) -> None:
    """What a fill worker writes: the pieces as they came, cut where a steal shortened its chunk."""
    import os
    import tempfile

    from mirror.download import _first_bytes
    from mirror.store import write_at

    expected = b"".join(pieces)[:cap]
    with tempfile.TemporaryFile() as f:
        write_at(f.fileno(), _first_bytes(pieces, cap), offset)
        assert os.pread(f.fileno(), 10_000, 0) == (b"\0" * offset + expected if expected else b"")


def test_settings_default_host_is_the_registry_the_upstream_is_named_for() -> None:
    """`--registry HOST=<the upstream URL>` (or a mirror upstream announcing HOST) names the tags
    named mode stores; without it, the upstream URL's own host does."""
    from mirror.config import Settings

    plain = Settings(upstream="http://regional.lan:11435")
    assert plain.default_host == "regional.lan:11435"
    tier = plain.mirroring("registry.ollama.ai")
    assert tier.default_host == "registry.ollama.ai"
    assert tier.registry_urls == {"registry.ollama.ai": "http://regional.lan:11435"}
    explicit = Settings(upstream="http://regional.lan:11435/", registries="registry.ollama.ai=http://regional.lan:11435")
    assert explicit.registry_urls == tier.registry_urls
