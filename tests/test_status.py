"""What an admin sees: /metrics, the status page (in a real headless browser), the admin listener, JSON logs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MirrorFactory
from .fakes import FakeRegistry, MirrorProcess, write_blob

CHROMIUM = "/usr/bin/chromium"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_cache_outcomes_and_bytes_saved(
    registry: FakeRegistry, mirror, tmp_path: Path
) -> None:
    layer = write_blob(registry.directory, 3_000_000, seed=81)
    registry.add_model("library/m", "1", [layer])
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        assert client.get("/v2/library/m/manifests/1").status_code == 200
        for _ in range(3):  # one fill, then two hits
            assert client.get(f"/v2/library/m/blobs/{layer.digest}").status_code == 200
        assert client.get("/v2/library/m/manifests/nope").status_code == 404
        text = client.get("/metrics").text
    got = _samples(text)
    assert got[("ollama_mirror_requests_total", (("method", "GET"), ("route", "blob"), ("status", "200")))] == 3
    assert got[("ollama_mirror_requests_total", (("method", "GET"), ("route", "manifest"), ("status", "404")))] == 1
    assert got[("ollama_mirror_cache_lookups_total", (("kind", "blob"), ("result", "fill")))] == 1
    assert got[("ollama_mirror_cache_lookups_total", (("kind", "blob"), ("result", "hit")))] == 2
    assert got[("ollama_mirror_cache_lookups_total", (("kind", "manifest"), ("result", "miss")))] == 1
    assert got[("ollama_mirror_served_bytes_total", (("source", "hit"),))] == 2 * layer.size
    assert got[("ollama_mirror_served_bytes_total", (("source", "fill"),))] == layer.size
    assert got[("ollama_mirror_upstream_bytes_total", ())] == layer.size  # served 3x, fetched once
    assert got[("ollama_mirror_fills_total", (("outcome", "done"),))] == 1
    assert got[("ollama_mirror_fill_seconds_count", ())] == 1
    assert got[("ollama_mirror_active_fills", ())] == 0
    assert got[("ollama_mirror_store_bytes", ())] >= layer.size
    assert got[("ollama_mirror_disk_free_bytes", ())] > 0
    assert got[("ollama_mirror_evicted_models_total", ())] == 0


def test_status_json_lists_models_totals_and_setup(registry: FakeRegistry, mirror) -> None:
    layer = write_blob(registry.directory, 1_000_000, seed=82)
    manifest = registry.add_model("library/shown", "7b", [layer])
    config = json.loads(manifest)["config"]
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        client.get("/v2/library/shown/manifests/7b")
        client.get(f"/v2/library/shown/blobs/{layer.digest}")
        client.get(f"/v2/library/shown/blobs/{layer.digest}")
        partial = client.get("/status.json").json()  # the config blob is not fetched yet: not complete
        client.get(f"/v2/library/shown/blobs/{config['digest']}")
        status = client.get("/status.json").json()
        assert client.get("/").text == "ollama-mirror is running"  # Ollama's probe and curl get text
        assert "<html" in client.get("/", headers={"Accept": "text/html"}).text
    assert partial["models"] == []
    assert partial["incomplete"] == [{"name": "shown:7b", "stored_as": f"{registry.url[7:]}/library/shown:7b",
                                      "size": layer.size + config["size"], "cached": layer.size, "filling": False}]
    assert partial["totals"]["hit_ratio"] == 0.5 and partial["totals"]["saved_bytes"] == layer.size
    [model] = status["models"]
    assert status["incomplete"] == []
    assert model["name"] == "shown:7b"  # as a client names it, not host:port/library/shown:7b
    assert model["id"] == hashlib.sha256(manifest).hexdigest()[:12]
    assert model["size"] == layer.size + config["size"]
    assert status["totals"]["store_bytes"] == layer.size + config["size"]
    named = next(mode for mode in status["setup"] if mode["mode"] == "named")
    assert named["lines"][0] == f"ollama pull --insecure 127.0.0.1:{mirror.port}/library/shown:7b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_status_json_setup_has_each_running_mode_with_a_cached_model(
    registry: FakeRegistry, start_mirror: MirrorFactory
) -> None:
    layer = write_blob(registry.directory, 1000, seed=84)
    config = json.loads(registry.add_model("library/tiny", "1b", [layer]))["config"]
    proxy = _free_port()
    mirror = start_mirror(upstream="https://registry.ollama.ai", registries=f"registry.ollama.ai={registry.url}",
                          proxy_listen=f"127.0.0.1:{proxy}", tls_listen=f"127.0.0.1:{_free_port()}")
    at = f"127.0.0.1:{mirror.port}"
    with httpx.Client(base_url=mirror.url(), timeout=30) as client:
        empty = {m["mode"]: m["lines"] for m in client.get("/status.json").json()["setup"]}
        client.get("/v2/library/tiny/manifests/1b")
        for digest in (layer.digest, config["digest"]):
            client.get(f"/v2/library/tiny/blobs/{digest}")
        modes = client.get("/status.json").json()["setup"]
        setup = {m["mode"]: m["lines"] for m in modes}
        covers = {m["mode"]: m["covers"] for m in modes}
        assert client.get("/ca.crt").status_code == 200  # the line that fetches it works
    # which of Ollama's download paths each mode serves: the proxy cannot see tensor models' blobs
    assert "GGUF models only" in covers["proxy"] and "DNS mode covers them" in covers["proxy"]
    assert all("both download paths" in covers[mode] for mode in ("named", "dns"))
    assert empty["named"] == ["# nothing is cached yet: put a model the upstream has in place of MODEL:TAG",
                              f"ollama pull --insecure {at}/library/MODEL:TAG",
                              (f"ollama cp {at}/library/MODEL:TAG MODEL:TAG   # optional: the usual name "
                               "(copies only the manifest)")]
    trust = f"curl -o ollama-mirror-ca.crt http://{at}/ca.crt   # then trust it as a system certificate"
    assert setup == {
        "named": [f"ollama pull --insecure {at}/library/tiny:1b",
                  f"ollama cp {at}/library/tiny:1b tiny:1b   # optional: the usual name (copies only the manifest)"],
        "ollama_host": [(f"OLLAMA_HOST={at} ollama pull tiny:1b   # fill the mirror (from the mirror's host or "
                         "--manage-clients)"), f"OLLAMA_HOST={at} ollama list   # what it holds"],
        "proxy": [trust, (f"HTTPS_PROXY=http://127.0.0.1:{proxy} ollama serve   # or: sudo systemctl edit ollama, "
                          "then restart it"), "ollama pull tiny:1b"],
        "dns": ["# in the LAN's DNS, point registry.ollama.ai at 127.0.0.1", trust, "ollama pull tiny:1b"],
    }


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it from Debian)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_status_page_in_a_real_browser_shows_a_fill_moving(
    registry: FakeRegistry, mirror, browser
) -> None:
    layer = write_blob(registry.directory, 12_000_000, seed=83)
    registry.add_model("library/slow", "1", [layer])
    registry.cdn.rate = 150_000  # bytes/s per connection: with 8 connections the fill lasts about 10 s
    page = browser.new_page()
    page.goto(mirror.url() + "/")
    page.wait_for_selector("#setup:has-text('ollama pull --insecure')")
    assert page.locator("#no-fills").is_visible()
    assert page.locator("#no-models").inner_text() == "Nothing cached yet: the first pull of a model fills it."
    upstream = page.locator(f"#health tr[data-registry='{registry.url.removeprefix('http://')}']")
    upstream.locator("td.state:has-text('reachable')").wait_for(timeout=10_000)  # the start-up probe
    assert upstream.locator("td.last-error").inner_text() == "none"

    done = threading.Event()

    def pull() -> None:
        with httpx.Client(base_url=mirror.url(), timeout=120) as client:
            manifest = client.get("/v2/library/slow/manifests/1").json()
            client.get(f"/v2/library/slow/blobs/{manifest['config']['digest']}")  # small: complete at once
            client.get(f"/v2/library/slow/blobs/{layer.digest}")
        done.set()

    threading.Thread(target=pull, daemon=True).start()
    row = page.locator(f"#fills tr[data-digest='{layer.digest}']")
    row.wait_for(timeout=15_000)
    assert row.locator("td").nth(5).inner_text() == "1"  # one client waiting on this fill
    # While its blob fills, the model is listed as not complete, never among the models.
    partial = page.locator("#incomplete tr[data-name='slow:1']")
    partial.wait_for(timeout=5_000)
    assert partial.locator("td").nth(3).inner_text() == "filling"
    assert page.locator("#models tr[data-name='slow:1']").count() == 0
    assert "filling)" in page.locator("#store").inner_text()  # the fill is not counted as stored
    seen = []  # the bar's values while the row is there: the page refreshes itself every second
    while not done.is_set():
        with contextlib.suppress(PlaywrightError):
            seen.append(float(row.locator("progress").get_attribute("value", timeout=500) or 0))
        time.sleep(0.3)
    assert len(set(seen)) >= 2 and seen == sorted(seen), seen  # it moved, forward only
    assert max(seen) > 0
    page.wait_for_selector("#no-fills", state="visible", timeout=10_000)
    page.wait_for_selector("#models tr[data-name='slow:1']", timeout=10_000)
    assert page.locator("#incomplete-section").is_hidden() and page.locator("#no-models").is_hidden()
    assert "ollama pull --insecure" in page.locator("pre[data-mode='named']").inner_text()
    assert "/library/slow:1" in page.locator("pre[data-mode='named']").inner_text()  # the model it holds
    assert page.locator("#error").inner_text() == ""


def test_status_page_in_a_real_browser_shows_an_unreachable_upstream(start_mirror: MirrorFactory, browser) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{sock.getsockname()[1]}"
    mirror = start_mirror(upstream=f"http://{host}")
    page = browser.new_page()
    page.goto(mirror.url() + "/")
    upstream = page.locator(f"#health tr[data-registry='{host}']")
    upstream.locator("td.state:has-text('unreachable')").wait_for(timeout=10_000)
    assert upstream.locator("td.reached").inner_text() == "never"
    assert upstream.locator("td.last-error").inner_text().startswith(
        f"the mirror cannot connect to {host}: connection refused; check that the registry is up")
    assert page.locator("pre[data-mode='named']").inner_text().startswith("# nothing is cached yet")


def test_admin_listener_holds_metrics_and_status(registry: FakeRegistry, tmp_path: Path) -> None:
    mirror = MirrorProcess(tmp_path / "cache", registry.url, "admin", "--admin-listen", "127.0.0.1:0",
                           "--log-format", "json")
    try:
        deadline = time.monotonic() + 20
        while "admin ready" not in mirror.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        admin = next(json.loads(line)["url"] for line in mirror.log.read_text().splitlines()
                     if "admin ready" in line)
        with httpx.Client(timeout=10) as client:
            assert client.get(mirror.url + "/metrics").status_code == 404
            assert client.get(mirror.url + "/status.json").status_code == 404
            assert client.get(mirror.url + "/", headers={"Accept": "text/html"}).text == "ollama-mirror is running"
            assert client.get(mirror.url + "/v2/").status_code == 200
            assert "ollama_mirror_requests_total" in client.get(admin + "/metrics").text
            assert "<html" in client.get(admin + "/", headers={"Accept": "text/html"}).text
            assert client.get(admin + "/v2/").status_code == 404  # not the registry
    finally:
        mirror.stop(signal.SIGTERM)
    lines = [json.loads(line) for line in mirror.log.read_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "mirror.access" and "/v2/ " in line["message"]]
    assert access and access[0]["status"] == 200 and access[0]["level"] == "info"


def test_config_command_prints_effective_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "mirror.toml"
    config.write_text('max_size = "80%"\nconnections = 4\n')
    shown = subprocess.run([sys.executable, "-m", "mirror", "config", "--config", str(config), "--connections", "6"],
                           capture_output=True, text=True, env={"OLLAMA_MIRROR_LOG_FORMAT": "json", "PATH": "/usr/bin"})
    assert shown.returncode == 0, shown.stderr
    assert f'max_size = "80%"  # {config}' in shown.stdout and "connections = 6  # command line" in shown.stdout
    assert 'log_format = "json"  # environment' in shown.stdout
    config.write_text("max_sise = 1\n")
    bad = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(config)], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "max_sise" in bad.stderr and "unknown setting" in bad.stderr
