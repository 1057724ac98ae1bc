"""End-to-end PRIME steps on CPU with a tiny model built from a config, and every ablation switch.

The verifier is replaced by a deterministic fake (outcome = parity of the response length), so an
untrained model still gets mixed right/wrong groups and every reward path carries signal.
(verifier.score_batch itself is tested in test_verifier.py and test_code_reward.py.)
"""
import json
import math
import os

import pytest
import torch

import checkpoint
import cli
import data
import prime
import verifier
from conftest import parity_scores, run_prime


@pytest.fixture(autouse=True)
def fake_verifier(monkeypatch):
    monkeypatch.setattr(verifier, "score_batch", parity_scores)


def run(model_dir, tmp_path, name, **overrides):
    return run_prime(model_dir, tmp_path / name, **overrides)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def default_run(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verifier, "score_batch", parity_scores)
        return run(tiny_model_dir, tmp_path_factory.mktemp("runs"), "default")


def test_default_step_outputs_and_updates(default_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    init = weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    m = default_run["metrics"]
    assert [x["step"] for x in m] == [0, 1, 2]
    # the verifier's reasons are counted over every sampled response of the step
    assert m[1]["verifier/ok"] + m[1]["verifier/wrong"] == 6
    for key in ["rollout/accuracy", "prm/loss", "prm/accuracy", "policy/loss", "policy/clipfrac",
                "perf/step_seconds", "eval/accuracy", "prm/first_error_hit", "prm/first_error_chance"]:
        assert all(key in x for x in m[1:]), key
    assert "eval/accuracy" in m[0]
    # PRM and reference start identical: q = 0, so the first PRM loss is ln 2 (pitfall 2; the
    # step's one mini-batch reads q before its update)
    assert m[1]["prm/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[2]["prm/loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert not torch.equal(weights(default_run["policy"]), init)
    assert not torch.equal(weights(default_run["prm"]), init)
    assert torch.equal(weights(default_run["ref"]), init)
    # the rollout engine samples from the updated policy
    assert torch.equal(weights(default_run["engine"].model), weights(default_run["policy"]))


def test_default_run_writes_args_and_samples(default_run, tmp_path):
    run_dir = default_run["run_dir"]
    assert json.load(open(os.path.join(run_dir, "args.json")))["samples_per_prompt"] == 2
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {s["step"] for s in samples} == {1, 2}
    assert all(len(s["tokens"]) == len(s["rewards"]) > 0 for s in samples)
    assert any(r != 0 for s in samples if s["step"] == 2 for r in s["rewards"])


def test_same_seed_same_result(default_run, tiny_model_dir, tmp_path, monkeypatch):
    # random numbers drawn while the models are set up (as building the embedded model does on
    # its first run only) must not change the run: a fresh and a cached default run are the same
    setup = prime.setup_models
    monkeypatch.setattr(prime, "setup_models", lambda *a, **k: (torch.rand(7), setup(*a, **k))[1])
    again = run(tiny_model_dir, tmp_path, "again")
    assert torch.equal(weights(again["policy"]), weights(default_run["policy"]))


# Each switch must take its path: same seed as the default run, so any difference in the final
# policy comes from the switch alone.
@pytest.mark.parametrize("flags", [
    {"granularity": "whole"},
    {"reward_norm": "none"},
    {"rloo_variant": "paper"},
    {"prm_update": "before"},
    {"reference": "policy"},
    {"gamma": 0.5},
    {"whiten": False},
    {"loss_agg": "token-mean"},
    {"kl_coef": 0.1},
    {"entropy_coef": 0.1},
    {"process_reward_coef": 0.5},
    {"no_prm": True},
    {"granularity": "step", "step_separator": "5"},
    {"estimator": "grpo"},
    {"estimator": "reinforce"},
    {"adaptive_process_coef": True},
    {"outcome_noise": 0.5},
    {"credit": "min"},
    {"credit": "min", "granularity": "step", "step_separator": "5"},
    {"task_digits": 4, "max_response_len": 8},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_switch_changes_the_update(flags, default_run, tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path, "switch", **flags)
    assert not torch.equal(weights(out["policy"]), weights(default_run["policy"]))
    if flags.get("adaptive_process_coef"):
        coefs = [m["prm/process_coef"] for m in out["metrics"][1:]]
        assert all(0 <= c < 1 for c in coefs) and default_run["metrics"][1]["prm/process_coef"] == 1.0
    if flags.get("outcome_noise"):
        assert sum(m.get("rollout/flipped_labels", 0) for m in out["metrics"]) > 0
        assert "rollout/flipped_labels" not in default_run["metrics"][1]
    if flags.get("kl_coef"):
        assert out["metrics"][1]["policy/kl"] >= 0
    if flags.get("reference") == "policy":
        assert out["ref"] is None  # no frozen copy: the policy's own log-probs are the reference
    if flags.get("task_digits"):
        evals = json.load(open(os.path.join(out["run_dir"], "eval.json")))
        assert set(evals[0]["per_source"]) == {"embedded/addition4"}


def test_prm_update_none_keeps_prm_frozen(tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path, "none", prm_update="none", reward_norm="none")
    assert torch.equal(weights(out["prm"]), weights(out["ref"]))
    # An un-updated PRM equals its reference, so q = 0 and the run is outcome-only RLOO, up to
    # float noise: two copies of one model can differ by ~1e-6 in log-prob on CPU (MKL's
    # results depend on memory layout), which batch_norm would scale up to O(1) rewards (README).
    outcome_only = run(tiny_model_dir, tmp_path, "outcome", no_prm=True)
    torch.testing.assert_close(weights(out["policy"]), weights(outcome_only["policy"]), atol=1e-4, rtol=0)  # lr 1e-3 steps


def test_offline_prm_loads_prm_model_and_keeps_it_frozen(tiny_model_dir, default_run, tmp_path):
    from transformers import AutoModelForCausalLM
    trained_elsewhere = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in trained_elsewhere.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained_elsewhere.save_pretrained(tmp_path / "prm")
    out = run(tiny_model_dir, tmp_path, "offline", prm_update="none", prm_model=str(tmp_path / "prm"))
    assert torch.equal(weights(out["prm"]), weights(trained_elsewhere))  # loaded, never updated
    assert torch.equal(weights(out["ref"]), weights(default_run["ref"]))  # the reference is still --model
    assert all(m["prm/return_abs"] > 0.01 for m in out["metrics"][1:])  # so q != 0: real process rewards


def test_prm_model_errors(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="--no-prm"):
        run(tiny_model_dir, tmp_path, "a", no_prm=True, prm_model=tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="must share the policy's tokenizer"):
        run(tiny_model_dir, tmp_path, "b", prm_model=str(tmp_path / "other"))


def test_outcome_only_builds_no_prm_and_coef_zero_is_the_same(tiny_model_dir, tmp_path):
    a = run(tiny_model_dir, tmp_path, "a", no_prm=True)
    b = run(tiny_model_dir, tmp_path, "b", process_reward_coef=0.0)
    assert a["prm"] is None and a["ref"] is None and "prm/loss" not in a["metrics"][1]
    assert torch.equal(weights(a["policy"]), weights(b["policy"]))


def ragged_batch():
    """6 responses of 1-4 tokens after prompts of 2-4 tokens: micro-batches can cut padding."""
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10], [1, 11], [1, 12], [1, 13, 14]]
    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29], [30], [31, 32]]
    return data.collate(prompts, responses, pad_id=0)


# (micro-batch size, token budget): by count, one response each, and by tokens (a budget of 12
# padded tokens packs 1-3 length-sorted responses per forward)
SPLITS = [(4, 0), (1, 0), (4, 12)]


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_micro_batches_accumulate_to_the_mini_batch_gradient(tiny_model_dir, agg):
    """Plain SGD (lr 1, no clipping) makes the weight change equal the gradient, so this compares
    the accumulated gradients exactly (Adam's first step would hide a wrong scale)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    batch = ragged_batch()
    advantages = torch.randn(6, 4) * batch[2]
    old_logp = prime.batched_logprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch,
                                      prime.Args(micro_batch_size=6), {1.0})[1.0]
    results = []
    for micro, tokens in SPLITS:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = prime.Args(mini_batch_size=4, micro_batch_size=micro, max_tokens_per_micro_batch=tokens,
                          loss_agg=agg, grad_clip=1e9, temperature=1.0)
        before = weights(model)
        prime.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, old_logp, None,
                            advantages, args, torch.Generator().manual_seed(0))
        results.append(weights(model) - before)
    assert results[0].abs().max() > 1e-3  # the update is not trivially zero
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=1e-4)


def test_token_budget_packs_sorted_responses_and_cuts_padding():
    batch = ragged_batch()  # prompt + response lengths: 6, 3, 6, 6, 3, 5
    splits = list(data.micro_batches(batch, torch.arange(6), max_count=6, max_tokens=12))
    # longest first; 0 and 2 together would be 2 x (4 + 3) = 14 padded tokens; 5 and 1: 2 x (3 + 2) = 10
    assert [idx.tolist() for idx, *_ in splits] == [[0], [2], [3], [5, 1], [4]]
    for idx, ids, attn, r in splits:
        assert ids.shape[0] * ids.shape[1] <= 12 and r == int(batch[2][idx].sum(-1).max())
        assert attn[:, 0].any() and ids.shape == attn.shape  # no column is padding in every row
    logp = prime.batched_logprobs(tiny_lm_from_config(), batch, prime.Args(micro_batch_size=6), {1.0})[1.0]
    packed = prime.batched_logprobs(tiny_lm_from_config(), batch, prime.Args(micro_batch_size=6,
                                                                             max_tokens_per_micro_batch=12), {1.0})[1.0]
    torch.testing.assert_close(packed, logp, atol=1e-5, rtol=0)  # the same log-probs (0 off-mask), less padding


def tiny_lm_from_config():
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        num_key_value_heads=1)).eval()


def test_on_policy_update_skips_the_old_logprob_forward_with_the_same_gradient(tiny_model_dir):
    """One epoch, one mini-batch: pi_old is the update's own detached log-prob (ratio 1)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    batch = ragged_batch()
    advantages = torch.randn(6, 4) * batch[2]
    args = prime.Args(mini_batch_size=6, micro_batch_size=2, grad_clip=1e9, temperature=0.7)
    results = []
    for given in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        old = prime.batched_logprobs(model, batch, args, {0.7})[0.7] if given else None
        before = weights(model)
        _, old_logp = prime.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, old, None,
                                          advantages, args, torch.Generator().manual_seed(0))
        results.append((weights(model) - before, old_logp))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=0)  # and the same pi_old


def test_filter_skips_steps_without_mixed_groups(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(verifier, "score_batch", lambda responses, *_, **__: ([1.0] * len(responses), {"ok": len(responses)}))
    out = run(tiny_model_dir, tmp_path, "filtered", filter_low=0.2, filter_high=0.8, max_filter_rounds=2)
    step1 = out["metrics"][1]
    assert step1["filter/kept_groups"] == 0 and step1["filter/rounds"] == 2 and step1["rollout/accuracy"] == 1.0
    assert torch.equal(weights(out["policy"]), weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))


def test_kl_needs_a_frozen_reference(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--reference sft"):
        run(tiny_model_dir, tmp_path, "bad", kl_coef=0.1, reference="policy")


def test_process_coef_alias():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(prime.Args).parse_args_into_dataclasses(["--process-coef", "0.25"])
    assert args.process_reward_coef == 0.25


def test_trains_and_evaluates_on_jsonl_files(tiny_model_dir, tmp_path):
    rows = data.addition_rows(6, 3)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(tiny_model_dir, tmp_path, "files", data=str(path), eval_data=str(path))
    assert out["metrics"][2]["filter/kept_groups"] == 3


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    """4 steps straight vs 2 steps + resume + 2 steps: same metrics and weights."""
    straight = run(tiny_model_dir, tmp_path, "straight", steps=4, save_every=2)
    run(tiny_model_dir, tmp_path, "split", steps=2, save_every=2)
    # a crash after the checkpoint: a logged step 3 and a half-written save must not leak in
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "rollout/accuracy": -1}) + "\n")
    os.makedirs(tmp_path / "split" / "checkpoint-000004.tmp" / "policy")
    evals = json.load(open(tmp_path / "split" / "eval.json"))
    json.dump(evals + [dict(evals[-1], step=3)], open(tmp_path / "split" / "eval.json", "w"))
    resumed = run(tiny_model_dir, tmp_path, "split", steps=4, save_every=2, resume=True)
    drop_timing = lambda ms: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in ms]
    assert [m["step"] for m in resumed["metrics"]] == [0, 1, 2, 3, 4]
    assert drop_timing(resumed["metrics"]) == drop_timing(straight["metrics"])
    assert json.load(open(tmp_path / "split" / "eval.json")) == json.load(open(tmp_path / "straight" / "eval.json"))
    for name in ("policy", "prm"):
        assert torch.equal(weights(resumed[name]), weights(straight[name])), name
    assert [os.path.basename(c) for c in checkpoint.checkpoints(str(tmp_path / "split"))] == ["checkpoint-000004"]


def test_resume_without_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(cli.UsageError, match="no complete checkpoint"):
        run(tiny_model_dir, tmp_path, "empty", resume=True)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sourced_rows(n, seed):
    """Addition rows split over two data_sources, for per-source reports."""
    return [dict(r, data_source=f"set{i % 2}") for i, r in enumerate(data.addition_rows(n, seed))]


def test_eval_only_reports_per_source_greedy_and_avg_at_k(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(verifier, "score_batch", lambda r, t, a, **kw: calls.append(len(r)) or parity_scores(r, t, a))
    path = write_rows(tmp_path / "eval.jsonl", sourced_rows(6, 1))
    common = dict(model=tiny_model_dir, eval_data=path, eval_only=True, max_response_len=6)
    greedy = prime.main(prime.Args(**common, run_dir=str(tmp_path / "greedy")))["eval"]
    report = json.load(open(tmp_path / "greedy" / "eval.json"))
    assert len(report) == 1 and report[0]["step"] == 0 and set(report[0]["per_source"]) == {"set0", "set1"}
    per_source = report[0]["per_source"]
    assert greedy["eval/accuracy"] == pytest.approx((per_source["set0"] + per_source["set1"]) / 2)  # 3 rows each
    assert greedy["eval/accuracy/set1"] == per_source["set1"]
    table = open(tmp_path / "greedy" / "eval.md").read().splitlines()
    assert table[0] == "Accuracy (greedy)" and table[2] == "| step | all | set0 | set1 |" and table[4].startswith("| 0 |")
    assert calls == [6]
    prime.main(prime.Args(**common, run_dir=str(tmp_path / "avg"), eval_samples=4, eval_temperature=0.7, eval_top_p=0.95))
    assert calls[-1] == 24  # k responses per problem
    assert "avg@4, T=0.7, top_p=0.95" in open(tmp_path / "avg" / "eval.md").read()
    with pytest.raises(ValueError, match="--eval-samples 1"):
        prime.main(prime.Args(**common, run_dir=str(tmp_path / "bad"), eval_samples=4))


def test_bad_rows_and_long_prompts_are_counted_not_silent(tiny_model_dir, tmp_path):
    """Training rows are checked as they are drawn: 3 steps of 3 prompts draw every one of the
    8 rows (6 usable, 1 bad, 1 too long) at least once."""
    rows = data.addition_rows(6, 3)
    bad = dict(rows[0], ability="poetry")
    long = dict(rows[1], prompt=[{"role": "user", "content": "1+" * 200 + "1="}])
    path = write_rows(tmp_path / "rows.jsonl", rows + [bad, long])
    with pytest.raises(data.DataError, match=r"rows.jsonl:7: field 'ability' .*\(--skip-bad-rows skips such rows\)"):
        run(tiny_model_dir, tmp_path, "strict", data=path, steps=3, max_prompt_len=100)
    out = run(tiny_model_dir, tmp_path, "lenient", data=path, skip_bad_rows=True, max_prompt_len=100, steps=3)
    assert out["metrics"][0]["data/train_rows"] == 8  # in the file; checked as drawn
    counts = [(m["data/train_skipped_bad_rows"], m["data/train_dropped_long_prompts"]) for m in out["metrics"][1:]]
    assert counts == sorted(counts) and min(counts[-1]) >= 1  # running totals, both met
    assert all(m["filter/kept_groups"] == 3 for m in out["metrics"][1:])  # every step still full
    # evaluated at every step: eval.json holds the history, one entry per eval
    assert [h["step"] for h in json.load(open(tmp_path / "lenient" / "eval.json"))] == [0, 1, 2, 3]


def test_render_samples_draws_a_real_runs_rewards(default_run):
    import importlib.util
    spec = importlib.util.spec_from_file_location("render_samples", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "render_samples.py"))
    render_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_samples)
    run_dir = default_run["run_dir"]
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    page = render_samples.render(samples)
    assert "<h2>step 1</h2>" in page and "<h2>step 2</h2>" in page
    assert page.count("<span class='t'") == sum(len(s["tokens"]) for s in samples)
    assert all(s["prompt"].startswith("<|im_start|>user") for s in samples)
    assert "&lt;|im_start|&gt;user" in page and "<|im_start|>" not in page  # text is escaped
    # the token with the largest |reward| gets full colour, a zero reward stays white
    biggest = max((r for s in samples for r in s["rewards"]), key=abs)
    assert f"{render_samples.colour(biggest, abs(biggest))}' title='{biggest:+.4g}'" in page
    assert render_samples.colour(0.0, 1.0) == "hsl(120, 70%, 100%)"
    assert "No process rewards" in render_samples.render([dict(samples[0], rewards=[])])


def perturbed_copy(model_dir, path, scale=0.05):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    model.save_pretrained(path)
    return str(path)


def test_implicit_reward_is_the_models_log_ratio_at_temperature_1(tiny_model_dir, tmp_path, monkeypatch):
    """Sampling at T = 0.7 divides the policy's logits (PPO) and the reference's where it meets the
    policy in the KL term, but q compares PRM and reference on their raw logits (official code)."""
    import checkpoint
    from transformers import AutoModelForCausalLM
    prm_dir = perturbed_copy(tiny_model_dir, tmp_path / "prm")
    args = prime.Args(model=tiny_model_dir, prm_model=prm_dir, samples_per_prompt=2, temperature=0.7, kl_coef=0.1,
                      mini_batch_size=6, micro_batch_size=3)
    policy, prm, ref, *_ = prime.setup_models(args, tiny_model_dir, torch.device("cpu"))
    models = prime.Models(policy, prm, ref, torch.optim.SGD(policy.parameters(), lr=0.0),
                          torch.optim.SGD(prm.parameters(), lr=0.0))
    batch = ragged_batch()
    seen = {}
    update = prime.update_policy
    monkeypatch.setattr(prime, "update_policy", lambda *a, **k: seen.update(ref_logp=a[4]) or update(*a, **k))
    q, _, _ = prime.prime_step(models, batch, torch.tensor([1.0, 0.0] * 3), args, checkpoint.TrainState(None, 0, 0))

    def logp(model, temperature):
        ids, attn, mask = batch
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
        logits = logits[:, -mask.shape[1] - 1:-1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -mask.shape[1]:, None]).squeeze(-1) * mask
    prm_model, ref_model = (AutoModelForCausalLM.from_pretrained(p) for p in (prm_dir, tiny_model_dir))
    torch.testing.assert_close(q, logp(prm_model, 1.0) - logp(ref_model, 1.0), atol=1e-5, rtol=0)
    assert (q - (logp(prm_model, 0.7) - logp(ref_model, 0.7))).abs().max() > 1e-2  # the old, tempered ratio
    torch.testing.assert_close(seen["ref_logp"], logp(ref_model, 0.7), atol=1e-5, rtol=0)  # KL: at T


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir):
    """--gradient-checkpointing recomputes activations in the backward pass: same gradients."""
    torch.manual_seed(0)
    batch = ragged_batch()
    advantages = torch.randn(6, 4) * batch[2]
    changes = []
    for checkpointing in (False, True):
        args = prime.Args(model=tiny_model_dir, no_prm=True, gradient_checkpointing=checkpointing,
                          mini_batch_size=6, micro_batch_size=3, grad_clip=1e9)
        policy, *_ = prime.setup_models(args, tiny_model_dir, torch.device("cpu"))
        assert policy.is_activation_checkpointing == checkpointing
        before = weights(policy)
        prime.update_policy(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, None, None, advantages,
                            args, torch.Generator().manual_seed(0))
        changes.append(weights(policy) - before)
    assert changes[0].abs().max() > 1e-3
    torch.testing.assert_close(changes[1], changes[0], atol=1e-6, rtol=1e-4)
