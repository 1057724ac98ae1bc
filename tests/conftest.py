"""Shared fixtures and helpers: tiny models (from a config, or a folder trained a few steps, and
a perturbed copy of it), a deterministic fake verifier, fake executables, one set of tiny-run
flags."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import batching
import bootstrap
import data
import prime
import sandbox
import vision

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
    model, _ = bootstrap.build_model(tokenizer, seed=0)
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
    out = subprocess.run(
        ["bash", os.path.join(ROOT, script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
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


# ----------------------------------------------------------------------------------------------
# Vision-language models (tests/test_vision.py, the FSDP2 test in test_distributed.py)
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def sharpen(model, seed=0):
    """Weights large enough that logits are far from uniform (HF's 0.02 init gives near-equal
    log-probs, which no position bug would move)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.3 if "embed_tokens" in name else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_vlm_dir(path, family):
    """A tiny LLaVA, Qwen2-VL or Qwen2.5-VL from a config with the project's tokenizer and its image
    processor, saved as an HF folder."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    special = [vision.MARKER] if family == "llava" else QWEN_TOKENS
    corpus = ["Add the two numbers. a=12;b=34;2+4=6;1+3=4;\\boxed{46}"] * 20
    tok = bootstrap.build_tokenizer(corpus + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL, special)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    if family == "llava":
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            text_config=Qwen2Config(**text),
            image_token_id=ids[vision.MARKER],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
    else:
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56},
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
        )
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": [2, 3, 3],
        }  # sums to head_dim / 2
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=1,
                embed_dim=32,
                hidden_size=64,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model = Qwen2VLForConditionalGeneration(config)
        if family == "qwen2_5_vl":  # the same text model; its vision blocks window attention
            config = Qwen2_5_VLConfig(
                text_config=text,
                vision_config=dict(
                    depth=2,
                    hidden_size=32,
                    out_hidden_size=64,
                    intermediate_size=64,
                    num_heads=2,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    window_size=56,
                    fullatt_block_indexes=[1],
                ),
                **{
                    key: getattr(config, key)
                    for key in (
                        "image_token_id",
                        "video_token_id",
                        "vision_start_token_id",
                        "vision_end_token_id",
                    )
                },
            )
            model = Qwen2_5_VLForConditionalGeneration(config)
    sharpen(model)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if family == "llava":  # the whole processor, as a LLaVA checkpoint ships it (vLLM runs it)
        from transformers import LlavaProcessor

        processor = LlavaProcessor(
            image_processor=processor,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    processor.save_pretrained(path)
    return str(path)


def image_rows(n, size, seed=0):
    """Rows of random images, prompts of different lengths (left padding), one image each."""
    rng = np.random.default_rng(seed)
    return [
        {
            "data_source": "test",
            "ability": "math",
            "prompt": [{"role": "user", "content": f"{vision.MARKER}" + "Add." * (1 + i % 3)}],
            "reward_model": {"ground_truth": "1"},
            "images": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)],
        }
        for i in range(n)
    ]
