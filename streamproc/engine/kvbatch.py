"""A left-padded batch of KV caches that sequences join and leave between steps.

Rows are sequences, columns are cache positions; ``mask`` marks which columns
of each row hold real tokens. Joining pads the shorter side on the left;
leaving drops rows and then any left columns that no row uses any more.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Full-attention layers only: every layer of a DynamicCache built from tensors.
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


def from_tensors(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(tensors)


class KVBatch:
    """The running batch's cache and attention mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def extend_mask(self) -> None:
        """One more real column for every row: the token about to be decoded."""
        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows below ours."""
        width = max(self.length, other.length)
        mine, theirs = _pad_left(self, width), _pad_left(other, width)
        self.cache = from_tensors([
            (torch.cat([k1, k2]), torch.cat([v1, v2]))
            for (k1, v1), (k2, v2) in zip(mine, theirs, strict=True)
        ])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then trim unused left columns."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else self.length
        self.cache = from_tensors([
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in layer_tensors(self.cache)
        ])
        self.mask = self.mask[:, start:]


def _pad_left(batch: KVBatch, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    extra = width - batch.length
    tensors = layer_tensors(batch.cache)
    if extra == 0:
        return tensors
    return [(_zeros_left(k, extra), _zeros_left(v, extra)) for k, v in tensors]


def _zeros_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    pad = torch.zeros((*t.shape[:2], extra, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - mask.shape[1]
    if extra == 0:
        return mask
    pad = torch.zeros((mask.shape[0], extra), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)
