"""The running batch's KV cache: preallocated slots that sequences join and leave.

Rows are sequences, columns cache positions. Every row's tokens end at the same
column ``end`` (prompts are left-padded), so a decode step writes one column
for all rows in place, and the model sees views ``[:rows, :, start:end]`` of
preallocated buffers: no copy of the cache per step. ``mask`` marks which
columns of a row hold real tokens.

* joining writes the newcomers' prefill keys and values below the live rows,
  right-aligned at ``end``;
* leaving moves the last rows into the holes (one row copy each) and returns
  the new row order, so the caller can reorder its sequences the same way;
* when the window reaches the buffers' right edge, or a newcomer needs more
  columns on its left, the window moves within the buffers; only when they are
  too small are bigger ones allocated (doubling rows or columns), so their cost
  is amortized over many steps. Allocating is what costs: fresh memory is
  faulted in page by page (on the 2-core CPU, 27-82 ms for a few to a few tens of MB,
  many decode steps' worth), while moving a window copies only its live columns;
* :meth:`reserve` sizes the buffers once for a whole step's admissions, and a
  batch whose sequences all left keeps its buffers for the next ones;
* when rows leave and what stays uses a quarter of the buffers' rows or columns or less
  (a long prompt finished, a wide wave drained), smaller buffers take its place: the
  memory a moment's peak took goes back, and the quarter (growth doubles) keeps a batch
  that breathes around one size from reallocating back and forth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Full-attention layers only: every layer of a DynamicCache built by a prefill.
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]


class _SlotLayer(DynamicLayer):
    """One layer's keys and values, as the model's attention reads and writes them."""

    def __init__(self, owner: SlotBatch, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._owner = owner
        self.key_buf, self.value_buf = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        o = self._owner
        width = key_states.shape[-2]
        self.key_buf[:o.rows, :, o.end:o.end + width] = key_states
        self.value_buf[:o.rows, :, o.end:o.end + width] = value_states
        window = slice(o.start, o.end + width)
        self.keys = self.key_buf[:o.rows, :, window]
        self.values = self.value_buf[:o.rows, :, window]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.length + query_length, 0


class SlotBatch:
    """Keys, values and attention mask of every running sequence."""

    def __init__(self, prefill: DynamicCache, mask: torch.Tensor, *, row_capacity: int = 0
                 ) -> None:
        """A batch of ``prefill``'s rows, with room for at least ``row_capacity`` rows."""
        tensors = layer_tensors(prefill)
        rows, width = mask.shape
        self.rows, self.start, self.end = rows, 0, width
        self.allocations = 1
        """How many times buffers were allocated (for tests and probes)."""
        self._mask = _alloc_like(mask, (_room(max(rows, row_capacity)), _room(width + 1)))
        self._mask[:rows, :width] = mask
        self._layers = [
            _SlotLayer(self, _alloc_like(k, (self._capacity_rows, k.shape[1],
                                             self._capacity_columns, k.shape[3])),
                       _alloc_like(v, (self._capacity_rows, v.shape[1],
                                       self._capacity_columns, v.shape[3])))
            for k, v in tensors]
        for layer, (k, v) in zip(self._layers, tensors, strict=True):
            layer.key_buf[:rows, :, :width] = k
            layer.value_buf[:rows, :, :width] = v
        layers: list[Any] = list(self._layers)
        self.cache = Cache(layers=layers)

    @property
    def length(self) -> int:
        """Visible columns (cache positions the model attends over)."""
        return self.end - self.start

    @property
    def buffer_bytes(self) -> int:
        """What the preallocated keys, values and mask hold, live or not."""
        return sum(buf.nbytes for buf, _ in self._buffers())

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[:self.rows, self.start:self.end]

    def open_column(self) -> torch.Tensor:
        """Make room for the token about to be decoded and return the mask including it;
        :meth:`close_column` after the forward pass."""
        if self.end + 1 > self._capacity_columns:
            self._make_room(self.rows, self.length)
        self._mask[:self.rows, self.end] = 1
        return self._mask[:self.rows, self.start:self.end + 1]

    def close_column(self) -> None:
        self.end += 1

    def join(self, prefill: DynamicCache, mask: torch.Tensor, keep: list[int]) -> None:
        """Append rows ``keep`` of a prefill batch below ours, right-aligned at ``end``."""
        index = torch.tensor(keep, dtype=torch.long, device=mask.device)
        new_rows, width = len(keep), mask.shape[1]
        self.reserve(self.rows + new_rows, width)
        if self.end - width < self.start:  # the newcomer is longer: expose columns on the left
            self._mask[:self.rows, self.end - width:self.start] = 0
            self.start = self.end - width
        top, columns = self.rows, slice(self.end - width, self.end)
        self._mask[top:top + new_rows, self.start:self.end] = 0
        self._mask[top:top + new_rows, columns] = mask.index_select(0, index)
        for layer, (k, v) in zip(self._layers, layer_tensors(prefill), strict=True):
            layer.key_buf[top:top + new_rows, :, columns] = k.index_select(0, index)
            layer.value_buf[top:top + new_rows, :, columns] = v.index_select(0, index)
        self.rows += new_rows

    def reserve(self, rows: int, width: int) -> None:
        """Room for ``rows`` rows in all and for a prompt of ``width`` tokens to join."""
        if width > self.end or rows > self._capacity_rows:
            self._make_room(rows, max(self.length, width))

    def clear(self) -> None:
        """Drop every row, keeping the buffers for the rows that join next."""
        self.rows, self.start = 0, self.end

    def remove(self, dead: list[int]) -> list[int]:
        """Drop rows ``dead``; returns, for each remaining row, the row it was before."""
        order = list(range(self.rows))
        for row in sorted(dead, reverse=True):
            order[row] = order[-1]
            order.pop()
        self.rows = len(order)
        moves = [(new, old) for new, old in enumerate(order) if new != old]
        if moves:
            self._move_rows(moves)
        self._trim_left()
        self._shrink()
        return order

    def _shrink(self) -> None:
        rows, columns = self._capacity_rows, self._capacity_columns
        needed_columns = self.length + 1 + self.length // _MOVES_PER_WINDOW
        if self.rows * _SHRINK_AT <= rows:
            rows = _room(self.rows)
        if needed_columns * _SHRINK_AT <= columns:
            columns = _room(needed_columns)
        if (rows, columns) != (self._capacity_rows, self._capacity_columns):
            self._reallocate(rows, columns, self.length)

    def _move_rows(self, moves: list[tuple[int, int]]) -> None:
        # Sources all lie past the new row count and destinations before it: no overlap.
        device = self._mask.device
        dst = torch.tensor([m[0] for m in moves], dtype=torch.long, device=device)
        src = torch.tensor([m[1] for m in moves], dtype=torch.long, device=device)
        window = slice(self.start, self.end)
        self._mask[:, window].index_copy_(0, dst, self._mask[:, window].index_select(0, src))
        for layer in self._layers:
            for buf in (layer.key_buf, layer.value_buf):
                view = buf[:, :, window]
                view.index_copy_(0, dst, view.index_select(0, src))

    def _trim_left(self) -> None:
        if not self.rows:
            return
        used = self.mask.any(dim=0).nonzero()
        self.start += int(used[0].item()) if used.numel() else self.length

    @property
    def _capacity_rows(self) -> int:
        return int(self._mask.shape[0])

    @property
    def _capacity_columns(self) -> int:
        return int(self._mask.shape[1])

    def _make_room(self, rows: int, end: int) -> None:
        """Capacity for ``rows`` rows, and the window moved to end at column ``end`` with a
        free column after it: within the buffers if they are big enough, else in bigger
        ones."""
        # Moving copies the live columns: worth it only with room for a few steps after.
        columns = end + 1 + self.length // _MOVES_PER_WINDOW
        if rows <= self._capacity_rows and columns <= self._capacity_columns:
            self._move_window(end)
        else:
            self._regrow(rows, end, columns)

    def _move_window(self, end: int) -> None:
        start = end - self.length
        if start != self.start and self.rows:
            # Overlapping columns would be read after being overwritten: copy a clone.
            overlap = abs(start - self.start) < self.length
            for buf, dim in self._buffers():
                live = buf[:self.rows]
                window = live.narrow(dim, self.start, self.length)
                live.narrow(dim, start, self.length).copy_(window.clone() if overlap else window)
        self.start, self.end = start, end

    def _buffers(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Every buffer, with the dimension of its columns."""
        yield self._mask, 1
        for layer in self._layers:
            yield layer.key_buf, 2
            yield layer.value_buf, 2

    def _regrow(self, rows: int, end: int, columns: int) -> None:
        """New buffers with room for ``rows`` rows and ``columns`` columns, the window copied
        to end at column ``end``."""
        self._reallocate(max(self._capacity_rows, _room(rows)),
                         max(self._capacity_columns, _room(columns)), end)

    def _reallocate(self, new_rows: int, new_columns: int, end: int) -> None:
        """Buffers of exactly ``new_rows`` x ``new_columns``, the window copied to end at
        column ``end``."""
        window = slice(self.start, self.end)
        target = slice(end - self.length, end)
        mask = _alloc_like(self._mask, (new_rows, new_columns))
        mask[:self.rows, target] = self._mask[:self.rows, window]
        self._mask = mask
        for layer in self._layers:
            k, v = layer.key_buf, layer.value_buf
            layer.key_buf = _alloc_like(k, (new_rows, k.shape[1], new_columns, k.shape[3]))
            layer.value_buf = _alloc_like(v, (new_rows, v.shape[1], new_columns, v.shape[3]))
            layer.key_buf[:self.rows, :, target] = k[:self.rows, :, window]
            layer.value_buf[:self.rows, :, target] = v[:self.rows, :, window]
        self.start, self.end = end - self.length, end
        self.allocations += 1


_MOVES_PER_WINDOW = 8
"""A window moves within its buffers only if it can then decode at least 1/8 of its
length before it moves again: copying its columns then costs at most 8 columns a step."""


_SHRINK_AT = 4
"""Buffers shrink once the live rows or columns need a quarter of them or less."""


def _room(size: int) -> int:
    """Capacity for ``size``: the next power of two, so growth is amortized."""
    return 1 << max(3, (size - 1).bit_length())


def _alloc_like(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape, dtype=t.dtype, device=t.device)
