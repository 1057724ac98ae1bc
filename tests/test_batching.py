"""batching.py: collating token ids, splitting a batch into forward passes, a step's training
batch, and the forwards that run each distinct prompt once for its K responses."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ragged_batch, tiny_lm

import batching
import bootstrap
import data
import prime


def test_collate_left_pads_prompts_and_right_pads_responses():
    ids, attn, mask = batching.collate([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 0], [0, 0, 8, 10, 11]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_token_budget_packs_sorted_responses_and_cuts_padding():
    batch = ragged_batch()  # prompt + response lengths: 6, 3, 6, 6, 3, 5
    budget = SimpleNamespace(micro_batch_size=6, max_tokens_per_micro_batch=12)
    splits = list(batching.micro_batches(budget, batch, torch.arange(6)))
    # longest first; 0 and 2 together would be 2 x (4 + 3) = 14 padded tokens; 5 and 1: 2 x (3 + 2)
    assert [idx.tolist() for idx, *_ in splits] == [[0], [2], [3], [5, 1], [4]]
    for idx, inputs, r in splits:
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape[0] * ids.shape[1] <= 12 and r == int(batch[2][idx].sum(-1).max())
        assert attn[:, 0].any() and ids.shape == attn.shape  # no column is padding in every row
    model = tiny_lm()
    logp = prime.batched_logprobs(model, batch, prime.Args(micro_batch_size=6), {1.0})[1.0]
    packed = prime.batched_logprobs(model, batch, prime.Args(**vars(budget)), {1.0})[1.0]
    torch.testing.assert_close(packed, logp, atol=1e-5, rtol=0)  # the same log-probs, less padding


def test_micro_batches_by_count_and_as_many_as_the_busiest_rank():
    batch = ragged_batch()
    by_count = SimpleNamespace(micro_batch_size=4, max_tokens_per_micro_batch=0)
    rows = torch.tensor([1, 2, 3, 4, 5])
    assert [len(idx) for idx, *_ in batching.micro_batches(by_count, batch, rows)] == [4, 1]

    def busiest_rank_needs_4(x, op):  # an all-reduce "max" where another rank has 4 passes
        assert op == "max"
        return torch.tensor(4)

    splits = [
        idx.tolist()
        for idx, *_ in batching.micro_batches(by_count, batch, rows, busiest_rank_needs_4)
    ]
    # the largest pass is split in two until there are 4; every row is still in exactly one
    assert len(splits) == 4 and sorted(sum(splits, [])) == rows.tolist()


def test_training_batch_pads_engine_logprobs_and_gives_step_ends_and_truth_when_asked():
    row = data.addition_row(345, 678)
    right = data.addition_solution(345, 678)
    tok = bootstrap.build_tokenizer([right, bootstrap.CHAT_TEMPLATE] + bootstrap.SPECIAL)
    responses = [tok(text)["input_ids"] for text in (right, "5+8=13,4+7+1=11,3")]
    logps = [[-0.5] * len(r) for r in responses]
    groups = batching.Groups([[1, 2]] * 2, responses, [row, row], logps, torch.tensor([1.0, 0.0]))
    args = prime.Args(granularity="step", step_separator=",")
    batch, engine_logp, step_ends, truth = batching.training_batch(
        groups, tok, args, 0, torch.device("cpu")
    )
    assert torch.equal(engine_logp, -0.5 * batch[2])  # 0 on padding
    ends, first, kind = data.step_truth(tok, [row, row], responses, batch[2].shape[1])
    assert torch.equal(truth[0], ends) and torch.equal(truth[1], first)
    assert torch.equal(truth[2], kind)
    assert torch.equal(step_ends, ends)  # "," ends a step in both
    # the truth only when asked (a PRM's rewards are checked against it), step ends only for
    # --granularity step, engine log-probs only where the engine gave them
    unasked = batching.training_batch(
        groups._replace(engine_logps=[None, None]),
        tok,
        prime.Args(),
        0,
        torch.device("cpu"),
        with_truth=False,
    )
    assert unasked[1:] == (None, None, None)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_shared_prompts_give_the_hidden_states_of_one_forward_per_sequence(lm):
    # K = 2 responses per prompt, prompts of different lengths (left padding), ragged responses;
    # the last prompt's tokens are those of [8, 9] once padded: its own padding tells them apart
    prompts = [[3, 4, 5, 6, 7]] * 2 + [[8, 9]] * 2 + [[10, 11, 12], [0, 0, 0, 8, 9]]
    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28], [29, 30], [31, 32, 33]]
    ids, attn, mask = batching.collate(prompts, responses, 0)
    with torch.no_grad():
        shared = batching.response_hidden(
            lm, dict(input_ids=ids, attention_mask=attn), 3, share_prompts=True
        )
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            hidden = lm.base_model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
        torch.testing.assert_close(
            shared[i, : len(r)], hidden[len(p) - 1 : len(p) + len(r) - 1], atol=1e-5, rtol=1e-5
        )
    # gradients: the cache's index sums the K responses' gradients into their one prompt
    model = copy.deepcopy(lm).train()
    grads = []
    for share in (False, True):
        (
            prime.token_logprobs(
                model, dict(input_ids=ids, attention_mask=attn), 3, share_prompts=share
            )
            * mask
        ).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for plain, shared_grad in zip(*grads):
        torch.testing.assert_close(shared_grad, plain, atol=1e-5, rtol=1e-5)
    # under gradient checkpointing HF drops the cache: the flag falls back to the plain forward
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(
        batching.response_hidden(
            model, dict(input_ids=ids, attention_mask=attn), 3, share_prompts=True
        ),
        batching.response_hidden(model, dict(input_ids=ids, attention_mask=attn), 3),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize(
    "prompts, responses",
    [
        ([[3, 4, 5]] * 2 + [[8, 9]] * 2, [[20], [21], [22], [23]]),  # one-token responses: R = 1
        ([[7]] * 2 + [[8]], [[20, 21], [22], [23, 24]]),  # one-token prompts
    ],
)
def test_shared_prompts_take_two_forwards_whatever_the_shapes(lm, prompts, responses):
    """FSDP needs the same number of forwards on every rank: always the prompts, then the rest."""
    ids, attn, mask = batching.collate(prompts, responses, 0)
    calls = []
    hook = lm.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            shared = prime.token_logprobs(
                lm, dict(input_ids=ids, attention_mask=attn), mask.shape[1], share_prompts=True
            )
            assert len(calls) == 2
            plain = prime.token_logprobs(
                lm, dict(input_ids=ids, attention_mask=attn), mask.shape[1]
            )
    finally:
        hook.remove()
    torch.testing.assert_close(shared * mask, plain * mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_from_logits_slow_loop(temperature):
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)  # bf16 in, fp32 out
    targets = torch.randint(0, 5, (2, 3))
    logp = batching.logprobs_from_logits(logits, targets, temperature)
    entropy = batching.entropy_from_logits(logits, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t].float() / temperature, -1).tolist()
            assert logp[b, t].item() == pytest.approx(math.log(p[targets[b, t]]), abs=1e-5)
            assert entropy[b, t].item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# The LM head a chunk of tokens at a time: the same log-probs and gradients as the whole logits,
# without ever holding [B, R, vocab] of them
def whole_logprobs(model, ids, attn, R, temperature):
    """The reference: every logit of the response positions, log-softmax in fp32."""
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    logits = logits[:, -R - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, -R:, None]).squeeze(-1)


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("share_prompts", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_gives_the_whole_logits_numbers(lm, share_prompts, bias, monkeypatch):
    """Log-probs at two temperatures and their gradients, entropy too, with left padding and
    shared prompts: equal to the whole-logits computation up to float rounding (a head with a
    bias too: it is divided by T like the hidden states)."""
    ids, attn, mask = ragged_batch()
    R = mask.shape[1]
    model = copy.deepcopy(lm).train()
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(model.lm_head.out_features) * 0.1)
    monkeypatch.setattr(batching, "LOGITS_BUDGET", 50 * 5)  # 5 tokens of vocabulary 50 a chunk
    for t in (1.0, 0.7):
        chunked = batching.response_logprobs(
            model, dict(input_ids=ids, attention_mask=attn), R, {t}, share_prompts
        )[t]
        (chunked * mask).sum().backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        whole = whole_logprobs(model, ids, attn, R, t)
        (whole * mask).sum().backward()
        torch.testing.assert_close(chunked * mask, whole * mask, atol=1e-5, rtol=1e-5)
        for g, w in zip(got, grads(model), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        model.zero_grad(set_to_none=True)
    logp, entropy = batching.response_logprobs_and_entropy(
        model, dict(input_ids=ids, attention_mask=attn), R, 0.7, share_prompts, entropy_grad=True
    )
    (entropy * mask).sum().backward()  # the entropy's gradient through its recomputed chunks
    got = grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(batching, "LOGITS_BUDGET", 2**26)  # the whole logits
    _, whole_entropy = batching.response_logprobs_and_entropy(
        model, dict(input_ids=ids, attention_mask=attn), R, 0.7, share_prompts, entropy_grad=True
    )
    (whole_entropy * mask).sum().backward()
    torch.testing.assert_close(entropy * mask, whole_entropy * mask, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, grads(model), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_no_logits_of_the_whole_batch_are_held(monkeypatch):
    """Over the budget, no tensor made while scoring (forward and backward) is as large as the
    batch's logits [B, R, vocab]; within it, they are made whole. A vocabulary large next to
    the model (2000 x hidden 16), so that only logits can be that large."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM, Qwen2Config

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    config = Qwen2Config(
        vocab_size=2000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids, attn, mask = ragged_batch()
    B, R, V = *mask.shape, config.vocab_size
    for budget in (2**26, V * 4):
        monkeypatch.setattr(batching, "LOGITS_BUDGET", budget)
        Largest.numel = 0
        with Largest():
            logp, entropy = batching.response_logprobs_and_entropy(
                model, dict(input_ids=ids, attention_mask=attn), R, 0.7
            )
            (logp * mask).sum().backward()
        assert (Largest.numel >= B * R * V) == (budget > B * R * V), (budget, Largest.numel)


def test_prm_and_reference_score_alike_through_the_chunked_head(lm, monkeypatch):
    """q = log pi_phi - log pi_ref is exactly 0 at step 1 (the PRM is the reference's copy):
    both go through the same function, chunks included."""
    monkeypatch.setattr(batching, "LOGITS_BUDGET", 50 * 3)
    ids, attn, mask = ragged_batch()
    prm, ref = copy.deepcopy(lm).train(), copy.deepcopy(lm)
    with torch.no_grad():
        ref_logp = prime.token_logprobs(
            ref, dict(input_ids=ids, attention_mask=attn), mask.shape[1]
        )
    q = prime.implicit_rewards(
        prime.token_logprobs(prm, dict(input_ids=ids, attention_mask=attn), mask.shape[1]),
        ref_logp,
        mask,
    )
    assert torch.equal(q, torch.zeros_like(q))
