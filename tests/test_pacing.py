"""How far apart a stream's chunks go out, and how many threads torch gets: pure rules."""

from __future__ import annotations

import pytest
import torch

from streamproc.config import WorkerConfig
from streamproc.engine.threads import apply_serving_threads, serving_threads, usable_cores
from streamproc.errors import ConfigError
from streamproc.publish.publisher import ChunkPacing


def test_pacing_interval_grows_with_the_streams_sharing_the_budget() -> None:
    pacing = ChunkPacing(chunks_per_s=2000, max_interval_s=0.05)
    assert pacing.interval_s(8) == pytest.approx(0.004)
    assert pacing.interval_s(64) == pytest.approx(0.032)
    assert pacing.interval_s(1000) == 0.05  # never past the cap


def test_pacing_off_never_holds() -> None:
    assert ChunkPacing().interval_s(1000) == 0.0


def test_serving_threads_leave_a_core_to_io_unless_told() -> None:
    assert serving_threads(0, cores=2) == 1
    assert serving_threads(0, cores=1) == 1
    assert serving_threads(0, cores=16) == 15
    assert serving_threads(2, cores=2) == 2
    with pytest.raises(ConfigError):
        serving_threads(-1, cores=2)


def test_throughput_mode_takes_every_core_and_a_latency_target_leaves_one() -> None:
    cores = usable_cores()
    assert WorkerConfig().torch_threads == 0  # the engine then leaves a core to I/O
    assert serving_threads(WorkerConfig().torch_threads, cores) == max(1, cores - 1)
    assert WorkerConfig(itl_target_ms=0).torch_threads == cores
    assert WorkerConfig(itl_target_ms=0, cpu_threads=3).torch_threads == 3
    assert WorkerConfig(cpu_threads=3).torch_threads == 3


def test_serving_threads_size_torchs_pool_on_cpu_only() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_serving_threads(torch.device("cpu"), 1) == 1
        assert torch.get_num_threads() == 1
        assert apply_serving_threads(torch.device("cuda"), 1) is None
    finally:
        torch.set_num_threads(before)


def test_config_refuses_negative_threads_and_chunk_rate() -> None:
    with pytest.raises(ConfigError, match="cpu_threads"):
        WorkerConfig(cpu_threads=-1)
    with pytest.raises(ConfigError, match="chunk_rate"):
        WorkerConfig(chunk_rate=-5.0)
