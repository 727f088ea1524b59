"""A wheel works anywhere: built from the source tree, installed into a fresh virtual
environment, and run from another directory, it has everything its commands need (the
topic declarations included) and serves a prompt end to end."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.model]
ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                  ".mypy_cache", ".pytest_cache", ".ruff_cache", "bench-*")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh environment with the wheel installed (and, through a
    path file, this environment's dependencies: torch is not fetched again)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=LEFT_OUT)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(base / "dist"), str(source)], check=True, timeout=300)
    [wheel] = (base / "dist").glob("streamproc-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "env")],
                   check=True, timeout=120)
    python = base / "env" / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True)
    # A plain path: the editable install's own .pth files there are not processed, so
    # streamproc resolves to the wheel's copy, and its dependencies to ours.
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return base / "env" / "bin"


async def run(bin_dir: Path, *args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(bin_dir / "streamproc"), *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_an_installed_wheel_applies_topics_and_serves_a_prompt_from_elsewhere(
        installed: Path, bootstrap: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # no topics/ here, no source tree above
    elsewhere.mkdir()
    code, where, err = await run(installed, "--help", cwd=elsewhere)
    assert code == 0, err
    assert "topics" in where

    code, out, err = await run(installed, "topics", "apply", "--bootstrap", bootstrap,
                               cwd=elsewhere)
    assert code == 0, err
    assert "streamproc.requests.default" in out + err

    worker = await asyncio.create_subprocess_exec(
        str(installed / "streamproc"), "worker", "--bootstrap", bootstrap, "--model",
        str(tiny_model_dir), "--device", "cpu", "--group", f"wheel-{uuid.uuid4().hex[:8]}",
        "--engine-thread", cwd=elsewhere, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        code, out, err = await run(installed, "submit", "--json", "--bootstrap", bootstrap,
                                   "--max-new-tokens", "4", "--timeout", "120",
                                   "served from a wheel", cwd=elsewhere)
        assert code == 0, err
        answer = json.loads(out)
        assert answer["finish_reason"] in ("length", "stop")
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_err = await asyncio.wait_for(worker.communicate(), 60)
    assert worker.returncode == 0, worker_err.decode()[-2000:]


def test_the_wheel_holds_every_declaration_and_schema(installed: Path) -> None:
    [wheel] = (installed.parent.parent / "dist").glob("streamproc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"streamproc/declarations/{p.relative_to(ROOT / 'topics')}"
                for p in (ROOT / "topics").rglob("*") if p.is_file()}
    assert expected
    assert expected <= names
    assert not [n for n in names if n.startswith(("tests/", "docs/"))]
    located = subprocess.run([str(installed / "python"), "-c",
                              "import streamproc; print(streamproc.__file__)"],
                             cwd=installed, capture_output=True, text=True, check=True)
    assert located.stdout.startswith(str(installed.parent)), located.stdout  # the wheel's copy
