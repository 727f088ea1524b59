"""Turning a GGUF file into an ordinary transformers model directory, once.

transformers reads GGUF files of the architectures it supports (Llama, Mistral, Qwen2,
Gemma, Phi-3 and others) and *dequantizes* them: the quantized blocks become full-precision
tensors. So a GGUF costs, in the cache and in memory, what the unquantized model does:
4 bytes a parameter in fp32 as converted (a 4-bit file grows about seven-fold; SmolLM2-135M:
93 MB of Q4_1 becomes 540 MB), and on a GPU the worker loads it in bf16, 2 bytes a
parameter. Dequantizing goes through Python once (about 20 s for 135M parameters here);
afterwards the directory loads through the normal path in a fraction of a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamproc.errors import ModelError
from streamproc.wheels import Progress


def gguf_cache_name(path: Path) -> str:
    """The cache entry of a local GGUF: its name, and a key that changes with the file."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: Path, out: Path, progress: Progress) -> None:
    """Dequantize ``gguf`` and save model, tokenizer and chat template into ``out``."""
    _require("gguf", "reading GGUF files")
    _require("accelerate", "reading GGUF files")
    progress(f"converting {gguf.name} to safetensors (once; dequantizing takes a while)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{gguf}: transformers cannot read this GGUF file ({exc})") from exc
    # The loaded tensors are already dequantized: drop the marker that would make
    # save_pretrained (and every later load) treat the model as quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ModelError(f"{what} needs the {module} package: pip install {module}") from exc
