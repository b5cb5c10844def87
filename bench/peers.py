"""The peers the mirror is measured against, each started on 127.0.0.1 and stopped by itself.

- nginx: serves the same blob files with sendfile (the limit for warm serving), and,
  rate-limited per connection, plays the far-away CDN for cold fills;
- aria2c -x8 and curl: what people download with instead;
- docker-registry (CNCF distribution 2.8) as a pull-through proxy: the generic cache.
All are Debian packages; ``ensure_tools`` installs the missing ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

TOOLS = {"nginx": "nginx-light", "aria2c": "aria2", "curl": "curl", "wrk": "wrk",
         "docker-registry": "docker-registry"}


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A scratch folder that nginx's workers may read (they run as another user when started as
    root), removed afterwards unless BENCH_KEEP is set."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    try:
        yield work
    finally:
        if os.environ.get("BENCH_KEEP") is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing the benchmark's peers: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass(frozen=True)
class Sent:
    """One response in nginx's access log: bytes sent (with headers), body bytes, the range asked,
    and the seconds it took."""

    sent: int
    body: int
    start: int
    stop: int | None  # None: to the end
    seconds: float


class Nginx:
    """Two servers: ``plain_url`` unthrottled, ``cdn_url`` limited per connection."""

    def __init__(self, work: Path, files: Path, rate_per_connection: int) -> None:
        self.dir = work / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plain_port, self.cdn_port = free_port(), free_port()
        self.access_log = self.dir / "access.log"
        temp = "".join(f"{kind}_temp_path {self.dir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  {temp}
  log_format bench '$bytes_sent $body_bytes_sent $http_range $request_time $request_uri';
  access_log {self.access_log} bench;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.plain_port};
    location /objects/ {{ alias {files}/; }}
  }}
  server {{
    listen 127.0.0.1:{self.cdn_port};
    location /objects/ {{ alias {files}/; limit_rate {rate_per_connection}; }}
  }}
}}
""")
        self.process = subprocess.Popen(["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
                                        stderr=subprocess.DEVNULL)
        wait_port(self.plain_port)
        wait_port(self.cdn_port)

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.plain_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://localhost:{self.cdn_port}"

    def bytes_sent(self, fragment: str) -> int:
        """Bytes nginx sent for requests whose URI contains ``fragment`` (from its access log)."""
        return sum(r.sent for r in self.requests(fragment))

    def requests(self, fragment: str) -> list[Sent]:
        """What nginx sent for each finished request whose URI contains ``fragment``, in order."""
        found = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                sent, body, asked, seconds, uri = line.split(" ", 4)
                if fragment in uri:
                    first, _, last = asked.removeprefix("bytes=").partition("-")
                    found.append(Sent(int(sent), int(body), int(first) if first.isdigit() else 0,
                                      int(last) + 1 if last.isdigit() else None, float(seconds)))
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class DockerRegistry:
    """CNCF distribution as a pull-through proxy of ``remote``; our own config, loopback only."""

    def __init__(self, work: Path, remote: str) -> None:
        self.dir = work / "docker-registry"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.dir / "config.yml").write_text(f"""version: 0.1
log: {{level: error}}
storage: {{filesystem: {{rootdirectory: {self.dir}/data}}}}
http:
  addr: 127.0.0.1:{self.port}
  headers: {{Location: ["#"]}}
proxy: {{remoteurl: "{remote}"}}
""")
        self.log = self.dir / "log"
        self.process = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def curl(url: str, *args: str, timeout: float = 600) -> dict[str, float]:
    """One curl download to /dev/null; its timings (seconds) and speed (bytes/s)."""
    fmt = "%{http_code} %{size_download} %{time_starttransfer} %{time_total} %{speed_download}"
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", fmt, *args, url], capture_output=True,
                         text=True, timeout=timeout, check=True).stdout.split()
    return {"status": float(out[0]), "bytes": float(out[1]), "ttfb": float(out[2]), "total": float(out[3]),
            "speed": float(out[4])}


def curl_ranges(url: str, size: int, parts: int) -> float:
    """``parts`` concurrent curl Range requests covering the blob; aggregate MB/s."""
    step = -(-size // parts)
    began = time.monotonic()
    procs = [subprocess.Popen(["curl", "-s", "-f", "-o", "/dev/null", "-r", f"{a}-{min(a + step, size) - 1}", url])
             for a in range(0, size, step)]
    codes = [p.wait(600) for p in procs]
    assert codes == [0] * len(procs), codes
    return size / (time.monotonic() - began) / 1e6


def cpu_seconds(pid: int) -> float:
    """User and system time the process used so far (all its threads)."""
    return _ticks(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")


def _ticks(stat: str) -> int:
    """User + system ticks, from the text of a /proc/<pid>/stat."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """Where the machine's CPU time went between ``start`` and ``stop``: seconds per program
    (processes grouped by name, threads included; a process that ended meanwhile is not
    counted), the cores busy on average, and the share of time the CPUs sat idle. A pull that
    left no idle time was waiting for the CPU, whatever else it waited for too."""

    def __init__(self, labels: dict[int, str] | None = None) -> None:
        self.labels = labels or {}  # pid -> the name to count it under (the mirror, among other pythons)

    def start(self) -> None:
        self._began, self._machine, self._procs = time.monotonic(), machine_ticks(), _process_ticks()

    def stop(self) -> dict[str, object]:
        wall = time.monotonic() - self._began
        tick = os.sysconf("SC_CLK_TCK")
        busy, idle = (b - a for a, b in zip(self._machine, machine_ticks()))
        by_name: dict[str, float] = {}
        for pid, (name, ticks) in _process_ticks().items():
            name = self.labels.get(pid, name)
            before = self._procs.get(pid)
            spent = ticks - before[1] if before else ticks  # a kernel worker's name changes with its work
            if spent:
                by_name[name] = by_name.get(name, 0.0) + spent / tick
        top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:6])
        return {"cores_busy": round(busy / tick / wall, 2), "idle_share": round(idle / max(busy + idle, 1), 3),
                "cpu_s": {name: round(s, 1) for name, s in top.items()}}


def machine_ticks() -> tuple[int, int]:
    """All CPUs' busy and idle ticks so far (/proc/stat; iowait counts as idle)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, idle


def _process_ticks() -> dict[int, tuple[str, int]]:
    """Each process's name and user + system ticks so far."""
    found: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        found[int(stat.parent.name)] = (text[text.index("(") + 1:text.rindex(")")], _ticks(text))
    return found


def served_bytes(base: str) -> float:
    """The mirror's ``ollama_mirror_served_bytes_total`` (all sources), from its /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("ollama_mirror_served_bytes_total"))


def aria2c(url: str, dest: Path, timeout: float = 600, connections: int = 8) -> float:
    """aria2c -x<connections> -s<connections> to ``dest``; the wall time in seconds."""
    began = time.monotonic()
    subprocess.run(["aria2c", "-q", f"-x{connections}", f"-s{connections}", "-k1M", "--allow-overwrite=true",
                    "--file-allocation=none", "-d", str(dest.parent), "-o", dest.name, url],
                   check=True, timeout=timeout)
    return time.monotonic() - began


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    """wrk with keep-alive: requests per second and p99 latency in ms."""
    # One load thread: on two cores, a second one takes the core the server needs and measures
    # the scheduler instead of the server.
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    p99 = out.split(" 99%")[1].split()[0]
    return {"rps": rps, "p99_ms": _ms(p99), "non_2xx": float("Non-2xx" in out)}


def _ms(text: str) -> float:
    for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)
