"""The reader rule: which response messages make up a request's stream.

Any reader in any language applies the same rule (docs/wire-schema.md), and so does a
worker that takes a request over, to learn exactly what readers hold:

1. Read the request's messages in log order (one partition: they are keyed by request id).
2. Follow one attempt: the first message's. A ``takeover`` switches you to its attempt and
   keeps what you hold: the new attempt continues from it.
3. Skip every message of another attempt than the one you follow.
4. Of the attempt you follow, append each chunk; its first terminal (``final`` or
   ``error``) ends the stream.

A worker that lost a request (crashed, or frozen until the group gave its partitions away)
can still write after the takeover; rule 3 drops it, by the log's order alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streamproc import wire

log = logging.getLogger(__name__)
Kept = wire.TokenChunk | wire.FinalMessage | wire.ErrorMessage


@dataclass
class Follower:
    """One request's stream as the rule reads it."""

    request_id: str
    attempt: str | None = None
    """The attempt followed; None until the first message."""
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    text_length: int = 0
    next_seq: int = 0
    """The ``seq`` the followed stream's next message carries."""
    end: wire.FinalMessage | wire.ErrorMessage | None = None
    logprobs: list[wire.TokenLogprob] | None = None
    """The chunks' log-probabilities, when they carry them."""

    def take(self, message: wire.ResponseMessage) -> Kept | None:
        """Apply the rule to the request's next message: the message if it belongs to
        the stream, else None."""
        if self.end is not None:
            return None
        if isinstance(message, wire.Takeover):
            self.attempt = message.attempt
            return None
        if self.attempt is None:
            self.attempt = message.attempt
        elif message.attempt != self.attempt:
            return None
        if isinstance(message, wire.TokenChunk):
            self._append(message)
        else:
            self.end = message
        self.next_seq = message.seq + 1
        return message

    def _append(self, chunk: wire.TokenChunk) -> None:
        if chunk.offset != len(self.tokens) or chunk.text_offset != self.text_length:
            # Never from a worker of this version: said, and kept as the rule says.
            log.warning("request %s: chunk at token %d/char %d, the stream holds %d/%d",
                        self.request_id, chunk.offset, chunk.text_offset, len(self.tokens),
                        self.text_length)
        self.tokens.extend(chunk.token_ids)
        self.text.append(chunk.text)
        self.text_length += len(chunk.text)
        if isinstance(chunk.logprobs, list):
            self.logprobs = (self.logprobs or []) + chunk.logprobs

    @property
    def joined_text(self) -> str:
        return "".join(self.text)
