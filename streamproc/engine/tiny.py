"""A tiny random-weight causal LM with a tokenizer made in code.

Weights cannot be downloaded everywhere streamproc is tested, so the tests and
the demo build this model and save it with ``save_pretrained``; it then loads
through exactly the same ``from_pretrained`` path as a real hub model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_CORPUS = [
    "Kafka holds the backlog while workers stream tokens to every subscriber in order.",
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
    "Streams of prompts arrive, batches form under an adaptive window, tokens flow out.",
    "Latency, throughput, lag and backpressure: the words of people who run queues.",
    "def hello(name):\n    return f'hello, {name}!'  # 0123456789 {}[]()<>=+-*/",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small built-in corpus.

    Byte level means every string encodes and decodes exactly, and the trained
    merges make tokens span several characters, as real tokenizers do.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(directory: str | Path, *, seed: int = 0, layers: int = 2,
                    hidden: int = 64) -> Path:
    """Build, save and return the directory of a tiny Llama-architecture model."""
    hf_logging.disable_progress_bar()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # A wide init spreads the logits, so greedy argmax has clear winners.
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
