"""``streamproc worker``: serve prompt jobs until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import fields, replace
from pathlib import Path

from streamproc.cli.common import add_bootstrap, bootstrap, run, setup_logging
from streamproc.cli.failures import Exit
from streamproc.config import WorkerConfig
from streamproc.engine import catalog
from streamproc.errors import WorkerStalledError
from streamproc.topics import load_specs, topic_names
from streamproc.worker.preflight import preflight

log = logging.getLogger("streamproc.worker")
_DEFAULTS = WorkerConfig()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="run a worker (the main job)",
                       description="Consume prompt jobs, generate, stream token chunks back. "
                       "Every option also reads STREAMPROC_<OPTION> from the environment.")
    add_bootstrap(p)
    p.add_argument("--model", help=_help(
        "catalog name (`streamproc model list`), .gguf file, model directory or hub id; "
        "fetched on first use (default: {})", "model"))
    p.add_argument("--model-alias", dest="model_aliases", action="append",
                   help="another name jobs may give as their model (repeat for several; "
                   "besides --model as given, its file name and a catalog model's hub id); "
                   "a job naming any other model is refused with model_not_found")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help=_help("default: {}", "device"))
    p.add_argument("--cpu-threads", type=int, help=_help(
        "on CPU, torch kernel threads (default {}: one less than the cores, or every core "
        "with --itl-target-ms 0)", "cpu_threads"))
    p.add_argument("--group", dest="group_id",
                   help=_help("consumer group (default: {})", "group_id"))
    p.add_argument("--topics-dir", type=Path, help="topic declarations (default: ./topics)")
    p.add_argument("--engine-thread", dest="engine_process", action="store_false",
                   default=None, help="run the engine on a thread of the worker, not in a "
                   "process of its own (one process, one copy of the model)")
    p.add_argument("--max-batch-size", type=int,
                   help=_help("most sequences decoding together ({})", "max_batch_size"))
    p.add_argument("--max-batch-tokens", type=int,
                   help=_help("most prompt tokens per prefill ({})", "max_batch_tokens"))
    p.add_argument("--prefill-chunk-tokens", type=int, help=_help(
        "prefill longer prompts this many tokens a step, decoding the running sequences in "
        "between ({}; 0: whole prompts)", "prefill_chunk_tokens"))
    p.add_argument("--prefix-cache-bytes", type=int, help=_help(
        "keep keys and values of prompt prefixes up to this many bytes, so a shared "
        "instruction is prefilled once ({}; 0: off)", "prefix_cache_bytes"))
    p.add_argument("--batch-policy", choices=["adaptive", "fixed"], help=_help(
        "adaptive: window and admission size follow latency (default: {})", "batch_policy"))
    p.add_argument("--batch-window-ms", type=float,
                   help=_help("fixed: gather window when idle ({})", "batch_window_ms"))
    p.add_argument("--window-min-ms", type=float,
                   help=_help("adaptive: shortest window ({})", "window_min_ms"))
    p.add_argument("--window-max-ms", type=float,
                   help=_help("adaptive: longest window ({})", "window_max_ms"))
    p.add_argument("--ttft-target-ms", type=float,
                   help=_help("adaptive: TTFT p95 target ({})", "ttft_target_ms"))
    p.add_argument("--itl-target-ms", type=float,
                   help=_help("adaptive: inter-token p95 target ({}; 0: none, batch for "
                              "throughput)", "itl_target_ms"))
    p.add_argument("--trace-file",
                   help="write every engine step and controller decision here (JSON lines)")
    p.add_argument("--chunk-rate", type=float, help=_help(
        "chunks/s to publish over all streams; a stream's tokens merge for up to streams/rate "
        "s, at most half the inter-token target ({}; 0: off)", "chunk_rate"))
    p.add_argument("--max-inflight", type=int,
                   help=_help("most requests held before pausing ({})", "max_inflight"))
    p.add_argument("--max-new-tokens-cap", type=int,
                   help=_help("cap on max_new_tokens ({})", "max_new_tokens_cap"))
    p.add_argument("--poison-attempts", type=int, help=_help(
        "dead-letter a record the worker died running this many times in a row ({})",
        "poison_attempts"))
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, help=_help(
        "seconds to finish running requests on shutdown ({})", "drain_timeout_s"))
    p.add_argument("--close-timeout", dest="close_timeout_s", type=float, help=_help(
        "then seconds to flush, commit and close the Kafka clients; also bounds a "
        "rebalance's flush and commit ({})", "close_timeout_s"))
    p.add_argument("--max-prompt-tokens", type=int,
                   help=_help("longest prompt accepted ({})", "max_prompt_tokens"))
    p.add_argument("--kv-memory-bytes", type=int, help=_help(
        "keep the running batch's keys and values within this many bytes; admissions wait "
        "for room ({}; 0: no bound)", "kv_memory_bytes"))
    p.add_argument("--kv-memory-fraction", type=float, help=_help(
        "on a GPU, without --kv-memory-bytes: that budget is this fraction of the memory "
        "free once the model is loaded ({}; 0: no bound)", "kv_memory_fraction"))
    p.add_argument("--reply-topic-pattern", help="regex of extra reply topics jobs may name")
    p.add_argument("--allow-unsafe-weights", action="store_true", default=None,
                   help="also load pickle-based .bin weights (default: safetensors only)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (off)")
    p.add_argument("--metrics-address",
                   help=_help("metrics bind address ({})", "metrics_address"))
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line, with request_id/topic/partition/offset")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(handler=_main)


def _help(text: str, field: str) -> str:
    """``text`` with ``field``'s default in place of ``{}``: the default is written once, in
    the config, and --help cannot drift from it."""
    value = getattr(_DEFAULTS, field)
    return text.format(f"{value:g}" if isinstance(value, float) else value)


def _main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, args.log_format)
    return run(serve(config_from_args(args)))


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """Defaults, then the environment, then every option given that names a config field
    (an option not given is None and leaves the field as it was)."""
    given = vars(args)
    overrides = {f.name: given[f.name] for f in fields(WorkerConfig)
                 if f.name in given and f.name != "bootstrap"}
    if overrides.get("model_aliases") is not None:
        overrides["model_aliases"] = tuple(overrides["model_aliases"])
    config = WorkerConfig.from_env(bootstrap=bootstrap(args), **overrides)
    names = replace(topic_names(load_specs(args.topics_dir)),
                    allowed_reply_pattern=config.reply_topic_pattern)
    return replace(config, topics=names)


async def serve(config: WorkerConfig) -> int:
    # torch and transformers load here, not with the command line: `--help` and every
    # other command start in a fraction of the time.
    from streamproc.engine.loader import describe_model, load_model
    from streamproc.worker.app import Worker

    await preflight(config)
    log.info("loading model %s", config.model)
    # Jobs name the model as the operator did, not as the cache directory it resolves to.
    aliases = tuple(sorted(catalog.model_names(config.model, config.model_aliases)))
    # Fetched and converted once, here: the engine's process then loads a plain directory.
    config = replace(config, model=await asyncio.to_thread(catalog.resolve, config.model),
                     model_aliases=aliases)
    if config.engine_process:  # the engine's process loads the weights, once
        loaded = await asyncio.to_thread(describe_model, config.model, config.device)
    else:
        loaded = await asyncio.to_thread(load_model, config.model, config.device,
                                         allow_unsafe_weights=config.allow_unsafe_weights)
    log.info("model on %s (%s), context %d tokens", loaded.device, loaded.dtype,
             loaded.max_context)
    worker = Worker(config, loaded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    failed = asyncio.create_task(worker.wait_failed())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    # A stage that ended by itself before any signal is a crash; decide before stop()
    # cancels the stages.
    crash = failed.exception() if failed.done() else None
    failed.cancel()
    stopping.cancel()
    await worker.stop()
    if isinstance(crash, WorkerStalledError):
        log.error("%s", crash)
        return Exit.STALLED
    if crash is not None:
        log.error("a worker stage failed: %r", crash)
        return 1
    return 0
