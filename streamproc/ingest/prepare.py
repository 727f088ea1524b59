"""Validating a decoded request and tokenizing its prompt.

A request that decodes but cannot be served gets a :class:`RequestError` whose
``code`` goes back to the producer on its reply topic.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from streamproc import wire
from streamproc.config import TopicNames
from streamproc.engine.sequence import PreparedRequest
from streamproc.errors import RequestError
from streamproc.openai.protocol import ANY_LENGTH

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_PENALTY = 2.0
MAX_TOP_LOGPROBS = 20


class Preparer:
    """Owns a tokenizer of its own (tokenizers are not shared across threads)."""

    def __init__(self, tokenizer: Any, max_context: int, max_new_tokens_cap: int,
                 topics: TopicNames, *, max_prompt_tokens: int | None = None,
                 max_span_tokens: int = 0, models: frozenset[str] = frozenset()) -> None:
        """``max_span_tokens``: prompt + max_new_tokens beyond this are refused (the
        worker's KV memory could never hold them); 0: no bound. ``models``: the names a
        request may give as its ``model`` (empty: any)."""
        self._tokenizer = tokenizer
        self._max_context = max_context
        self._max_prompt = max_prompt_tokens or max_context
        self.max_span_tokens = max_span_tokens
        self._cap = max_new_tokens_cap
        self._topics = topics
        self._models = models

    @property
    def reply_topic_default(self) -> str:
        return self._topics.responses

    def reply_topic(self, request: wire.GenerationRequest) -> str:
        return request.reply_topic or self._topics.responses

    def reply_allowed(self, topic: str) -> bool:
        return self._topics.reply_allowed(topic)

    def prepare(self, request: wire.GenerationRequest, appended_at: float) -> PreparedRequest:
        """Raise :class:`RequestError` or return the request ready for prefill."""
        if not self._topics.reply_allowed(self.reply_topic(request)):
            raise RequestError("unknown_reply_topic",
                               f"reply topic {request.reply_topic!r} is not served here")
        self._check_model(request.model)
        self._check_params(request.params, any_length=request.openai is not None)
        ids = self._tokenize(request.prompt)
        if len(ids) > self._max_prompt:
            raise RequestError("prompt_too_long", f"prompt has {len(ids)} tokens; the limit "
                               f"is {self._max_prompt}", param="prompt")
        budget = self._max_context - len(ids)
        if request.params.max_new_tokens == ANY_LENGTH:  # an OpenAI job that set no limit
            room = self.max_span_tokens - len(ids) if self.max_span_tokens else budget
            request = _limited(request, min(self._cap, budget, room))
        if budget < request.params.max_new_tokens:
            raise RequestError(
                "prompt_too_long",
                f"prompt has {len(ids)} tokens; with max_new_tokens="
                f"{request.params.max_new_tokens} it exceeds the {self._max_context}-token context",
            )
        span = len(ids) + request.params.max_new_tokens
        if self.max_span_tokens and span > self.max_span_tokens:
            raise RequestError(
                "prompt_too_long",
                f"prompt ({len(ids)} tokens) and max_new_tokens "
                f"({request.params.max_new_tokens}) need {span} tokens of KV memory; this "
                f"worker's --kv-memory-bytes holds {self.max_span_tokens}")
        return PreparedRequest(request, ids, request.params.max_new_tokens,
                               _origin(request.submitted_at, appended_at))

    def _check_model(self, model: str) -> None:
        if model and self._models and model not in self._models:
            raise RequestError("model_not_found", f"the model {model!r} is not served here "
                               f"(this group serves {', '.join(sorted(self._models))})",
                               param="model")

    def _check_params(self, params: wire.GenerationParams, *, any_length: bool) -> None:
        lowest = ANY_LENGTH if any_length else 1
        if not lowest <= params.max_new_tokens <= self._cap:
            _invalid("max_new_tokens", f"max_new_tokens must be between 1 and {self._cap}, "
                     f"got {params.max_new_tokens}")
        if not math.isfinite(params.temperature) or params.temperature < 0:
            _invalid("temperature", f"temperature must be a finite number >= 0, got "
                     f"{params.temperature}")
        if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
            _invalid("top_p", f"top_p must be in (0, 1], got {params.top_p}")
        if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH
                                                      for s in params.stop):
            _invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_LENGTH} "
                     "characters")
        _check_sampling(params)

    def _tokenize(self, prompt: str | list[wire.ChatMessage]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("empty_prompt", "the prompt is empty")
            return list(self._tokenizer(prompt, add_special_tokens=True).input_ids)
        if not prompt:
            raise RequestError("empty_prompt", "the chat has no messages")
        return self._chat_ids(prompt)

    def _chat_ids(self, messages: list[wire.ChatMessage]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):
            raise RequestError("chat_unsupported", "this model has no chat template")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        text = self._tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                   tokenize=False)
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)


def _check_sampling(params: wire.GenerationParams) -> None:
    if params.top_k < 0:
        _invalid("top_k", f"top_k must be >= 0 (0: off), got {params.top_k}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        if not math.isfinite(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
            _invalid(name, f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, "
                     f"got {value}")
    if not math.isfinite(params.repetition_penalty) or params.repetition_penalty <= 0:
        _invalid("repetition_penalty", f"repetition_penalty must be a finite number > 0, got "
                 f"{params.repetition_penalty}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        _invalid("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                 f"got {params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        _invalid("top_logprobs", "top_logprobs needs logprobs")


def _limited(request: wire.GenerationRequest, tokens: int) -> wire.GenerationRequest:
    return msgspec.structs.replace(
        request, params=msgspec.structs.replace(request.params, max_new_tokens=max(1, tokens)))


def _invalid(param: str, message: str) -> None:
    raise RequestError("invalid_params", message, param=f"params.{param}")


def _origin(submitted_at: float | None, appended_at: float) -> float:
    """The producer's submit time if it is a plausible Unix time, else the append time."""
    if submitted_at is not None and math.isfinite(submitted_at) \
            and 0 < submitted_at <= time.time() + 60:
        return submitted_at
    return appended_at
