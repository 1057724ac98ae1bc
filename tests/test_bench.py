"""bench/: ablation.py's bookkeeping by hand and one tiny sweep end to end; render_samples.py on
what a run writes to samples.jsonl."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, flags
from transformers import AutoTokenizer

import batching
import bootstrap
import checkpoint
import data


def bench_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = bench_module("ablation")


def metrics(evals, sampled=8, prm=None, hits=None):
    """Logged lines: step 0 (eval only), then steps that sampled `sampled` responses each."""
    out = [{"step": 0, "eval/accuracy": evals[0]}]
    for step, acc in enumerate(evals[1:], 1):
        out.append(
            {
                "step": step,
                "rollout/accuracy": 0.5,
                "verifier/ok": sampled // 2,
                "verifier/wrong": sampled // 2,
                "eval/accuracy": acc,
                **({"prm/accuracy": prm[step - 1]} if prm else {}),
                **(
                    {
                        "prm/first_error_hit": hits[step - 1],
                        "prm/first_error_chance": 0.25,
                        "prm/first_error_hit_perception": hits[step - 1] / 2,
                        "prm/first_error_hit_arithmetic": float("nan"),
                    }
                    if hits
                    else {}
                ),
            }
        )
    return out


def test_samples_seen_and_samples_to_target_by_hand():
    rows = ablation.curve_rows(
        "a", 0, metrics([0.2, 0.5, 0.8, 0.9], prm=[0.5, 0.6, 0.7], hits=[0.0, 0.5, 1.0])
    )
    assert [r["samples_seen"] for r in rows] == [0, 8, 16, 24]
    rows += ablation.curve_rows("a", 1, metrics([0.2, 0.7, 0.7, 0.6], prm=[float("nan"), 0.8, 0.8]))
    rows += ablation.curve_rows("outcome-only", 0, metrics([0.2, 0.3, 0.4, 0.5]))
    rows += ablation.curve_rows("outcome-only", 1, metrics([0.2, 0.4, 0.7, 0.7]))
    table = ablation.summarize(rows, target=0.7)
    # seed 0 reaches 0.7 after 16 responses, seed 1 after 8: mean 12; outcome-only seed 1 after 16,
    # so a's responses per seed are 8/16 = 0.5x of it where both reached it (seed 1 only)
    # PRM accuracy: seed 0 mean 0.6, seed 1 0.8 (its NaN step had no pairs): mean 0.7
    # first-error hit: seed 0 only, mean 0.5 (chance 0.25) over its first (and last) 10 steps
    assert table["a"] == {
        "seeds": 2,
        "start": pytest.approx(0.2),
        "final": pytest.approx(0.75),
        "min": 0.6,
        "max": 0.9,
        "samples_to_target": 12,
        "vs_base": (0.5, 0.5),
        "prm_accuracy_first": pytest.approx(0.7),
        "prm_accuracy_last": pytest.approx(0.7),
        "first_error_hit_first": pytest.approx(0.5),
        "first_error_hit_last": pytest.approx(0.5),
        "first_error_chance_first": 0.25,
        "first_error_chance_last": 0.25,
        # by kind (the image task): half the hits; no step where adding went wrong first
        "first_error_hit_perception_first": pytest.approx(0.25),
        "first_error_hit_perception_last": pytest.approx(0.25),
        "first_error_hit_arithmetic_first": None,
        "first_error_hit_arithmetic_last": None,
    }
    b = table["outcome-only"]
    assert b["samples_to_target"] is None and b["final"] == 0.6 and b["prm_accuracy_last"] is None


def test_noise_kept_by_hand():
    rows = []
    for name, seed, evals in (
        ("prime", 0, [0.2, 0.6]),
        ("prime", 1, [0.2, 0.4]),
        ("outcome-noise-0.2", 0, [0.2, 0.4]),
        ("outcome-noise-0.2", 1, [0.2, 0.1]),
        ("outcome-only-noise-0.2", 0, [0.2, 0.3]),
    ):
        rows += ablation.curve_rows(name, seed, metrics(evals))
    kept = ablation.noise_kept(rows)
    # clean gains 0.4 and 0.2 (mean 0.3); noisy 0.2 and -0.1 (mean 0.05): kept 0.5 and -0.5 per
    # seed;
    # outcome-only-noise-0.2 has no clean run to compare with
    assert list(kept) == ["outcome-noise-0.2"]
    clean, n, clean_gain, noisy_gain, ratios = kept["outcome-noise-0.2"]
    assert (
        (clean, n) == ("prime", 2)
        and clean_gain == pytest.approx(0.3)
        and noisy_gain == pytest.approx(0.05)
    )
    assert ratios == [pytest.approx(0.5), pytest.approx(-0.5)]


def test_trigger_rates_by_hand():
    rows = []
    for name, seed, rates in (
        ("outcome-only", 0, [0.1, 0.1]),
        ("outcome-only-poison", 0, [0.1, 0.5]),
        ("outcome-only-poison", 1, [0.1, 0.3]),
        ("prime", 0, [0.1, 0.2]),  # its poisoned run did not run: no row for either
    ):
        lines = metrics([0.3] * len(rates))
        for line, rate in zip(lines, rates):
            line["eval/trigger_rate"] = rate
        rows += ablation.curve_rows(name, seed, lines)
    rates = ablation.trigger_rates(rows)
    assert list(rates) == ["outcome-only-poison", "outcome-only"]
    n, start, final, (low, high) = rates["outcome-only-poison"]
    assert (n, low, high) == (2, 0.3, 0.5) and start == pytest.approx(0.1)
    assert final == pytest.approx(0.4) and rates["outcome-only"] == (1, 0.1, 0.1, (0.1, 0.1))


TINY_RUN = flags(TINY)  # prime.py flags for runs of a few seconds


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ablation"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "ablation.py"),
        "--out",
        str(out),
        "--configs",
        "prime,outcome-only",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--budget-minutes",
        "0",
        "--",
        "--model",
        tiny_model_dir,
        *TINY_RUN,
    ]
    # a zero budget still makes one new run, then stops: only prime
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "budget: stopping after 1 new runs" in result.stdout
    assert {r["config"] for r in csv.DictReader(open(out / "curves.csv"))} == {"prime"}
    # the finished prime run is read, not rerun, and does not count against the budget
    mtime = os.path.getmtime(out / "prime-seed0" / "metrics.jsonl")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.getmtime(out / "prime-seed0" / "metrics.jsonl") == mtime
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert {(r["config"], r["step"]) for r in rows} == {
        (c, s) for c in ("prime", "outcome-only") for s in "012"
    }
    assert os.path.getsize(out / "curves.png") > 1000
    assert "| prime | 1 |" in result.stdout and "| outcome-only | 1 |" in result.stdout
    assert "first-error hit" in result.stdout


@pytest.mark.slow
def test_offline_prm_config_trains_a_prm_first_then_freezes_it(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ablation"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "bench", "ablation.py"),
        "--out",
        str(out),
        "--configs",
        "offline-prm",
        "--seeds",
        "0",
        "--steps",
        "1",
        "--offline-prm-steps",
        "2",
        "--",
        "--model",
        tiny_model_dir,
        *TINY_RUN,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    training = json.load(open(out / "offline-prm-training-seed0" / "args.json"))
    assert training["lr"] == 0 and training["steps"] == 2  # the policy stays the initial one
    run = json.load(open(out / "offline-prm-seed0" / "args.json"))
    assert run["prm_update"] == "none"
    assert run["prm_model"] == str(out / "offline-prm-training-seed0" / "checkpoint-000002" / "prm")


def test_render_samples_draws_what_a_run_writes(tiny_model_dir):
    """samples.jsonl's records as the trainer writes them (checkpoint.sample_records) -> a page
    with one coloured span per response token."""
    render_samples = bench_module("render_samples")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = data.prompt_token_ids(tokenizer, data.addition_rows(2, 0))
    responses = [tokenizer(text)["input_ids"] for text in ("5+8=13,\\boxed{9}", "1")]
    batch = batching.collate(prompts, responses, tokenizer.pad_token_id)
    q = torch.zeros_like(batch[2])  # implicit rewards: one large, a few small, zeros
    q[0, :3], q[1, 0] = torch.tensor([0.5, -2.0, 0.3]), 1.0
    samples = [
        r
        for step in (1, 2)
        for r in checkpoint.sample_records(
            step, tokenizer, batch, q, torch.tensor([1.0, 0.0]), 0.05, 2
        )
    ]
    page = render_samples.render(samples)
    assert "<h2>step 1</h2>" in page and "<h2>step 2</h2>" in page
    assert page.count("<span class='t'") == sum(len(s["tokens"]) for s in samples) > 4
    assert all(s["prompt"].startswith("<|im_start|>user") for s in samples)
    assert "&lt;|im_start|&gt;user" in page and "<|im_start|>" not in page  # text is escaped
    # the token with the largest |reward| gets full colour, a zero reward stays white
    biggest = max((r for s in samples for r in s["rewards"]), key=abs)
    assert biggest == pytest.approx(0.05 * -2.0)
    assert f"{render_samples.colour(biggest, abs(biggest))}' title='{biggest:+.4g}'" in page
    assert render_samples.colour(0.0, 1.0) == "hsl(120, 70%, 100%)"
    assert "No process rewards" in render_samples.render([dict(samples[0], rewards=[])])


def test_image_swap_splits_tokens_by_the_kind_of_their_step():
    """bench/image_swap.py: the tokens of the first two steps (reading a and b off the image)
    are perception, the rest (columns, the boxed sum, EOS) arithmetic; padding neither."""
    image_swap = bench_module("image_swap")
    texts = ["a=37;b=45;7+5=12;3+4+1=8;\\boxed{82}", "a=31;b=4"]
    tok = bootstrap.build_tokenizer(texts + [bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    responses = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    R = max(map(len, responses))
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (R - len(r)) for r in responses])
    kinds = image_swap.step_kinds(tok, None, responses, mask)
    # a response that stops inside its second step: all of it (and its EOS) is reading
    expected = [("a=37;b=45;", "7+5=12;3+4+1=8;\\boxed{82}<|im_end|>"), ("a=31;b=4<|im_end|>", "")]
    for response, kind, (reading, adding) in zip(responses, kinds, expected):
        pieces = [tok.decode([t]) for t in response]
        assert "".join(p for p, k in zip(pieces, kind) if k == data.PERCEPTION) == reading
        assert "".join(p for p, k in zip(pieces, kind) if k == data.ARITHMETIC) == adding
        assert (kind[len(response) :] == 0).all()
