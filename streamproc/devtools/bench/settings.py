"""The benchmark's settings, apart from what runs it: the command line reads them for its
``--help`` without loading torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamproc.devtools.bench.trace import TraceSettings, real_model_trace


@dataclass(frozen=True)
class SharedPrefixSettings:
    records: int = 48
    """0: the workload is not run."""
    new_tokens: int = 8
    """A label or a few fields: short answers, so the prompt is most of the work."""


@dataclass(frozen=True)
class BenchSettings:
    trace: TraceSettings = field(default_factory=TraceSettings)
    ttft_target_s: float = 1.0
    itl_target_s: float = 0.1
    fixed_window_s: float = 0.010
    fixed_batch: int = 32
    max_batch_size: int = 128
    """streamproc's largest decode batch; the ceiling is measured up to the same size."""
    drain_timeout_s: float = 180.0
    paired_rounds: int = 3
    """Saturation waves through streamproc after the trace, each between two ceiling runs
    (:mod:`streamproc.devtools.bench.paired`); 0: none, the target reads the trace's wave."""
    ceiling_batches: int = 2
    """Full batches per batch size in the ceiling's sweep."""
    paired_ceiling_batches: int = 4
    """Full batches of the best size per ceiling run between paired waves: about as long
    as a wave takes."""
    extras: bool = True
    """Also the engine alone sampled and on the worker's threads, and long prompts."""
    cpu_threads: int = 0
    """torch's CPU threads in every peer (0: the worker's policy)."""
    shared_prefix: SharedPrefixSettings = field(
        default_factory=lambda: SharedPrefixSettings(records=0))
    """The shared-prefix workload, run after the trace (records 0: not run)."""
    run_trace: bool = True
    """Whether the arrival trace runs (the shared-prefix workload can run alone)."""

    @property
    def ceiling_batch_sizes(self) -> tuple[int, ...]:
        return tuple(s for s in (1, 8, 16, 32, 64, 128, 256) if s <= self.max_batch_size)


def real_model_settings(trace: TraceSettings | None = None) -> BenchSettings:
    """Sized for a real model on a 2-core CPU (SmolLM2-135M: a decode step of about 60 ms
    at one row, 300 ms at 64): the whole run in under 10 minutes. The inter-token target,
    150 ms, is one the fixed window misses here once its batch fills (about 210 ms a step
    at 32 rows)."""
    return BenchSettings(trace=trace or real_model_trace(), ttft_target_s=2.0,
                         itl_target_s=0.15, max_batch_size=64, drain_timeout_s=300.0,
                         paired_rounds=2, ceiling_batches=1, paired_ceiling_batches=1,
                         extras=False, shared_prefix=SharedPrefixSettings())
