"""Where an outcome-only step's time goes on bench/same_work.py's work, against the CPU's limit.

    python bench/compute_bound.py [--reps 7]

Timed in this process on same_work's 4.1M Qwen2 and one batch of its 64 sampled responses:
- the CPU's fp32 matmul rate: a 2048 square, and the shape of the model's MLP on that batch;
- one policy forward+backward as prime does it (`prime.token_logprobs`, its log-softmax one row
  at a time), the same with one log-softmax over the batch (what the row loop costs), and its
  linear layers' FLOPs (6 x their multiply-adds: forward, input and weight gradients) per second;
- the same forward+backward with --share-prompts (each distinct prompt computed once, its KV cache
  shared by its K responses): less arithmetic than the work itself, the same numbers up to
  rounding.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from same_work import NEW_TOKENS, PROMPTS, K, build_work, print_machine  # noqa: E402

import batching  # noqa: E402
import data  # noqa: E402
import prime  # noqa: E402
import rollout  # noqa: E402


def median_seconds(fns, reps):
    """{name: median seconds} of each fn, timed in turn within each rep (after one warm-up call
    each), so that a slow spell of this machine falls on all of them alike."""
    times = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    print_machine()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tempfile.mkdtemp(prefix="compute-bound-")
    build_work(folder)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    policy, engine = load().train(), rollout.HFRollout(load(), tokenizer, NEW_TOKENS, 1.0, 1.0)
    rows = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"))][:PROMPTS]
    prompts = data.prompt_token_ids(tokenizer, [r for r in rows for _ in range(K)])
    torch.manual_seed(0)
    ids, attn, mask = batching.collate(prompts, engine.generate(prompts)[0], engine.pad_id)
    B, R = mask.shape
    P = ids.shape[1] - R
    inputs = {"input_ids": ids, "attention_mask": attn}

    def fwd_bwd(logps):
        def run():
            ((logps() * mask).sum() / mask.sum()).backward()
            policy.zero_grad(set_to_none=True)

        return run

    def shared():
        return prime.token_logprobs(policy, inputs, R, share_prompts=True)

    def batched():
        logits = policy(
            input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=R + 1
        ).logits[:, :-1]
        return logits.log_softmax(-1).gather(-1, ids[:, -R:, None]).squeeze(-1)

    fb = median_seconds(
        {
            "prime": fwd_bwd(lambda: prime.token_logprobs(policy, inputs, R)),
            "batched": fwd_bwd(batched),
            "shared": fwd_bwd(shared),
        },
        a.reps,
    )
    gap = (
        ((shared() - prime.token_logprobs(policy, inputs, R)).detach() * mask).abs().max().item()
    )

    linears = [m for m in policy.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    macs = (
        sum(m.in_features * m.out_features for m in linears) * B * (P + R)
        + policy.lm_head.in_features * policy.lm_head.out_features * B * R
    )
    square, mlp_in = torch.randn(2048, 2048), torch.randn(B * (P + R), policy.config.hidden_size)
    mlp_w = torch.randn(policy.config.hidden_size, policy.config.intermediate_size)
    mm = median_seconds({"square": lambda: square @ square, "mlp": lambda: mlp_in @ mlp_w}, a.reps)
    peak, at_shape = (
        2 * 2048**3 / mm["square"] / 1e9,
        2 * mlp_in.numel() * mlp_w.shape[1] / mm["mlp"] / 1e9,
    )
    print(
        f"batch: {B} responses, {P} prompt + {R} response columns ({K} responses per prompt), "
        f"{int(mask.sum())} response tokens\n"
    )
    print("| measurement | value |\n|---|---:|")
    print(f"| fp32 matmul, 2048 x 2048 x 2048 | {peak:.0f} GFLOP/s |")
    print(
        f"| fp32 matmul, the MLP's shape on this batch "
        f"({B * (P + R)} x {mlp_w.shape[0]} x {mlp_w.shape[1]}) | {at_shape:.0f} GFLOP/s |"
    )
    print(f"| policy forward+backward, prime.token_logprobs | {fb['prime']:.3f} s |")
    print(
        f"| the same with one log-softmax over the whole batch (no row loop) "
        f"| {fb['batched']:.3f} s |"
    )
    print(
        f"| the same with --share-prompts (each prompt once, its KV shared by {K} responses) "
        f"| {fb['shared']:.3f} s ({fb['shared'] / fb['prime']:.2f}x; log-probs within {gap:.1e}) |"
    )
    print(
        f"| prime's forward+backward: its linear layers' FLOPs "
        f"(6 x {macs / 1e9:.2f} G multiply-adds) / its time "
        f"| {6 * macs / fb['prime'] / 1e9:.0f} GFLOP/s |"
    )


if __name__ == "__main__":
    main()
