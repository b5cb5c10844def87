"""The real Ollama 0.9.3 server and CLI (from PyPI's bigdl-core-cpp), driven from tests.

``scripts/test`` installs it into ``.venv-ollama``; ``OLLAMA_REAL_VENV`` points
elsewhere. Each ``OllamaServer`` is one simulated machine: its own port, HOME
and models folder, all on loopback.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def find_venv() -> Path | None:
    for candidate in (os.environ.get("OLLAMA_REAL_VENV"), ROOT / ".venv-ollama"):
        if candidate and _binary(Path(candidate)) is not None:
            return Path(candidate)
    return None


def _binary(venv: Path) -> Path | None:
    found = glob.glob(str(venv / "lib/python3*/site-packages/bigdl/cpp/libs/ollama/ollama-lib"))
    return Path(found[0]) if found else None


def require_venv() -> Path:
    venv = find_venv()
    if venv is None:
        message = "the real Ollama client is not installed (scripts/test installs it into .venv-ollama)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OllamaServer:
    def __init__(self, venv: Path, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.venv = venv
        self.binary = _binary(venv)
        self.home = home
        self.models = home / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LD_LIBRARY_PATH": str(venv / "lib"),
            "OLLAMA_HOST": self.host,
            "OLLAMA_MODELS": str(self.models),
            "OLLAMA_NOPRUNE": "1",
            **(extra_env or {}),
        }
        self.log = home / "ollama.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OllamaServer:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(self.binary), "serve"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.host}/api/version", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ollama serve did not start:\n{self.log.read_text()[-3000:]}")

    def cli(self, *args: str, timeout: float = 600, host: str | None = None) -> subprocess.CompletedProcess[str]:
        """The ``ollama`` CLI, talking to this server or to ``host`` (e.g. the mirror)."""
        env = {**self.env, "OLLAMA_HOST": host} if host else self.env
        return subprocess.run([str(self.binary), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def pull(self, name: str, timeout: float = 600, insecure: bool = True) -> subprocess.CompletedProcess[str]:
        """``ollama pull``; ``insecure`` (plain http) for a mirror named by address, off for stock names."""
        return self.cli("pull", *(["--insecure"] if insecure else []), name, timeout=timeout)

    def list_models(self, host: str | None = None) -> dict[str, str]:
        """``ollama list`` as {name: short id}."""
        result = self.cli("list", timeout=60, host=host)
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()[1:] if line.strip()]
        return {row[0]: row[1] for row in rows}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
