"""How many CPU threads torch's kernels may use in a serving process.

torch's intra-op pool (OpenMP) spins at every barrier until all its threads
arrive. When another busy thread or process holds one of those cores — the
worker's own event loop consuming, detokenizing and publishing, or a broker on
the same box — every kernel waits for a thread that is not running: on a 2-core
machine one busy neighbour made a batch-128 decode loop about 3x slower with two
torch threads, and barely slowed it with one. So a worker on CPU leaves one core to
its I/O by default.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from streamproc.errors import ConfigError

if TYPE_CHECKING:  # torch itself only where a pool is sized: configs import this too
    import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def serving_threads(requested: int, cores: int) -> int:
    """``requested`` if set (> 0), else one less than ``cores``, at least 1."""
    if requested < 0:
        raise ConfigError(f"cpu_threads must be >= 0 (0: automatic), got {requested}")
    return requested if requested > 0 else max(1, cores - 1)


def apply_serving_threads(device: torch.device, requested: int) -> int | None:
    """Size torch's CPU pool for serving on ``device``; the thread count, or None on a GPU
    (where kernels run on the device and torch's CPU pool is left as it is)."""
    if device.type != "cpu":
        return None
    import torch

    threads = serving_threads(requested, usable_cores())
    torch.set_num_threads(threads)
    return threads
