"""The engine against ``model.generate()`` on a GPU: ``make gpu-check``.

A random-weight Llama of a real size (``1b``: 16 layers, hidden 2048, 8 KV heads — the
shape of Llama 3.2 1B with a 32k vocabulary) is built here, in bf16, so nothing is
downloaded. At each batch size, the same prompts go through the engine (every request
admitted in one step, stepped until all are done) and through ``generate()`` (one call,
greedy, exactly as many new tokens), side by side. Reported per batch size: tokens/s of
both and their ratio, the engine's decode steps/s, and its decode model bandwidth
utilisation — the bytes a decode step must read (every weight, and the batch's keys and
values so far) times steps/s over the device's peak memory bandwidth — and how many
requests' greedy tokens equal ``generate()``'s (bf16 on a GPU may differ where the batch
changes the kernels' reduction order: reported, not asserted).

Runs where torch and transformers are installed; the rest of streamproc's imports (msgspec,
aiokafka) install from ``deploy/gpu-check/wheels`` (``make gpu-check-wheels``) on a machine
without a package registry. ``--size tiny --device cpu`` is the path the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.sequence import PreparedRequest
from streamproc.engine.tiny import build_tokenizer
from streamproc.wire import GenerationParams, GenerationRequest

SIZES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
}
PEAK_BYTES_PER_S = {  # memory bandwidth of the device, by a substring of its name
    "H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12, "A10": 0.6e12,
}


@dataclass(frozen=True)
class Row:
    batch: int
    engine_tokens_per_s: float
    generate_tokens_per_s: float
    ratio: float
    decode_steps_per_s: float
    decode_mbu: float | None
    greedy_equal: int


def build(size: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    tokenizer = build_tokenizer()
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        model: Any = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).eval()
    # No end of sequence: every request generates exactly its tokens, in both runs.
    return LoadedModel(model, tokenizer, device, dtype, 4096, frozenset(),
                       int(tokenizer.pad_token_id))


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(loaded: LoadedModel, batch: list[list[int]], new: int
               ) -> tuple[float, float, dict[int, list[int]]]:
    """Seconds in all, seconds decoding (after the step that prefilled), tokens by row."""
    engine = Engine(loaded, prefix_cache_bytes=0)
    engine.warm_up()
    params = GenerationParams(max_new_tokens=new, ignore_eos=True)
    admitted = [PreparedRequest(GenerationRequest(request_id=str(i), prompt="-",
                                                  params=params), p, new, 0.0)
                for i, p in enumerate(batch)]
    out: dict[int, list[int]] = {i: [] for i in range(len(batch))}
    done, first = 0, True
    _sync(loaded.device)
    began = time.perf_counter()
    decode_began = began
    while done < len(batch):
        for event in engine.step(admitted if first else []):
            out[int(event.request_id)] += event.token_ids
            done += event.outcome is not None
        if first:
            _sync(loaded.device)
            decode_began, first = time.perf_counter(), False
    _sync(loaded.device)
    ended = time.perf_counter()
    return ended - began, ended - decode_began, out


def run_generate(loaded: LoadedModel, batch: list[list[int]], new: int
                 ) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(batch, device=loaded.device)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new,
              "min_new_tokens": new, "do_sample": False, "pad_token_id": loaded.pad_id}
    loaded.model.generate(ids[:, :8], **{**kwargs, "attention_mask": torch.ones_like(ids[:, :8]),
                                         "max_new_tokens": 2, "min_new_tokens": 2})
    _sync(loaded.device)
    began = time.perf_counter()
    out = loaded.model.generate(ids, **kwargs)
    _sync(loaded.device)
    return time.perf_counter() - began, out[:, ids.shape[1]:].tolist()


def decode_bytes(loaded: LoadedModel, rows: int, context: float) -> float:
    """What one decode step reads: every weight, and the keys and values of ``rows``
    sequences of ``context`` tokens."""
    model = loaded.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim \
        * torch.finfo(loaded.dtype).bits // 8
    return float(weights + rows * context * per_token)


def peak_bandwidth(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)


def measure(loaded: LoadedModel, batches: list[int], prompt_tokens: int, new: int,
            peak: float | None) -> list[Row]:
    vocab = min(int(loaded.model.config.vocab_size), len(loaded.tokenizer))
    rows = []
    for size in batches:
        batch = prompts(size, prompt_tokens, vocab)
        total, decoding, tokens = run_engine(loaded, batch, new)
        generate_s, reference = run_generate(loaded, batch, new)
        steps_per_s = (new - 1) / decoding if decoding > 0 else 0.0
        mbu = None
        if peak:
            mbu = decode_bytes(loaded, size, prompt_tokens + new / 2) * steps_per_s / peak
        engine_rate, generate_rate = size * new / total, size * new / generate_s
        rows.append(Row(size, engine_rate, generate_rate, engine_rate / generate_rate,
                        steps_per_s, mbu,
                        sum(tokens[i] == reference[i] for i in range(size))))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: Row) -> str:
    mbu = f"{row.decode_mbu:.0%}" if row.decode_mbu is not None else "n/a"
    return (f"batch {row.batch:4d}: engine {row.engine_tokens_per_s:9.0f} tok/s, generate() "
            f"{row.generate_tokens_per_s:9.0f} tok/s, ratio {row.ratio:.2f}; decode "
            f"{row.decode_steps_per_s:.1f} steps/s, MBU {mbu}; greedy equal "
            f"{row.greedy_equal}/{row.batch}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamproc.devtools.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's memory bandwidth in GB/s (default: by its name)")
    parser.add_argument("--json", type=Path, help="write the figures here as well")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (use --device cpu --size tiny for the CPU path)",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.perf_counter()
    loaded = build(args.size, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu-check: {args.size} random-weight Llama, {dtype}, on {name}; prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each", flush=True)
    peak = peak_bandwidth(device, args.peak_gbps and args.peak_gbps * 1e9)
    rows = measure(loaded, [int(b) for b in args.batches.split(",")], args.prompt_tokens,
                   args.new_tokens, peak)
    print(f"gpu-check: done in {time.perf_counter() - began:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": args.size,
                                         "dtype": str(dtype), "peak_bytes_per_s": peak,
                                         "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
