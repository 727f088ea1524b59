"""``make gpu-check``'s path on CPU: the same script, a tiny model, small batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamproc.devtools import gpu_check

pytestmark = pytest.mark.model


def test_the_gpu_check_measures_the_engine_beside_generate(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    code = gpu_check.main(["--size", "tiny", "--device", "cpu", "--batches", "1,4",
                           "--prompt-tokens", "16", "--new-tokens", "8", "--peak-gbps", "20",
                           "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["batch"] for row in report["rows"]] == [1, 4]
    for row in report["rows"]:
        assert row["engine_tokens_per_s"] > 0
        assert row["generate_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(
            row["engine_tokens_per_s"] / row["generate_tokens_per_s"])
        assert 0 < row["decode_mbu"] < 1
        assert row["greedy_equal"] == row["batch"]  # fp32 on CPU: exactly generate()'s

