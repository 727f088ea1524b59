"""``streamproc config``: every worker setting, from the config's own field docs.

``docs/configuration.md`` is this command's output (``make schema`` writes it; a test
fails when it differs), so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from dataclasses import MISSING, fields
from typing import Any

from streamproc import config
from streamproc.config import ENV_PREFIX, KafkaSecurity, WorkerConfig

_HEADER = """\
# Configuration

Every worker setting, generated from `streamproc/config.py` by `streamproc config`
(`make schema` rewrites this file; a test fails when it is stale). A setting is read from
its flag, else from `STREAMPROC_<NAME>` in the environment, else its default.

| setting | flag | environment | default | meaning |
|---|---|---|---|---|
"""

_SECURITY = """
## Security

Read from the environment only (secrets never go on a command line), by every command
that talks to Kafka; see [security.md](security.md).

| environment | default | meaning |
|---|---|---|
"""

_SECURITY_ENV = {
    "protocol": "SECURITY_PROTOCOL", "sasl_mechanism": "SASL_MECHANISM",
    "sasl_username": "SASL_USERNAME", "sasl_password": "SASL_PASSWORD",
    "ssl_cafile": "SSL_CAFILE", "ssl_certfile": "SSL_CERTFILE", "ssl_keyfile": "SSL_KEYFILE",
}
_SECURITY_DOCS = {
    "protocol": "`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`",
    "sasl_mechanism": "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`",
    "sasl_username": "the SASL user",
    "sasl_password": "its password; or `STREAMPROC_SASL_PASSWORD_FILE`, a file holding it",
    "ssl_cafile": "CA bundle that signed the brokers' certificates",
    "ssl_certfile": "client certificate (mutual TLS)",
    "ssl_keyfile": "its private key",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="print every worker setting (Markdown)",
                       description="Print the worker's settings: flag, environment "
                       "variable, default and meaning, as docs/configuration.md holds them.")
    p.set_defaults(handler=_print)


def _print(args: argparse.Namespace) -> int:
    from streamproc.cli.main import build_parser

    print(reference(build_parser()), end="")
    return 0


def reference(parser: argparse.ArgumentParser) -> str:
    """The Markdown reference, with each setting's flag as ``parser``'s worker has it."""
    flags = _worker_flags(parser)
    docs = field_docs(WorkerConfig)
    rows = []
    for f in fields(WorkerConfig):
        if f.name in ("topics", "security"):
            continue
        default = f.default if f.default is not MISSING else getattr(WorkerConfig(), f.name)
        rows.append(f"| `{f.name}` | {flags.get(f.name, '—')} | "
                    f"`{ENV_PREFIX}{f.name.upper()}` | {_shown(default)} | "
                    f"{_cell(docs.get(f.name, ''))} |")
    security = [f"| `{ENV_PREFIX}{_SECURITY_ENV[f.name]}` | "
                f"{_shown(getattr(KafkaSecurity(), f.name))} | {_SECURITY_DOCS[f.name]} |"
                for f in fields(KafkaSecurity)]
    return _HEADER + "\n".join(rows) + "\n" + _SECURITY + "\n".join(security) + "\n"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls``, as written in its source."""
    tree = ast.parse(inspect.getsource(config))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs: dict[str, str] = {}
    for node, following in zip(body.body, body.body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(str(following.value.value))
    return docs


def _worker_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker = sub.choices["worker"]
    return {a.dest: ", ".join(f"`{o}`" for o in a.option_strings if o.startswith("--"))
            for a in worker._actions if a.option_strings and a.dest != "help"}


def _shown(value: Any) -> str:
    if value == "" or value is None:
        return "—"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _cell(text: str) -> str:
    """One table cell: no line breaks, no unescaped bars, Markdown's code marks for the
    docstrings' reStructuredText ones."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"``\1``", text).replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")
