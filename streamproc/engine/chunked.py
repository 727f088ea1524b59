"""Prompts too long for one step, prefilled a chunk per step.

A long prompt prefilled in one pass holds up every running sequence's next
token for as long as the pass takes: on a GPU, an 8k-token prompt of a 7B model
costs tens of decode steps. Split into chunks of at most ``chunk_tokens``, one
chunk a step, the running sequences keep decoding in between, and the
newcomer's first token comes when its last chunk is done. Each chunk extends
the prompt's own cache (no padding: one prompt per chunk); the finished prompt
then joins the running batch like any other prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DynamicCache

from streamproc.engine.sequence import PreparedRequest


@dataclass(eq=False)  # each is one admission: equal only to itself
class PartialPrefill:
    prepared: PreparedRequest
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0
    """Prompt tokens already in ``cache``."""

    @property
    def length(self) -> int:
        return len(self.prepared.prompt_ids)

    def next_chunk(self, budget: int) -> list[int]:
        """Up to ``budget`` of the prompt tokens not yet prefilled."""
        return self.prepared.prompt_ids[self.done:self.done + budget]


def needs_chunks(prepared: PreparedRequest, chunk_tokens: int) -> bool:
    """Whether ``prepared``'s prompt is prefilled in chunks (0: never)."""
    return 0 < chunk_tokens < len(prepared.prompt_ids)
