"""batching.py: collating token ids, splitting a batch into forward passes, a step's training
batch, and the forwards that run each distinct prompt once for its K responses."""

import copy
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
    for idx, ids, attn, r in splits:
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
    ends, first = data.step_truth(tok, [row, row], responses, batch[2].shape[1])
    assert torch.equal(truth[0], ends) and torch.equal(truth[1], first)
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


def test_shared_prompts_give_the_logits_of_one_forward_per_sequence(lm):
    # K = 2 responses per prompt, prompts of different lengths (left padding), ragged responses;
    # the last prompt's tokens are those of [8, 9] once padded: its own padding tells them apart
    prompts = [[3, 4, 5, 6, 7]] * 2 + [[8, 9]] * 2 + [[10, 11, 12], [0, 0, 0, 8, 9]]
    responses = [[20, 21, 22], [23], [24, 25], [26, 27, 28], [29, 30], [31, 32, 33]]
    ids, attn, mask = batching.collate(prompts, responses, 0)
    with torch.no_grad():
        shared = batching.response_logits(lm, ids, attn, 3, share_prompts=True)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + r])).logits[0]
        torch.testing.assert_close(
            shared[i, : len(r)], logits[len(p) - 1 : len(p) + len(r) - 1], atol=1e-5, rtol=1e-5
        )
    # gradients: the cache's index sums the K responses' gradients into their one prompt
    model = copy.deepcopy(lm).train()
    grads = []
    for share in (False, True):
        (prime.token_logprobs(model, ids, attn, 3, share_prompts=share) * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for plain, shared_grad in zip(*grads):
        torch.testing.assert_close(shared_grad, plain, atol=1e-5, rtol=1e-5)
    # under gradient checkpointing HF drops the cache: the flag falls back to the plain forward
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(
        batching.response_logits(model, ids, attn, 3, share_prompts=True),
        batching.response_logits(model, ids, attn, 3),
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
    hook = lm.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            shared = prime.token_logprobs(lm, ids, attn, mask.shape[1], share_prompts=True)
            assert len(calls) == 2
            plain = prime.token_logprobs(lm, ids, attn, mask.shape[1])
    finally:
        hook.remove()
    torch.testing.assert_close(shared * mask, plain * mask, atol=1e-5, rtol=1e-5)
