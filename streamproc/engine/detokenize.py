"""Turning a growing list of token ids into text deltas, and stop strings.

Decoding each token alone is wrong for most tokenizers (multi-byte characters
split across tokens, leading spaces that depend on the previous token), so we
decode a short window and emit only the stable new suffix (as TGI and vLLM do).
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context so the first generated token decodes right.
_CONTEXT_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def direct_decoder(tokenizer: Decoder) -> Decoder:
    """The Rust tokenizer under a transformers fast tokenizer, where decoding through it
    gives the same text (no clean-up of spaces): the wrapper's Python costs several
    times the decode itself, and a stream decodes twice per token. Otherwise
    ``tokenizer`` itself."""
    backend: Decoder | None = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer
    return backend


class IncrementalDetokenizer:
    """Yields the text each new token adds, holding back incomplete characters."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int]) -> None:
        self._tokenizer = direct_decoder(tokenizer)
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    @classmethod
    def resumed(cls, tokenizer: Decoder, prompt_ids: list[int], published: list[int],
                published_text: str) -> tuple[IncrementalDetokenizer, str]:
        """A detokenizer that continues a stream of which ``published`` tokens went out as
        ``published_text``, and the text those tokens add beyond it (held back for a stop
        string; it comes out with the next token). Tokens at the end that are part of an
        incomplete character stay unread, so the token completing it decodes it whole."""
        detok = cls(tokenizer, prompt_ids)
        context = detok._ids
        whole = len(published)
        while whole > 0 and detok._decode(context + published[:whole]).endswith(_REPLACEMENT):
            whole -= 1
        base = detok._decode(context)
        implied = detok._decode(context + published[:whole])[len(base):]
        detok._ids = (context + published)[-_CONTEXT_TOKENS - (len(published) - whole):]
        detok._read_offset = len(detok._ids) - (len(published) - whole)
        owed = implied[len(published_text):] if implied.startswith(published_text) else ""
        return detok, owed

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream."""
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    Only the longest tail that could still grow into a stop string is held
    back, so without stop strings (or without a partial match) nothing waits.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self._window = max((len(s) for s in self._stops), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        hit = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self._pending = ""
            return text[:hit], True
        keep = self._partial_tail(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _partial_tail(self, text: str) -> int:
        for size in range(min(self._window - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
