"""prime.py: the pure functions against slow, obvious loops and hand-worked numbers, then
end-to-end PRIME steps on CPU with a tiny model built from a config, and every ablation switch.

In the end-to-end part the verifier is replaced by a deterministic fake (outcome = parity of the
response length), so an untrained model still gets mixed right/wrong groups and every reward path
carries signal (verifier.score_batch itself is tested in test_verifier.py).
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import prime
import rollout
import verifier
from conftest import parity_scores, run_prime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.manual_seed(0)


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


def random_batch(B=6, R=7):
    """Rewards and a mask with ragged valid lengths (1..R) per response."""
    lengths = torch.randint(1, R + 1, (B,))
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return torch.randn(B, R), mask


# ---------------------------------------------------------------------------------------------
# token_logprobs: left-padded batched forward vs one unpadded forward per sequence
@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_left_padded_matches_unpadded(tiny_lm, temperature):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    responses = [[20, 21, 22], [23], [24, 25]]
    pad = 0
    ids, attn, mask = prime.collate(prompts, responses, pad)
    with torch.no_grad():
        logp = prime.token_logprobs(tiny_lm, ids, attn, mask.shape[1], temperature)
    assert logp.shape == (3, 3) and logp.dtype == torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = tiny_lm(input_ids=seq).logits[0].float() / temperature
        expected = [torch.log_softmax(logits[len(p) + j - 1], -1)[r[j]].item() for j in range(len(r))]
        assert_close(logp[i, :len(r)], expected)


def test_token_logprobs_entropy(tiny_lm):
    ids, attn, mask = prime.collate([[3, 4], [5]], [[6, 7], [8, 9]], 0)
    with torch.no_grad():
        logp, ent = prime.token_logprobs(tiny_lm, ids, attn, 2, with_entropy=True)
        logits = tiny_lm(input_ids=torch.tensor([[3, 4, 6, 7]])).logits[0]
    p = torch.softmax(logits[1], -1)
    assert ent[0, 0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    assert torch.equal(logp, prime.token_logprobs(tiny_lm, ids, attn, 2))


def test_token_logprobs_with_shared_prompts_matches_one_forward_per_sequence(tiny_lm):
    # K = 2 responses per prompt, prompts of different lengths (left padding), ragged responses;
    # the last prompt's tokens are those of [8, 9] once padded: its own padding tells them apart
    prompts = [[3, 4, 5, 6, 7]] * 2 + [[8, 9]] * 2 + [[10, 11, 12], [0, 0, 0, 8, 9]]
    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28], [29, 30], [31, 32, 33]]
    ids, attn, mask = prime.collate(prompts, responses, 0)
    with torch.no_grad():
        logp, ent = prime.token_logprobs(tiny_lm, ids, attn, 3, {1.0, 0.7}, True, share_prompts=True)
        plain_logp, plain_ent = prime.token_logprobs(tiny_lm, ids, attn, 3, {1.0, 0.7}, True)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = tiny_lm(input_ids=torch.tensor([p + r])).logits[0].float()
        for t in (1.0, 0.7):
            expected = [torch.log_softmax(logits[len(p) + j - 1] / t, -1)[r[j]].item() for j in range(len(r))]
            assert_close(logp[t][i, :len(r)], expected)
    assert_close(ent * mask, plain_ent * mask)
    # gradients: the cache's index sums the K responses' gradients into their one prompt
    model = copy.deepcopy(tiny_lm).train()
    grads = []
    for share in (False, True):
        (prime.token_logprobs(model, ids, attn, 3, share_prompts=share) * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for plain, shared in zip(*grads):
        assert_close(shared, plain)
    # one-token responses (the batch's width R is 1) and one-token prompts: still two forwards, as
    # FSDP needs the same number on every rank
    calls = []
    hook = tiny_lm.register_forward_hook(lambda *_: calls.append(1))
    for prompts, responses in [([[3, 4, 5]] * 2 + [[8, 9]] * 2, [[20], [21], [22], [23]]),
                               ([[7]] * 2 + [[8]], [[20, 21], [22], [23, 24]])]:
        small = prime.collate(prompts, responses, 0)
        with torch.no_grad():
            shared = prime.token_logprobs(tiny_lm, *small[:2], small[2].shape[1], share_prompts=True)
            assert_close(shared * small[2], prime.token_logprobs(tiny_lm, *small[:2], small[2].shape[1]) * small[2])
    hook.remove()
    assert len(calls) == 2 * (2 + 1)  # two shared forwards and one plain forward per case
    # under gradient checkpointing HF drops the cache: the flag falls back to the plain forward
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # as distributed.py
    assert torch.equal(prime.token_logprobs(model, ids, attn, 3, share_prompts=True).detach(),
                       prime.token_logprobs(model, ids, attn, 3).detach())


# ---------------------------------------------------------------------------------------------
def test_response_mask_includes_first_eos_only():
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 7, 0], [5, 6, 7, 8, 9]])
    assert rollout.response_mask(responses, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_implicit_rewards_hand_worked():
    prm = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert prime.implicit_rewards(prm, ref, mask).tolist() == [[0.5, -1.0, 0.0]]


def test_process_rewards_hand_worked():
    q = torch.tensor([[2.0, -4.0, 6.0], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    tok = prime.process_rewards(q, mask, beta=0.5, norm="none")
    assert tok.tolist() == [[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]]
    whole = prime.process_rewards(q, mask, beta=0.5, granularity="whole", norm="none")
    assert whole.tolist() == [[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]]
    # suffix sums of tok: row 0: [2, 1, 3], row 1: [1, .5, 0] -> max |.| = 3
    normed = prime.process_rewards(q, mask, beta=0.5)
    assert_close(normed, (tok / (3 + 1e-6)))


def test_process_rewards_batch_norm_slow_loop():
    q, mask = random_batch()
    r = prime.process_rewards(q, mask, beta=0.05)
    B, R = q.shape
    biggest = 0.0
    for i in range(B):
        for t in range(R):
            biggest = max(biggest, abs(sum(0.05 * q[i, s].item() * mask[i, s].item() for s in range(t, R))))
    expected = [[0.05 * q[i, t].item() * mask[i, t].item() / (biggest + 1e-6) for t in range(R)] for i in range(B)]
    assert_close(r, expected)
    with pytest.raises(ValueError, match="granularity"):
        prime.process_rewards(q, mask, granularity="step")


def test_process_rewards_uses_global_max_through_reduce():
    q, mask = random_batch()
    local = prime.process_rewards(q, mask, norm="batch_norm")
    doubled = prime.process_rewards(q, mask, norm="batch_norm", reduce=lambda x, op: 2 * x)
    assert_close(doubled, (local / 2))


# ---------------------------------------------------------------------------------------------
def test_prm_ce_loss_hand_worked_and_soft_labels():
    q = torch.tensor([[10.0, 10.0, 99.0], [-20.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # scores: beta*sum q = 0.05*20 = 1, 0.05*-20 = -1
    outcome = torch.tensor([1.0, 0.25])
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = (-math.log(sig(1.0)) - (0.25 * math.log(sig(-1.0)) + 0.75 * math.log(1 - sig(-1.0)))) / 2
    assert prime.prm_ce_loss(q, mask, outcome, beta=0.05).item() == pytest.approx(expected, rel=1e-5)


def test_prm_ce_loss_at_init_is_ln2():
    mask = torch.ones(4, 5)
    assert prime.prm_ce_loss(torch.zeros(4, 5), mask, torch.tensor([1.0, 0, 1, 0])).item() == pytest.approx(math.log(2))


def test_prm_ce_loss_finite_for_huge_scores():
    q = torch.tensor([[4000.0, 4000.0], [-6000.0, 0.0]], requires_grad=True)  # |beta*sum q| = 400, 300
    loss = prime.prm_ce_loss(q, torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx((400 + 300) / 2, rel=1e-4)
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
def rloo_slow(rewards, mask, k, variant):
    B, R = rewards.shape
    m = [sum(rewards[i, t].item() for t in range(R) if mask[i, t]) / max(1, mask[i].sum().item()) for i in range(B)]
    out = torch.zeros(B, R)
    for i in range(B):
        g = i // k * k
        group = range(g, g + k)
        for t in range(R):
            if not mask[i, t]:
                continue
            if variant == "official":
                out[i, t] = rewards[i, t] * k / (k - 1) - sum(m[j] for j in group) / (k - 1)
            else:
                out[i, t] = rewards[i, t] - sum(m[j] for j in group if j != i) / (k - 1)
    return out


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("k", [2, 3])
def test_rloo_slow_loop(variant, k):
    rewards, mask = random_batch(B=6)
    assert_close(prime.rloo(rewards, mask, k, variant), rloo_slow(rewards, mask, k, variant))


def test_rloo_hand_worked_outcome():
    # one group of 4 outcomes on one token each: r_i - mean of the other three
    r = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    expected = [[1 - 1 / 3], [0 - 2 / 3], [0 - 2 / 3], [1 - 1 / 3]]
    for variant in ("official", "paper"):
        assert_close(prime.rloo(r, torch.ones(4, 1), 4, variant), expected)


def test_rloo_rejects_k_below_2_and_ragged_groups():
    with pytest.raises(ValueError, match="K >= 2"):
        prime.rloo(torch.zeros(3, 2), torch.ones(3, 2), 1)
    with pytest.raises(ValueError, match="whole groups"):
        prime.rloo(torch.zeros(3, 2), torch.ones(3, 2), 2)


# ---------------------------------------------------------------------------------------------
def test_discounted_returns_hand_worked_and_slow_loop():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert prime.discounted_returns(r, mask, 0.5).tolist() == [[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0, 0.0]]
    rewards, mask = random_batch()
    expected = [[sum(0.9 ** (s - t) * rewards[i, s].item() * mask[i, s].item() for s in range(t, 7)) * mask[i, t].item()
                 for t in range(7)] for i in range(6)]
    assert_close(prime.discounted_returns(rewards, mask, 0.9), expected)


def test_masked_whiten_slow_loop():
    values, mask = random_batch()
    valid = [values[i, t].item() for i in range(6) for t in range(7) if mask[i, t]]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
    expected = [[(values[i, t].item() - mean) / math.sqrt(var + 1e-8) * mask[i, t].item() for t in range(7)] for i in range(6)]
    assert_close(prime.masked_whiten(values, mask), expected)


def test_masked_whiten_hand_worked():
    # valid values 1, 2, 3: mean 2, unbiased var 1
    out = prime.masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]]))
    assert_close(out, [[-1.0, 0.0, 1.0, 0.0]])


# ---------------------------------------------------------------------------------------------
def test_prime_advantages_hand_worked_outcome_only():
    # K=2: outcomes 1 and 0; rloo -> +1 and -1 on the last token; returns carry it to every token
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = prime.prime_advantages(None, torch.tensor([1.0, 0.0]), mask, k=2, whiten=False)
    assert adv.tolist() == [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_prime_advantages_compose_both_sources(variant):
    r, mask = random_batch(B=6)
    outcome = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = prime.prime_advantages(r, outcome, mask, k=3, gamma=0.9, variant=variant)
    last = torch.zeros_like(mask)
    for i in range(6):
        last[i, int(mask[i].sum()) - 1] = 1
    out_part = rloo_slow(outcome[:, None] * last, last, 3, variant)
    proc_part = rloo_slow(r, mask, 3, variant)
    total = torch.zeros(6, 7)
    for i in range(6):
        for t in range(7):
            if mask[i, t]:
                total[i, t] = sum(out_part[i, s] for s in range(t, 7)) + sum(0.9 ** (s - t) * proc_part[i, s] for s in range(t, 7))
    expected = prime.masked_whiten(total, mask)
    assert_close(adv, expected)
    # both reward sources are present: dropping either changes the result
    assert not torch.allclose(adv, prime.prime_advantages(None, outcome, mask, k=3, variant=variant))
    assert not torch.allclose(adv, prime.prime_advantages(r, torch.zeros(6), mask, k=3, gamma=0.9, variant=variant))


# ---------------------------------------------------------------------------------------------
def test_ppo_clip_loss_hand_worked():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # old_logp = 0 -> ratios 1.5, 0.5, 1.0
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; token 2: max(2, 2) = 2
    loss, stats = prime.ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2, return_stats=True)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)


def test_ppo_clip_loss_aggregations_slow_loop():
    adv, mask = random_batch()
    logp, old = 0.3 * torch.randn(6, 7), 0.3 * torch.randn(6, 7)
    per_tok = [[max(-adv[i, t].item() * math.exp(logp[i, t] - old[i, t]),
                    -adv[i, t].item() * min(max(math.exp(logp[i, t] - old[i, t]), 0.8), 1.2)) for t in range(7)] for i in range(6)]
    seq_means = [sum(per_tok[i][t] for t in range(7) if mask[i, t]) / mask[i].sum().item() for i in range(6)]
    token_mean = sum(per_tok[i][t] for i in range(6) for t in range(7) if mask[i, t]) / mask.sum().item()
    assert prime.ppo_clip_loss(logp, old, adv, mask).item() == pytest.approx(sum(seq_means) / 6, rel=1e-5)
    assert prime.ppo_clip_loss(logp, old, adv, mask, agg="token-mean").item() == pytest.approx(token_mean, rel=1e-5)
    with pytest.raises(ValueError, match="agg"):
        prime.ppo_clip_loss(logp, old, adv, mask, agg="sum")


def test_accuracy_filter_inclusive_bounds():
    outcome = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.0])
    # groups of 5: means 0, 0.2, 1, 0.8 -> keep 0.2 and 0.8 (inclusive)
    assert prime.accuracy_filter(outcome, 5).tolist() == [False, True, False, True]
    assert prime.accuracy_filter(outcome, 5, low=0.0, high=1.0).tolist() == [True] * 4


def test_pairwise_accuracy_hand_worked():
    # group 1: right answer scored above both wrong ones -> 2/2; group 2: tie -> 1/2
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 0.0])
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    # group 2 pairs: (3 beats 4): tie 0.5; (5 beats 4): 0 < 5 wrong -> 0
    assert prime.pairwise_accuracy(scores, outcome, 3) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert math.isnan(prime.pairwise_accuracy(scores, torch.ones(6), 3))


# ---------------------------------------------------------------------------------------------
# Research switches: estimators (paper Sec. 5.3), step granularity, process weight
def test_grpo_hand_worked():
    # one group of K=3 outcomes 1, 0, 0 on the last token: mean 1/3, unbiased std sqrt(1/3)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    last = prime.last_token_mask(mask)
    out = prime.grpo(torch.tensor([1.0, 0.0, 0.0])[:, None] * last, last, k=3)
    std = (1 / 3) ** 0.5
    assert_close(out, [[0.0, (2 / 3) / std], [(-1 / 3) / std, 0.0], [0.0, (-1 / 3) / std]], atol=1e-4)
    # dense rewards: z-scores against the per-response means m = (2, 0) -> mean 1, std sqrt(2)
    dense = prime.grpo(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.ones(2, 2), k=2)
    assert_close(dense, [[0.0, 2 / 2 ** 0.5], [-1 / 2 ** 0.5, -1 / 2 ** 0.5]], atol=1e-4)
    centred = prime.grpo(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.ones(2, 2), k=2, scale=False)
    assert_close(centred, [[0.0, 2.0], [-1.0, -1.0]])  # minus the group mean 1, not divided by the std
    with pytest.raises(ValueError, match="K >= 2"):
        prime.grpo(torch.ones(2, 2), torch.ones(2, 2), k=1)


def test_estimators_hand_worked():
    # K=2, outcomes 1 and 0, process rewards on two tokens, gamma 0.5, no whitening
    mask = torch.ones(2, 2)
    r = torch.tensor([[0.2, 0.4], [0.0, -0.2]])
    outcome = torch.tensor([1.0, 0.0])
    adv = lambda est: prime.prime_advantages(r, outcome, mask, k=2, gamma=0.5, whiten=False, estimator=est)
    # reinforce (Eq. 8): A_t = r_o + sum_{s>=t} 0.5^(s-t) r_s
    assert_close(adv("reinforce"), [[1 + 0.2 + 0.5 * 0.4, 1 + 0.4], [0 + 0.0 + 0.5 * -0.2, -0.2]])
    # grpo: outcome z-scores +-0.5/std(1, 0) = +-0.5/sqrt(0.5); process rewards minus the group
    # mean of the per-response means (0.3, -0.1), 0.1, and not divided by their std
    s2, c = 0.5 ** 0.5, lambda x: x - 0.1
    assert_close(adv("grpo"), [[s2 + c(0.2) + 0.5 * c(0.4), s2 + c(0.4)],
                               [-s2 + c(0.0) + 0.5 * c(-0.2), -s2 + c(-0.2)]], atol=1e-5)
    # so, unlike a z-score, the process term keeps the scale it is given (--process-coef, batch_norm)
    doubled = prime.prime_advantages(2 * r, outcome, mask, k=2, gamma=0.5, whiten=False, estimator="grpo")
    assert_close(doubled - adv("grpo"), [[c(0.2) + 0.5 * c(0.4), c(0.4)], [c(0.0) + 0.5 * c(-0.2), c(-0.2)]])
    # rloo is the default
    assert torch.equal(adv("rloo"), prime.prime_advantages(r, outcome, mask, k=2, gamma=0.5, whiten=False))


def test_step_granularity_sums_each_step_on_its_last_token():
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1.0, 1.0, 1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    ends = torch.tensor([[0.0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]])  # an end past the mask is ignored
    r = prime.process_rewards(q, mask, beta=0.5, granularity="step", norm="none", step_ends=ends)
    # steps (1,2) (3,4) (5) and (1) (1,1): the response's last token closes its last step
    assert_close(r, [[0, 1.5, 0, 3.5, 2.5, 0], [0.5, 0, 1.0, 0, 0, 0]])
    assert_close(r.sum(-1), 0.5 * (q * mask).sum(-1))  # a step split never changes the total
    with pytest.raises(ValueError, match="step_ends"):
        prime.process_rewards(q, mask, granularity="step")


def test_step_end_mask_finds_separator_tokens():
    import bootstrap
    tok = bootstrap.build_tokenizer(["1+2=3,4+5=9,\\boxed{93}", bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    ids = tok("1+2=3,4+5=9,\\boxed{93}", add_special_tokens=False)["input_ids"]
    ends = data.step_end_mask(tok, [ids, ids[:3]], ",", width=len(ids) + 2)
    texts = [tok.decode([i]) for i in ids]
    assert [t for t, e in zip(texts, ends[0]) if e] == [t for t in texts if "," in t] and len(ends[0].nonzero()) == 2
    assert ends[1].sum() == 0 and ends.shape == (2, len(ids) + 2)


def test_adaptive_process_coef_fades_in_with_prm_accuracy():
    args = prime.Args(process_reward_coef=2.0, adaptive_process_coef=True)
    assert prime.process_coef(args, 0.5, 0.5) == (0.0, 0.5)  # a PRM at chance gets no weight
    coef, trust = prime.process_coef(args, 0.5, 0.3)
    assert coef == 0.0 and trust == pytest.approx(0.48)  # worse: still 0
    coef, trust = prime.process_coef(args, trust, 1.0)  # 0.9 * 0.48 + 0.1 = 0.532
    assert trust == pytest.approx(0.532) and coef == pytest.approx(2.0 * (2 * 0.532 - 1))
    assert prime.process_coef(args, trust, float("nan")) == (coef, trust)  # no pairs: no news
    assert prime.process_coef(prime.Args(process_reward_coef=0.7), trust, 0.0) == (0.7, trust)  # fixed weight


# ---------------------------------------------------------------------------------------------
# Credit: PURE's min-form, and whether the PRM blames the first wrong step
def test_min_returns_hand_worked_and_slow_loop():
    r = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    assert_close(prime.min_returns(r, mask), [[-1.0, -1.0, 0.3, 0.3], [1.0, 2.0, 0.0, 0.0]])
    # step rewards on step ends only: the minimum over the steps still ahead
    ends = torch.tensor([[0.0, 1, 0, 1], [0, 1, 0, 0]])
    assert_close(prime.min_returns(r, mask, ends), [[-1.0, -1.0, 0.3, 0.3], [2.0, 2.0, 0.0, 0.0]])
    rewards, mask = random_batch()
    slow = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        for t in range(int(mask[i].sum())):
            slow[i, t] = min(rewards[i, s] for s in range(t, int(mask[i].sum())))
    assert_close(prime.min_returns(rewards, mask), slow)


def test_min_credit_replaces_the_sum_in_the_process_return():
    mask = torch.ones(2, 3)
    r = torch.tensor([[0.2, -0.4, 0.1], [0.0, 0.3, 0.3]])
    outcome = torch.tensor([1.0, 0.0])
    adv = lambda credit: prime.prime_advantages(r, outcome, mask, k=2, whiten=False, credit=credit)
    base = prime.rloo(r, mask, 2)  # the process rewards after their RLOO baseline
    outcome_only = prime.prime_advantages(None, outcome, mask, k=2, whiten=False)
    assert_close(adv("sum") - outcome_only, prime.discounted_returns(base, mask))
    assert_close(adv("min") - outcome_only, [[min(base[0, t:]) for t in range(3)], [min(base[1, t:]) for t in range(3)]])


def test_first_error_hit_hand_worked():
    # 3 responses of 3 steps (step ends at tokens 1, 3 and the last); per-step sums of q:
    # row 0: (-1, 2, 0) -> lowest step 0, its first wrong step 0: a hit
    # row 1: (1, 1, -3) -> lowest step 2, first wrong 1: a miss; row 2 is right (-1): not counted
    # row 3: 2 steps (its last token ends step 1), sums (0.5, -1) -> lowest 1 = first wrong: a hit
    q = torch.tensor([[-1.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5, -1.0, -2.0],
                      [9.0, 9.0, 9.0, 9.0, 9.0, 9.0], [0.5, 0.0, -1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0] * 6, [1.0] * 6, [1.0] * 6, [1.0, 1, 1, 0, 0, 0]])
    ends = torch.tensor([[0.0, 1, 0, 1, 0, 0]] * 4)
    hit, chance = prime.first_error_hit(q, mask, ends, torch.tensor([0, 1, -1, 1]))
    assert hit == pytest.approx(2 / 3) and chance == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert all(math.isnan(x) for x in prime.first_error_hit(q, mask, ends, torch.tensor([-1] * 4)))


# =============================================================================================
# End-to-end steps

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


def test_share_prompts_reaches_every_forward_of_a_step(tiny_model_dir, tmp_path, monkeypatch):
    # K = 2 per forward; no batch_norm, which would scale q's float noise up to O(1)
    settings = dict(micro_batch_size=6, steps=1, reward_norm="none")
    plain = run(tiny_model_dir, tmp_path, "plain", share_prompts=False, **settings)
    calls, shared_logits = [], prime.shared_prompt_logits
    monkeypatch.setattr(prime, "shared_prompt_logits", lambda model, *a: calls.append(model) or shared_logits(model, *a))
    prefills, prefill = [], rollout.HFRollout.shared_prefill
    monkeypatch.setattr(rollout.HFRollout, "shared_prefill", lambda *a: prefills.append(prefill(*a)) or prefills[-1])
    shared = run(tiny_model_dir, tmp_path, "shared", **settings)  # the default
    assert {id(m) for m in calls} == {id(shared["policy"]), id(shared["prm"]), id(shared["ref"])}
    assert any(cache is not None for cache in prefills)  # the rollout's K=2 rows a prompt (a greedy eval: none)
    for key in ("policy/loss", "prm/loss", "policy/entropy"):  # the same up to rounding
        assert shared["metrics"][1][key] == pytest.approx(plain["metrics"][1][key], rel=1e-5, abs=1e-6), key


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


@pytest.mark.slow
def test_seeded_runs_repeat_bit_for_bit_in_separate_processes(tiny_model_dir, tmp_path):
    """The same command twice, and the same run stopped after 2 steps and resumed, each in a process
    of its own with two threads and the default batch flags (64 prompts x K=4 a step, prompts
    shared): the same metrics bit for bit, timings aside. (The filter is off: the tiny model
    answers nothing right.)"""
    flags = ["--model", tiny_model_dir, "--seed", "3", "--eval-size", "8", "--eval-every", "1", "--save-every", "1",
             "--filter-low", "0", "--filter-high", "1"]

    def prime_py(*argv):
        out = subprocess.run([sys.executable, "prime.py", *flags, *argv], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert out.returncode == 0, out.stderr[-3000:]
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                for line in open(argv[-1] + "/metrics.jsonl")]
    first = prime_py("--steps", "3", "--run-dir", str(tmp_path / "a"))
    assert [m["step"] for m in first] == [0, 1, 2, 3] and all("policy/loss" in m for m in first[1:])
    assert prime_py("--steps", "3", "--run-dir", str(tmp_path / "b")) == first
    prime_py("--steps", "2", "--run-dir", str(tmp_path / "c"))
    assert prime_py("--steps", "3", "--resume", "--run-dir", str(tmp_path / "c")) == first


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
