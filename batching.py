"""The trainer's batches: token-id lists to padded tensors, and the forward passes over them.

Plumbing every trainer needs, kept out of data.py (the task, which forks replace) and out of
prime.py (the algorithm):
- `collate`: left-padded prompts + right-padded responses, and the response mask;
- `micro_batches`: length-sorted forward passes within a row and token budget, as many on
  every rank (under FSDP each forward is a collective);
- `training_batch`: what prime.prime_step takes for a step's kept groups (`Groups`);
- `response_logits`: a model's logits for the response tokens of a batch; with
  `shared_prompt_logits` each distinct prompt is run once, its KV cache shared by the K
  responses sampled from it (the prompt's compute divided by K).
"""
from typing import NamedTuple

import torch

import data


def left_pad(seqs, pad_id):
    """Token-id lists -> input_ids, attention_mask [B, max len], padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, attn


def collate(prompts, responses, pad_id):
    """Left-padded prompts + right-padded responses -> input_ids, attention_mask [B, P+R] and the
    response mask [B, R] (responses already end at their first EOS)."""
    p_ids, p_attn = left_pad(prompts, pad_id)
    R = max(1, max(len(r) for r in responses))
    r_ids = torch.tensor([r + [pad_id] * (R - len(r)) for r in responses])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (R - len(r)) for r in responses])
    return torch.cat([p_ids, r_ids], 1), torch.cat([p_attn, mask.long()], 1), mask


def micro_batches(args, batch, rows, reduce=None):
    """Split rows `rows` [n] of a collated batch into forward passes, sorted by length: at most
    --micro-batch-size rows each and, with --max-tokens-per-micro-batch, at most that many
    tokens once padded (rows x (the longest prompt + the longest response)), so padding does not
    dominate when lengths vary (verl's dynamic batch size). Yields (row indices, input_ids,
    attention_mask, r): the columns that are padding in every row are cut away; r is the
    response width kept. With `reduce` (an all-reduce) every rank makes as many passes as the
    rank that needs most: under FSDP each forward is a collective."""
    max_count, max_tokens = args.micro_batch_size, args.max_tokens_per_micro_batch
    ids, attn, mask = batch
    R = mask.shape[1]
    P = ids.shape[1] - R
    p_len = attn[:, :P].sum(-1).tolist()
    r_len = [max(1, n) for n in mask.sum(-1).long().tolist()]
    groups = []
    for i in sorted(rows.tolist(), key=lambda i: -(p_len[i] + r_len[i])):
        group = groups[-1] if groups else []
        p = max([p_len[i]] + [p_len[j] for j in group])
        r = max([r_len[i]] + [r_len[j] for j in group])
        fits = max_tokens <= 0 or (p + r) * (len(group) + 1) <= max_tokens
        if group and len(group) < max_count and fits:
            group.append(i)
        else:
            groups.append([i])
    most = len(groups) if reduce is None else int(reduce(torch.tensor(len(groups)), "max"))
    while len(groups) < most:  # split the largest
        largest = max(groups, key=len)
        at = groups.index(largest)
        groups[at:at + 1] = [largest[::2], largest[1::2]]
    for group in groups:
        idx = torch.tensor(group, device=ids.device)
        p, r = max(p_len[j] for j in group), max(r_len[j] for j in group)
        cols = torch.cat([torch.arange(P - p, P), torch.arange(P, P + r)]).to(ids.device)
        yield idx, ids[idx][:, cols], attn[idx][:, cols], r


def padded(x, R):
    """[b, r] -> [b, R], zeros on the right: a micro-batch's values back at the batch's width."""
    return torch.nn.functional.pad(x, (0, R - x.shape[1]))


class Groups(NamedTuple):
    """This rank's kept groups of a step: K responses per prompt, contiguous."""
    prompts: list  # token ids, one per response (a group's K are the same)
    responses: list  # token ids, ending at the first EOS
    rows: list  # the data row of each response
    engine_logps: list  # the engine's log-prob of each sampled token, or Nones
    outcome: torch.Tensor  # [n] the verifier's reward


def training_batch(groups, tokenizer, args, pad_id, device, with_truth=True):
    """(collated batch, engine log-probs [B, R] or None, --granularity step ends [B, R] or None,
    the task's step truth or None) for a step's kept groups: what prime.prime_step takes. The
    truth only with_truth: only a PRM's rewards are checked against it."""
    batch = tuple(t.to(device) for t in collate(groups.prompts, groups.responses, pad_id))
    R = batch[2].shape[1]
    engine_logp = None
    if None not in groups.engine_logps:
        engine_logp = torch.tensor([lp + [0.0] * (R - len(lp)) for lp in groups.engine_logps],
                                   device=device)
    step_ends = None
    if args.granularity == "step":
        step_ends = data.step_end_mask(tokenizer, groups.responses, args.step_separator, R)
        step_ends = step_ends.to(device)
    truth = data.step_truth(tokenizer, groups.rows, groups.responses, R) if with_truth else None
    if truth is not None:
        truth = tuple(t.to(device) for t in truth)
    return batch, engine_logp, step_ends, truth


def response_logits(model, input_ids, attention_mask, response_len, share_prompts=False):
    """The logits [B, R, vocab] that predict the last R = `response_len` tokens of input_ids
    [B, P+R]: the token at position p is predicted by the logits at p-1. Prompts are
    left-padded, so position ids come from the attention mask (pitfall: otherwise every padded
    prompt is shifted). share_prompts: each distinct prompt run once (shared_prompt_logits)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # the same choice on every rank: FSDP's collectives need as many forwards on each
    if share_prompts and not model.is_activation_checkpointing:
        return shared_prompt_logits(model, input_ids, attention_mask, position_ids, response_len)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 logits_to_keep=response_len + 1, use_cache=False).logits[:, :-1]


def shared_prompt_cache(model, ids, attn):
    """(KV cache, logits of the last position [B, 1, vocab]) of left-padded prompts ids [B, P]
    with each distinct prompt (its ids and padding) computed once and indexed out to its rows;
    the index is differentiable (its backward sums the rows' gradients into their one prompt).
    Used by the HF engine's prefill and by shared_prompt_logits in training."""
    from transformers import DynamicCache
    P, cache = ids.shape[1], DynamicCache(config=model.config)
    distinct, inverse = torch.unique(torch.cat([ids, attn], 1), dim=0, return_inverse=True)
    d_ids, d_attn = distinct[:, :P], distinct[:, P:]
    last = model(input_ids=d_ids, attention_mask=d_attn,
                 position_ids=(d_attn.cumsum(-1) - 1).clamp(min=0),
                 cache=cache, use_cache=True, logits_to_keep=1).logits
    # index_select, not x[inverse] (DynamicCache.batch_select_indices): on CPU the backward of
    # advanced indexing (index_put_ with accumulate) sums rows in an order that varies with the
    # threads, run to run; index_select's backward (index_add_) sums them in a fixed order.
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, inverse)
        layer.values = layer.values.index_select(0, inverse)
    return cache, last.index_select(0, inverse)


def shared_prompt_logits(model, input_ids, attention_mask, position_ids, response_len):
    """The logits [B, R, vocab] that predict the last `response_len` tokens of input_ids
    [B, P+R], with each distinct prompt run once: the responses that share it attend to its KV
    cache. The same numbers up to float rounding. Not under gradient checkpointing: HF drops a
    cache passed to a checkpointed layer.
    Two forwards whatever the shapes, as FSDP needs (as many on every rank): the prompts, whose
    last position predicts the first response token, then every response token (the last one's
    logits predict nothing). Both are in the loss's graph, so FSDP gathers each layer again for
    backward."""
    P = input_ids.shape[1] - response_len
    cache, last = shared_prompt_cache(model, input_ids[:, :P], attention_mask[:, :P])
    rest = model(input_ids=input_ids[:, P:], attention_mask=attention_mask,
                 position_ids=position_ids[:, P:], cache=cache, use_cache=True).logits
    return torch.cat([last, rest[:, :-1]], 1)
