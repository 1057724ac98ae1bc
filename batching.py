"""The trainer's batches: token-id lists to padded tensors, and the forward passes over them.

Plumbing every trainer needs, kept out of data.py (the task, which forks replace) and out of
prime.py (the algorithm):
- `collate`: left-padded prompts + right-padded responses, and the response mask;
- `micro_batches`: length-sorted forward passes within a row and token budget, as many on
  every rank (under FSDP each forward is a collective);
- `training_batch`: what prime.prime_step takes for a step's kept groups (`Groups`);
- `response_hidden`: a model's final hidden states for the response tokens of a batch; with
  `shared_prompt_hidden` each distinct prompt is run once, its KV cache shared by the K
  responses sampled from it (the prompt's compute divided by K);
- `response_logprobs` / `response_logprobs_and_entropy`: the LM head on them, a chunk of tokens
  at a time at scale (no [B, R, vocab] logits), as prime.token_logprobs computes log pi.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import vision

# The most logits ([tokens, vocab] elements) the LM head materialises at once: 2^26, 256 MB in
# fp32. A batch under it gets its logits whole (the fastest on small vocabularies); above it,
# chunks of tokens of this size, so memory grows with R * hidden size, not R * vocabulary.
LOGITS_BUDGET = 2**26


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
    """Split rows `rows` [n] of a batch (training_batch's) into forward passes, sorted by
    length: at most --micro-batch-size rows each and, with --max-tokens-per-micro-batch, at most
    that many tokens once padded (rows x (the longest prompt + the longest response)), so
    padding does not dominate when lengths vary (verl's dynamic batch size). Yields (row
    indices, model inputs: input_ids, attention_mask and the rows' image tensors if any, r): the
    columns that are padding in every row are cut away; r is the response width kept. With
    `reduce` (an all-reduce) every rank makes as many passes as the rank that needs most: under
    FSDP each forward is a collective."""
    max_count, max_tokens = args.micro_batch_size, args.max_tokens_per_micro_batch
    ids, attn, mask = batch[:3]
    pixels = batch[3] if len(batch) > 3 else None  # per row (vision.ImageInputs.pixels)
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
        inputs = {"input_ids": ids[idx][:, cols], "attention_mask": attn[idx][:, cols]}
        images = vision.select(pixels, group) if pixels else None
        if images:
            inputs.update({key: t.to(ids.device) for key, t in images.items()})
        yield idx, inputs, r


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
    """(batch, engine log-probs [B, R] or None, --granularity step ends [B, R] or None, the
    task's step truth or None) for a step's kept groups: what prime.prime_step takes. The batch
    is collate's (input_ids, attention_mask, response mask), and for a vision-language model
    each row's image tensors (data.row_pixels). The truth only with_truth: only a PRM's rewards
    are checked against it."""
    batch = tuple(t.to(device) for t in collate(groups.prompts, groups.responses, pad_id))
    pixels = data.row_pixels(tokenizer, groups.rows)
    if pixels is not None:
        batch = (*batch, pixels)
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


def response_hidden(model, inputs, response_len, share_prompts=False):
    """The final hidden states [B, R, H] (after the last norm, what the LM head takes) that
    predict the last R = `response_len` tokens of inputs' input_ids [B, P+R]: the token at
    position p is predicted at p-1. Prompts are left-padded, so position ids come from the
    attention mask (pitfall: otherwise every padded prompt is shifted; vision.forward_inputs).
    No logits: the caller applies the head, a chunk at a time where they are large.
    share_prompts: each distinct prompt run once (text models: a prompt's ids are not all of it
    when it has images)."""
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    pixels = {key: t for key, t in inputs.items() if key not in ("input_ids", "attention_mask")}
    inputs = vision.forward_inputs(model.config, ids, attn, pixels)
    # the same choice on every rank: FSDP's collectives need as many forwards on each
    if share_prompts and not model.is_activation_checkpointing and \
            not vision.is_multimodal(model.config):
        return shared_prompt_hidden(model, ids, attn, inputs["position_ids"], response_len)
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden[:, -response_len - 1:-1]


def shared_prompt_cache(model, ids, attn):
    """(KV cache, final hidden state of the last position [B, 1, H]) of left-padded prompts ids
    [B, P] with each distinct prompt (its ids and padding) computed once and indexed out to its
    rows; the index is differentiable (its backward sums the rows' gradients into their one
    prompt). Used by the HF engine's prefill and by shared_prompt_hidden in training."""
    from transformers import DynamicCache
    P, cache = ids.shape[1], DynamicCache(config=model.config)
    distinct, inverse = torch.unique(torch.cat([ids, attn], 1), dim=0, return_inverse=True)
    d_ids, d_attn = distinct[:, :P], distinct[:, P:]
    hidden = model.base_model(input_ids=d_ids, attention_mask=d_attn,
                              position_ids=(d_attn.cumsum(-1) - 1).clamp(min=0),
                              cache=cache, use_cache=True).last_hidden_state
    # index_select, not x[inverse] (DynamicCache.batch_select_indices): on CPU the backward of
    # advanced indexing (index_put_ with accumulate) sums rows in an order that varies with the
    # threads, run to run; index_select's backward (index_add_) sums them in a fixed order.
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, inverse)
        layer.values = layer.values.index_select(0, inverse)
    return cache, hidden[:, -1:].index_select(0, inverse)


def shared_prompt_hidden(model, input_ids, attention_mask, position_ids, response_len):
    """response_hidden with each distinct prompt run once: the responses that share it attend to
    its KV cache. The same numbers up to float rounding. Not under gradient checkpointing: HF
    drops a cache passed to a checkpointed layer.
    Two forwards whatever the shapes, as FSDP needs (as many on every rank): the prompts, whose
    last position predicts the first response token, then every response token (the last one
    predicts nothing). Both are in the loss's graph, so FSDP gathers each layer again for
    backward."""
    P = input_ids.shape[1] - response_len
    cache, last = shared_prompt_cache(model, input_ids[:, :P], attention_mask[:, :P])
    rest = model.base_model(input_ids=input_ids[:, P:], attention_mask=attention_mask,
                            position_ids=position_ids[:, P:], cache=cache,
                            use_cache=True).last_hidden_state
    return torch.cat([last, rest[:, :-1]], 1)


def response_logprobs(model, inputs, response_len, temperatures, share_prompts=False):
    """{T: log pi(y_t) [B, R] fp32 at temperature T} for the last `response_len` tokens of
    inputs (micro_batches'): one forward (and within LOGITS_BUDGET one head matmul) for every
    temperature. Under FSDP run it through distributed.as_forward (the head's weight is the root
    module's)."""
    hidden = response_hidden(model, inputs, response_len, share_prompts)
    targets = inputs["input_ids"][:, -response_len:]
    head = model.get_output_embeddings()
    temperatures = sorted(temperatures, reverse=True)
    if whole_logits_fit(hidden, head):
        logits = head(hidden)
        return {t: logprobs_from_logits(logits, targets, t) for t in temperatures}
    return {t: head_logprobs(hidden, head, targets, t) for t in temperatures}


def response_logprobs_and_entropy(model, inputs, response_len, temperature, share_prompts=False,
                                  entropy_grad=False):
    """(log pi(y_t) [B, R], the entropy of pi [B, R]) at `temperature`, from one forward (and
    within LOGITS_BUDGET one head matmul); the entropy (a diagnostic) with grad only if
    entropy_grad (an entropy bonus in the loss)."""
    hidden = response_hidden(model, inputs, response_len, share_prompts)
    targets = inputs["input_ids"][:, -response_len:]
    head = model.get_output_embeddings()
    entropy_grad = entropy_grad and torch.is_grad_enabled()
    if whole_logits_fit(hidden, head):
        logits = head(hidden)
        logp = logprobs_from_logits(logits, targets, temperature)
        with torch.set_grad_enabled(entropy_grad):
            entropy = entropy_from_logits(logits, temperature)
        return logp, entropy
    logp = head_logprobs(hidden, head, targets, temperature)
    with torch.set_grad_enabled(entropy_grad):
        entropy = head_entropy(hidden, head, temperature)
    return logp, entropy


def whole_logits_fit(hidden, head):
    """Do the logits of hidden [B, R, H] fit LOGITS_BUDGET? Then they are made whole (the
    fastest on small vocabularies), else a chunk of tokens at a time."""
    return hidden.shape[0] * hidden.shape[1] * head.weight.shape[0] <= LOGITS_BUDGET


def chunk_tokens(head):
    """Tokens per chunk of the LM head: LOGITS_BUDGET logits."""
    return max(1, LOGITS_BUDGET // head.weight.shape[0])


def head_logprobs(hidden, head, targets, temperature=1.0):
    """log softmax(head(h) / T) at `targets`, never the whole logits: hidden [B, R, H], the LM
    head (nn.Linear, weight [V, H]), targets [B, R] -> [B, R] fp32. torch's
    F.linear_cross_entropy (log pi = -CE), a chunk of tokens at a time, recomputing each chunk's
    softmax in backward; h / T (and bias / T) gives the logits / T exactly."""
    B, R, H = hidden.shape
    # explicit chunks: the "auto" choice sizes them by vocab / hidden, one token per chunk for
    # a small hidden size (8x slower than the whole logits on a CPU)
    options = torch.nn.LinearCrossEntropyOptions(
        batch_chunk_size=chunk_tokens(head), chunking_method=None,
        acc_policy="accurate", acc_dtype=torch.float32)  # fp32 softmax, as logprobs_from_logits
    bias = None if head.bias is None else head.bias / temperature
    ce = F.linear_cross_entropy((hidden / temperature).reshape(-1, H), head.weight,
                                targets.reshape(-1), linear_bias=bias, reduction="none",
                                options=options)
    return -ce.float().view(B, R)


def head_entropy(hidden, head, temperature=1.0):
    """Entropy [B, R] of softmax(head(h) / T), fp32, a chunk of tokens at a time (by hand: torch
    has no chunked entropy), each chunk's logits recomputed in backward when there is one."""
    B, R, H = hidden.shape
    chunks = []
    for chunk in hidden.reshape(1, -1, H).split(chunk_tokens(head), dim=1):
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_chunk_entropy, chunk, head, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_entropy(chunk, head, temperature))
    return torch.cat(chunks, 1).view(B, R)


def _chunk_entropy(hidden, head, temperature):
    return entropy_from_logits(head(hidden), temperature)


def logprobs_from_logits(logits, targets, temperature=1.0):
    """log softmax(logits / T) at `targets`: [B, R, vocab], [B, R] -> [B, R], in fp32 (bf16
    rounding becomes noise in q), a row at a time (without grad, one fp32 row exists at once)."""
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.float() / temperature
        rows.append(row.gather(-1, row_targets[:, None]).squeeze(-1) - row.logsumexp(-1))
    return torch.stack(rows)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy [B, R] of softmax(logits / T) for logits [B, R, vocab], fp32, a row at a time."""
    rows = []
    for row_logits in logits:
        row = row_logits.float() / temperature
        rows.append(row.logsumexp(-1) - (row.softmax(-1) * row).sum(-1))
    return torch.stack(rows)
