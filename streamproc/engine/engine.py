"""Iteration-level batching: sequences join and leave the batch between steps.

Each :meth:`Engine.step` decodes one token for every running sequence, then
prefills the newly admitted requests together and joins them to the running
batch. A prompt too long for one step is prefilled a chunk a step instead
(:mod:`streamproc.engine.chunked`). A sequence retires the moment it finishes.
The engine is synchronous and owned by one thread; the worker calls it off the
event loop.
"""

from __future__ import annotations

import inspect
import time

import torch
from transformers import Cache, DynamicCache

from streamproc.config import DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_PREFIX_CACHE_BYTES
from streamproc.engine.chunked import PartialPrefill, needs_chunks
from streamproc.engine.grouping import (
    DEFAULT_OVERHEAD_TOKENS,
    pass_overhead_tokens,
    prefill_groups,
)
from streamproc.engine.kvbatch import SlotBatch, layer_tensors
from streamproc.engine.loader import LoadedModel
from streamproc.engine.logits import LogprobRequest, Logprobs, PenaltyState, apply_penalties
from streamproc.engine.prefill import MISS, Hit, prefill_inputs, remember
from streamproc.engine.prefix_cache import PrefixCache
from streamproc.engine.sampling import choose_tokens
from streamproc.engine.sequence import PreparedRequest, Sequence, TokenEvent, unserved_event
from streamproc.wire import GenerationParams, GenerationRequest


class Engine:
    def __init__(self, loaded: LoadedModel, *,
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        """``prefill_chunk_tokens``: longer prompts are prefilled that many tokens a step
        (see :mod:`streamproc.engine.chunked`); 0: every prompt in one pass.
        ``prefix_cache_bytes``: keys and values of prompt prefixes kept for later prompts
        that start the same way (:mod:`streamproc.engine.prefix_cache`); 0: none."""
        if prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {prefill_chunk_tokens}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._loaded = loaded
        self._model = loaded.model
        # Only the last position's logits are sampled from: a prefill need not project
        # every prompt token onto the vocabulary (generate() skips that work too).
        forward = inspect.signature(self._model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        # transformers 5.x renamed the cache argument (the old name warns, then goes).
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self._prefixes_on = prefix_cache_bytes > 0
        self._running: list[Sequence] = []
        self._partial: list[PartialPrefill] = []
        """Long prompts being prefilled a chunk a step, oldest first."""
        self._batch: SlotBatch | None = None
        self._dropped_allocations = 0
        self.last_prefill_s = 0.0
        """Seconds the last step spent in prefill (0 when it admitted nothing)."""
        self.last_decode_s = 0.0
        """Seconds the last step spent decoding the running batch (0 when it was empty)."""
        self.last_decode_rows = 0
        """Rows the last step decoded."""
        self.last_prefill_tokens = 0
        """Prompt tokens the last step prefilled (whole prompts and a long prompt's chunk)."""
        self.prefill_overhead_tokens = DEFAULT_OVERHEAD_TOKENS
        """What one more prefill pass costs, in padded prompt tokens (see
        :mod:`streamproc.engine.grouping`); measured by :meth:`warm_up`."""

    @property
    def num_running(self) -> int:
        """Sequences decoding, and long prompts still prefilling (they hold a slot)."""
        return len(self._running) + len(self._partial)

    @property
    def kv_tokens(self) -> int:
        """Cache positions holding real tokens, over the running batch and the prompts
        still prefilling."""
        batch = int(self._batch.mask.sum().item()) if self._batch is not None else 0
        return batch + sum(p.done for p in self._partial)

    @property
    def kv_allocations(self) -> int:
        """How many times KV buffers were allocated since this engine started."""
        live = self._batch.allocations if self._batch is not None else 0
        return self._dropped_allocations + live

    def free_device_bytes(self) -> int:
        """The accelerator's free memory now (0 on a CPU)."""
        device = self._loaded.device
        return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0

    @property
    def kv_buffer_bytes(self) -> int:
        """What the running batch's KV buffers hold, used or not."""
        return self._batch.buffer_bytes if self._batch is not None else 0

    def warm_up(self) -> None:
        """A throwaway prefill and decode, so the first real request does not pay for the
        first forward pass (lazy initialization in torch and the model code)."""
        request = GenerationRequest(request_id="warm-up", prompt="warm up",
                                    params=GenerationParams(max_new_tokens=2, ignore_eos=True))
        ids = list(self._loaded.tokenizer("warm up").input_ids) or [self._loaded.pad_id]
        prepared = PreparedRequest(request, ids, 2, time.time())
        # Warm-up prompts are no one's prefix, and the pass costs measured below must not
        # be cache hits.
        self._prefixes_on, enabled = False, self._prefixes_on
        try:
            self.step([prepared])
            while self._running:
                self.step([])
            self.reset()
            self.prefill_overhead_tokens = self._measure_pass_overhead(request, ids[0])
        finally:
            self._prefixes_on = enabled

    def _measure_pass_overhead(self, request: GenerationRequest, token: int) -> float:
        """Time a small and a large prefill (best of three each) on this model and device."""
        def best_of_three(rows: int, width: int) -> float:
            batch = [PreparedRequest(request, [token] * width, 1, time.time())] * rows
            times = []
            for _ in range(3):
                started = time.perf_counter()
                with torch.inference_mode():  # one pass, however the chunk size is set
                    self._prefill(batch)
                times.append(time.perf_counter() - started)
                self.reset()
            return min(times)
        small, large = (1, 16), (16, 64)
        return pass_overhead_tokens(best_of_three(*small), best_of_three(*large),
                                    small[0] * small[1], large[0] * large[1])

    def reset(self) -> None:
        """Forget every running sequence and the KV buffers (after a failed step)."""
        self._dropped_allocations = self.kv_allocations
        self._running = []
        self._partial = []
        self._batch = None
        if self._loaded.device.type == "cuda":  # give the freed buffers back at once
            torch.cuda.empty_cache()

    def step(self, admitted: list[PreparedRequest], abandon: frozenset[int] = frozenset(),
             cancel: frozenset[int] = frozenset()) -> list[TokenEvent]:
        """One iteration: drop ``abandon`` (keys of admitted requests, no events), end
        ``cancel`` (a final ``cancelled`` event each), decode the running batch, then
        prefill ``admitted`` and the next chunk of the long prompts."""
        now = time.time()
        events = [unserved_event(p, now, "expired") for p in admitted if _past_deadline(p, now)]
        fresh = [p for p in admitted if not _past_deadline(p, now)]
        self._partial += [PartialPrefill(p) for p in fresh
                          if needs_chunks(p, self.prefill_chunk_tokens)]
        whole = [p for p in fresh if not needs_chunks(p, self.prefill_chunk_tokens)]
        self.last_prefill_s = self.last_decode_s = 0.0
        self.last_decode_rows = self.last_prefill_tokens = 0
        # Dropping rows moves others into their place: the KV buffers are inference
        # tensors, which may only be written in inference mode.
        with torch.inference_mode():
            events = self._drop(abandon, cancel, now) + events
            if self._running:
                self.last_decode_rows = len(self._running)
                started = time.perf_counter()
                events += self._decode()
                self.last_decode_s = time.perf_counter() - started
            if whole or self._partial:
                started = time.perf_counter()
                events += self._prefill(whole) if whole else []
                events += self._prefill_chunk(now)
                self.last_prefill_s = time.perf_counter() - started
        return events

    def _drop(self, abandon: frozenset[int], cancel: frozenset[int],
              now: float) -> list[TokenEvent]:
        """Leave ``abandon`` without a word; end ``cancel`` with a final ``cancelled``."""
        if not abandon and not cancel:
            return []
        events = [s.cancel(now) for s in self._running if s.prepared.key in cancel]
        events += [unserved_event(p.prepared, now, "cancelled") for p in self._partial
                   if p.prepared.key in cancel]
        gone = abandon | cancel
        self._partial = [p for p in self._partial if p.prepared.key not in gone]
        for seq in self._running:
            seq.finished = seq.finished or seq.prepared.key in abandon
        self._retire()
        return events

    def _prefill_chunk(self, now: float) -> list[TokenEvent]:
        """The next chunk of the oldest long prompt; its first token once it is all in."""
        expired = [p for p in self._partial if _past_deadline(p.prepared, now)]
        events = [unserved_event(p.prepared, now, "expired") for p in expired]
        self._partial = [p for p in self._partial if p not in expired]
        if not self._partial:
            return events
        partial = self._partial[0]
        if partial.done == 0:
            self._seed_partial(partial)
        chunk = partial.next_chunk(self.prefill_chunk_tokens)
        self.last_prefill_tokens += len(chunk)
        device = self._loaded.device
        end = partial.done + len(chunk)
        span = torch.arange(partial.done, end, device=device)
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        logits = self._forward(torch.tensor([chunk], device=device), partial.cache, mask,
                               span.unsqueeze(0), span)
        partial.done = end
        if end < partial.length:
            return events
        self._partial.pop(0)
        if self._prefixes_on:
            self.prefixes.insert(partial.prepared.prompt_ids, lambda: [
                (k[0], v[0]) for k, v in layer_tensors(partial.cache)])
        sequence = Sequence.start(partial.prepared, self._loaded.tokenizer, self._loaded.eos_ids)
        events += self._advance([sequence], logits)
        self._admit([sequence], partial.cache, mask, self.num_running + 1)
        return events

    def _decode(self) -> list[TokenEvent]:
        batch = self._require_batch()
        device = self._loaded.device
        positions = batch.mask.sum(dim=1, keepdim=True)
        cache_position = torch.tensor([batch.length], device=device)
        mask = batch.open_column()
        last = torch.tensor([[s.last_token] for s in self._running], device=device)
        logits = self._forward(last, batch.cache, mask, positions, cache_position)
        batch.close_column()
        events = self._advance(self._running, logits)
        self._retire()
        return events

    def _seed_partial(self, partial: PartialPrefill) -> None:
        """Start a long prompt's chunks after its cached prefix, if it has one."""
        if not self._prefixes_on:
            return
        length, layers = self.prefixes.lookup(partial.prepared.prompt_ids)
        for index, (k, v) in enumerate(layers):
            partial.cache.update(k.unsqueeze(0), v.unsqueeze(0), index)
        partial.done = length

    def _prefill(self, prepared: list[PreparedRequest]) -> list[TokenEvent]:
        """Prefill ``prepared`` and join them to the batch. Prompts that share a prefix
        nobody has cached yet (a burst of one instruction) wait for one of them to
        prefill it, then start from it."""
        rows = len(prepared) + self.num_running
        if self._batch is not None:  # room for every pass at once, not one pass at a time
            self._batch.reserve(rows, max(len(p.prompt_ids) for p in prepared))
        leaders = self._cold_leaders(prepared) if self._prefixes_on else []
        events = self._prefill_passes(leaders, rows, shared=True) if leaders else []
        rest = [p for p in prepared if all(p is not leader for leader in leaders)]
        return events + self._prefill_passes(rest, rows)

    def _cold_leaders(self, prepared: list[PreparedRequest]) -> list[PreparedRequest]:
        """One prompt of each group that starts with the same uncached block."""
        groups: dict[bytes, list[PreparedRequest]] = {}
        for p in prepared:
            name = self.prefixes.first_block(p.prompt_ids)
            if name is not None:
                groups.setdefault(name, []).append(p)
        return [group[0] for group in groups.values() if len(group) > 1]

    def _prefill_passes(self, prepared: list[PreparedRequest], rows: int, *,
                        shared: bool = False) -> list[TokenEvent]:
        """One pass per group of similar lengths to compute, so little goes to padding.
        ``shared``: their prefixes are known to be wanted (stored on first sight)."""
        if not prepared:
            return []
        hits = [self.prefixes.lookup(p.prompt_ids) if self._prefixes_on else MISS
                for p in prepared]
        lengths = [len(p.prompt_ids) - hit[0] for p, hit in zip(prepared, hits, strict=True)]
        self.last_prefill_tokens += sum(lengths)
        events: list[TokenEvent] = []
        # Longest first: a new batch is sized by its first pass.
        for group in reversed(prefill_groups(lengths, self.prefill_overhead_tokens)):
            events += self._prefill_pass([prepared[i] for i in group],
                                         [hits[i] for i in group], rows, shared)
        return events

    def _prefill_pass(self, prepared: list[PreparedRequest], hits: list[Hit],
                      rows: int, shared: bool = False) -> list[TokenEvent]:
        """Prefill ``prepared`` (after their cached prefixes, ``hits``) and join them to
        the batch, sized for ``rows`` in all."""
        prompts = [p.prompt_ids for p in prepared]
        inputs = prefill_inputs(prompts, hits, self._loaded.pad_id, self._loaded.device)
        cache, mask = inputs.cache, inputs.mask
        logits = self._forward(inputs.ids, cache, mask, inputs.positions,
                               inputs.cache_position)
        if self._prefixes_on:
            remember(self.prefixes, prompts, cache, mask, force=shared)
        sequences = [
            Sequence.start(p, self._loaded.tokenizer, self._loaded.eos_ids)
            for p in prepared
        ]
        events = self._advance(sequences, logits)
        self._admit(sequences, cache, mask, rows)
        return events

    def _forward(self, ids: torch.Tensor, cache: Cache, mask: torch.Tensor,
                 positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache_position=cache_position,
            use_cache=True,
            **{self._cache_argument: cache},
            **self._last_logits_only,
        )
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        now = time.time()
        # Taken from the model's logits as they came, before any penalty changes them.
        logprobs = Logprobs(logits, [LogprobRequest(row, s.params.top_logprobs)
                                     for row, s in enumerate(sequences) if s.params.logprobs])
        penalties = [self._penalties(s, logits.shape[-1]) for s in sequences]
        if any(p is not None for p in penalties):
            logits = logits.clone()
            apply_penalties(logits, penalties)
        # The whole batch at once: per-row calls cost more than the model at small sizes.
        chosen = choose_tokens(logits, [s.sampler for s in sequences],
                               [s.position for s in sequences])
        token_logprobs = logprobs.of(chosen, self._loaded.tokenizer)
        return [seq.expire(now) if _past_deadline(seq.prepared, now)
                else seq.advance(token, now, token_logprobs.get(row))
                for row, (seq, token) in enumerate(zip(sequences, chosen, strict=True))]

    def _penalties(self, sequence: Sequence, vocab: int) -> PenaltyState | None:
        if sequence.penalties is None and not sequence.generated:
            prompt = sequence.prepared.prompt_ids[:sequence.prepared.prompt_tokens]
            sequence.penalties = PenaltyState.start(sequence.params, prompt,
                                                    sequence.completion, vocab,
                                                    self._loaded.device)
        return sequence.penalties

    def _admit(self, sequences: list[Sequence], prefill: DynamicCache,
               mask: torch.Tensor, rows: int) -> None:
        alive = [i for i, s in enumerate(sequences) if not s.finished]
        if not alive:
            return
        if self._batch is None:
            self._batch = SlotBatch(prefill, mask, row_capacity=rows)
            self._running = sequences
            self._retire()
        else:
            self._batch.join(prefill, mask, alive)
            self._running += [sequences[i] for i in alive]

    def _retire(self) -> None:
        dead = [i for i, s in enumerate(self._running) if s.finished]
        if not dead:
            return
        if len(dead) == len(self._running):
            # The buffers stay for the next arrivals: allocating them again costs more.
            self._running = []
            self._require_batch().clear()
            return
        order = self._require_batch().remove(dead)
        self._running = [self._running[i] for i in order]

    def _require_batch(self) -> SlotBatch:
        if self._batch is None:
            raise RuntimeError("running sequences without a KV batch")
        return self._batch


def _past_deadline(prepared: PreparedRequest, now: float) -> bool:
    deadline = prepared.request.deadline
    return deadline is not None and now > deadline
