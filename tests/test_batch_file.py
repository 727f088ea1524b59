"""The files of ``streamproc batch``, without a broker: checking, indexing, picking up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamproc.openai.batch import BatchRun, BatchSettings
from streamproc.openai.batch_file import (
    BatchFileError,
    Progress,
    mark_answered,
    scan,
    write_progress,
)


def line(custom_id: str) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": "x"}})


def output_line(custom_id: str) -> str:
    return json.dumps({"id": "b", "custom_id": custom_id, "response": None,
                       "error": {"code": "batch_expired", "message": "late"}})


def test_every_line_is_indexed_and_found_by_its_custom_id(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(line(f"c{i}") for i in range(500)) + "\n\n")
    index = scan(source, 10_000)
    assert len(index) == 500
    slots = {index.slot(f"c{i}") for i in range(500)}
    assert slots == set(range(500))
    assert index.slot("c500") is None
    assert index.slot(b"c7") == index.slot("c7")


@pytest.mark.parametrize(("content", "says"), [
    ("", "no lines"),
    (line("a") + "\n{oops\n", "in.jsonl:2"),
    (line("a") + "\n" + json.dumps({"custom_id": 5}) + "\n", "in.jsonl:2"),
    (line("a") + "\n" + line("b") + "\n" + line("a") + "\n", "'a' is the custom_id"),
    (line("x" * 300), "in.jsonl:1"),
    (line("a") + "\n" + line("b" * 150) + "\n", "over the 200-byte limit"),
])
def test_a_file_that_cannot_run_is_refused_naming_the_line(tmp_path: Path, content: str,
                                                            says: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(content)
    with pytest.raises(BatchFileError, match=says):
        scan(source, 200)


def test_answers_already_written_count_and_a_line_cut_short_is_dropped(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(line(f"c{i}") + "\n" for i in range(5)))
    output.write_text(output_line("c1") + "\n" + output_line("c3") + "\n"
                      + output_line("c4")[:20])  # killed while writing the third
    index = scan(source, 10_000)
    mark_answered(index, output, tmp_path / "missing.jsonl")
    assert index.done == 2
    assert index.answered[index.slot("c3")]
    assert not index.answered[index.slot("c4")]
    assert output.read_text().endswith(output_line("c3") + "\n")


async def test_a_progress_file_of_another_input_or_a_changed_one_is_refused(
        tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(line("a") + "\n")
    settings = BatchSettings(source, tmp_path / "out.jsonl", tmp_path / "err.jsonl", "lane",
                             "replies")
    write_progress(settings.progress_file, Progress("/elsewhere.jsonl", "replies", 1.0, 1))
    with pytest.raises(BatchFileError, match=r"belongs to a run of /elsewhere\.jsonl"):
        await BatchRun("127.0.0.1:1", settings).run()
    write_progress(settings.progress_file,
                   Progress(str(source.resolve()), "replies", 1.0, source.stat().st_size + 1))
    with pytest.raises(BatchFileError, match="changed since"):
        await BatchRun("127.0.0.1:1", settings).run()


async def test_a_file_already_answered_sends_nothing(tmp_path: Path) -> None:
    """Nothing left: no broker is even contacted (this one does not exist)."""
    source = tmp_path / "in.jsonl"
    source.write_text(line("a") + "\n" + line("b") + "\n")
    settings = BatchSettings(source, tmp_path / "out.jsonl", tmp_path / "err.jsonl", "lane",
                             "replies")
    settings.output.write_text(output_line("a") + "\n")
    settings.errors.write_text(output_line("b") + "\n")
    tally = await BatchRun("127.0.0.1:1", settings).run()
    assert (tally.done, tally.total, tally.sent_now) == (2, 2, 0)
