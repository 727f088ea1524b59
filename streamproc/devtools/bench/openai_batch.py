"""An OpenAI Batch file through ``streamproc batch``, against offline ``generate()``
(``make bench-batch``).

``python -m streamproc.devtools.bench.openai_batch [--lines N] [--max-tokens T]``

N chat lines (the benchmark's short questions, greedy, exactly T tokens each) go through
``streamproc batch`` (its own process) to a worker in throughput mode (up to 128 rows) on
fresh topics of a local broker (or ``$STREAMPROC_BOOTSTRAP``), timed from the command's
start to its exit; then ``generate()`` alone, no Kafka, on the same prompts at batch sizes
up to 128 gives the ceiling. Reported: the batch's wall time and tokens/s, the ceiling's,
and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from streamproc import topics
from streamproc.cli.common import run
from streamproc.cli.demo_cmd import local_broker
from streamproc.config import DEFAULT_MODEL, WorkerConfig, bootstrap_from_env
from streamproc.devtools.bench.peers import offline_ceiling
from streamproc.devtools.bench.trace import QUESTIONS
from streamproc.engine import catalog
from streamproc.engine.loader import describe_model, load_model
from streamproc.worker.app import Worker

CEILING_SIZES = (8, 16, 32, 64, 128)


def batch_lines(count: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "temperature": 0, "max_completion_tokens": max_tokens,
                      "ignore_eos": True,
                      "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}}
            for i in range(count)]


async def time_batch(bootstrap: str, model_dir: str, source: Path, say: Any) -> float:
    """Seconds ``streamproc batch`` takes over ``source``, a worker serving it here."""
    specs = topics.suffixed(topics.load_specs(), f"batch-{uuid.uuid4().hex[:8]}",
                            replication_factor=1)
    await topics.apply(bootstrap, specs)
    names = topics.topic_names(specs)
    # As the docs advise for batch files: throughput mode, batches as wide as the ceiling's.
    config = WorkerConfig(bootstrap=bootstrap, topics=names, model=model_dir,
                          group_id=f"bench-batch-{uuid.uuid4().hex[:6]}", itl_target_ms=0.0,
                          max_batch_size=max(CEILING_SIZES), model_aliases=(DEFAULT_MODEL,))
    worker = Worker(config, describe_model(model_dir, "auto"))
    await worker.start()
    try:
        say("streamproc batch: running")
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamproc", "batch", str(source), "--bootstrap", bootstrap,
            "--lane", names.requests[-1], "--reply-topic", names.responses, "--quiet")
        code = await process.wait()
        seconds = time.monotonic() - started
    finally:
        await worker.stop()
    if code != 0:
        raise RuntimeError(f"streamproc batch exited with {code}")
    return seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamproc.devtools.bench.openai_batch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"bench-batch: {message}", file=sys.stderr, flush=True)

    model_dir = catalog.resolve(args.model, progress=say)
    lines = batch_lines(args.lines, args.max_tokens, args.model)
    with ExitStack() as cleanup, tempfile.TemporaryDirectory() as scratch:
        bootstrap = bootstrap_from_env() or local_broker(cleanup, say)
        source = Path(scratch) / "jobs.jsonl"
        source.write_text("".join(json.dumps(line) + "\n" for line in lines))
        seconds = run(time_batch(bootstrap, model_dir, source, say))
        answered = (Path(scratch) / "jobs.output.jsonl").read_text().count("\n")
    loaded = load_model(model_dir, "auto")
    prompts = [str(loaded.tokenizer.apply_chat_template(line["body"]["messages"],
                                                        add_generation_prompt=True,
                                                        tokenize=False)) for line in lines]
    say(f"offline ceiling: generate() at batch sizes {CEILING_SIZES}")
    rates = offline_ceiling(loaded, prompts, args.max_tokens, CEILING_SIZES, batches=1)
    tokens = args.lines * args.max_tokens
    figures = {"lines": args.lines, "answered": answered, "tokens": tokens,
               "batch_seconds": seconds, "batch_tokens_per_s": tokens / seconds,
               "ceiling_tokens_per_s": max(rates.values()), "ceiling_by_batch_size": rates,
               "ceiling_seconds": tokens / max(rates.values())}
    figures["ratio"] = figures["batch_tokens_per_s"] / figures["ceiling_tokens_per_s"]
    print(f"{args.lines} lines, {args.max_tokens} tokens each ({answered} answered): "
          f"streamproc batch {seconds:.1f} s, {figures['batch_tokens_per_s']:.1f} tokens/s; "
          f"generate() at its best batch ({max(rates, key=lambda k: rates[k])}) "
          f"{figures['ceiling_tokens_per_s']:.1f} tokens/s, {figures['ceiling_seconds']:.1f} s "
          f"for the same tokens; ratio {figures['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if answered == args.lines else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
