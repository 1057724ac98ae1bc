"""Rollout tokens/s of rollout.HFRollout.generate, next to the machine's weight-bandwidth limit.

    python bench/generation_speed.py [--new-tokens 64] [--batches 8,16,32,64]

Each decoding step reads every weight at least once and yields one token per response, so it
cannot beat batch x memory bandwidth / weight bytes tokens/s (the limit; bandwidth measured here
as the read rate of a large tensor's sum; the copy rate, bytes copied per second, is printed too).
Models, fp32:
- the embedded default (2-layer Qwen2, hidden 128; the cached warm-up model if present) at the
  batch its preset samples and evaluates: 64 prompts x K=4 = 256 responses;
- a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied)
  from its config, at batch 8 (run_smollm2.sh: 2 prompts x K=4) and larger, prompts of
  --prompt-len random tokens (run_smollm2.sh's few-shot prompts are about that long).
Every response runs to --new-tokens: the EOS is set to an id no model can sample.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# busy_cpu_seconds: its children count as its own (none here)
from same_work import busy_cpu_seconds, print_machine  # noqa: E402

import bootstrap  # noqa: E402
import data  # noqa: E402
import rollout  # noqa: E402

EMBEDDED = os.path.expanduser("~/.cache/prime/embedded-addition-v1-seed0-target0.3")


def memory_bandwidth(mib=512, reps=5):
    """(read, copy) bytes per second, best of `reps`, on a `mib` MiB fp32 tensor: read = summing it
    (what decoding does to weights), copy = bytes copied per second (each is read and written)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    read = copy = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        src.sum()
        t1 = time.perf_counter()
        dst.copy_(src)
        read, copy = min(read, t1 - t0), min(copy, time.perf_counter() - t1)
    return mib * 2**20 / read, mib * 2**20 / copy


def embedded_model():
    """(model, tokenizer, what it is): the cached warm-up model, else the same architecture
    untrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if os.path.exists(os.path.join(EMBEDDED, "config.json")):
        return (AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32),
                AutoTokenizer.from_pretrained(EMBEDDED, padding_side="left"),
                "embedded default (cached)")
    corpus = [data.addition_question(a, b) + data.addition_solution(a, b)
              for a, b in data.addition_pairs(2000, 0)]
    tokenizer = bootstrap.build_tokenizer(corpus + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    return bootstrap.build_model(tokenizer, 0)[0], tokenizer, "embedded default (untrained)"


def smollm2_shape():
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    return AutoModelForCausalLM.from_config(config).float()


class NoTokenizer:  # what HFRollout reads of a tokenizer, for a model without one
    eos_token_id, pad_token_id = 2, 2


def tokens_per_s(model, tokenizer, prompts, new_tokens):
    """(tokens/s, tokens) of one generate() call on `prompts` after a short warm-up call."""
    engine = rollout.HFRollout(model, tokenizer, new_tokens, temperature=1.0, top_p=1.0)
    engine.eos_ids = [model.config.vocab_size + 1]  # unreachable: every response is new_tokens long
    engine.generate(prompts[:2])
    t0 = time.perf_counter()
    responses, _ = engine.generate(prompts)
    seconds = time.perf_counter() - t0
    n = sum(map(len, responses))
    assert n == len(prompts) * new_tokens, f"{n} tokens, expected {len(prompts) * new_tokens}"
    return n / seconds, n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="8,16,32,64", help="SmolLM2-shape batch sizes")
    p.add_argument("--prompt-len", type=int, default=150, help="SmolLM2-shape prompt tokens")
    a = p.parse_args()
    print_machine()
    (all0, own0), t0 = busy_cpu_seconds(), time.time()
    bandwidth, copy = memory_bandwidth()
    print(f"memory bandwidth: read {bandwidth / 1e9:.1f} GB/s (the limit below), "
          f"copy {copy / 1e9:.1f} GB/s (bytes copied); {a.new_tokens} new tokens per response, "
          f"fp32\n")
    rows = []
    model, tokenizer, name = embedded_model()
    prompts = data.prompt_token_ids(tokenizer, data.addition_rows(64, 0))
    four_each = [q for q in prompts for _ in range(4)]  # K = 4 responses per prompt
    rows.append((name, model, tokens_per_s(model, tokenizer, four_each, a.new_tokens), 256))
    model = smollm2_shape()
    gen = torch.Generator().manual_seed(0)
    for batch in map(int, a.batches.split(",")):
        prompts = torch.randint(3, 49152, (batch, a.prompt_len), generator=gen).tolist()
        rows.append(("SmolLM2-135M shape", model,
                     tokens_per_s(model, NoTokenizer(), prompts, a.new_tokens), batch))
    print("| model | params | batch | tokens/s | weight-bandwidth limit tokens/s | fraction "
          "| fraction of the copy-rate limit |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, model, (speed, _), batch in rows:
        params = list(model.parameters())  # tied embeddings: one tensor, read once per step
        weight_bytes = sum(t.numel() * t.element_size() for t in params)
        limit = batch * bandwidth / weight_bytes
        print(f"| {name} | {sum(t.numel() for t in params) / 1e6:.2f}M | {batch} | {speed:.0f} "
              f"| {limit:.0f} | {speed / limit:.1%} | {speed / (limit * copy / bandwidth):.1%} |")
    (all1, own1), seconds = busy_cpu_seconds(), time.time() - t0
    others = max(0.0, (all1 - all0) - (own1 - own0)) / (seconds * os.cpu_count())
    print(f"\nother processes used {others:.0%} of the CPUs meanwhile (rerun if not ~0: they slow "
          f"PyTorch many-fold); load average (1 min) at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
