"""Shared fixtures: a tiny model built from a config, a deterministic fake verifier, a tiny run."""
import json
import os

import pytest
import torch

import bootstrap
import data
import prime


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    corpus = [data.addition_question(a, b) + data.addition_solution(a, b) for a, b in data.addition_pairs(200, 0)]
    tokenizer = bootstrap.build_tokenizer(corpus + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    model = bootstrap.build_model(tokenizer, seed=0)
    # A few steps on answers of 1-5 digits + EOS, so sampled responses have ragged lengths
    # (token-mean and seq-mean losses differ only then).
    opt, gen = torch.optim.AdamW(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    prompt = data.prompt_token_ids(tokenizer, [data.addition_row(123, 456)])[0]
    for _ in range(30):
        n = int(torch.randint(1, 6, (), generator=gen))
        target = [digits[int(i)] for i in torch.randint(0, 10, (n,), generator=gen)] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        model(input_ids=ids, labels=torch.tensor([[-100] * len(prompt) + target])).loss.backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parity_scores(responses, truths, abilities, **kw):
    rewards = [float(len(r) % 2 == 0) for r in responses]
    return rewards, {"ok": int(sum(rewards)), "wrong": len(rewards) - int(sum(rewards))}




# A run of a few seconds: 3 prompts x K=2, responses of at most 6 tokens, the filter off.
TINY = dict(steps=2, prompts_per_step=3, samples_per_prompt=2, max_response_len=6, eval_size=4, eval_every=1,
            filter_low=0.0, filter_high=1.0, mini_batch_size=6, micro_batch_size=2, lr=1e-3, prm_lr=1e-3)


def run_prime(model_dir, run_dir, **overrides):
    """prime.main on the tiny settings (the caller fakes the verifier); its result + "metrics"."""
    args = prime.Args(**{"model": model_dir, "run_dir": str(run_dir), **TINY, **overrides})
    out = prime.main(args)
    with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
        out["metrics"] = [json.loads(line) for line in f]
    return out
