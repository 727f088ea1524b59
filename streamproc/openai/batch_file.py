"""The files of ``streamproc batch``: the input's index, the answers so far, the progress.

Memory stays small whatever the file: the input is read line by line, twice (once to
check and index it, once to send it), and what is kept per line is its ``custom_id``'s
64-bit hash in a sorted array and one byte saying whether it is answered — about 9 bytes
a line; the lines themselves live only while in flight.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy

from streamproc.openai import protocol, shapes


class BatchFileError(Exception):
    """The input (or a file beside it) cannot be run; nothing was sent."""


def id_hash(custom_id: str | bytes) -> int:
    data = custom_id.encode() if isinstance(custom_id, str) else custom_id
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass
class BatchIndex:
    """Every ``custom_id`` of the input, by hash: which are ours, which are answered."""

    hashes: numpy.ndarray
    """Sorted, unique."""
    answered: numpy.ndarray
    """One bool per hash, in the same order."""

    @classmethod
    def of(cls, hashes: list[int] | numpy.ndarray) -> BatchIndex:
        array = numpy.sort(numpy.asarray(hashes, dtype=numpy.uint64))
        return cls(array, numpy.zeros(len(array), dtype=bool))

    def __len__(self) -> int:
        return len(self.hashes)

    def slot(self, custom_id: str | bytes) -> int | None:
        """Where ``custom_id`` sits in the index; None if it is not the input's."""
        h = numpy.uint64(id_hash(custom_id))
        i = int(numpy.searchsorted(self.hashes, h))
        return i if i < len(self.hashes) and self.hashes[i] == h else None

    @property
    def done(self) -> int:
        return int(self.answered.sum())


def scan(path: Path, max_line_bytes: int) -> BatchIndex:
    """Check every line (JSON, a ``custom_id``, unique, small enough to publish) and index
    them; raises :class:`BatchFileError` naming the first bad line."""
    hashes: list[int] = []
    for number, line in numbered_lines(path):
        if len(line) > max_line_bytes:
            raise BatchFileError(f"{path}:{number}: {len(line)} bytes, over the "
                                 f"{max_line_bytes}-byte limit of a request")
        try:
            envelope = protocol.line_envelope_decoder.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BatchFileError(f"{path}:{number}: not a Batch API line: {exc}") from None
        hashes.append(id_hash(envelope.custom_id))
    if not hashes:
        raise BatchFileError(f"{path}: no lines")
    index = BatchIndex.of(hashes)
    if len(numpy.unique(index.hashes)) != len(index.hashes):
        raise BatchFileError(f"{path}: {_first_duplicate(path)} is the custom_id of more "
                             "than one line; each line needs its own")
    return index


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines, numbered from 1 as an editor shows them."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if line:
                yield number, line


def _first_duplicate(path: Path) -> str:
    seen: set[int] = set()
    for _, line in numbered_lines(path):
        custom_id = protocol.line_envelope_decoder.decode(line).custom_id
        h = id_hash(custom_id)
        if h in seen:
            return repr(custom_id)
        seen.add(h)
    return "a custom_id"


def mark_answered(index: BatchIndex, *paths: Path) -> None:
    """Lines already answered in output files of an earlier run. A last line cut short
    (the run was killed while writing it) is removed."""
    for path in paths:
        if not path.exists():
            continue
        keep = 0
        with path.open("rb") as f:
            for raw in f:
                try:
                    line = shapes.output_line_decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    break
                keep += len(raw)
                slot = index.slot(line.custom_id)
                if slot is not None:
                    index.answered[slot] = True
        if keep != path.stat().st_size:
            os.truncate(path, keep)


class Progress(msgspec.Struct):
    """Beside the output file while a batch runs: how to pick it up again."""

    input: str
    reply_topic: str
    started_at: float
    input_bytes: int = 0
    """The input's size when the first run began: a file changed since is not resumed."""
    """When the first run began: answers are read back from just before it."""
    sent: int = 0
    """Lines, from the top of the input, that the broker acknowledged."""


def read_progress(path: Path) -> Progress | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Progress)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BatchFileError(f"{path} is damaged ({exc}); remove it to start over") from None


def write_progress(path: Path, progress: Progress) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_bytes(msgspec.json.encode(progress))
    staged.replace(path)  # never half written
