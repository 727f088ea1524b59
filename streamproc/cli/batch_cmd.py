"""``streamproc batch``: run an OpenAI Batch input file through Kafka (docs/openai.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from streamproc.cli.common import add_bootstrap, bootstrap, run, security
from streamproc.cli.failures import Exit
from streamproc.config import DEFAULT_LANE, TopicNames, WorkerConfig
from streamproc.errors import ConfigError
from streamproc.openai.batch import BatchRun, BatchSettings, Tally
from streamproc.openai.batch_file import BatchFileError

_DEFAULTS = TopicNames()
BAR_WIDTH = 24


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "batch", help="run an OpenAI Batch API input file (JSONL) through the workers",
        description="Publish every line of an OpenAI Batch API input file (custom_id, method, "
        "url, body) to a request lane, show progress, and write each answer in the Batch "
        "API's output format: completions to the output file, failures to the errors file. "
        "Stop it at any time and run it again with the same files: answered lines are not "
        "sent again. Exit status: 0 every line succeeded, 1 some are in the errors file, "
        "2 the input cannot be run (nothing sent).")
    p.add_argument("input", type=Path, help="the Batch API input file, one request per line")
    p.add_argument("-o", "--output", type=Path,
                   help="where completions go (default: INPUT with .output.jsonl)")
    p.add_argument("--errors", type=Path,
                   help="where failed lines' answers go (default: INPUT with .errors.jsonl)")
    p.add_argument("--lane", default=DEFAULT_LANE,
                   help="the request topic (%(default)s; streamproc.requests.high goes first)")
    p.add_argument("--reply-topic", default=_DEFAULTS.responses,
                   help="where answers come back (%(default)s)")
    p.add_argument("--max-in-flight", type=int, default=1000,
                   help="lines published and not yet answered, at most (%(default)s): the "
                   "backlog stays in the file, not in Kafka or in this process")
    p.add_argument("--max-line-bytes", type=int, default=WorkerConfig().max_message_bytes,
                   help="refuse the file if a line is longer (%(default)s, the workers' "
                   "default message limit)")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    add_bootstrap(p)
    p.set_defaults(handler=_main)


def settings_from(args: argparse.Namespace) -> BatchSettings:
    source: Path = args.input
    if args.max_in_flight < 1:
        raise ConfigError(f"--max-in-flight must be >= 1, got {args.max_in_flight}")
    if not source.is_file():
        raise ConfigError(f"no such input file: {source}")
    stem = source.name.removesuffix(".jsonl")
    return BatchSettings(
        input=source,
        output=args.output or source.with_name(f"{stem}.output.jsonl"),
        errors=args.errors or source.with_name(f"{stem}.errors.jsonl"),
        lane=args.lane, reply_topic=args.reply_topic, max_in_flight=args.max_in_flight,
        max_line_bytes=args.max_line_bytes)


def _main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    show = _Progress(sys.stderr, quiet=args.quiet)
    batch = BatchRun(bootstrap(args), settings, security(), on_progress=show)
    try:
        tally = run(batch.run())
    except BatchFileError as exc:
        print(f"streamproc batch: {exc}", file=sys.stderr)
        return Exit.USAGE
    except KeyboardInterrupt:
        show.end()
        print(f"stopped with {batch.tally.done}/{batch.tally.total} answered; run the same "
              "command again to finish", file=sys.stderr)
        return Exit.INTERRUPTED
    show.end()
    print(summary(tally, settings))
    # Failed: answered, but some lines (of this run or an earlier one) with an error.
    return Exit.FAILED if tally.failed or _has_lines(settings.errors) else Exit.OK


def summary(tally: Tally, settings: BatchSettings) -> str:
    return (f"{tally.done}/{tally.total} answered ({tally.answered_now} this run, "
            f"{tally.failed} failed) in {tally.elapsed_s:.1f}s, {tally.tokens_per_s:.1f} "
            f"tokens/s; output: {settings.output}, errors: {settings.errors}")


def _has_lines(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


class _Progress:
    """A live line on a terminal (redrawn in place); elsewhere a line every 10 updates."""

    def __init__(self, out: TextIO, *, quiet: bool) -> None:
        self._out = out
        self._quiet = quiet
        self._live = out.isatty()
        self._updates = 0

    def __call__(self, tally: Tally) -> None:
        if self._quiet:
            return
        self._updates += 1
        if self._live:
            self._out.write("\r" + progress_line(tally) + "\033[K")
            self._out.flush()
        elif self._updates % 10 == 1:
            print(progress_line(tally), file=self._out, flush=True)

    def end(self) -> None:
        if self._live and not self._quiet and self._updates:
            self._out.write("\n")


def progress_line(tally: Tally) -> str:
    share = tally.done / tally.total if tally.total else 1.0
    filled = round(share * BAR_WIDTH)
    eta = tally.eta_s
    return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {tally.done}/{tally.total} done, "
            f"{tally.failed} failed, {tally.tokens_per_s:.1f} tok/s, ETA "
            f"{'-' if eta is None else _duration(eta)}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
