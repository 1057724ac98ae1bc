"""What one GPU holds for `bash run_math.sh` at 7B on 8 GPUs: arithmetic from the model config,
not a measurement (no GPU has run it here).

    python bench/memory_7b.py [--config PATH/config.json] [--gpus 8] [--gpu-gib 80]

The default config is Qwen2.5-Math-7B's (Eurus-2-7B-SFT's base). run_math.sh: FSDP2 over the
GPUs with fp32 master weights, fp32 gradients and AdamW states for policy and PRM, a bf16 frozen
reference, bf16 compute with gradient checkpointing, micro-batches of at most 16,384 tokens (or
one sequence, if longer), and a colocated vLLM engine that takes --vllm-gpu-memory-utilization 0.3
of the GPU while it samples and sleeps (KV cache freed, weights offloaded) while the trainer runs.
--logits whole: every response logit at once, as prime did before its LM head ran in chunks;
chunks (now): batching.LOGITS_BUDGET logits at a time.
"""
import argparse
import json

QWEN25_MATH_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      tie_word_embeddings=False)


def parameters(c):
    """(total, one decoder layer) parameter counts of a Qwen2-style config."""
    h, inter, head = (c["hidden_size"], c["intermediate_size"],
                      c["hidden_size"] // c["num_attention_heads"])
    kv = c["num_key_value_heads"] * head
    # q, k, v (biases), o, MLP, norms
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    embeddings = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + embeddings + h, layer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an HF config.json (default: Qwen2.5-Math-7B's numbers)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="memory per GPU (paper: 8x A100-80G)")
    parser.add_argument("--tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--max-response-len", type=int, default=3072)
    parser.add_argument("--vllm-share", type=float, default=0.3)
    parser.add_argument("--logits", choices=["chunks", "whole"], default="chunks")
    args = parser.parse_args()
    c = dict(QWEN25_MATH_7B, **(json.load(open(args.config)) if args.config else {}))
    total, layer = parameters(c)
    h, inter, n, gib = c["hidden_size"], c["intermediate_size"], args.gpus, 2**30
    sequence = 1024 + args.max_response_len  # run_math.sh's prompts: up to 1,024 tokens
    tokens = max(args.tokens_per_micro_batch, sequence)  # a micro-batch holds a whole sequence
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    response_tokens = args.max_response_len * max(1, tokens // sequence)
    if args.logits == "whole":
        logits = [(f"logits of {response_tokens:,} response tokens, bf16, and their gradient",
                   2 * response_tokens * c["vocab_size"] * 2),
                  ("fp32 log-softmax copies of each row, kept for the backward pass",
                   response_tokens * c["vocab_size"] * 4)]
    else:  # a chunk's fp32 logits, its softmax and their gradient at the backward's peak
        logits = [(f"LM head: chunks of {2**26:,} fp32 logits (batching.LOGITS_BUDGET), ~3 at once",
                   3 * 2**26 * 4)]
    rows = [
        ("policy: fp32 weights + fp32 gradients + AdamW (2 fp32 states), sharded", 16 * total / n),
        ("implicit PRM: the same", 16 * total / n),
        ("reference: bf16 weights, sharded", 2 * total / n),
        ("FSDP2: two decoder layers gathered in bf16 (the current and the prefetched)",
         2 * 2 * layer),
        ("activations kept between layers (gradient checkpointing), bf16",
         tokens * h * 2 * c["num_hidden_layers"]),
        ("one decoder layer recomputed in the backward pass, bf16 (~6h + 4I + 2kv values a token)",
         tokens * (6 * h + 4 * inter + 2 * kv) * 2),
        *logits,
    ]
    training = sum(b for _, b in rows)
    vllm = args.vllm_share * args.gpu_gib * gib
    print(f"{c['num_hidden_layers']} layers, hidden {h}, vocabulary {c['vocab_size']}: "
          f"{total / 1e9:.2f}B parameters; {n} GPUs of {args.gpu_gib:.0f} GiB; responses of "
          f"{args.max_response_len:,} tokens, micro-batches of {tokens:,} tokens; "
          f"logits: {args.logits}\n")
    print("| per GPU | GiB |\n|---|---:|")
    for name, b in rows:
        print(f"| {name} | {b / gib:.1f} |")
    print(f"| **while the trainer runs** (vLLM asleep) | **{training / gib:.1f}** |")
    print(f"| vLLM while it samples: {args.vllm_share:.0%} of the GPU (bf16 weights "
          f"{2 * total / gib:.1f} GiB unsharded, the rest KV cache at "
          f"{2 * c['num_hidden_layers'] * kv * 2 / 1024:.0f} KiB a token) "
          f"| {vllm / gib:.1f} |")
    print(f"| sharded states while vLLM samples (policy, PRM, reference) "
          f"| {sum(b for _, b in rows[:3]) / gib:.1f} |")
    print(f"\nWithout --vllm-sleep the trainer shares the GPU with vLLM's {vllm / gib:.0f} GiB: "
          f"{(training + vllm) / gib:.0f} of {args.gpu_gib:.0f} GiB.")


if __name__ == "__main__":
    main()
