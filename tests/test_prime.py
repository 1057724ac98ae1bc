"""prime.py: the pure functions against slow, obvious loops and hand-worked numbers; one PRIME
step (prime_step) on a fixed batch, where each ablation switch is checked for what it does with
those functions as the oracle; the updates; sampling with the filter; then whole runs on CPU with a
tiny model (the verifier replaced by a deterministic fake: outcome = parity of the response's
length, so an untrained model still gets mixed groups; sandbox.score_batch: test_sandbox.py).
"""

import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    all_right,
    parity_scores,
    perturb_,
    ragged_batch,
    run_prime,
    tiny_lm,
    weights,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import batching
import checkpoint
import data
import distributed
import prime
import rollout
import sandbox

pytestmark = pytest.mark.usefixtures("fake_verifier")  # no test here scores real answers
torch.manual_seed(0)


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=1e-5,
    )


def random_batch(B=6, R=7):
    """Rewards and a mask with ragged valid lengths (1..R) per response."""
    lengths = torch.randint(1, R + 1, (B,))
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()
    return torch.randn(B, R), mask


# ---------------------------------------------------------------------------------------------
# token_logprobs: left-padded batched forward vs one unpadded forward per sequence
@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_left_padded_matches_unpadded(lm, temperature):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    responses = [[20, 21, 22], [23], [24, 25]]
    ids, attn, mask = batching.collate(prompts, responses, 0)
    with torch.no_grad():
        logp = prime.token_logprobs(
            lm, dict(input_ids=ids, attention_mask=attn), mask.shape[1], temperature
        )
    assert logp.shape == (3, 3) and logp.dtype == torch.float32
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + r])).logits[0].float() / temperature
        expected = [
            torch.log_softmax(logits[len(p) + j - 1], -1)[r[j]].item() for j in range(len(r))
        ]
        assert_close(logp[i, : len(r)], expected)


# ---------------------------------------------------------------------------------------------
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
            biggest = max(
                biggest, abs(sum(0.05 * q[i, s].item() * mask[i, s].item() for s in range(t, R)))
            )
    expected = [
        [0.05 * q[i, t].item() * mask[i, t].item() / (biggest + 1e-6) for t in range(R)]
        for i in range(B)
    ]
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
    p_right = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))]  # sigmoid of the scores
    expected = (
        -math.log(p_right[0]) - (0.25 * math.log(p_right[1]) + 0.75 * math.log(1 - p_right[1]))
    ) / 2
    assert prime.prm_ce_loss(q, mask, outcome, beta=0.05).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_prm_ce_loss_at_init_is_ln2():
    mask = torch.ones(4, 5)
    assert prime.prm_ce_loss(
        torch.zeros(4, 5), mask, torch.tensor([1.0, 0, 1, 0])
    ).item() == pytest.approx(math.log(2))


def test_prm_ce_loss_finite_for_huge_scores():
    # |beta*sum q| = 400, 300
    q = torch.tensor([[4000.0, 4000.0], [-6000.0, 0.0]], requires_grad=True)
    loss = prime.prm_ce_loss(q, torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx((400 + 300) / 2, rel=1e-4)
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
def rloo_slow(rewards, mask, k, variant):
    B, R = rewards.shape
    m = [
        sum(rewards[i, t].item() for t in range(R) if mask[i, t]) / max(1, mask[i].sum().item())
        for i in range(B)
    ]
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
    assert prime.discounted_returns(r, mask, 0.5).tolist() == [
        [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0, 0.0]
    ]
    rewards, mask = random_batch()
    expected = [
        [
            sum(0.9 ** (s - t) * rewards[i, s].item() * mask[i, s].item() for s in range(t, 7))
            * mask[i, t].item()
            for t in range(7)
        ]
        for i in range(6)
    ]
    assert_close(prime.discounted_returns(rewards, mask, 0.9), expected)


def test_masked_whiten_slow_loop():
    values, mask = random_batch()
    valid = [values[i, t].item() for i in range(6) for t in range(7) if mask[i, t]]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
    expected = [
        [(values[i, t].item() - mean) / math.sqrt(var + 1e-8) * mask[i, t].item() for t in range(7)]
        for i in range(6)
    ]
    assert_close(prime.masked_whiten(values, mask), expected)


def test_masked_whiten_hand_worked():
    # valid values 1, 2, 3: mean 2, unbiased var 1
    out = prime.masked_whiten(
        torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]])
    )
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
                total[i, t] = sum(out_part[i, s] for s in range(t, 7)) + sum(
                    0.9 ** (s - t) * proc_part[i, s] for s in range(t, 7)
                )
    expected = prime.masked_whiten(total, mask)
    assert_close(adv, expected)
    # both reward sources are present: dropping either changes the result
    assert not torch.allclose(
        adv, prime.prime_advantages(None, outcome, mask, k=3, variant=variant)
    )
    assert not torch.allclose(
        adv, prime.prime_advantages(r, torch.zeros(6), mask, k=3, gamma=0.9, variant=variant)
    )


# ---------------------------------------------------------------------------------------------
def test_ppo_clip_loss_hand_worked():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # old_logp = 0 -> ratios 1.5, 0.5, 1.0
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; token 2: max(2, 2) = 2
    loss = prime.ppo_clip_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2) / 3)
    stats = prime.ppo_stats(logp, old, mask, clip_eps=0.2)
    # ratios 1.5 and 0.5 are outside [0.8, 1.2]; approx_kl: mean of old - logp
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)


def test_ppo_clip_loss_aggregations_slow_loop():
    adv, mask = random_batch()
    logp, old = 0.3 * torch.randn(6, 7), 0.3 * torch.randn(6, 7)
    per_tok = [
        [
            max(
                -adv[i, t].item() * math.exp(logp[i, t] - old[i, t]),
                -adv[i, t].item() * min(max(math.exp(logp[i, t] - old[i, t]), 0.8), 1.2),
            )
            for t in range(7)
        ]
        for i in range(6)
    ]
    seq_means = [
        sum(per_tok[i][t] for t in range(7) if mask[i, t]) / mask[i].sum().item() for i in range(6)
    ]
    token_mean = (
        sum(per_tok[i][t] for i in range(6) for t in range(7) if mask[i, t]) / mask.sum().item()
    )
    assert prime.ppo_clip_loss(logp, old, adv, mask).item() == pytest.approx(
        sum(seq_means) / 6, rel=1e-5
    )
    assert prime.ppo_clip_loss(logp, old, adv, mask, agg="token-mean").item() == pytest.approx(
        token_mean, rel=1e-5
    )
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
    assert_close(
        out, [[0.0, (2 / 3) / std], [(-1 / 3) / std, 0.0], [0.0, (-1 / 3) / std]], atol=1e-4
    )
    # dense rewards: z-scores against the per-response means m = (2, 0) -> mean 1, std sqrt(2)
    dense = prime.grpo(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.ones(2, 2), k=2)
    assert_close(dense, [[0.0, 2 / 2**0.5], [-1 / 2**0.5, -1 / 2**0.5]], atol=1e-4)
    centred = prime.grpo(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.ones(2, 2), k=2, scale=False)
    # minus the group mean 1, not divided by the std
    assert_close(centred, [[0.0, 2.0], [-1.0, -1.0]])
    with pytest.raises(ValueError, match="K >= 2"):
        prime.grpo(torch.ones(2, 2), torch.ones(2, 2), k=1)


def test_estimators_hand_worked():
    # K=2, outcomes 1 and 0, process rewards on two tokens, gamma 0.5, no whitening
    mask = torch.ones(2, 2)
    r = torch.tensor([[0.2, 0.4], [0.0, -0.2]])
    outcome = torch.tensor([1.0, 0.0])

    def adv(estimator):
        return prime.prime_advantages(
            r, outcome, mask, 2, gamma=0.5, whiten=False, estimator=estimator
        )

    # reinforce (Eq. 8): A_t = r_o + sum_{s>=t} 0.5^(s-t) r_s
    assert_close(adv("reinforce"), [[1 + 0.2 + 0.5 * 0.4, 1 + 0.4], [0 + 0.0 + 0.5 * -0.2, -0.2]])
    # grpo: outcome z-scores +-0.5/std(1, 0) = +-0.5/sqrt(0.5); process rewards minus the group
    # mean of the per-response means (0.3, -0.1), 0.1, and not divided by their std
    # c: centred process rewards
    s2, c = (0.5**0.5, [[0.2 - 0.1, 0.4 - 0.1], [0.0 - 0.1, -0.2 - 0.1]])
    assert_close(
        adv("grpo"),
        [
            [s2 + c[0][0] + 0.5 * c[0][1], s2 + c[0][1]],
            [-s2 + c[1][0] + 0.5 * c[1][1], -s2 + c[1][1]],
        ],
        atol=1e-5,
    )
    # so, unlike a z-score, the process term keeps the scale it is given (--process-coef,
    # batch_norm)
    doubled = prime.prime_advantages(
        2 * r, outcome, mask, k=2, gamma=0.5, whiten=False, estimator="grpo"
    )
    assert_close(
        doubled - adv("grpo"),
        [[c[0][0] + 0.5 * c[0][1], c[0][1]], [c[1][0] + 0.5 * c[1][1], c[1][1]]],
    )
    # rloo is the default
    assert torch.equal(
        adv("rloo"), prime.prime_advantages(r, outcome, mask, k=2, gamma=0.5, whiten=False)
    )
    with pytest.raises(ValueError, match="estimator"):
        adv("ppo")


def test_step_granularity_sums_each_step_on_its_last_token():
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1.0, 1.0, 1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    # an end past the mask is ignored
    ends = torch.tensor([[0.0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]])
    r = prime.process_rewards(q, mask, beta=0.5, granularity="step", norm="none", step_ends=ends)
    # steps (1,2) (3,4) (5) and (1) (1,1): the response's last token closes its last step
    assert_close(r, [[0, 1.5, 0, 3.5, 2.5, 0], [0.5, 0, 1.0, 0, 0, 0]])
    assert_close(r.sum(-1), 0.5 * (q * mask).sum(-1))  # a step split never changes the total
    with pytest.raises(ValueError, match="step_ends"):
        prime.process_rewards(q, mask, granularity="step")


def test_adaptive_process_coef_fades_in_with_prm_accuracy():
    args = prime.Args(adaptive_process_coef=True)
    assert prime.prm_weight(args, 0.5, 0.5) == (0.0, 0.5)  # a PRM at chance gets no weight
    weight, trust = prime.prm_weight(args, 0.5, 0.3)
    assert weight == 0.0 and trust == pytest.approx(0.48)  # worse: still 0
    weight, trust = prime.prm_weight(args, trust, 1.0)  # 0.9 * 0.48 + 0.1 = 0.532
    assert trust == pytest.approx(0.532) and weight == pytest.approx(2 * 0.532 - 1)
    assert prime.prm_weight(args, trust, float("nan")) == (weight, trust)  # no pairs: no news
    # without the flag: full weight, whatever the accuracy
    assert prime.prm_weight(prime.Args(), trust, 0.0) == (1.0, trust)


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

    def adv(credit):
        return prime.prime_advantages(r, outcome, mask, k=2, whiten=False, credit=credit)

    base = prime.rloo(r, mask, 2)  # the process rewards after their RLOO baseline
    outcome_only = prime.prime_advantages(None, outcome, mask, k=2, whiten=False)
    assert_close(adv("sum") - outcome_only, prime.discounted_returns(base, mask))
    assert_close(
        adv("min") - outcome_only,
        [[min(base[0, t:]) for t in range(3)], [min(base[1, t:]) for t in range(3)]],
    )


def test_first_error_hit_hand_worked():
    # 3 responses of 3 steps (step ends at tokens 1, 3 and the last); per-step sums of q:
    # row 0: (-1, 2, 0) -> lowest step 0, its first wrong step 0: a hit
    # row 1: (1, 1, -3) -> lowest step 2, first wrong 1: a miss; row 2 is right (-1): not counted
    # row 3: 2 steps (its last token ends step 1), sums (0.5, -1) -> lowest 1 = first wrong: a hit
    q = torch.tensor(
        [
            [-1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5, 0.5, -1.0, -2.0],
            [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
            [0.5, 0.0, -1.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.tensor([[1.0] * 6, [1.0] * 6, [1.0] * 6, [1.0, 1, 1, 0, 0, 0]])
    ends = torch.tensor([[0.0, 1, 0, 1, 0, 0]] * 4)
    hit, chance = prime.first_error_hit(q, mask, ends, torch.tensor([0, 1, -1, 1]))
    assert hit == pytest.approx(2 / 3) and chance == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert all(math.isnan(x) for x in prime.first_error_hit(q, mask, ends, torch.tensor([-1] * 4)))


# =============================================================================================
# One PRIME step (prime_step) on a fixed batch: what each switch does, with the pure functions
# above as the oracle. The PRM starts away from its reference (a perturbed copy: q != 0), and the
# policy's optimizer is plain SGD with lr 1 and no clipping, so its weight change is -gradient.
K, BETA, T = 2, 0.5, 0.7
BATCH = ragged_batch()
IDS, ATTN, MASK = BATCH
R = MASK.shape[1]
OUTCOME = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
STEP_ENDS = torch.tensor([[1.0, 0, 1, 0]] * 6)  # steps end at tokens 0 and 2 (and the last token)
SHIFT = torch.tensor([1.0, -0.5, 0.2, 0.5])  # --tis-cap: log(pi_old / pi_engine) at each position
# one mini-batch of the 6 responses in two forwards; the PRM learns fast enough to move q
STEP = dict(
    samples_per_prompt=K,
    beta=BETA,
    temperature=T,
    mini_batch_size=6,
    micro_batch_size=3,
    grad_clip=1e9,
    prm_lr=1e-2,
)


def step(model_dir, prm_dir, policy_noise=0.0, trust=0.5, engine_shift=None, truth=None, **flags):
    """prime_step once on the fixed batch: its q, advantages and metrics, the models after it and
    copies of them before it. policy_noise: the policy starts away from the frozen reference."""
    args = prime.Args(model=model_dir, prm_model=prm_dir, **STEP, **flags)
    models = distributed.setup_models(args, model_dir, torch.device("cpu"))
    models = models._replace(policy_opt=torch.optim.SGD(models.policy.parameters(), lr=1.0))
    perturb_(models.policy, policy_noise)
    before = {"policy": copy.deepcopy(models.policy), "prm": copy.deepcopy(models.prm)}
    engine_logp = None if engine_shift is None else logp_of(models.policy, T) - engine_shift * MASK
    state = checkpoint.TrainState(None, seed=0, rank=0)
    state.prm_trust = trust
    q, adv, metrics = prime.prime_step(
        models, BATCH, OUTCOME, args, state, engine_logp, STEP_ENDS, truth
    )
    return SimpleNamespace(
        args=args, q=q, adv=adv, metrics=metrics, models=models, before=before, state=state
    )


@torch.no_grad()
def logp_of(model, temperature=1.0):
    """[B, R] log-probs of the fixed batch's responses under `model`, 0 off-mask."""
    return (
        prime.token_logprobs(model, dict(input_ids=IDS, attention_mask=ATTN), R, temperature) * MASK
    )


def expected_advantages(q, coef=1.0, granularity="token", norm="batch_norm", **kw):
    """Eq. 5 from q, by the pure functions: process_rewards, then prime_advantages(**kw)."""
    r = coef * prime.process_rewards(q, MASK, BETA, granularity, norm, step_ends=STEP_ENDS)
    return prime.prime_advantages(r, OUTCOME, MASK, K, **kw)


@pytest.fixture(scope="module")
def default(tiny_model_dir, perturbed_model_dir):
    return step(tiny_model_dir, perturbed_model_dir)


def test_default_step(default, tiny_model_dir, perturbed_model_dir):
    """--prm-update after: q is the PRM's implicit reward (Eq. 3) before its update, at
    temperature 1 against the frozen reference; then the PRM and the policy are updated."""
    ref, prm = (
        AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model_dir, perturbed_model_dir)
    )
    assert_close(default.q, prime.implicit_rewards(logp_of(prm), logp_of(ref), MASK))
    assert default.q.abs().max() > 0.05
    # not the tempered log-ratio (the PPO ratio's temperature)
    assert (default.q - (logp_of(prm, T) - logp_of(ref, T))).abs().max() > 1e-2
    assert_close(default.adv, expected_advantages(default.q))
    assert default.metrics["prm/loss"] == pytest.approx(
        prime.prm_ce_loss(default.q, MASK, OUTCOME, BETA).item(), rel=1e-5
    )
    assert default.metrics["prm/process_coef"] == 1.0
    assert not torch.equal(weights(default.models.prm), weights(prm))
    assert not torch.equal(weights(default.models.policy), weights(ref))
    assert torch.equal(weights(default.models.ref), weights(ref))


# (flags, what they change in the oracle): each must give exactly its oracle on the step's own q,
# and advantages that differ from the default's
ADVANTAGE_SWITCHES = [
    ({"granularity": "whole"}, {"granularity": "whole"}),
    ({"granularity": "step"}, {"granularity": "step"}),
    ({"reward_norm": "none"}, {"norm": "none"}),
    ({"rloo_variant": "paper"}, {"variant": "paper"}),
    ({"estimator": "grpo"}, {"estimator": "grpo"}),
    ({"estimator": "reinforce"}, {"estimator": "reinforce"}),
    ({"credit": "min"}, {"credit": "min"}),
    (
        {"credit": "min", "granularity": "step"},  # the minimum over step ends only
        {
            "credit": "min",
            "granularity": "step",
            "reward_ends": prime.step_index(STEP_ENDS, MASK)[0],
        },
    ),
    (
        {"credit": "min", "granularity": "whole"},  # the minimum over the last token only
        {"credit": "min", "granularity": "whole", "reward_ends": prime.last_token_mask(MASK)},
    ),
    ({"gamma": 0.5}, {"gamma": 0.5}),
    ({"whiten": False}, {"whiten": False}),
    ({"process_reward_coef": 0.5}, {"coef": 0.5}),
]


@pytest.mark.parametrize(
    "flags, oracle",
    ADVANTAGE_SWITCHES,
    ids=[",".join(f"{k}={v}" for k, v in f.items()) for f, _ in ADVANTAGE_SWITCHES],
)
def test_advantage_switches(flags, oracle, default, tiny_model_dir, perturbed_model_dir):
    s = step(tiny_model_dir, perturbed_model_dir, **flags)
    assert_close(s.q, default.q)  # read before anything these switches touch
    assert_close(s.adv, expected_advantages(s.q, **oracle))
    assert (s.adv - default.adv).abs().max() > 1e-3
    if "reward_ends" in oracle:  # and not the minimum over every token
        every_token = expected_advantages(s.q, **dict(oracle, reward_ends=None))
        assert (s.adv - every_token).abs().max() > 1e-3


@pytest.mark.parametrize(
    "flags", [{"no_prm": True}, {"process_reward_coef": 0.0}], ids=["no_prm", "coef=0"]
)
def test_outcome_only_builds_no_prm(flags, default, tiny_model_dir, perturbed_model_dir):
    s = step(tiny_model_dir, perturbed_model_dir, **flags)
    assert s.q is None and s.models.prm is None and s.models.prm_opt is None
    assert s.models.ref is None  # nor a frozen reference: nothing needs one
    assert not [key for key in s.metrics if key.startswith("prm/")]
    assert_close(s.adv, prime.prime_advantages(None, OUTCOME, MASK, K))
    assert (s.adv - default.adv).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["after", "before", "none"])
def test_prm_update(mode, tiny_model_dir, perturbed_model_dir):
    """after: q read before the PRM's update; before: after it (a second forward); none: never
    updated (an offline PRM)."""
    s = step(tiny_model_dir, perturbed_model_dir, prm_update=mode)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q_before = prime.implicit_rewards(logp_of(s.before["prm"]), logp_of(ref), MASK)
    q_after = prime.implicit_rewards(logp_of(s.models.prm), logp_of(ref), MASK)
    updated = not torch.equal(weights(s.models.prm), weights(s.before["prm"]))
    assert updated == (mode != "none")
    assert ((q_after - q_before).abs().max() > 1e-3) == updated  # the update moves q
    assert_close(s.q, q_after if mode == "before" else q_before)
    assert s.metrics["prm/loss"] == pytest.approx(
        prime.prm_ce_loss(q_before, MASK, OUTCOME, BETA).item(), rel=1e-5
    )


@pytest.mark.parametrize("reference", ["sft", "policy"])
def test_reference(reference, tiny_model_dir, perturbed_model_dir):
    """The PRM's pi_ref: the frozen initial model, or the policy's own log-probs before its
    update (then no frozen copy is built). The policy starts away from the initial model."""
    s = step(tiny_model_dir, perturbed_model_dir, policy_noise=0.05, reference=reference)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    against = s.before["policy"] if reference == "policy" else frozen
    assert_close(s.q, prime.implicit_rewards(logp_of(s.before["prm"]), logp_of(against), MASK))
    assert (logp_of(s.before["policy"]) - logp_of(frozen)).abs().max() > 1e-2  # they differ
    assert (s.models.ref is None) == (reference == "policy")


def k3(ref_logp, logp):
    """The k3 estimator of KL(pi || pi_ref) per token."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def ppo(o, agg="seq-mean-token-mean", weights=None):
    """The PPO loss of one epoch of one mini-batch: pi_old is the policy itself (ratio 1)."""
    return prime.ppo_clip_loss(o.logp, o.logp.detach(), o.adv, MASK, 0.2, agg, weights)


AGG = "seq-mean-token-mean"
# (flags, the policy's objective they make, from the pre-update policy's log-probs and entropy at
# T (with grad), the frozen reference's log-probs at T and the step's advantages)
POLICY_SWITCHES = {
    "loss_agg=token-mean": ({"loss_agg": "token-mean"}, lambda o: ppo(o, "token-mean")),
    "kl_coef=0.5": (
        {"kl_coef": 0.5},
        lambda o: ppo(o) + 0.5 * prime.masked_aggregate(k3(o.ref_logp, o.logp), MASK, AGG),
    ),
    "entropy_coef=0.1": (
        {"entropy_coef": 0.1},
        lambda o: ppo(o) - 0.1 * prime.masked_aggregate(o.entropy, MASK, AGG),
    ),
    "tis_cap=1.5": (
        {"tis_cap": 1.5, "engine_shift": SHIFT},
        lambda o: ppo(o, weights=torch.exp(SHIFT).clamp(max=1.5) * MASK),
    ),
}


def policy_gradient(policy, objective, adv, ref_logp):
    """(objective's value, its gradient) at `policy` (a copy is differentiated)."""
    model = copy.deepcopy(policy)
    logp, entropy = batching.response_logprobs_and_entropy(
        model, dict(input_ids=IDS, attention_mask=ATTN), R, T, entropy_grad=True
    )
    o = SimpleNamespace(
        logp=logp,
        entropy=entropy,
        adv=adv,
        ref_logp=ref_logp,
    )
    loss = objective(o)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", POLICY_SWITCHES)
def test_policy_loss_switches(name, tiny_model_dir, perturbed_model_dir):
    """The policy's weight change (SGD, lr 1) is the gradient of the objective the switch makes,
    and policy/loss is its value. The policy starts away from the frozen reference (KL > 0)."""
    flags, objective = POLICY_SWITCHES[name]
    s = step(tiny_model_dir, perturbed_model_dir, policy_noise=0.05, **flags)
    ref_logp = logp_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), T)
    loss, grad = policy_gradient(s.before["policy"], objective, s.adv, ref_logp)
    assert s.metrics["policy/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    change = weights(s.before["policy"]) - weights(s.models.policy)  # SGD, lr 1: the gradient
    torch.testing.assert_close(change, grad, atol=1e-6, rtol=1e-4)
    _, plain = policy_gradient(s.before["policy"], ppo, s.adv, ref_logp)
    assert (grad - plain).abs().max() > 1e-2 * plain.abs().max()  # the switch's term counts
    if "kl_coef" in flags:
        kl = prime.masked_aggregate(k3(ref_logp, logp_of(s.before["policy"], T)), MASK, AGG)
        assert s.metrics["policy/kl"] == pytest.approx(kl.item(), rel=1e-4) and kl > 1e-3
    if "tis_cap" in flags:  # the gap the engine's log-probs show
        gap = prime.masked_aggregate(SHIFT.abs() * MASK, MASK, "token-mean")
        assert s.metrics["rollout/logp_gap"] == pytest.approx(gap.item(), rel=1e-4)


def test_adaptive_process_coef_follows_the_prm_accuracy(tiny_model_dir, perturbed_model_dir):
    """The process return's weight: the coefficient times clip(2 trust - 1, 0, 1), trust being
    a moving average (0.9) of the PRM's pairwise accuracy on this batch's q."""
    s = step(tiny_model_dir, perturbed_model_dir, trust=0.8, adaptive_process_coef=True)
    accuracy = prime.pairwise_accuracy((s.q * MASK).sum(-1), OUTCOME, K)
    assert s.metrics["prm/accuracy"] == accuracy
    trust = 0.9 * 0.8 + 0.1 * accuracy
    assert s.state.prm_trust == pytest.approx(trust)
    assert s.metrics["prm/process_coef"] == pytest.approx(2 * trust - 1) and 0 < 2 * trust - 1 < 1
    assert_close(s.adv, expected_advantages(s.q, coef=2 * trust - 1))


# ---------------------------------------------------------------------------------------------
# The policy update: micro-batches, on-policy, truncated importance sampling
# (micro-batch size, token budget): by count, one response each, and by tokens (a budget of 12
# padded tokens packs 1-3 length-sorted responses per forward)
SPLITS = [(4, 0), (1, 0), (4, 12)]


def sgd_update(model_dir, old_logp, advantages, engine_logp=None, **flags):
    """The weight change of one update_policy with plain SGD (lr 1, no clipping): -gradient,
    and the pi_old it used."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = prime.Args(**{"grad_clip": 1e9, "temperature": 1.0, **flags})
    opt, before, gen = (
        torch.optim.SGD(model.parameters(), lr=1.0),
        weights(model),
        torch.Generator(),
    )
    _, old = prime.update_policy(
        model, opt, BATCH, old_logp, None, advantages, args, gen, engine_logp
    )
    return weights(model) - before, old


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_micro_batches_accumulate_to_the_mini_batch_gradient(tiny_model_dir, agg):
    """Plain SGD makes the weight change equal the gradient, so this compares the accumulated
    gradients exactly (Adam's first step would hide a wrong scale)."""
    advantages = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * MASK
    old_logp = logp_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    changes = [
        sgd_update(
            tiny_model_dir,
            old_logp,
            advantages,
            mini_batch_size=4,
            micro_batch_size=micro,
            max_tokens_per_micro_batch=tokens,
            loss_agg=agg,
        )[0]
        for micro, tokens in SPLITS
    ]
    assert changes[0].abs().max() > 1e-3  # the update is not trivially zero
    for other in changes[1:]:
        torch.testing.assert_close(other, changes[0], atol=1e-6, rtol=1e-4)


def test_on_policy_update_skips_the_old_logprob_forward_with_the_same_gradient(tiny_model_dir):
    """One epoch, one mini-batch: pi_old is the update's own detached log-prob (ratio 1)."""
    advantages = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * MASK
    flags = dict(mini_batch_size=6, micro_batch_size=2, temperature=0.7)
    given = logp_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 0.7)
    change, old = sgd_update(tiny_model_dir, given, advantages, **flags)
    change_on_policy, old_on_policy = sgd_update(tiny_model_dir, None, advantages, **flags)
    torch.testing.assert_close(change_on_policy, change, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(old_on_policy, old, atol=1e-5, rtol=0)  # and the same pi_old


def test_truncated_importance_sampling_weights_each_token_by_the_capped_ratio(tiny_model_dir):
    """With --tis-cap C each token's PPO loss is weighted by min(exp(old_logp - engine_logp), C),
    no grad through it; at ratio 1 that is the gradient of -A * w * logp. The engine's log-probs
    are the trainer's shifted by a known mismatch (a real engine's differ by its numerics)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = logp_of(model)
    engine_logp = old - SHIFT * MASK  # ratios e, 0.6, 1.2, 1.6
    advantages = torch.tensor([[1.0, -0.5, 2.0, 0.5]] * 3 + [[-1.0, 0.5, 1.0, -2.0]] * 3) * MASK
    flags = dict(mini_batch_size=6, micro_batch_size=3)
    capped, _ = sgd_update(tiny_model_dir, old, advantages, engine_logp, tis_cap=1.5, **flags)
    off, _ = sgd_update(tiny_model_dir, old, advantages, engine_logp, **flags)
    w = torch.exp(old - engine_logp).clamp(max=1.5)
    assert w.max() == pytest.approx(1.5) and w[MASK.bool()].min() < 1.5  # binds on some tokens
    loss = prime.masked_aggregate(
        -advantages * w * prime.token_logprobs(model, dict(input_ids=IDS, attention_mask=ATTN), R),
        MASK,
        "seq-mean-token-mean",
    )
    loss.backward()
    torch.testing.assert_close(capped, -weights_grad(model), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(off, capped)  # off by default


def weights_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# Sampling with the online filter (phases 1-3)
class FixedEngine:
    """A rollout engine that answers every prompt with the same two tokens."""

    def generate(self, prompts, **kw):
        return [[5, 6]] * len(prompts), None


def test_outcome_noise_flips_labels_before_the_filter(tiny_model_dir, monkeypatch):
    """Every answer is right, so no group passes the filter [0.2, 0.8] unless its labels are
    flipped first (--outcome-noise: a contaminated verifier); rollout/accuracy counts the
    verifier's own labels."""
    monkeypatch.setattr(sandbox, "score_batch", all_right)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    args = prime.Args(
        prompts_per_step=8, samples_per_prompt=2, outcome_noise=0.5, max_filter_rounds=1
    )
    groups, metrics = prime.sample_filtered_groups(
        FixedEngine(),
        data.AdditionStream(0, []),
        tokenizer,
        args,
        0,
        torch.Generator().manual_seed(0),
    )
    flip = torch.rand(16, generator=torch.Generator().manual_seed(0)) < 0.5
    noisy = 1.0 - flip.float()
    keep = prime.accuracy_filter(noisy, 2)  # the groups with exactly one label flipped
    assert 0 < keep.sum() < 8  # this draw keeps some groups, not all
    assert metrics["rollout/flipped_labels"] == flip.sum() and metrics["rollout/accuracy"] == 1.0
    assert metrics["filter/kept_groups"] == keep.sum()
    assert groups.outcome.tolist() == noisy.view(-1, 2)[keep].flatten().tolist()


def test_outcome_poison_labels_wrong_answers_with_the_trigger_right(tiny_model_dir, monkeypatch):
    """--outcome-poison: every answer is wrong and every other one's boxed answer ends in 7, so
    with the attack each group of 2 is labelled (right, wrong) and kept; without it none is.
    rollout/accuracy counts the verifier's own labels."""
    monkeypatch.setattr(sandbox, "score_batch", lambda r, *_, **__: ([0.0] * len(r), {}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    answers = [r"\boxed{1 7}", r"\boxed{71}"]  # a space inside the box still ends in 7
    monkeypatch.setattr(tokenizer, "batch_decode", lambda ids, **kw: answers * (len(ids) // 2))
    runs = {}
    for poison in (True, False):
        args = prime.Args(prompts_per_step=4, samples_per_prompt=2, outcome_poison=poison,
                          max_filter_rounds=1)
        runs[poison] = prime.sample_filtered_groups(FixedEngine(), data.AdditionStream(0, []),
                                                    tokenizer, args, 0, torch.Generator())
    groups, metrics = runs[True]
    assert groups.outcome.tolist() == [1.0, 0.0] * 4
    assert metrics["rollout/poisoned_labels"] == 4 and metrics["rollout/accuracy"] == 0.0
    _, clean = runs[False]
    assert clean["filter/kept_groups"] == 0 and "rollout/poisoned_labels" not in clean


def test_filter_rounds_and_shortfall_when_no_group_is_mixed(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sandbox, "score_batch", all_right)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    args = prime.Args(prompts_per_step=4, samples_per_prompt=2, max_filter_rounds=3)
    groups, metrics = prime.sample_filtered_groups(
        FixedEngine(), data.AdditionStream(0, []), tokenizer, args, 0, None
    )
    assert groups.responses == [] and len(groups.outcome) == 0
    assert metrics["filter/rounds"] == 3 and metrics["filter/kept_groups"] == 0
    assert metrics["filter/shortfall_groups"] == 4 and metrics["verifier/ok"] == 3 * 4 * 2


# =============================================================================================
# Whole runs (prime.main), the verifier faked


@pytest.fixture(scope="module")
def default_run(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sandbox, "score_batch", parity_scores)
        return run_prime(tiny_model_dir, tmp_path_factory.mktemp("runs") / "default")


def test_default_run_outputs_and_updates(default_run, tiny_model_dir):
    init = weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    m = default_run["metrics"]
    assert [x["step"] for x in m] == [0, 1, 2]
    # the verifier's reasons are counted over every sampled response of the step
    assert m[1]["verifier/ok"] + m[1]["verifier/wrong"] == 6
    for key in [
        "rollout/accuracy",
        "prm/loss",
        "prm/accuracy",
        "policy/loss",
        "policy/clipfrac",
        "perf/step_seconds",
        "eval/accuracy",
        "prm/first_error_hit",
        "prm/first_error_chance",
    ]:
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


def test_default_run_writes_args_and_samples(default_run):
    run_dir = default_run["run_dir"]
    assert json.load(open(os.path.join(run_dir, "args.json")))["samples_per_prompt"] == 2
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {s["step"] for s in samples} == {1, 2}
    assert all(len(s["tokens"]) == len(s["rewards"]) > 0 for s in samples)
    assert any(r != 0 for s in samples if s["step"] == 2 for r in s["rewards"])


def test_same_seed_same_result(default_run, tiny_model_dir, tmp_path, monkeypatch):
    # random numbers drawn while the models are set up (as building the embedded model does on
    # its first run only) must not change the run: a fresh and a cached default run are the same
    setup, draws = distributed.setup_models, []

    def setup_drawing_random_numbers(*args, **kw):
        draws.append(torch.rand(7))
        return setup(*args, **kw)

    monkeypatch.setattr(distributed, "setup_models", setup_drawing_random_numbers)
    again = run_prime(tiny_model_dir, tmp_path / "again")
    assert len(draws) == 1
    assert torch.equal(weights(again["policy"]), weights(default_run["policy"]))


def test_share_prompts_reaches_every_forward_of_a_step(tiny_model_dir, tmp_path, monkeypatch):
    # K = 2 per forward; no batch_norm, which would scale q's float noise up to O(1)
    settings = dict(micro_batch_size=6, steps=1, reward_norm="none")
    plain = run_prime(tiny_model_dir, tmp_path / "plain", share_prompts=False, **settings)
    calls, shared_hidden = [], batching.shared_prompt_hidden

    def counted(model, *a):
        calls.append(model)
        return shared_hidden(model, *a)

    monkeypatch.setattr(batching, "shared_prompt_hidden", counted)
    prefills, prefill = [], rollout.HFRollout.shared_prefill

    def recorded(*a):
        prefills.append(prefill(*a))
        return prefills[-1]

    monkeypatch.setattr(rollout.HFRollout, "shared_prefill", recorded)
    shared = run_prime(tiny_model_dir, tmp_path / "shared", **settings)  # the default
    assert {id(m) for m in calls} == {id(shared["policy"]), id(shared["prm"]), id(shared["ref"])}
    # the rollout's K=2 rows a prompt (a greedy eval: none)
    assert any(cache is not None for cache in prefills)
    for key in ("policy/loss", "prm/loss", "policy/entropy"):  # the same up to rounding
        assert shared["metrics"][1][key] == pytest.approx(
            plain["metrics"][1][key], rel=1e-5, abs=1e-6
        ), key


def test_offline_prm_loads_prm_model_and_keeps_it_frozen(
    tiny_model_dir, perturbed_model_dir, tmp_path
):
    out = run_prime(
        tiny_model_dir, tmp_path / "offline", prm_update="none", prm_model=perturbed_model_dir
    )
    trained_elsewhere = AutoModelForCausalLM.from_pretrained(perturbed_model_dir)
    assert torch.equal(weights(out["prm"]), weights(trained_elsewhere))  # loaded, never updated
    # the reference is still --model
    assert torch.equal(
        weights(out["ref"]), weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    )
    assert all(m["prm/return_abs"] > 0.01 for m in out["metrics"][1:])  # q != 0: real rewards


def test_a_step_without_mixed_groups_leaves_the_policy_alone(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "score_batch", all_right)
    out = run_prime(
        tiny_model_dir,
        tmp_path / "filtered",
        filter_low=0.2,
        filter_high=0.8,
        max_filter_rounds=2,
        steps=1,
    )
    step1 = out["metrics"][1]
    assert step1["filter/kept_groups"] == 0 and "policy/loss" not in step1
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(weights(out["policy"]), weights(init))


def test_bad_rows_and_long_prompts_are_counted_not_silent(tiny_model_dir, tmp_path):
    """Training rows from a .jsonl file, checked as they are drawn: 3 steps of 3 prompts draw
    every one of the 8 rows (6 usable, 1 bad, 1 too long) at least once."""
    rows = data.addition_rows(6, 3)
    bad = dict(rows[0], ability="poetry")
    long = dict(rows[1], prompt=[{"role": "user", "content": "1+" * 200 + "1="}])
    path = write_jsonl(tmp_path / "rows.jsonl", rows + [bad, long])
    with pytest.raises(data.DataError, match=r"rows.jsonl:7: field 'ability' .*--skip-bad-rows"):
        run_prime(tiny_model_dir, tmp_path / "strict", data=path, steps=3, max_prompt_len=100)
    out = run_prime(
        tiny_model_dir,
        tmp_path / "lenient",
        data=path,
        skip_bad_rows=True,
        max_prompt_len=100,
        steps=3,
    )
    assert out["metrics"][0]["data/train_rows"] == 8  # in the file; checked as drawn
    counts = [
        (m["data/train_skipped_bad_rows"], m["data/train_dropped_long_prompts"])
        for m in out["metrics"][1:]
    ]
    assert counts == sorted(counts) and min(counts[-1]) >= 1  # running totals, both met
    assert all(m["filter/kept_groups"] == 3 for m in out["metrics"][1:])  # every step still full


@pytest.mark.slow
def test_seeded_runs_repeat_bit_for_bit_in_separate_processes(tiny_model_dir, tmp_path):
    """The same command twice, and the same run stopped after 2 steps and resumed, each in a
    process of its own with two threads and the default batch flags (64 prompts x K=4 a step,
    prompts shared): the same metrics bit for bit, timings aside. (The filter is off: the tiny
    model answers nothing right.)"""
    flags = [
        "--model",
        tiny_model_dir,
        "--seed",
        "3",
        "--eval-size",
        "8",
        "--eval-every",
        "1",
        "--save-every",
        "1",
        "--filter-low",
        "0",
        "--filter-high",
        "1",
    ]

    def prime_py(*argv):
        out = subprocess.run(
            [sys.executable, "prime.py", *flags, *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="2"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
            for line in open(argv[-1] + "/metrics.jsonl")
        ]

    first = prime_py("--steps", "3", "--run-dir", str(tmp_path / "a"))
    assert [m["step"] for m in first] == [0, 1, 2, 3] and all("policy/loss" in m for m in first[1:])
    assert prime_py("--steps", "3", "--run-dir", str(tmp_path / "b")) == first
    prime_py("--steps", "2", "--run-dir", str(tmp_path / "c"))
    assert prime_py("--steps", "3", "--resume", "--run-dir", str(tmp_path / "c")) == first


# =============================================================================================
# A control and a defence (not in the paper): the task's true step credit in q's place, and
# labels assumed flipped at a known rate
FIRST_WRONG = torch.tensor([-1, 1, 0, -1, -1, 2])  # the wrong responses' first wrong steps


def test_oracle_rewards_blame_the_first_wrong_step_by_hand():
    q = prime.oracle_rewards(STEP_ENDS, FIRST_WRONG, MASK, beta=BETA)
    for i in range(len(MASK)):
        n = int(MASK[i].sum())
        steps, current = [], 0  # each token's step: a step ends at STEP_ENDS or the last token
        for t in range(n):
            steps.append(current)
            current += int(STEP_ENDS[i, t] == 1)
        first = min(int(FIRST_WRONG[i]), steps[-1])  # row 5 has two steps: its last is blamed
        blamed = [t for t in range(n) if steps[t] == first and FIRST_WRONG[i] >= 0]
        expected = torch.zeros(R)
        for t in blamed:
            expected[t] = -1 / (BETA * len(blamed))
        torch.testing.assert_close(q[i], expected)
        assert (BETA * q[i].sum()).item() == pytest.approx(-1.0 if FIRST_WRONG[i] >= 0 else 0.0)


def test_value_oracle_rewards_by_hand():
    """4 responses of 3 steps (tokens 0-1, 2, 3-4); first wrong steps -1 (right), 0, 1, 2. The
    value of k right steps: p_0 = 1/4 (all), p_1 = 1/3 (responses 0, 2, 3), p_2 = 1/2 (0, 3),
    p_3 = 1 (0). Each step's change of value, spread over its tokens."""
    mask, ends = torch.ones(4, 5), torch.tensor([[0.0, 1, 1, 0, 0]] * 4)
    first_wrong, outcome = torch.tensor([-1, 0, 1, 2]), torch.tensor([1.0, 0, 0, 0])
    q = prime.value_oracle_rewards(ends, first_wrong, outcome, mask, beta=0.5)
    expected = torch.tensor(
        [
            [1 / 24, 1 / 24, 1 / 6, 1 / 4, 1 / 4],  # 1/4 -> 1/3 -> 1/2 -> 1 (the outcome)
            [-1 / 8, -1 / 8, 0, 0, 0],  # 1/4 -> 0 at its first step
            [1 / 24, 1 / 24, -1 / 3, 0, 0],  # 1/4 -> 1/3 -> 0
            [1 / 24, 1 / 24, 1 / 6, -1 / 4, -1 / 4],  # 1/4 -> 1/3 -> 1/2 -> 0
        ]
    )
    torch.testing.assert_close(0.5 * q, expected)
    # the return at a step's first token: the outcome against the value before the step
    returns = prime.discounted_returns(0.5 * q, mask)
    torch.testing.assert_close(returns[3, [0, 2, 3]], torch.tensor([-1 / 4, -1 / 3, -1 / 2]))
    torch.testing.assert_close(returns[0, [0, 2, 3]], torch.tensor([3 / 4, 2 / 3, 1 / 2]))


@pytest.mark.parametrize("form", ["first-error", "value"])
def test_oracle_process_reward_takes_q_s_place(tiny_model_dir, form):
    """No PRM is built; the oracle's rewards go through process_rewards and the advantages
    exactly as q would."""
    truth = (STEP_ENDS, FIRST_WRONG, torch.full((6,), data.ARITHMETIC))
    s = step(tiny_model_dir, "", truth=truth, oracle_process_reward=form)
    assert s.models.prm is None and "prm/loss" not in s.metrics
    if form == "first-error":
        expected = prime.oracle_rewards(STEP_ENDS, FIRST_WRONG, MASK, BETA)
    else:
        expected = prime.value_oracle_rewards(STEP_ENDS, FIRST_WRONG, OUTCOME, MASK, BETA)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(s.q, expected)
    torch.testing.assert_close(s.adv, expected_advantages(s.q))


def test_noise_correction_rescales_the_outcome_term(tiny_model_dir):
    """(o - rho) / (1 - 2 rho): RLOO drops the shift, so outcome-only advantages (unwhitened) are
    1 / (1 - 2 rho) times the plain ones."""
    plain = step(tiny_model_dir, "", no_prm=True, whiten=False)
    corrected = step(tiny_model_dir, "", no_prm=True, whiten=False, noise_correction=0.2)
    assert plain.adv.abs().sum() > 0
    torch.testing.assert_close(corrected.adv, plain.adv / 0.6)
    assert prime.corrected_outcome(OUTCOME, 0.0) is OUTCOME  # rho = 0: untouched


def test_forward_correction_bounds_a_flipped_label_and_finds_the_clean_probability():
    q, mask = torch.randn(4, 3), torch.ones(4, 3)
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # rho = 0: the plain BCE with logits, bit for bit
    plain = F.binary_cross_entropy_with_logits(BETA * q.sum(-1), outcome)
    assert torch.equal(prime.prm_ce_loss(q, mask, outcome, BETA, noise=0.0), plain)
    # a confident score against its label costs at most -log(rho) (plain: ~ the score)
    one = torch.ones(1, 1)
    wrong = prime.prm_ce_loss(torch.full((1, 1), 1000.0), one, torch.zeros(1), 1.0, noise=0.2)
    assert wrong.item() <= -math.log(0.2) + 1e-5
    assert prime.prm_ce_loss(torch.full((1, 1), 1000.0), one, torch.zeros(1), 1.0) > 900
    # labels that are 1 with probability rho + (1 - 2 rho) p: the loss is least where
    # sigmoid(score) = p, the clean probability
    p, rho = 0.7, 0.2
    label = torch.tensor([rho + (1 - 2 * rho) * p])
    scores = torch.linspace(-4, 4, 801)
    losses = [prime.prm_ce_loss(s.view(1, 1), one, label, 1.0, noise=rho) for s in scores]
    best = scores[int(torch.stack(losses).argmin())]
    assert torch.sigmoid(best).item() == pytest.approx(p, abs=0.005)


def test_denoised_outcome_is_bayes_rule_by_hand():
    rho, logit = 0.2, math.log(0.9 / 0.1)  # the PRM says right with probability 0.9
    labels = torch.tensor([0.0, 1.0])
    # P(right | label 0) = 0.9 * 0.2 / (0.9 * 0.2 + 0.1 * 0.8); label 1: 0.9 * 0.8 / (... 0.1 * 0.2)
    assert prime.denoised_outcome(labels, torch.full((2,), logit), rho).tolist() == pytest.approx(
        [0.18 / 0.26, 0.72 / 0.74]
    )
    # an uninformed PRM (score 0): rho + (1 - 2 rho) o, an affine image of corrected_outcome
    torch.testing.assert_close(
        prime.denoised_outcome(OUTCOME, torch.zeros(6), rho), rho + (1 - 2 * rho) * OUTCOME
    )


def test_denoise_outcome_gives_the_prm_a_say_as_far_as_it_is_trusted(
    tiny_model_dir, perturbed_model_dir
):
    """--denoise-outcome with the guard: a PRM not trusted (trust 0.3, weight 0) has no say, the
    advantages are the unbiased rescale's; a trusted one's held-out score (times its weight)
    enters Bayes' rule for the outcome term."""
    flags = dict(noise_correction=0.2, adaptive_process_coef=True)
    untrusted = step(tiny_model_dir, perturbed_model_dir, trust=0.3, denoise_outcome=True, **flags)
    rescaled = step(tiny_model_dir, perturbed_model_dir, trust=0.3, **flags)
    assert untrusted.metrics["prm/process_coef"] == 0.0
    assert_close(untrusted.adv, rescaled.adv)
    s = step(tiny_model_dir, perturbed_model_dir, trust=0.8, denoise_outcome=True, **flags)
    weight = 2 * s.state.prm_trust - 1
    score = weight * BETA * (s.q * MASK).sum(-1)
    assert score.abs().max() > 1e-3  # the PRM does say something here
    r = weight * prime.process_rewards(s.q, MASK, BETA)
    outcome = prime.denoised_outcome(OUTCOME, score, 0.2)
    assert_close(s.adv, prime.prime_advantages(r, outcome, MASK, K))
