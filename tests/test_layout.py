"""The package tree reads as the data path: the serving stages never reach into the
development tools or the command line, and flow/ holds pure policies only (numbers in,
decisions out; the code that reads offsets from a broker lives elsewhere)."""

from __future__ import annotations

import ast
from pathlib import Path

import streamproc

PACKAGE = Path(streamproc.__file__).parent
SERVING = ("ingest", "admission", "engine", "publish", "flow", "worker", "client", "metrics")
PURE_ALLOWED = {"__future__", "math", "dataclasses", "typing", "collections",
                "collections.abc", "itertools", "aiokafka.structs"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_the_serving_stages_never_import_the_development_tools_or_the_cli() -> None:
    offenders = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for stage in SERVING for path in (PACKAGE / stage).rglob("*.py")
        for name in imports(path)
        if name.split(".")[:2] in (["streamproc", "devtools"], ["streamproc", "cli"])
    }
    assert not offenders


def test_flow_holds_pure_policies_only() -> None:
    modules = sorted((PACKAGE / "flow").glob("*.py"))
    assert len(modules) >= 6  # the policies are there, not moved away unnoticed
    offenders = {
        f"{path.name}: {name}" for path in modules for name in imports(path)
        if name not in PURE_ALLOWED and not name.startswith("streamproc.flow")
    }
    assert not offenders
