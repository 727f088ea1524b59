"""top_k, the penalties and log-probabilities, each against a reference computed directly
with torch (and transformers' own logits processors) on the same logits."""

from __future__ import annotations

import random

import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from streamproc.engine.engine import Engine
from streamproc.engine.loader import LoadedModel
from streamproc.engine.logits import PenaltyState, apply_penalties
from streamproc.engine.sampling import Sampler, choose_tokens, uniform_draw
from streamproc.wire import GenerationParams

from .test_engine import prepared, run_to_completion, tokens

VOCAB = 300


def reference_draw(logits: torch.Tensor, sampler: Sampler, position: int) -> int:
    """transformers' warpers (temperature, top-k, top-p, in generate()'s order) on one row,
    then the inverse-transform draw streamproc documents: walk the tokens (from the
    likeliest down when truncated, else in vocabulary order) until the cumulative
    probability passes u times the total."""
    row = logits.unsqueeze(0).double()
    row = TemperatureLogitsWarper(sampler.temperature)(None, row)
    if sampler.top_k:
        row = TopKLogitsWarper(sampler.top_k)(None, row)
    if sampler.top_p < 1:
        row = TopPLogitsWarper(sampler.top_p)(None, row)
    probs = torch.softmax(row[0], dim=-1)
    order = (torch.argsort(probs, descending=True, stable=True) if sampler.truncates
             else torch.arange(len(probs)))
    cdf = torch.cumsum(probs[order], dim=-1)
    target = uniform_draw(sampler.seed, position) * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype), right=True))
    return int(order[min(index, int((probs > 0).sum()) - 1)])


def test_top_k_and_top_p_draw_what_transformers_warpers_leave() -> None:
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(160, VOCAB, generator=gen) * 3
    samplers = [Sampler(seed=rng.randrange(1 << 40), temperature=rng.choice([0.5, 1.0, 1.7]),
                        top_p=rng.choice([1.0, 0.9, 0.5]), top_k=rng.choice([0, 1, 5, 40]))
                for _ in range(len(logits))]
    positions = [rng.randrange(100) for _ in samplers]
    chosen = choose_tokens(logits, samplers, positions)
    expected = [reference_draw(logits[i], s, positions[i]) for i, s in enumerate(samplers)]
    assert chosen == expected
    for row, sampler in enumerate(samplers):
        if sampler.top_k:
            allowed = torch.topk(logits[row], sampler.top_k).indices.tolist()
            assert chosen[row] in allowed


def test_penalties_change_the_logits_as_openai_and_transformers_define_them() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, VOCAB, generator=gen)
    prompt, completion = [4, 5, 6], [6, 7, 7, 7]
    params = [GenerationParams(frequency_penalty=0.7, presence_penalty=0.4),
              GenerationParams(repetition_penalty=1.3), GenerationParams()]
    states = [PenaltyState.start(p, prompt, completion, VOCAB, torch.device("cpu"))
              for p in params]
    assert states[2] is None
    penalized = logits.clone()
    apply_penalties(penalized, states)
    counts = torch.bincount(torch.tensor(completion), minlength=VOCAB).float()
    expected_openai = logits[0] - counts * 0.7 - (counts > 0).float() * 0.4
    assert torch.allclose(penalized[0], expected_openai)
    seen = torch.tensor([prompt + completion])
    expected_hf = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits[1:2].clone())
    assert torch.allclose(penalized[1], expected_hf[0])
    assert torch.equal(penalized[2], logits[2])


def manual_greedy(loaded: LoadedModel, prompt: list[int], steps: int, frequency: float,
                  presence: float) -> tuple[list[int], list[torch.Tensor]]:
    """Full forward passes, no cache: each step's raw log-probabilities, and the argmax of
    the logits less OpenAI's penalties."""
    ids, out, logprobs = list(prompt), list[int](), list[torch.Tensor]()
    with torch.no_grad():
        for _ in range(steps):
            logits = loaded.model(torch.tensor([ids])).logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, dim=-1))
            counts = torch.bincount(torch.tensor(out or [0]), minlength=logits.shape[-1])
            counts = counts.float() if out else torch.zeros_like(logits)
            token = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
            out.append(token)
            ids.append(token)
    return out, logprobs


def test_greedy_with_frequency_and_presence_penalties_equals_the_manual_loop(
        loaded_model: LoadedModel) -> None:
    prompt = [3, 4, 3, 4, 3, 4]  # its plain greedy output repeats a token within 20
    requests = [prepared("f", prompt, 20, frequency_penalty=1.5, presence_penalty=0.5,
                         ignore_eos=True),
                prepared("plain", [7, 8, 9], 20, ignore_eos=True)]  # shares the batch
    events = run_to_completion(Engine(loaded_model), [requests])
    expected, _ = manual_greedy(loaded_model, prompt, 20, 1.5, 0.5)
    assert tokens(events["f"]) == expected
    plain, _ = manual_greedy(loaded_model, [7, 8, 9], 20, 0.0, 0.0)
    assert tokens(events["plain"]) == plain
    assert expected != manual_greedy(loaded_model, prompt, 20, 0.0, 0.0)[0]  # it bit


def test_greedy_with_a_repetition_penalty_equals_generate(loaded_model: LoadedModel) -> None:
    prompt = [3, 4, 3, 4, 3, 4]
    events = run_to_completion(Engine(loaded_model), [[
        prepared("r", prompt, 20, repetition_penalty=1.8, ignore_eos=True)]])
    ids = torch.tensor([prompt])
    out = loaded_model.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=20, do_sample=False,
                                      repetition_penalty=1.8, pad_token_id=loaded_model.pad_id)
    assert tokens(events["r"]) == out[0, len(prompt):].tolist()
    assert tokens(events["r"]) != manual_greedy(loaded_model, prompt, 20, 0.0, 0.0)[0]


def test_logprobs_are_log_softmax_of_the_models_logits_at_each_step(
        loaded_model: LoadedModel) -> None:
    """Raw: taken before the penalty that changes which token is chosen."""
    prompt = [5, 9, 14, 3, 22]
    requests = [prepared("lp", prompt, 8, logprobs=True, top_logprobs=3,
                         frequency_penalty=1.5, ignore_eos=True),
                prepared("other", [11, 12], 8, ignore_eos=True)]
    events = run_to_completion(Engine(loaded_model), [requests])
    chosen, tables = manual_greedy(loaded_model, prompt, 8, 1.5, 0.0)
    got = [lp for e in events["lp"] for lp in (e.logprobs or [])]
    assert tokens(events["lp"]) == chosen
    assert len(got) == len(chosen)
    tokenizer = loaded_model.tokenizer
    for token, table, entry in zip(chosen, tables, got, strict=True):
        assert abs(entry.logprob - float(table[token])) < 1e-4
        assert entry.token == tokenizer.decode([token])
        top = torch.topk(table, 3)
        assert [t.token_id for t in entry.top] == top.indices.tolist()
        for t, value in zip(entry.top, top.values.tolist(), strict=True):
            assert abs(t.logprob - value) < 1e-4
    assert all(e.logprobs is None for e in events["other"])
