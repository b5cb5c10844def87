"""The service unit and the container recipe: checked as far as this machine allows (no Docker engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "ollama-mirror.service").read_text()
    for directive in ("DynamicUser=yes", "CacheDirectory=ollama-mirror", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                      "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "Restart=on-failure",
                      "Environment=OLLAMA_MIRROR_LISTEN=0.0.0.0:80", "KillSignal=SIGTERM"):
        assert directive in unit, directive
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Verify the unit as installed: ExecStart pointing at this environment's console script.
    script = Path(sys.executable).parent / "ollama-mirror"
    copy = tmp_path / "ollama-mirror.service"
    copy.write_text(re.sub(r"ExecStart=\S+", f"ExecStart={script}", unit))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dockerfile_runs_unprivileged_with_a_cache_volume_and_healthcheck() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'VOLUME ["/var/cache/ollama-mirror"]' in text
    assert "OLLAMA_MIRROR_CACHE_DIR=/var/cache/ollama-mirror" in text
    assert re.search(r"HEALTHCHECK .*\n?.*CMD .*/v2/", text)
    assert 'ENTRYPOINT ["ollama-mirror"]' in text and 'CMD ["serve"]' in text
