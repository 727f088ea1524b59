"""One request's generation state while it runs in the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

from streamproc.engine.detokenize import IncrementalDetokenizer, StopMatcher
from streamproc.engine.logits import PenaltyState
from streamproc.engine.sampling import Sampler, sampler_for
from streamproc.wire import (
    FinishReason,
    GenerationParams,
    GenerationRequest,
    Timings,
    TokenLogprob,
    Usage,
)

_keys = itertools.count()


def _next_key() -> int:
    return next(_keys)


@dataclass(frozen=True)
class Resumed:
    """What readers already hold of a request taken over from another attempt: the new
    attempt generates from here, as the continuation of prompt + these tokens."""

    tokens: list[int]
    text: str
    next_seq: int
    logprobs: list[TokenLogprob] | None = None
    """The published chunks' log-probabilities, when the request asked for them."""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with its prompt tokenized, ready for prefill."""

    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int
    origin_ts: float
    """Wall-clock seconds the latency clock starts from (submit time or Kafka append)."""
    key: int = field(default_factory=_next_key)
    """This admission's identity in this worker, stable across the engine's process
    boundary (request ids need not be unique: a duplicate job, a replay)."""
    resumed: Resumed | None = None
    """Set when the request continues another attempt's stream: ``prompt_ids`` then end
    with the tokens published so far, and ``max_new_tokens`` counts only what is left."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def kept_tokens(self) -> int:
        """Completion tokens already published by an earlier attempt."""
        return len(self.resumed.tokens) if self.resumed is not None else 0

    @property
    def prompt_tokens(self) -> int:
        """The prompt's own length, without any resumed completion."""
        return len(self.prompt_ids) - self.kept_tokens

    def resume(self, resumed: Resumed) -> PreparedRequest:
        """This request continuing from what ``resumed`` says readers hold."""
        return replace(self, prompt_ids=self.prompt_ids + resumed.tokens,
                       max_new_tokens=self.max_new_tokens - len(resumed.tokens),
                       resumed=resumed)

    def continued(self, tokens: list[int], text: str) -> PreparedRequest:
        """This request continuing after ``tokens`` (``text``) more than it started with:
        the same admission run again, from where it stood."""
        before = self.resumed or Resumed([], "", 0)
        return replace(self, prompt_ids=self.prompt_ids + tokens,
                       max_new_tokens=self.max_new_tokens - len(tokens),
                       resumed=Resumed(before.tokens + tokens, before.text + text,
                                       before.next_seq, before.logprobs))


@dataclass(frozen=True)
class Outcome:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    detail: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one request; ``outcome`` is set on its last event."""

    source: PreparedRequest
    """The very object that was admitted (request ids need not be unique)."""
    token_ids: list[int]
    text: str
    outcome: Outcome | None = None
    logprobs: list[TokenLogprob] | None = None
    """One per token of ``token_ids``, when the request asked for log-probabilities."""

    @property
    def request_id(self) -> str:
        return self.source.request_id


def unserved_event(prepared: PreparedRequest, now: float, reason: FinishReason,
                   detail: str = "") -> TokenEvent:
    """The answer to a request that ends before its prefill (expired, rejected)."""
    waited = max(0.0, now - prepared.origin_ts)
    usage = Usage(prompt_tokens=prepared.prompt_tokens, completion_tokens=prepared.kept_tokens)
    outcome = Outcome(reason, usage, Timings(queue_s=waited, ttft_s=0.0, total_s=waited),
                      detail)
    return TokenEvent(prepared, [], "", outcome)


@dataclass
class Sequence:
    prepared: PreparedRequest
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    sampler: Sampler | None
    """None: greedy."""
    eos_ids: frozenset[int]
    admitted_at: float = field(default_factory=time.time)
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    owed_text: str = ""
    """Text of a resumed request's published tokens that readers do not hold yet."""
    penalties: PenaltyState | None = None
    """Set by the engine at the first step of a request that asks for penalties."""

    @classmethod
    def start(cls, prepared: PreparedRequest, tokenizer: Any,
              eos_ids: frozenset[int]) -> Sequence:
        params = prepared.request.params
        sequence = cls(
            prepared=prepared,
            detokenizer=IncrementalDetokenizer(tokenizer, prepared.prompt_ids),
            stop=StopMatcher(params.stop),
            sampler=sampler_for(params, prepared.request_id),
            eos_ids=eos_ids,
        )
        if prepared.resumed is not None:
            sequence._resume_text(tokenizer, prepared.resumed)
        return sequence

    def _resume_text(self, tokenizer: Any, resumed: Resumed) -> None:
        """Pick the text up where readers' copy ends: text the published tokens imply
        but that was held back (an incomplete character, the start of a stop string)
        comes out with the next token."""
        prompt = self.prepared.prompt_ids[:self.prepared.prompt_tokens]
        self.detokenizer, owed = IncrementalDetokenizer.resumed(
            tokenizer, prompt, resumed.tokens, resumed.text)
        self.owed_text = owed

    @property
    def position(self) -> int:
        """Completion tokens so far, of every attempt: where sampling draws from."""
        return self.prepared.kept_tokens + len(self.generated)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    @property
    def params(self) -> GenerationParams:
        return self.prepared.request.params

    @property
    def completion(self) -> list[int]:
        """Every completion token so far, of every attempt."""
        kept = self.prepared.prompt_ids[self.prepared.prompt_tokens:]
        return kept + self.generated

    def advance(self, token: int, now: float, logprob: TokenLogprob | None = None
                ) -> TokenEvent:
        """Append ``token`` and say what it adds to the stream.

        An end-of-sequence token (a chat model's end of turn) ends the stream but is not
        part of it: not in its text, its token ids or ``usage`` (as ``generate()``'s output
        less its last token), so the stream holds the answer and nothing else."""
        if self.first_token_at is None:
            self.first_token_at = now
        if token in self.eos_ids and not self.prepared.request.params.ignore_eos:
            return self._finish_event([], self._drain(self.detokenizer.flush()), "stop", now)
        self.generated.append(token)
        if self.penalties is not None:
            self.penalties.generated(token)
        reason: FinishReason | None = None
        text, hit = self.stop.feed(self._owed() + self.detokenizer.push(token))
        if hit:
            reason = "stop"
        elif len(self.generated) >= self.prepared.max_new_tokens:
            reason, text = "length", text + self._drain(self.detokenizer.flush())
        return self._event(token, text, reason, now, logprob)

    def expire(self, now: float) -> TokenEvent:
        """End early because the deadline passed mid-generation."""
        return self._finish_event([], self._drain(""), "expired", now)

    def cancel(self, now: float) -> TokenEvent:
        """End early because the producer cancelled the request."""
        return self._finish_event([], self._drain(""), "cancelled", now)

    def _owed(self) -> str:
        owed, self.owed_text = self.owed_text, ""
        return owed

    def _drain(self, tail: str) -> str:
        text, hit = self.stop.feed(self._owed() + tail)
        return text if hit else text + self.stop.flush()

    def _event(self, token: int, text: str, reason: FinishReason | None,
               now: float, logprob: TokenLogprob | None) -> TokenEvent:
        logprobs = None if logprob is None else [logprob]
        if reason is None:
            return TokenEvent(self.prepared, [token], text, None, logprobs)
        return self._finish_event([token], text, reason, now, logprobs)

    def _finish_event(self, tokens: list[int], text: str, reason: FinishReason,
                      now: float, logprobs: list[TokenLogprob] | None = None) -> TokenEvent:
        self.finished = True
        origin = self.prepared.origin_ts
        first = self.first_token_at if self.first_token_at is not None else now
        outcome = Outcome(
            finish_reason=reason,
            usage=Usage(self.prepared.prompt_tokens, self.position),
            timings=Timings(queue_s=max(0.0, self.admitted_at - origin),
                            ttft_s=max(0.0, first - origin), total_s=max(0.0, now - origin)),
        )
        return TokenEvent(self.prepared, tokens, text, outcome, logprobs)
