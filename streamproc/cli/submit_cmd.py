"""``streamproc submit``: push one prompt (streamed) or many (all in flight) through."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from typing import Any

import msgspec

from streamproc import wire
from streamproc.cli.common import add_bootstrap, bootstrap, run, security
from streamproc.client import Result, ResultStream, StreamprocClient
from streamproc.config import DEFAULT_LANE, TopicNames
from streamproc.errors import GenerationError
from streamproc.flow.admission import AdmissionPolicy

_DEFAULTS = TopicNames()
_ADMISSION = AdmissionPolicy()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("submit", help="submit prompts and print their tokens",
                       description="Submit one PROMPT and print its tokens as they arrive, or "
                       "many prompts (one per line) from --file, all kept in flight.")
    p.add_argument("prompt", nargs="?",
                   help="the prompt (or --file, or prompts piped in, one per line)")
    p.add_argument("-f", "--file", help="read prompts from FILE, one per line ('-' for stdin)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line per finished request")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="most tokens to generate (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set of tokens holding this much "
                   "probability (%(default)g: all)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the K likeliest tokens only (%(default)s: all)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="-2..2: less of what was generated, per time it was (%(default)g)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="-2..2: less of what was generated at all (%(default)g)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0: transformers' penalty on prompt and output tokens "
                   "(%(default)g: off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int,
                   help="sampling seed (default: derived from the request id)")
    p.add_argument("--request-topic", default=DEFAULT_LANE,
                   help=f"the lane (default {DEFAULT_LANE}; streamproc.requests.high goes first)")
    p.add_argument("--reply-topic", default=_DEFAULTS.responses,
                   help="where the tokens come back (%(default)s)")
    p.add_argument("--priority", type=int, default=0,
                   help="the job's priority, which --admission shed compares (%(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up after SECONDS (%(default)g)")
    adm = p.add_argument_group("admission", "check the lane's backlog before submitting")
    adm.add_argument("--admission", choices=["block", "reject", "shed"],
                     help="block: wait until the drain time is under --max-drain; reject: "
                     "fail at once; shed: fail only jobs below --shed-below-priority")
    adm.add_argument("--max-drain", type=float, default=_ADMISSION.max_drain_s,
                     help="estimated drain time, in seconds, counted as overloaded (%(default)g)")
    adm.add_argument("--admission-timeout", type=float, default=_ADMISSION.timeout_s,
                     help="block: how long to wait (%(default)g)")
    adm.add_argument("--shed-below-priority", type=int, default=_ADMISSION.shed_below_priority,
                     help="shed: jobs below this priority are refused (%(default)s)")
    adm.add_argument("--group", default="streamproc-workers",
                     help="the workers' consumer group, whose lag is checked")
    add_bootstrap(p)
    p.set_defaults(handler=_main)


def register_cancel(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cancel", help="cancel requests by id",
                       description="Publish a cancellation for each REQUEST_ID on the control "
                       "topic; the request ends with a final 'cancelled' message.")
    p.add_argument("request_ids", nargs="+", metavar="REQUEST_ID",
                   help="the request ids to cancel")
    p.add_argument("--control-topic", default=_DEFAULTS.control,
                   help="where the workers read cancellations (%(default)s)")
    add_bootstrap(p)
    p.set_defaults(handler=_cancel)


def _cancel(args: argparse.Namespace) -> int:
    async def send() -> None:
        async with StreamprocClient(bootstrap(args), control_topic=args.control_topic,
                                    security=security()) as client:
            for request_id in args.request_ids:
                await client.cancel(request_id)
                print(f"cancel sent for {request_id}")
    run(send())
    return 0


def _main(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    if not prompts:
        print("streamproc: error: no prompts given: pass PROMPT, --file FILE, or pipe "
              "prompts in (one per line)", file=sys.stderr)
        return 2
    return run(asyncio.wait_for(_submit_all(args, prompts), args.timeout))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.file is None and args.prompt:
        return [args.prompt]
    if args.file is None:  # no prompt: what is piped in, if anything is
        return [] if sys.stdin.isatty() else _stdin()
    if args.file == "-":
        return _stdin()
    with open(args.file, encoding="utf-8") as handle:
        return _non_blank(handle)


def _stdin() -> list[str]:
    """Strictly UTF-8, whatever the locale says (a C locale would smuggle bad bytes in as
    surrogates, which no JSON encoder takes)."""
    return _non_blank(sys.stdin.buffer.read().decode("utf-8").splitlines())


def _non_blank(lines: Iterable[str]) -> list[str]:
    return [line.rstrip("\n") for line in lines if line.strip()]


async def _submit_all(args: argparse.Namespace, prompts: list[str]) -> int:
    params = wire.GenerationParams(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p,
                                   stop=args.stop, seed=args.seed, top_k=args.top_k,
                                   frequency_penalty=args.frequency_penalty,
                                   presence_penalty=args.presence_penalty,
                                   repetition_penalty=args.repetition_penalty)
    admission = None if args.admission is None else AdmissionPolicy(
        args.admission, args.max_drain, args.admission_timeout, args.shed_below_priority)
    async with StreamprocClient(bootstrap(args), request_topic=args.request_topic,
                                reply_topic=args.reply_topic, admission=admission,
                                group_id=args.group, security=security()) as client:
        streams = [await client.submit(p, params=params, priority=args.priority)
                   for p in prompts]
        if len(streams) == 1 and not args.json:
            return await _stream_one(streams[0])
        outcomes = await asyncio.gather(*(_finish(s, args.json) for s in streams))
    return 0 if all(outcomes) else 1


async def _stream_one(stream: ResultStream) -> int:
    try:
        async for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        result = await stream.result()
    except GenerationError as exc:
        print(f"\nstreamproc: {exc}", file=sys.stderr)
        return 1
    print(f"\n[{result.finish_reason}, {result.usage.completion_tokens} tokens, "
          f"first token {result.client_ttft_s * 1000:.0f} ms]", file=sys.stderr)
    return 0


async def _finish(stream: ResultStream, as_json: bool) -> bool:
    try:
        result = await stream.result()
    except GenerationError as exc:
        _emit({"request_id": stream.request_id, "error": {"code": exc.code, "message": str(exc)}},
              as_json, f"[{stream.request_id}] error {exc.code}: {exc}")
        return False
    _emit(_as_json(result), as_json, f"[{result.request_id}] {result.text}")
    return True


def _as_json(result: Result) -> dict[str, Any]:
    return {"request_id": result.request_id, "text": result.text,
            "finish_reason": result.finish_reason, "usage": result.usage,
            "timings": result.timings}


def _emit(obj: dict[str, Any], as_json: bool, plain: str) -> None:
    line = msgspec.json.encode(obj).decode() if as_json else plain
    print(line, flush=True)
