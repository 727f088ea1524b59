"""A prefill pass's inputs when some prompts start with a cached prefix.

Rows are laid out as the running batch expects (every row's tokens end at the last
column), in two blocks: the cached prefixes, right-aligned in the first ``P`` columns
(``P``, the longest), then the rest of each prompt, right-aligned in the last ``S``
columns. Only the last ``S`` columns are computed. A row whose prefix is shorter than
``P``, or whose rest is shorter than ``S``, has masked columns before each of its spans:
attention skips them and positions count only real tokens (the mask's running sum), so
each token sees exactly its prompt's earlier tokens at their own positions, as in a
prefill of the whole prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from streamproc.engine.kvbatch import layer_tensors
from streamproc.engine.prefix_cache import LayerKV, PrefixCache

Hit = tuple[int, list[LayerKV]]
"""A cached prefix: its length in tokens, and each layer's keys and values for it."""
MISS: Hit = (0, [])


@dataclass
class PrefillInputs:
    ids: torch.Tensor
    mask: torch.Tensor
    """Over the prefix and the computed columns: what the running batch keeps."""
    positions: torch.Tensor
    cache: DynamicCache
    cache_position: torch.Tensor


def prefill_inputs(prompts: list[list[int]], hits: list[Hit], pad_id: int,
                   device: torch.device) -> PrefillInputs:
    cached = [length for length, _ in hits]
    rest = [prompt[length:] for prompt, length in zip(prompts, cached, strict=True)]
    width = max(len(r) for r in rest)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rest], device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest],
                             dtype=torch.long, device=device)
    offsets = torch.tensor(cached, dtype=torch.long, device=device).unsqueeze(1)
    positions = (offsets + rest_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    prefix = max(cached)
    if prefix:
        prefix_mask = _seed_prefixes(cache, hits, prefix, device)
        mask = torch.cat([prefix_mask, rest_mask], dim=1)
    else:
        mask = rest_mask
    cache_position = torch.arange(prefix, prefix + width, device=device)
    return PrefillInputs(ids, mask, positions, cache, cache_position)


def _seed_prefixes(cache: DynamicCache, hits: list[Hit], width: int,
                   device: torch.device) -> torch.Tensor:
    """Write each row's cached prefix right-aligned in ``width`` columns of ``cache``;
    return their mask."""
    mask = torch.zeros((len(hits), width), dtype=torch.long, device=device)
    sample = next(layers for length, layers in hits if length)
    for layer, (k0, v0) in enumerate(sample):
        keys = k0.new_zeros((len(hits), k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((len(hits), v0.shape[0], width, v0.shape[2]))
        for row, (length, layers) in enumerate(hits):
            if length:
                keys[row, :, width - length:] = layers[layer][0]
                values[row, :, width - length:] = layers[layer][1]
        cache.update(keys, values, layer)
    for row, (length, _) in enumerate(hits):
        if length:
            mask[row, width - length:] = 1
    return mask


def remember(prefixes: PrefixCache, prompts: list[list[int]], cache: DynamicCache,
             mask: torch.Tensor, *, force: bool = False) -> None:
    """Offer each prompt's keys and values to the prefix cache (copied only for blocks it
    stores: see :meth:`PrefixCache.insert`)."""
    tensors = layer_tensors(cache)
    for row, prompt in enumerate(prompts):
        def row_kv(row: int = row) -> list[LayerKV]:
            columns = mask[row].nonzero().squeeze(1)
            return [(k[row].index_select(1, columns), v[row].index_select(1, columns))
                    for k, v in tensors]
        prefixes.insert(prompt, row_kv, force=force)
