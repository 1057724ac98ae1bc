"""Peak memory of the log-prob passes against response length: whole logits against chunks.

    python bench/memory_scaling.py [--lengths 512,1024,2048,4096] [--batch 2] [--hidden 64]

A 2-layer Qwen2 with Qwen2.5's vocabulary (152,064, untied head) and a small hidden size, built
from a config, on the CPU in fp32: memory is memory. For each response length R, in a fresh
process each: one policy forward+backward (prime.token_logprobs with grad at T = 0.7) and one
no-grad PRM / reference pass, with the LM head's logits whole (batching.LOGITS_BUDGET unbounded:
how every pass ran before) and in chunks (the default budget). Peak = the process's peak resident
memory during the pass minus before it (the model and the batch are built first).
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 152064  # Qwen2.5's


def measure(R, batch, hidden, whole, grad):
    """In this process: peak resident memory (GiB) of one pass, above what was resident before."""
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import batching
    import prime
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=R + 128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).train(grad)
    if whole:
        batching.LOGITS_BUDGET = 2**62
    P = 64
    ids = torch.randint(0, VOCAB, (batch, P + R))
    attn = torch.ones_like(ids)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.set_grad_enabled(grad):
        logp = prime.token_logprobs(model, {"input_ids": ids, "attention_mask": attn}, R,
                                    0.7 if grad else 1.0)
        if grad:
            logp.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 2**20  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # R,whole,grad: measure in this process
    args = parser.parse_args()
    if args.one:
        R, whole, grad = (int(x) for x in args.one.split(","))
        print(json.dumps(measure(R, args.batch, args.hidden, bool(whole), bool(grad))))
        return
    print("| R | pass | whole logits: peak GiB | chunks: peak GiB | chunks / whole |")
    print("|---:|---|---:|---:|---:|")
    for R in map(int, args.lengths.split(",")):
        for grad, name in ((1, "policy fwd+bwd"), (0, "PRM/ref no grad")):
            peaks = []
            for whole in (1, 0):
                out = subprocess.run([sys.executable, __file__, "--one", f"{R},{whole},{grad}",
                                      "--batch", str(args.batch), "--hidden", str(args.hidden)],
                                     capture_output=True, text=True)
                peaks.append(float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                             else float("nan"))
            print(f"| {R} | {name} | {peaks[0]:.2f} | {peaks[1]:.2f} | {peaks[1] / peaks[0]:.2f} |",
                  flush=True)
    print(f"batch {args.batch}, hidden {args.hidden}, vocabulary {VOCAB}, fp32, CPU")


if __name__ == "__main__":
    main()
