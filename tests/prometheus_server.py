"""A real Prometheus server for tests: Debian's package, unpacked without root.

``prometheus`` and ``promtool`` are used from PATH when installed; otherwise
``apt-get download prometheus`` fetches the package and ``dpkg -x`` unpacks it
into the streamproc cache, once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from streamproc.wheels import cache_dir


def prometheus_binaries() -> tuple[Path, Path]:
    found = shutil.which("prometheus"), shutil.which("promtool")
    if found[0] and found[1]:
        return Path(found[0]), Path(found[1])
    root = cache_dir() / "prometheus"
    binaries = root / "usr" / "bin" / "prometheus", root / "usr" / "bin" / "promtool"
    if not binaries[0].exists():
        _unpack_debian_package(root)
    return binaries


def _unpack_debian_package(root: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise RuntimeError("Prometheus tests need `prometheus` on PATH, or apt-get and dpkg "
                           "to fetch Debian's package")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, check=True,
                       capture_output=True)
        [deb] = Path(tmp).glob("prometheus_*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)


class PrometheusServer:
    def __init__(self, binary: Path, workdir: Path, port: int, target: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: streamproc\n    static_configs: [{{targets: ['{target}']}}]\n")
        self._log = (workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns series: scraping is periodic by nature."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except OSError:
                result = []
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no series for {promql} after {timeout_s}s")

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)
        self._log.close()
