"""Loading any causal LM and its tokenizer: a catalog name, a GGUF file, a directory or a
hub id (see :mod:`streamproc.engine.catalog`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from streamproc import logs
from streamproc.config import Device
from streamproc.engine import catalog
from streamproc.errors import ConfigError, ModelError
from streamproc.flow.kv_budget import kv_bytes_per_token

logs.adopt_library_loggers()  # transformers was just imported

# Past this, a config's max_position_embeddings is a placeholder, not a limit.
_UNBOUNDED_CONTEXT = 1_000_000


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    """None when only described (:func:`describe_model`): its weights are elsewhere."""
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_ids: frozenset[int]
    pad_id: int
    kv_bytes_per_token: int = 0
    """Keys and values of one token over every layer, at ``dtype`` (0: unknown)."""


def resolve_device(device: Device) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(name: str) -> Any:
    """A tokenizer of its own for each thread that uses one (they are not thread-safe)."""
    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(name)


def load_model(name: str, device: Device = "auto", *,
               allow_unsafe_weights: bool = False) -> LoadedModel:
    """Load ``name`` (hub id or directory) for inference with the KV cache on.

    Only safetensors weights load unless ``allow_unsafe_weights``: pickle-based
    ``.bin`` files can run code when read. Remote code is never trusted.
    """
    name, target, tokenizer = _device_and_tokenizer(name, device)
    dtype = pick_dtype(target)
    pickled = not allow_unsafe_weights and any(Path(name).glob("*.bin"))
    hint = ("; its weights are pickle-based (.bin), which can run code when read: "
            "--allow-unsafe-weights loads them") if pickled else ""
    with _load_errors(name, hint):
        model: Any = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=None if allow_unsafe_weights else True,
            trust_remote_code=False)
    model = model.to(target).eval()
    model.generation_config.use_cache = True
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        dtype=dtype,
        max_context=_max_context(model.config, tokenizer),
        eos_ids=_eos_ids(model.generation_config, tokenizer),
        pad_id=_pad_id(tokenizer),
        kv_bytes_per_token=_kv_bytes_per_token(model.config, dtype),
    )


def describe_model(name: str, device: Device = "auto") -> LoadedModel:
    """What :func:`load_model` gives but the weights (``model`` is None): for a worker whose
    engine loads them in a process of its own, so they are not held twice."""
    name, target, tokenizer = _device_and_tokenizer(name, device)
    with _load_errors(name):
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    try:
        generation = GenerationConfig.from_pretrained(name)
    except OSError:  # none saved: what the model config says, as from_pretrained does
        generation = GenerationConfig.from_model_config(config)
    return LoadedModel(model=None, tokenizer=tokenizer, device=target,
                       dtype=pick_dtype(target), max_context=_max_context(config, tokenizer),
                       eos_ids=_eos_ids(generation, tokenizer), pad_id=_pad_id(tokenizer),
                       kv_bytes_per_token=_kv_bytes_per_token(config, pick_dtype(target)))


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """From the model's config: 0 where it does not say (an unusual architecture)."""
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", 0)
    layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    if not (heads and layers and hidden):
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return kv_bytes_per_token(layers, kv_heads, head_dim, torch.finfo(dtype).bits // 8)


def _device_and_tokenizer(name: str, device: Device) -> tuple[str, torch.device, Any]:
    """What loading and describing a model both start with: where it is (fetched and
    converted first if it is a catalog name or a GGUF file), the device, the tokenizer."""
    target = resolve_device(device)
    path = catalog.resolve(name)
    hf_logging.disable_progress_bar()
    with _load_errors(path):
        return path, target, load_tokenizer(path)


@contextmanager
def _load_errors(name: str, hint: str = "") -> Iterator[None]:
    """transformers' failures to find or read a model, as one line that says what to do
    (the catalog's names, when ``name`` is nowhere on disk)."""
    try:
        yield
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        known = "" if Path(name).exists() else \
            f" (known names: {', '.join(catalog.known_names())})"
        raise ModelError(f"cannot load model {name!r}: {first}{hint}{known}") from exc


def _max_context(config: Any, tokenizer: Any) -> int:
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < _UNBOUNDED_CONTEXT]
    return min(usable, default=2048)


def _eos_ids(generation_config: Any, tokenizer: Any) -> frozenset[int]:
    configured = generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids if i is not None)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
