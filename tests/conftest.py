"""Shared fixtures and helpers: tiny models (from a config, or a folder trained a few steps, and
a perturbed copy of it), a deterministic fake verifier, fake executables, one set of tiny-run
flags."""

import json
import os
import subprocess

import pytest
import torch

import batching
import bootstrap
import data
import prime
import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32 Eurus-2-RL-Data rows, math and code
EURUS2_SAMPLE = os.path.join(ROOT, "tests", "fixtures", "eurus2_sample.jsonl")
# The models here are tiny: a second thread gains nothing, and OpenMP threads waiting on a loaded
# machine made a PRIME step of 6 responses 10-30x slower (0.09 s with one thread, 0.4-3 s with two).
torch.set_num_threads(1)


def tiny_lm(seed=0):
    """A 2-layer Qwen2 of vocabulary 50 built from a config (random weights, eval mode): no folder,
    no tokenizer. The global RNG is left as it was."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded model's tokenizer and architecture, trained a few steps: a folder as
    save_pretrained writes it."""
    pairs = data.addition_pairs(200, 0)
    corpus = [data.addition_question(a, b) + data.addition_solution(a, b) for a, b in pairs]
    tokenizer = bootstrap.build_tokenizer(corpus + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    model = bootstrap.build_model(tokenizer, seed=0)
    # A few steps on answers of 1-5 digits + EOS, so sampled responses have ragged lengths
    # (token-mean and seq-mean losses differ only then).
    opt, gen = torch.optim.AdamW(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    prompt = data.prompt_token_ids(tokenizer, [data.addition_row(123, 456)])[0]
    for _ in range(30):
        n = int(torch.randint(1, 6, (), generator=gen))
        answer = torch.randint(0, 10, (n,), generator=gen)
        target = [digits[int(i)] for i in answer] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path_factory.mktemp("tiny"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturb_(model, scale=0.05):
    """Add fixed noise (seeded per parameter) to every weight of `model`, in place."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


@pytest.fixture(scope="session")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model plus fixed noise (no tokenizer: a PRM for --prm-model): a PRM away from its
    reference, so q is O(0.1) from the first step. Where the PRM equals its reference q is 0 up
    to ~1e-6 of float noise, which batch_norm would scale up to O(1)."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("perturbed"))
    perturb_(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).save_pretrained(path)
    return path


def ragged_batch():
    """A collated batch of 6 responses of 1-4 tokens after prompts of 2-4 tokens (ids < 40):
    ragged, so micro-batches can cut padding and the two loss averages differ."""
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11], [1, 12], [1, 13, 14]]
    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29], [30], [31, 32]]
    return batching.collate(prompts, responses, pad_id=0)


def weights(model):
    """Every parameter of a model, flat."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fake_executable(folder, name):
    """An executable `name` in `folder` that prints its arguments, one a line (instead of
    launching torchrun or training); returns an environment with `folder` first on PATH."""
    path = folder / name
    path.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}")


def printed_command(script, *args, env):
    """The lines that `bash script args` prints, run from the repository root with `env` (a
    fake_executable's, so the launch it makes prints its arguments instead)."""
    out = subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, check=True)
    return out.stdout.splitlines()


def parity_scores(responses, truths, abilities, **kw):
    """A deterministic verifier: outcome 1 for a response of even length in characters, so an
    untrained model still gets mixed right/wrong groups."""
    rewards = [float(len(r) % 2 == 0) for r in responses]
    return rewards, {"ok": int(sum(rewards)), "wrong": len(rewards) - int(sum(rewards))}


def all_right(responses, *_, **__):
    """A verifier that scores every answer right: no group passes the accuracy filter."""
    return [1.0] * len(responses), {"ok": len(responses)}


@pytest.fixture
def fake_verifier(monkeypatch):
    monkeypatch.setattr(sandbox, "score_batch", parity_scores)


# A run of a few seconds: 3 prompts x K=2, responses of at most 6 tokens, the filter off.
TINY = dict(
    prompts_per_step=3,
    samples_per_prompt=2,
    max_response_len=6,
    eval_size=4,
    eval_every=1,
    filter_low=0.0,
    filter_high=1.0,
    mini_batch_size=6,
    micro_batch_size=2,
)


def flags(settings):
    """prime.py's command line for Args fields {name: value} (no booleans)."""
    return [
        arg
        for name, value in settings.items()
        for arg in (f"--{name.replace('_', '-')}", str(value))
    ]


def run_prime(model_dir, run_dir, **overrides):
    """prime.main for 2 steps of TINY (the caller fakes the verifier); its result + "metrics"."""
    settings = {"model": model_dir, "run_dir": str(run_dir), "steps": 2, "lr": 1e-3, "prm_lr": 1e-3}
    args = prime.Args(**{**settings, **TINY, **overrides})
    out = prime.main(args)
    with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
        out["metrics"] = [json.loads(line) for line in f]
    return out
