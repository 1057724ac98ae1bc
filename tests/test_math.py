"""The pure functions of prime.py against slow, obvious loops and hand-worked numbers."""
import math

import pytest
import torch

import data
import prime
import rollout

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
