"""Keys and values of prompt prefixes, kept across requests so a shared prefix is
prefilled once.

The commonest job behind a queue is one instruction applied to many records: the same
system prompt and examples in front of every document. Its keys and values are the same
for every record (keys are rotated by absolute position, and a prefix always starts at
position 0), so they are computed once and copied into each new row.

Prompts are cut into blocks of ``block_tokens``; a block is named by a hash of every token
up to its end (so equal names mean equal prefixes) and holds, per layer, the keys and
values of its tokens. A lookup walks a prompt's blocks from the start and stops at the
first one not held; at least one token of every prompt is always left to prefill, since
its logits choose the first token. Blocks are evicted least recently used once the cache
holds more than ``capacity_bytes``. A hit *copies* the blocks into the running batch, so
evicting a block never touches a running row.

A block is kept on second sight: the first prompt that has it only leaves its name (a
hash), and the next prompt that starts the same way stores it. Copying every prompt's keys
and values cost 15% of the throughput on unique prompts (SmolLM2 on the 2-core CPU); a
name costs a hash. Prompts that arrive together and share an uncached start are known to
share it, and are stored at once (``force``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values for a span of tokens: ``[kv_heads, tokens, head_dim]``."""
DEFAULT_BLOCK_TOKENS = 16
SEEN_NAMES = 1 << 16
"""Names of blocks seen once, remembered (least recently seen forgotten first)."""


@dataclass
class _Block:
    layers: list[LayerKV]
    nbytes: int


class PrefixStats(msgspec.Struct, array_like=True):
    """Counts since the cache began; a step's result carries a copy."""

    lookup_tokens: int = 0
    """Prompt tokens looked up."""
    hit_tokens: int = 0
    """Of those, tokens whose keys and values came from the cache."""
    evictions: int = 0
    cached_bytes: int = 0

    def snapshot(self) -> PrefixStats:
        return PrefixStats(self.lookup_tokens, self.hit_tokens, self.evictions,
                           self.cached_bytes)


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        self.capacity_bytes, self.block_tokens = capacity_bytes, block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.stats = PrefixStats()

    def _names(self, prompt: list[int], blocks: int) -> list[bytes]:
        names, parent = [], b""
        for i in range(blocks):
            part = array("q", prompt[i * self.block_tokens:(i + 1) * self.block_tokens])
            parent = hashlib.blake2b(parent + part.tobytes(), digest_size=16).digest()
            names.append(parent)
        return names

    def lookup(self, prompt: list[int]) -> tuple[int, list[LayerKV]]:
        """The longest cached prefix of ``prompt`` (whole blocks, one token short of the
        whole prompt at most): its length, and each layer's keys and values for it."""
        usable = (len(prompt) - 1) // self.block_tokens
        found: list[_Block] = []
        for name in self._names(prompt, usable):
            block = self._blocks.get(name)
            if block is None:
                break
            self._blocks.move_to_end(name)
            found.append(block)
        self.stats.lookup_tokens += len(prompt)
        if not found:
            return 0, []
        length = len(found) * self.block_tokens
        self.stats.hit_tokens += length
        layers = [(torch.cat([b.layers[i][0] for b in found], dim=1),
                   torch.cat([b.layers[i][1] for b in found], dim=1))
                  for i in range(len(found[0].layers))]
        return length, layers

    def first_block(self, prompt: list[int]) -> bytes | None:
        """The name of ``prompt``'s first block if a hit on it could help (the prompt
        is longer than a block) and it is not cached; else None."""
        if len(prompt) <= self.block_tokens:
            return None
        [name] = self._names(prompt, 1)
        return None if name in self._blocks else name

    def insert(self, prompt: list[int], kv: Callable[[], list[LayerKV]], *,
               force: bool = False) -> None:
        """Keep the whole blocks of ``prompt`` seen before (all of them if ``force``);
        ``kv`` gives its keys and values (``[kv_heads, len(prompt), head_dim]`` per
        layer), asked only if a block is to be stored."""
        names = self._names(prompt, len(prompt) // self.block_tokens)
        missing = []
        for i, name in enumerate(names):
            if name in self._blocks:
                self._blocks.move_to_end(name)
            elif force or name in self._seen:
                self._seen.pop(name, None)
                missing.append(i)
            else:
                self._see(name)
        if not missing:
            return
        layers = kv()
        for i in missing:
            name = names[i]
            span = slice(i * self.block_tokens, (i + 1) * self.block_tokens)
            block = [(k[:, span].clone(), v[:, span].clone()) for k, v in layers]
            nbytes = sum(k.nbytes + v.nbytes for k, v in block)
            self._blocks[name] = _Block(block, nbytes)
            self.stats.cached_bytes += nbytes
        self._evict()

    def _see(self, name: bytes) -> None:
        self._seen[name] = None
        if len(self._seen) > SEEN_NAMES:
            self._seen.popitem(last=False)

    def _evict(self) -> None:
        while self.stats.cached_bytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.stats.cached_bytes -= block.nbytes
            self.stats.evictions += 1
