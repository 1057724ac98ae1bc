"""PRIME: Process Reinforcement through IMplicit rEwards (Cui et al., 2025, arXiv 2502.01456).

One file, read top to bottom like the paper: the config, the math (one pure function per
equation), the models and the rollout engine, then the training loop (Algorithm 1).

    python prime.py                                 # embedded default: tiny LM, 3-digit addition, CPU
    python prime.py --model PATH --data rows.jsonl  # your model and Eurus-2-style data
    python prime.py --help                          # every flag

What is kept from the paper and the official code (a veRL fork), and what is not:
- kept: the implicit PRM r_t = beta*(log pi_phi - log pi_ref), updated online with a cross-entropy
  loss on outcome labels only (Eq. 3, Alg. 1 line 8); RLOO advantages computed separately for the
  process and outcome rewards, then summed (Eq. 5); PPO-clip (Eq. 6); online accuracy filtering;
  the official code's effective defaults (batch_norm of process rewards, its RLOO scaling,
  global whitening, seq-mean-token-mean loss, PRM updated after its rewards are read).
- dropped: rm_coef/reward_coef (in the official code they only rescale logged metrics) and
  everything asynchronous: all K samples of a prompt come from one policy version.
"""
import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F


def arg(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    # model and data; empty strings select the embedded default (see bootstrap.py)
    model: str = arg("", "HF model folder for policy, PRM and reference; '' builds the embedded tiny model")
    data: str = arg("", "comma-separated Eurus-2-style .jsonl files; '' = built-in 3-digit addition")
    eval_data: str = arg("", "comma-separated .jsonl eval files; '' = built-in held-out addition problems")
    eval_size: int = arg(500, "number of built-in held-out problems (ignored with --eval-data)")
    skip_bad_rows: bool = arg(False, "skip (and count) malformed data rows instead of stopping at the first")
    cache_dir: str = arg("~/.cache/prime", "where the embedded default model is built once and cached")
    run_dir: str = arg("", "output folder; '' = runs/<timestamp>")
    seed: int = arg(0, "seed of data order, sampling and init")
    # rollout
    rollout: str = arg("hf", "rollout engine: HF generate (CPU, tests, GPU fallback) or vLLM (GPU)", choices=["hf", "vllm"])
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm: fraction of each GPU for its weights and KV cache (the "
                                             "rest holds the sharded policy, PRM, reference and optimizers)")
    steps: int = arg(150, "training steps (each: sample, verify, filter, PRM update, policy update)")
    prompts_per_step: int = arg(64, "prompt groups trained on per step (after filtering)")
    samples_per_prompt: int = arg(4, "K: responses sampled per prompt (RLOO needs K >= 2)")
    max_prompt_len: int = arg(1024, "prompts longer than this (tokens) are dropped")
    max_response_len: int = arg(48, "max new tokens per response")
    temperature: float = arg(0.7, "sampling temperature, also divides the trainer's logits (paper: 1.0; the tiny "
                             "embedded model samples 7%% right at 1.0 vs 46%% greedy, 24%% at 0.7)")
    top_p: float = arg(1.0, "nucleus sampling")
    filter_low: float = arg(0.2, "keep a prompt only if the mean outcome of its K samples is >= this")
    filter_high: float = arg(0.8, "... and <= this (0 and 1 disable the filter)")
    max_filter_rounds: int = arg(4, "sampling rounds per step to fill the quota of kept groups")
    # implicit PRM
    beta: float = arg(0.05, "beta of the implicit PRM: r_t = beta * log(pi_phi / pi_ref) (Eq. 3)")
    no_prm: bool = arg(False, "outcome-only RLOO: no PRM, no process rewards (the paper's baseline)")
    process_reward_coef: float = arg(1.0, "weight of the process return in the advantage; 0 = --no-prm", aliases=["--process-coef"])
    adaptive_process_coef: bool = arg(False, "scale the process weight by how much better than chance the PRM ranks "
                                      "fresh responses (smoothed pairwise accuracy): 0 at chance, full at 100%%")
    granularity: str = arg("token", "process reward on every token, summed per reasoning step on the step's last "
                           "token, or summed on the last token", choices=["token", "step", "whole"])
    step_separator: str = arg("\n", "--granularity step: text that ends a reasoning step (a token containing it "
                              "closes the step)")
    outcome_noise: float = arg(0.0, "flip each training outcome label (o -> 1-o) with this probability: a "
                               "contaminated verifier (eval is never flipped)")
    reward_norm: str = arg("batch_norm", "scale process rewards by the batch's max |return| (official)", choices=["batch_norm", "none"])
    prm_model: str = arg("", "initial weights of the implicit PRM (same tokenizer); '' = --model (paper default). "
                         "With --prm-update none, a PRM trained beforehand: the paper's offline PRM")
    prm_update: str = arg("after", "read rewards then update the PRM (single forward), update first, or never",
                          choices=["after", "before", "none"])
    reference: str = arg("sft", "pi_ref of the PRM: the frozen initial model, or the current policy", choices=["sft", "policy"])
    prm_lr: float = arg(5e-4, "PRM AdamW learning rate (paper: 1e-6 at 7B, 2x the policy's; the PRM must adapt "
                        "faster than the policy drifts, see README)")
    prm_weight_decay: float = arg(0.0, "PRM AdamW weight decay")
    prm_grad_clip: float = arg(10.0, "PRM gradient-norm clip")
    # advantages and policy
    estimator: str = arg("rloo", "advantage estimator (paper Sec. 5.3): RLOO (Eq. 5), GRPO-style group z-scores "
                         "(Eq. 7), or REINFORCE without baseline (Eq. 8)", choices=["rloo", "grpo", "reinforce"])
    rloo_variant: str = arg("official", "RLOO scaling: official code, or the paper's Eq. 5", choices=["official", "paper"])
    gamma: float = arg(1.0, "discount of the process-reward return")
    whiten: bool = arg(True, "whiten advantages over the batch (official)")
    lr: float = arg(5e-5, "policy AdamW learning rate (paper: 5e-7 at 7B)")
    weight_decay: float = arg(0.01, "policy AdamW weight decay")
    grad_clip: float = arg(1.0, "policy gradient-norm clip")
    clip_eps: float = arg(0.2, "PPO clip epsilon (Eq. 6)")
    loss_agg: str = arg("seq-mean-token-mean", "how the PPO loss averages tokens", choices=["seq-mean-token-mean", "token-mean"])
    ppo_epochs: int = arg(1, "passes over each batch")
    mini_batch_size: int = arg(128, "responses per optimizer step (policy and PRM)")
    micro_batch_size: int = arg(128, "responses per forward/backward (gradient accumulation)")
    kl_coef: float = arg(0.0, "weight of a k3 KL(policy || frozen reference) loss term")
    entropy_coef: float = arg(0.0, "weight of an entropy bonus in the policy loss")
    # logging
    eval_every: int = arg(10, "evaluate every N steps; also at step 0 and the last")
    eval_only: bool = arg(False, "evaluate --model on --eval-data (eval.json, eval.md in --run-dir) and exit")
    eval_samples: int = arg(1, "k of avg@k: responses per eval problem (PRIME's authors now report avg@16)")
    eval_temperature: float = arg(0.0, "eval sampling temperature; 0 = greedy (authors' avg@16 uses 0.3, top_p 0.95: "
                                  "greedy scores move between vLLM versions)")
    eval_top_p: float = arg(1.0, "eval nucleus sampling")
    save_every: int = arg(0, "write a checkpoint every N steps (0 = never); only the newest is kept")
    resume: bool = arg(False, "continue from the newest checkpoint in --run-dir")
    num_samples_logged: int = arg(4, "responses written to samples.jsonl at each eval")


# ==============================================================================================
# The math. Tensors are [B, R]: B responses (the K samples of a prompt contiguous), R response
# positions. `mask` is 1 on response tokens up to and including the first EOS. `reduce(x, op)`
# turns a local batch statistic into a global one ("sum" or "max"); identity in one process,
# an all-reduce under torchrun, so results do not depend on the number of GPUs.
def _local(x, op):
    return x


def token_logprobs(model, input_ids, attention_mask, response_len, temperature=1.0, with_entropy=False):
    """log pi(y_t | x, y_<t) of the last `response_len` tokens of input_ids [B, P+R] -> [B, R] fp32.

    The token at position p is predicted by the logits at p-1. Prompts are left-padded, so
    position ids come from the attention mask (pitfall: otherwise every padded prompt is shifted).
    Log-softmax in fp32 (bf16 rounding becomes noise in q = log pi_phi - log pi_ref), row by row
    so a [B, R, vocab] fp32 tensor never exists. with_entropy also returns the entropy [B, R]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=response_len + 1, use_cache=False).logits[:, :-1]
    targets = input_ids[:, -response_len:]
    logps, entropies = [], []
    for row_logits, row_targets in zip(logits, targets):
        row_logits = row_logits.float() / temperature
        lse = row_logits.logsumexp(-1)  # [R]
        logps.append(row_logits.gather(-1, row_targets[:, None]).squeeze(-1) - lse)
        if with_entropy:
            entropies.append(lse - (row_logits.softmax(-1) * row_logits).sum(-1))
    logp = torch.stack(logps)
    return (logp, torch.stack(entropies)) if with_entropy else logp


def implicit_rewards(prm_logp, ref_logp, mask):
    """q_t = log pi_phi(y_t|y_<t) - log pi_ref(y_t|y_<t) on valid tokens, 0 elsewhere: the implicit
    process reward of Eq. 3 without beta. All [B, R]."""
    return (prm_logp - ref_logp) * mask


def process_rewards(q, mask, beta=0.05, granularity="token", norm="batch_norm", reduce=_local, step_ends=None):
    """Process rewards [B, R] from implicit rewards q [B, R] (Eq. 3, official-code post-processing).

    token: r_t = beta * q_t. step: beta * (sum of q over a reasoning step) on the step's last
    token, `step_ends` [B, R] marking those (see step_end_mask). whole: beta * sum_t q_t on the last
    valid token (one reward per response). batch_norm (official): divide by
    max_{i,t} |sum_{s>=t} r_{i,s}| + 1e-6 over the batch, so the largest process return is 1, on
    the scale of the 0/1 outcome."""
    r = beta * q * mask
    if granularity == "whole":
        r = r.sum(-1, keepdim=True) * last_token_mask(mask)
    elif granularity == "step":
        if step_ends is None:
            raise ValueError("granularity 'step' needs step_ends, the mask of each reasoning step's last token")
        ends = torch.maximum(step_ends * mask, last_token_mask(mask))  # the last step ends with the response
        step = (ends.cumsum(-1) - ends).long()  # [B, R]: which step each token belongs to
        totals = torch.zeros_like(r).scatter_add_(-1, step, r)  # [B, R]: each step's sum, by step index
        r = totals.gather(-1, step) * ends
    elif granularity != "token":
        raise ValueError(f"granularity must be 'token', 'step' or 'whole', got {granularity!r}")
    if norm == "batch_norm":
        suffix_sums = r.flip(-1).cumsum(-1).flip(-1)
        r = r / (reduce(suffix_sums.abs().max(), "max") + 1e-6)
    elif norm != "none":
        raise ValueError(f"norm must be 'batch_norm' or 'none', got {norm!r}")
    return r


def prm_ce_loss(q, mask, outcome, beta=0.05):
    """The PRM's cross-entropy loss on outcome labels only (Alg. 1 line 8): the sequence score
    beta * sum_t q_t [B] is a logit for P(correct); mean over sequences of BCE with `outcome` [B]
    in [0, 1] (code pass fractions are soft labels, not binarised). With-logits: finite for any
    score, where sigmoid-then-BCE saturates to inf around |score| ~ 17 in fp32."""
    score = beta * (q * mask).sum(-1)
    return F.binary_cross_entropy_with_logits(score, outcome.to(score.dtype))


def rloo(rewards, mask, k, variant="official"):
    """Leave-one-out baseline within each group of K contiguous responses (Eq. 5). [B, R] -> [B, R].

    m_j = mean of rewards[j] over mask[j]. official (PRIME's code): r*K/(K-1) - sum_j m_j/(K-1);
    paper (Eq. 5): r - sum_{j != i} m_j/(K-1). The two agree when a response has one rewarded
    token (the outcome); on dense process rewards the official form also adds (r - m_i)/(K-1)."""
    if k < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per prompt (a leave-one-out baseline of "
                         f"zero others is undefined); got K={k}. Raise --samples-per-prompt.")
    B, R = rewards.shape
    if B % k:
        raise ValueError(f"batch of {B} responses is not whole groups of K={k}")
    mask = mask.to(rewards.dtype)
    m = (rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    group_sum = m.view(-1, k).sum(-1).repeat_interleave(k)  # [B]
    if variant == "official":
        out = rewards * k / (k - 1) - (group_sum / (k - 1))[:, None]
    elif variant == "paper":
        out = rewards - ((group_sum - m) / (k - 1))[:, None]
    else:
        raise ValueError(f"variant must be 'official' or 'paper', got {variant!r}")
    return out * mask


def grpo(rewards, mask, k, eps=1e-6):
    """Group z-scores (paper Eq. 7, GRPO-style), [B, R] -> [B, R]: with m_j the mean of rewards[j]
    over its mask, (r - mean_group(m)) / (std_group(m) + eps), unbiased std over the K of a
    group; 0 off-mask. On the outcome (one rewarded token) it is the familiar GRPO advantage."""
    if k < 2:
        raise ValueError(f"group statistics need K >= 2 samples per prompt; got K={k}")
    mask = mask.to(rewards.dtype)
    m = ((rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)).view(-1, k)  # [B/K, K]
    mean, std = m.mean(-1).repeat_interleave(k), m.std(-1).repeat_interleave(k)
    return (rewards - mean[:, None]) / (std[:, None] + eps) * mask


def discounted_returns(rewards, mask, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1} over valid tokens (the sum in Eq. 5). [B, R] -> [B, R]."""
    rewards = rewards * mask
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def masked_whiten(values, mask, reduce=_local):
    """(x - mean) / sqrt(var + 1e-8) over valid tokens of the whole batch, unbiased variance (as
    veRL's masked_whiten); 0 off-mask. [B, R] -> [B, R]."""
    mask = mask.to(values.dtype)
    n = reduce(mask.sum(), "sum")
    mean = reduce((values * mask).sum(), "sum") / n
    var = reduce((((values - mean) * mask) ** 2).sum(), "sum") / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def prime_advantages(process_rewards, outcome, mask, k, gamma=1.0, variant="official", whiten=True,
                     reduce=_local, estimator="rloo"):
    """PRIME's advantage (Eq. 5, as the official code computes it), [B, R].

    The outcome [B] sits on the last valid token; a baseline is applied to each reward source on
    its own (outcome over that one token, process rewards over all valid tokens); each becomes a
    return (outcome undiscounted, so every token carries it); the two are summed and whitened.
    estimator: rloo (Eq. 5), grpo (group z-scores, Eq. 7) or reinforce (no baseline, Eq. 8:
    A_t = r_o + sum_{s>=t} gamma^(s-t) r_s). process_rewards=None gives the outcome-only baseline."""
    baseline = {"rloo": lambda r, m: rloo(r, m, k, variant), "grpo": lambda r, m: grpo(r, m, k),
                "reinforce": lambda r, m: r * m}[estimator]
    last = last_token_mask(mask)
    adv = discounted_returns(baseline(outcome[:, None] * last, last), mask, 1.0)
    if process_rewards is not None:
        adv = adv + discounted_returns(baseline(process_rewards, mask), mask, gamma)
    return masked_whiten(adv, mask, reduce) if whiten else adv * mask


def ppo_clip_loss(logp, old_logp, advantages, mask, clip_eps=0.2, agg="seq-mean-token-mean",
                  return_stats=False):
    """PPO-clip policy loss (Eq. 6): max(-A*rho, -A*clip(rho, 1-eps, 1+eps)), rho = exp(logp -
    old_logp), all [B, R]. agg: seq-mean-token-mean (mean over sequences of each one's token mean:
    what the official code effectively does) or token-mean (over all valid tokens of the batch)."""
    ratio = torch.exp(logp - old_logp)
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    loss = masked_aggregate(per_token, mask, agg)
    if not return_stats:
        return loss
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"clipfrac": masked_aggregate(clipped, mask, "token-mean").item(),
                 "approx_kl": masked_aggregate(old_logp - logp, mask, "token-mean").item()}
    return loss, stats


def accuracy_filter(outcome, k, low=0.2, high=0.8):
    """Online prompt filter (paper Sec. 3.4): keep a prompt iff low <= mean outcome of its K
    samples <= high, so every kept group has both right and wrong answers (a signal for RLOO
    and balanced labels for the PRM). outcome [B] -> bool [B//K]."""
    acc = outcome.view(-1, k).float().mean(-1)
    return (acc >= low - 1e-6) & (acc <= high + 1e-6)  # tolerance: 0.2 is not exact in fp32


def masked_aggregate(x, mask, agg):
    """Mean of x [B, R] over valid tokens: per sequence then over sequences, or over all tokens."""
    mask = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"agg must be 'seq-mean-token-mean' or 'token-mean', got {agg!r}")


def last_token_mask(mask):
    """1 on the last valid token of each row of mask [B, R] (where the outcome reward sits)."""
    last = torch.zeros_like(mask)
    n = mask.sum(-1).long()
    rows = torch.nonzero(n > 0).squeeze(-1)
    last[rows, n[rows] - 1] = 1
    return last


def response_mask(responses, eos_ids):
    """1 up to and including the first EOS of each sampled response [B, R], 0 after it (where
    generate() pads). The EOS is kept: ending the answer is an action the policy is credited for.
    A response with no EOS was cut at the length limit and is valid throughout."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).float()  # no EOS strictly before t


def step_end_mask(tokenizer, responses, separator, width):
    """1 on each response token whose text contains `separator` (it ends a reasoning step), as
    [B, width] for responses given as token-id lists. Tokens are decoded one by one: a token's
    text is its span of the response, so step boundaries fall on token boundaries."""
    ends = torch.zeros(len(responses), width)
    for i, ids in enumerate(responses):
        for t, text in enumerate(tokenizer.batch_decode([[token] for token in ids])):
            ends[i, t] = float(separator in text)
    return ends


def pairwise_accuracy(scores, outcome, k, reduce=_local):
    """Within each group of K, the fraction of (better, worse) outcome pairs whose scores are
    ordered the same way (ties count half): how well the PRM ranks responses. nan if no pairs.
    Pairs are counted over the whole batch (all ranks, with reduce)."""
    s, o = scores.view(-1, k), outcome.view(-1, k)
    better = (o[:, :, None] > o[:, None, :]).float()  # [G, K, K]: i beat j
    agree = (s[:, :, None] > s[:, None, :]).float() + 0.5 * (s[:, :, None] == s[:, None, :]).float()
    agreed, pairs = reduce(torch.stack([(better * agree).sum(), better.sum()]), "sum").tolist()
    return agreed / pairs if pairs > 0 else float("nan")


# ==============================================================================================
# Distribution: one process, or one per GPU under torchrun (FSDP2; gloo on CPU for tests)
def init_distributed():
    """(rank, world_size, device). Under torchrun (any number of processes, one included) joins the
    process group, NCCL and one GPU per rank or gloo on CPU, and the models are FSDP2-sharded.
    `python prime.py`: one process on cuda:0 or the CPU, plain fp32 models."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def all_reduce(x, op):
    """The `reduce` of the math under torchrun: "sum", "max" or "min" of tensor x over all ranks
    (a new tensor; x itself is unchanged). Identity in one process."""
    if not dist.is_initialized():
        return x
    # NCCL reduces GPU tensors only; a CPU statistic travels through this rank's GPU and back
    y = x.to(torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device, copy=True)
    dist.all_reduce(y, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return y.to(x.device)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def scalar(x):
    """A Python float from a tensor or a DTensor (FSDP2's grad norm is one: gather it first)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


# ==============================================================================================
# Models and the rollout engines
def setup_models(args, model_path, device, checkpoint=None):
    """Policy (trained), PRM (trained, same init unless --prm-model) and reference (frozen), from
    one checkpoint (policy and PRM from `checkpoint` when resuming). The one place where models are built: under
    torchrun each is sharded with FSDP2, every decoder layer and then the root."""
    from transformers import AutoModelForCausalLM

    def load(path=model_path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights
        if not dist.is_initialized():
            return model.to(device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # GPU: bf16 forward/backward, fp32 gradient reduction and optimizer. CPU: fp32 throughout
        # (bf16 is 20x slower on these CPUs). PRM and reference use the same policy, so q = 0
        # exactly where they are equal (pitfall: different kernels make q noise).
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=precision)
        return fully_shard(model, mesh=mesh, mp_policy=precision)

    policy = load(os.path.join(checkpoint, "policy") if checkpoint else model_path).train()
    use_prm = not args.no_prm and args.process_reward_coef != 0
    prm = load(os.path.join(checkpoint, "prm") if checkpoint else args.prm_model or model_path).train() if use_prm else None
    if prm is not None and prm.config.vocab_size != policy.config.vocab_size:
        raise ValueError(f"--prm-model {args.prm_model}: vocabulary of {prm.config.vocab_size} tokens, the policy's "
                         f"has {policy.config.vocab_size}; the implicit PRM must share the policy's tokenizer")
    # The PRM's reference and the KL term need the frozen initial model; --reference policy
    # reuses the policy's own pre-update log-probs and needs no extra copy.
    need_ref = (use_prm and args.reference == "sft") or args.kl_coef > 0
    ref = load().eval().requires_grad_(False) if need_ref else None
    return policy, prm, ref


def full_weights(model):
    """(HF name, full tensor) for every parameter and buffer of a (sharded) model. A collective
    under FSDP2: every rank iterates in the same (state_dict) order and gathers each tensor."""
    for name, t in model.state_dict().items():
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t


def stop_tokens(generation_config, tokenizer):
    """(EOS ids, pad id): the tokenizer's EOS and every EOS of the model's generation config."""
    gen_eos = generation_config.eos_token_id
    eos_ids = sorted((set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | {tokenizer.eos_token_id}) - {None})
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


class HFRollout:
    """Rollout engine: an unsharded copy of the policy on this rank's device (`model`, loaded by
    the caller) that samples with HF generate(). It keeps its own weights, refreshed by sync()
    after every update, as vLLM does."""

    def __init__(self, model, tokenizer, args):
        self.model, self.args, self.device = model.eval().requires_grad_(False), args, model.device
        self.eos_ids, self.pad_id = stop_tokens(self.model.generation_config, tokenizer)

    @torch.no_grad()
    def sync(self, policy):
        """Copy the policy's full weights in; refuse (at step 0 and after) if any is left out."""
        params, loaded = self.model.state_dict(), set()
        for name, tensor in full_weights(policy):
            params[name].copy_(tensor)
            loaded.add(name)
        if loaded != set(params):
            raise RuntimeError(f"rollout sync left engine weights stale: {sorted(set(params) - loaded)[:5]}")

    @torch.no_grad()
    def generate(self, prompts, greedy=False, temperature=None, top_p=None):
        """prompts: list of token-id lists -> (responses: token-id lists ending at EOS, their
        per-token log-probs under the engine's weights at the sampling temperature; None if
        greedy). temperature and top_p default to the training rollout's."""
        ids, attn = left_pad(prompts, self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        temperature = self.args.temperature if temperature is None else temperature
        sampling = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=temperature, top_p=self.args.top_p if top_p is None else top_p,
            top_k=0)  # HF's default top_k is 50
        out = self.model.generate(input_ids=ids, attention_mask=attn,
                                  max_new_tokens=self.args.max_response_len, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids, **sampling)
        responses = out[:, ids.shape[1]:]
        mask = response_mask(responses, self.eos_ids)
        responses = [r[: int(m.sum())].tolist() for r, m in zip(responses, mask)]
        if greedy:
            return responses, None
        # The engine's own log-probs of what it sampled (vLLM returns these); compared with the
        # trainer's each step, a gap means the engine sampled from stale weights.
        batch = collate(prompts, responses, self.pad_id)
        logp = batched_logprobs(self.model, tuple(t.to(self.device) for t in batch), self.args.micro_batch_size, temperature)
        return responses, [row[: len(r)].tolist() for row, r in zip(logp, responses)]


class VLLMRollout:
    """Rollout engine on vLLM (GPU only; written against vLLM 0.30, pinned in requirements-gpu.txt):
    one engine per rank (`external_launcher` runs the V1 engine in this process,
    tensor_parallel_size=1), new weights loaded in place after every update. vLLM cannot run in
    this project's CI (no GPU); tests drive this layer with a fake `vllm`, so keep it this thin.
    Assumed, to check on a GPU: returned token_ids end with the EOS that stopped them (as HF's);
    rollout/logp_gap near 0 confirms the weights and the temperature match the trainer's."""

    def __init__(self, model_path, tokenizer, args):
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM, SamplingParams  # imported only here: CPU runs and tests never need vLLM
        self.llm = LLM(model=model_path, dtype="bfloat16", seed=args.seed + int(os.environ.get("RANK", 0)),
                       tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       max_model_len=args.max_prompt_len + args.max_response_len,
                       logprobs_mode="processed_logprobs")  # log-probs after temperature, as the trainer's
        self.args, self.SamplingParams = args, SamplingParams
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the model config's EOS
            generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path))
        self.eos_ids, self.pad_id = stop_tokens(generation_config, tokenizer)

    @torch.no_grad()
    def sync(self, policy):
        """Load the policy's full weights in place; refuse if any engine parameter was not loaded."""
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        loaded = model.load_weights(full_weights(policy))  # HF names; vLLM fuses q/k/v itself
        missing = {name for name, _ in model.named_parameters()} - set(loaded)
        if missing:
            raise RuntimeError(f"rollout sync left vLLM weights stale: {sorted(missing)[:5]}")
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights

    def generate(self, prompts, greedy=False, temperature=None, top_p=None):
        params = self.SamplingParams(
            temperature=0.0 if greedy else self.args.temperature if temperature is None else temperature,
            top_p=1.0 if greedy else self.args.top_p if top_p is None else top_p,
            max_tokens=self.args.max_response_len, stop_token_ids=self.eos_ids, logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        logps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs]
        return responses, (None if greedy else logps)


def make_engine(args, model_path, tokenizer, device):
    if args.rollout == "vllm":
        return VLLMRollout(model_path, tokenizer, args)
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return HFRollout(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device), tokenizer, args)


def left_pad(seqs, pad_id):
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


@torch.no_grad()
def batched_logprobs(model, batch, micro, temperature):
    ids, attn, mask = batch
    return torch.cat([token_logprobs(model, ids[i:i + micro], attn[i:i + micro], mask.shape[1], temperature)
                      for i in range(0, len(ids), micro)])


# ==============================================================================================
# Training: the PRM update (Alg. 1 lines 6-8) and the policy update (lines 9-11)
def update_prm(prm, opt, batch, ref_logp, outcome, args):
    """Implicit process rewards q [B, R] for this batch, and the PRM's CE update on outcomes.

    after (official default): each mini-batch's q comes from the same forward that computes the
    loss, read before the step (one forward). before: update on the whole batch first, then
    recompute q with the updated PRM (a second forward). none: the PRM is never updated."""
    ids, attn, mask = batch
    R, B, stats = mask.shape[1], len(ids), {"prm/loss": 0.0, "prm/grad_norm": 0.0}
    if args.prm_update == "none":
        q = implicit_rewards(batched_logprobs(prm, batch, args.micro_batch_size, args.temperature), ref_logp, mask)
        stats["prm/loss"] = prm_ce_loss(q, mask, outcome, args.beta).item()
        return q, stats
    q, n_minibatches = torch.zeros_like(mask), math.ceil(B / args.mini_batch_size)
    for lo in range(0, B, args.mini_batch_size):
        hi = min(lo + args.mini_batch_size, B)
        for i in range(lo, hi, args.micro_batch_size):
            j = min(i + args.micro_batch_size, hi)
            q_mb = implicit_rewards(token_logprobs(prm, ids[i:j], attn[i:j], R, args.temperature), ref_logp[i:j], mask[i:j])
            loss = prm_ce_loss(q_mb, mask[i:j], outcome[i:j], args.beta)
            (loss * (j - i) / (hi - lo)).backward()  # mean over the mini-batch's sequences
            q[i:j] = q_mb.detach()
            stats["prm/loss"] += loss.item() * (j - i) / B
        stats["prm/grad_norm"] += scalar(torch.nn.utils.clip_grad_norm_(prm.parameters(), args.prm_grad_clip)) / n_minibatches
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.prm_update == "before":
        q = implicit_rewards(batched_logprobs(prm, batch, args.micro_batch_size, args.temperature), ref_logp, mask)
    return q, stats


def update_policy(policy, opt, batch, old_logp, ref_logp, advantages, args, gen):
    """PPO-clip epochs over shuffled mini-batches (Eq. 6), with optional KL and entropy terms."""
    ids, attn, mask = batch
    B, R = mask.shape
    totals, count, grad_norms, losses, world = {}, 0, [], [], world_size()
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for lo in range(0, B, args.mini_batch_size):
            idx_mb = order[lo:lo + args.mini_batch_size]
            # Each micro-batch's loss is weighted by its share of the mini-batch (sequences or
            # tokens, as agg averages), so accumulation gives exactly the mini-batch gradient.
            # Under FSDP gradients are averaged over ranks, which hold equal numbers of sequences;
            # for token-mean each rank's share of the global tokens is scaled back by world size.
            mb_tokens, mb_loss = all_reduce(mask[idx_mb].sum(), "sum") / world, 0.0
            for i in range(0, len(idx_mb), args.micro_batch_size):
                idx = idx_mb[i:i + args.micro_batch_size]
                m = mask[idx]
                logp, entropy = token_logprobs(policy, ids[idx], attn[idx], R, args.temperature, with_entropy=True)
                loss, stats = ppo_clip_loss(logp, old_logp[idx], advantages[idx], m, args.clip_eps, args.loss_agg, return_stats=True)
                stats["entropy"] = masked_aggregate(entropy.detach(), m, "token-mean").item()
                if args.kl_coef > 0:  # k3 estimator of KL(pi || pi_ref): unbiased, always >= 0
                    log_ratio = ref_logp[idx] - logp
                    kl = masked_aggregate(torch.exp(log_ratio) - log_ratio - 1, m, args.loss_agg)
                    loss, stats["kl"] = loss + args.kl_coef * kl, kl.item()
                if args.entropy_coef > 0:
                    loss = loss - args.entropy_coef * masked_aggregate(entropy, m, args.loss_agg)
                weight = (m.sum() / mb_tokens) if args.loss_agg == "token-mean" else len(idx) / len(idx_mb)
                (loss * weight).backward()
                mb_loss += (loss * weight).item()  # the mini-batch's objective, as its gradient sees it
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v * len(idx)
                count += len(idx)
            grad_norms.append(scalar(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)))
            losses.append(mb_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"policy/loss": sum(losses) / len(losses), "policy/grad_norm": sum(grad_norms) / len(grad_norms),
            **{f"policy/{key}": v / count for key, v in totals.items()}}


def process_coef(args, trust, accuracy, smoothing=0.9):
    """The weight of the process return. Fixed (--process-coef), or with --adaptive-process-coef
    scaled by how much better than chance the PRM ranks fresh responses: an exponential moving
    average a of its held-out pairwise accuracy (starting at chance, 0.5) gives the weight
    coef * clip(2a - 1, 0, 1): nothing while the PRM is no better than a coin, all at 100%."""
    if not args.adaptive_process_coef:
        return args.process_reward_coef
    if not math.isnan(accuracy):  # a batch without right/wrong pairs says nothing
        trust["accuracy"] = smoothing * trust["accuracy"] + (1 - smoothing) * accuracy
    return args.process_reward_coef * min(max(2 * trust["accuracy"] - 1, 0.0), 1.0)


def prime_step(policy, prm, ref, policy_opt, prm_opt, batch, outcome, args, shuffle_gen, engine_logp=None,
               step_ends=None, trust=None):
    """Phases 4-7 of one step on this rank's filtered batch: log-probs, PRM, advantages, policy
    update. Batch-wide statistics are taken over all ranks. engine_logp [B, R]: the rollout
    engine's log-probs of the sampled tokens, compared with the trainer's (a stale-weights alarm).
    step_ends [B, R]: reasoning-step ends, for --granularity step. trust: {"accuracy": smoothed
    PRM pairwise accuracy}, updated here, for --adaptive-process-coef.
    Returns the implicit rewards q [B, R] (None without a PRM), the advantages and the metrics."""
    mask, K, metrics = batch[2], args.samples_per_prompt, {}
    # 4. log-probs of the sampling policy and of the reference, no grad
    old_logp = batched_logprobs(policy, batch, args.micro_batch_size, args.temperature)
    ref_logp = batched_logprobs(ref, batch, args.micro_batch_size, args.temperature) if ref is not None else None
    if engine_logp is not None:
        metrics["rollout/logp_gap"] = masked_aggregate((engine_logp - old_logp).abs(), mask, "token-mean").item()

    # 5. implicit process rewards and the PRM's CE update on outcome labels
    q = r = None
    if prm is not None:
        q, prm_metrics = update_prm(prm, prm_opt, batch, old_logp if args.reference == "policy" else ref_logp, outcome, args)
        metrics.update(prm_metrics)
        # held out for "after" (q is read before the PRM trains on this batch); in-sample for "before"
        metrics["prm/accuracy"] = pairwise_accuracy((q * mask).sum(-1), outcome, K, all_reduce)
        metrics["prm/process_coef"] = process_coef(args, trust, metrics["prm/accuracy"])
        r = metrics["prm/process_coef"] * process_rewards(q, mask, args.beta, args.granularity, args.reward_norm,
                                                          all_reduce, step_ends)
        # size of the process return next to the 0/1 outcome: how much the PRM steers
        metrics["prm/return_abs"] = r.sum(-1).abs().mean().item()

    # 6. advantages: RLOO of process and outcome rewards, summed, whitened over all ranks
    advantages = prime_advantages(r, outcome, mask, K, args.gamma, args.rloo_variant, args.whiten, all_reduce, args.estimator)

    # 7. PPO-clip policy update
    metrics.update(update_policy(policy, policy_opt, batch, old_logp, ref_logp, advantages, args, shuffle_gen))
    return q, advantages, metrics


def sample_filtered_groups(engine, stream, tokenizer, args, rank, noise_gen):
    """Phases 1-3: sample K responses per prompt, verify, keep the groups that pass the accuracy
    filter; repeat until every rank has its quota (args: this rank's share of prompts per step),
    or the rounds run out: then every rank keeps as many groups as the rank with fewest has
    (equal batches keep FSDP's collectives in step; filter/kept_groups shows the shortfall).
    With --outcome-noise each label is flipped (o -> 1 - o, drawn from noise_gen) after it is
    counted in rollout/accuracy and before the filter: the trainer sees a contaminated verifier.
    Returns this rank's kept prompts, responses, engine log-probs, outcome [n] and the metrics."""
    import data
    K, quota = args.samples_per_prompt, args.prompts_per_step * args.samples_per_prompt  # responses per rank
    prompts, responses, engine_logps, outcomes, metrics = [], [], [], [], {}
    sampled = torch.zeros(2, dtype=torch.float64)  # (sum of outcomes, count) on this rank
    generated, generate_seconds = 0, 0.0
    for rounds in range(1, args.max_filter_rounds + 1):
        # every rank reads the same global stream and keeps its slice, so streams stay in step
        rows = stream.take(args.prompts_per_step * world_size())[rank * args.prompts_per_step:(rank + 1) * args.prompts_per_step]
        if len(prompts) < quota:  # a rank with its quota only waits for the others
            p_ids = [p for p in data.prompt_token_ids(tokenizer, rows) for _ in range(K)]
            t_gen = time.time()
            r_ids, r_logps = engine.generate(p_ids)
            generated, generate_seconds = generated + sum(map(len, r_ids)), generate_seconds + time.time() - t_gen
            texts = tokenizer.batch_decode(r_ids, skip_special_tokens=True)
            outcome, reasons = outcome_rewards(texts, [row for row in rows for _ in range(K)])
            for reason, count in reasons.items():
                metrics[f"verifier/{reason}"] = metrics.get(f"verifier/{reason}", 0) + count
            sampled += torch.tensor([outcome.sum().item(), len(outcome)], dtype=torch.float64)
            if args.outcome_noise > 0:
                flip = torch.rand(len(outcome), generator=noise_gen) < args.outcome_noise
                outcome = torch.where(flip, 1 - outcome, outcome)
                metrics["rollout/flipped_labels"] = metrics.get("rollout/flipped_labels", 0) + int(flip.sum())
            keep = accuracy_filter(outcome, K, args.filter_low, args.filter_high).repeat_interleave(K)
            # kept groups stay whole and contiguous: RLOO's leave-one-out baseline needs all K
            prompts += [p for p, k in zip(p_ids, keep) if k]
            responses += [r for r, k in zip(r_ids, keep) if k]
            engine_logps += [lp for lp, k in zip(r_logps, keep) if k]
            outcomes.append(outcome[keep])
        if all_reduce(torch.tensor(min(len(prompts), quota)), "min") >= quota:
            break
    n = int(all_reduce(torch.tensor(min(len(prompts), quota)), "min"))  # whole groups on every rank
    sampled = all_reduce(sampled, "sum")
    metrics.update({"rollout/accuracy": (sampled[0] / sampled[1]).item(), "filter/rounds": rounds,
                    "filter/kept_groups": n // K, "rollout/response_len": sum(map(len, responses[:n])) / max(n, 1),
                    "perf/rollout_tokens_per_s": generated / max(generate_seconds, 1e-9)})  # per rank
    return prompts[:n], responses[:n], engine_logps[:n], torch.cat(outcomes)[:n], metrics


def outcome_rewards(texts, rows):
    """The verifier's outcome reward [len(texts)] of each response to its row (math answer or code
    tests, by the row's ability), scored in worker processes, and how many items had each reason
    (no_answer, timeout, ...): a checker failure scores that item 0, never the batch."""
    import verifier
    rewards, reasons = verifier.score_batch(texts, [r["reward_model"]["ground_truth"] for r in rows],
                                            [r["ability"] for r in rows])
    return torch.tensor(rewards), reasons


def evaluate(engine, tokenizer, rows, samples=1, temperature=0.0, top_p=1.0, batch_size=256):
    """Accuracy of the rollout engine's policy on `rows`: greedy (temperature 0), or avg@k: the
    mean outcome of `samples` responses per problem at `temperature` and `top_p`. Each rank scores
    its share. {"accuracy": over all problems, "per_source": {data_source: accuracy}}."""
    from tqdm import tqdm
    from data import prompt_token_ids
    if temperature == 0 and samples != 1:
        raise ValueError("greedy evaluation (--eval-temperature 0) gives one answer per problem: use --eval-samples 1")
    rank, world = (dist.get_rank(), world_size()) if dist.is_initialized() else (0, 1)
    mine = [row for row in rows[rank::world] for _ in range(samples)]
    prompts, responses = prompt_token_ids(tokenizer, mine), []
    for i in tqdm(range(0, len(prompts), batch_size), desc="eval", leave=False, disable=rank != 0):
        responses += engine.generate(prompts[i:i + batch_size], greedy=temperature == 0, temperature=temperature, top_p=top_p)[0]
    scores, _ = outcome_rewards(tokenizer.batch_decode(responses, skip_special_tokens=True), mine)
    totals = {}  # data_source -> [sum of outcomes, responses], over all ranks
    for per_rank in gather_objects([(row.get("data_source", ""), score) for row, score in zip(mine, scores.tolist())]):
        for source, score in per_rank:
            totals.setdefault(source, [0.0, 0])
            totals[source][0] += score
            totals[source][1] += 1
    return {"accuracy": sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values()),
            "per_source": {source: t[0] / t[1] for source, t in sorted(totals.items())}}


def write_eval_report(run_dir, history, args):
    """eval.json (every evaluation so far) and eval.md (a table: one row per eval step, one
    column per data_source) in the run directory."""
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(history, f, indent=2)
    sources = sorted({s for h in history for s in h["per_source"]})
    how = "greedy" if args.eval_temperature == 0 else f"avg@{args.eval_samples}, T={args.eval_temperature}, top_p={args.eval_top_p}"
    lines = [f"Accuracy ({how})", "", "| step | all | " + " | ".join(sources) + " |", "|---:" * (len(sources) + 2) + "|"]
    lines += [f"| {h['step']} | {h['accuracy']:.1%} | " + " | ".join(f"{h['per_source'].get(s, float('nan')):.1%}" for s in sources) + " |"
              for h in history]
    with open(os.path.join(run_dir, "eval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def sample_records(step, tokenizer, batch, q, outcome, args):
    """A few responses (with their prompt) and their per-token implicit rewards beta*q_t, for
    samples.jsonl (bench/render_samples.py draws them)."""
    ids, attn, mask = batch
    R, records = mask.shape[1], []
    for i in range(min(args.num_samples_logged, len(ids))):
        n = int(mask[i].sum())
        tokens = ids[i, -R:][:n].tolist()
        records.append({"step": step, "outcome": outcome[i].item(),
                        "prompt": tokenizer.decode(ids[i, :-R][attn[i, :-R].bool()]),
                        "tokens": [tokenizer.decode([t]) for t in tokens],
                        "rewards": [] if q is None else (args.beta * q[i, :n]).tolist()})
    return records


# ==============================================================================================
# Checkpoints: everything needed to continue exactly where a run stopped
def checkpoints(run_dir):
    """Complete checkpoints in run_dir, oldest first (a save in progress is a .tmp folder)."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint-[0-9]*[0-9]")))


def save_checkpoint(run_dir, step, models, optimizers, tokenizer, trainer_state):
    """policy/ and prm/ as HF folders (loadable by transformers and vLLM as they are) plus the
    optimizer states and `trainer_state` (step, data position, each rank's RNG states). Every rank
    calls it (gathering sharded weights is a collective); rank 0 writes to a temp folder and
    renames it into place, so a crash mid-save leaves the previous checkpoint whole; older
    checkpoints are removed after. `models`: {"policy": model, "prm": model or None}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets everything, on CPU
    models = {name: m for name, m in models.items() if m is not None}
    weights = {name: get_model_state_dict(m, options=full) for name, m in models.items()}
    opt_states = [get_optimizer_state_dict(m, opt, options=full) for m, opt in zip(models.values(), optimizers)]
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    final = os.path.join(run_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in models.items():
        model.save_pretrained(os.path.join(tmp, name), state_dict=weights[name])
    tokenizer.save_pretrained(os.path.join(tmp, "policy"))
    torch.save({**trainer_state, "optimizers": opt_states}, os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-1]:
        shutil.rmtree(old)


def load_optimizers(models, optimizers, opt_states):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    for model, opt, state in zip([m for m in models if m is not None], optimizers, opt_states):
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def rng_states():
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def truncate_jsonl(path, last_step):
    """Drop lines logged after `last_step` (a crash after the checkpoint) before appending."""
    with open(path) as f:
        lines = [line for line in f if json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


def merge_rank_metrics(per_rank):
    """One metrics dict from every rank's: counts (verifier reasons, kept groups) are summed, the
    rest (means over equal-sized per-rank batches) averaged over the ranks that logged them."""
    merged = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):
        values = [m[key] for m in per_rank if key in m]
        summed = key.startswith("verifier/") or key in ("filter/kept_groups", "rollout/flipped_labels")
        merged[key] = sum(values) if summed else values[0] if len(set(values)) == 1 else sum(values) / len(values)
    return merged


def main(args: Args):
    from tqdm import tqdm
    import data

    if args.no_prm:
        args.process_reward_coef = 0.0
    if args.kl_coef > 0 and args.reference == "policy":
        raise ValueError("--kl-coef needs a frozen reference model: use --reference sft")
    if args.prm_model and args.process_reward_coef == 0:
        raise ValueError("--prm-model given, but --no-prm (or --process-coef 0) uses no PRM")
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs the --run-dir of the run to continue")
    rank, world, device = init_distributed()
    for name in ("prompts_per_step", "mini_batch_size"):
        if getattr(args, name) % world:
            raise ValueError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be divisible by the number of processes ({world})")
    # Each rank trains on its share; the flags are global, as in the paper's recipe.
    local = replace(args, prompts_per_step=args.prompts_per_step // world, mini_batch_size=args.mini_batch_size // world)
    is_main = rank == 0
    run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    run_dir = gather_objects(run_dir)[0]  # rank 0's timestamp for every rank
    os.makedirs(run_dir, exist_ok=True)
    checkpoint = checkpoints(run_dir)[-1] if args.resume and checkpoints(run_dir) else None
    if args.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {run_dir}")
    if is_main:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)

    # --- data, models, rollout engine
    model_path = args.model
    if not model_path:
        import bootstrap
        model_path = bootstrap.embedded_model(os.path.expanduser(args.cache_dir))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    data_stats = {}

    def load(paths, split):
        """Rows of comma-separated files; bad rows (with --skip-bad-rows) and prompts longer than
        --max-prompt-len are left out, counted and reported, as nothing should vanish silently."""
        rows, errors = data.load_rows(paths.split(","), args.skip_bad_rows)
        lengths = [len(p) for p in data.prompt_token_ids(tokenizer, rows)]
        kept = [r for r, n in zip(rows, lengths) if n <= args.max_prompt_len]
        data_stats.update({f"data/{split}_rows": len(kept), f"data/{split}_skipped_bad_rows": len(errors),
                           f"data/{split}_dropped_long_prompts": len(rows) - len(kept)})
        if is_main:
            print(f"data ({split}): {len(kept)} rows; {len(errors)} bad rows skipped"
                  + (f" (first: {errors[0]})" if errors else "") + f"; {len(rows) - len(kept)} longer than --max-prompt-len dropped")
        if not kept:
            raise ValueError(f"no {split} rows left in {paths}")
        return kept

    eval_rows = load(args.eval_data, "eval") if args.eval_data else data.embedded_eval_rows(args.eval_size)
    eval_history = []

    def run_eval(step):
        """Evaluate, record in eval.json / eval.md, return the metrics to log."""
        result = evaluate(engine, tokenizer, eval_rows, args.eval_samples, args.eval_temperature, args.eval_top_p)
        eval_history.append({"step": step, **result})
        if is_main:
            report = write_eval_report(run_dir, eval_history, args)
        if is_main and args.eval_only:
            print(report)
        return {"eval/accuracy": result["accuracy"], **{f"eval/accuracy/{s}": a for s, a in result["per_source"].items()}}

    if args.eval_only:  # no training: only the rollout engine is needed
        engine = make_engine(args, model_path, tokenizer, device)
        return {"engine": engine, "eval": run_eval(0)}
    policy, prm, ref = setup_models(args, model_path, device, checkpoint)
    engine = make_engine(args, model_path, tokenizer, device)
    engine.sync(policy)  # step 0 too: checks that every engine weight is loaded from the policy
    if args.data:
        stream = data.RowStream(load(args.data, "train"), args.seed)
    else:
        stream = data.AdditionStream(args.seed, eval_rows)
    # One seed drives sampling, data order and shuffles, set after the models are built (building
    # the embedded model consumes random numbers only on its first run): a rerun with the same
    # flags reproduces every metric (tests rely on it to compare ablation switches). Every rank
    # reads the same data stream and takes its own slice; sampling differs by rank.
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    prm_opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_lr, weight_decay=args.prm_weight_decay) if prm is not None else None
    shuffle_gen = torch.Generator().manual_seed(args.seed + rank)
    noise_gen = torch.Generator().manual_seed(args.seed + rank + 1_000_003)  # --outcome-noise's own stream
    trust = {"accuracy": 0.5}  # smoothed PRM pairwise accuracy, for --adaptive-process-coef

    optimizers = [opt for opt in (policy_opt, prm_opt) if opt is not None]
    metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "samples.jsonl")
    start = 0
    if checkpoint:
        state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
        if len(state["rng"]) != world:
            raise ValueError(f"{checkpoint} was saved by {len(state['rng'])} processes; resume it with as many (not {world})")
        load_optimizers([policy, prm], optimizers, state["optimizers"])
        stream.load_state_dict(state["stream"])
        shuffle_gen.set_state(state["rng"][rank]["shuffle"])
        noise_gen.set_state(state["rng"][rank]["noise"])
        trust.update(state["trust"])
        set_rng_states(state["rng"][rank])
        start, (first_eval, last_eval) = state["step"], state["evals"]
        if os.path.exists(os.path.join(run_dir, "eval.json")):
            with open(os.path.join(run_dir, "eval.json")) as f:
                eval_history += [h for h in json.load(f) if h["step"] <= start]
        if is_main:
            for path in (metrics_path, samples_path):
                truncate_jsonl(path, start)
            print(f"resumed from {checkpoint} at step {start}")
    # Flushed after every step, so a crash loses at most the steps since the last checkpoint.
    # Only rank 0 writes; the other ranks write to nowhere.
    metrics_file = open(metrics_path if is_main else os.devnull, "a" if checkpoint else "w")
    samples_file = open(samples_path if is_main else os.devnull, "a" if checkpoint else "w")

    def log(metrics):
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()

    if not checkpoint:
        eval_metrics = run_eval(0)
        first_eval = last_eval = eval_metrics["eval/accuracy"]
        log({"step": 0, **eval_metrics, **data_stats})
    bar = tqdm(range(start + 1, args.steps + 1), desc="prime", dynamic_ncols=True, disable=not is_main)
    for step in bar:
        t0 = time.time()
        # 1-3. generate K samples per prompt, verify, filter
        prompts, responses, engine_logps, outcome, metrics = sample_filtered_groups(engine, stream, tokenizer, local, rank, noise_gen)
        n = len(responses)
        outcome, metrics = outcome.to(device), {"step": step, **metrics}
        if n > 0:  # else every group was all right or all wrong: nothing to learn this step
            batch = tuple(t.to(device) for t in collate(prompts, responses, engine.pad_id))
            R = batch[2].shape[1]
            engine_logp = torch.tensor([lp + [0.0] * (R - len(lp)) for lp in engine_logps], device=device)
            step_ends = step_end_mask(tokenizer, responses, args.step_separator, R).to(device) if args.granularity == "step" else None
            q, _, step_metrics = prime_step(policy, prm, ref, policy_opt, prm_opt, batch, outcome, local, shuffle_gen,
                                            engine_logp, step_ends, trust)
            metrics.update(step_metrics)
            # 8. the rollout engine samples from the new policy
            engine.sync(policy)

        # 9. log, evaluate
        metrics["perf/step_seconds"] = time.time() - t0
        if device.type == "cuda":
            metrics["perf/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if step % args.eval_every == 0 or step == args.steps:
            metrics.update(run_eval(step))
            last_eval = metrics["eval/accuracy"]
            if n > 0:
                for rec in sample_records(step, tokenizer, batch, q, outcome, args):
                    samples_file.write(json.dumps(rec) + "\n")
                samples_file.flush()
        metrics = merge_rank_metrics(gather_objects(metrics))
        log(metrics)
        bar.set_postfix(reward=f"{metrics['rollout/accuracy']:.3f}", prm_acc=f"{metrics.get('prm/accuracy', float('nan')):.3f}",
                        eval=f"{last_eval:.3f}")
        if args.save_every and step % args.save_every == 0:
            rng = gather_objects({**rng_states(), "shuffle": shuffle_gen.get_state(), "noise": noise_gen.get_state()})
            save_checkpoint(run_dir, step, {"policy": policy, "prm": prm}, optimizers, tokenizer,
                            {"step": step, "evals": (first_eval, last_eval), "stream": stream.state_dict(), "rng": rng,
                             "trust": trust})
    if is_main:
        print(f"eval accuracy ({len(eval_rows)} held-out problems, see eval.md): "
              f"{first_eval:.1%} at step 0 -> {last_eval:.1%} at step {args.steps} ({100 * (last_eval - first_eval):+.1f} points)")
    metrics_file.close()
    samples_file.close()
    return {"policy": policy, "prm": prm, "ref": ref, "engine": engine, "eval": (first_eval, last_eval)}


if __name__ == "__main__":
    from transformers import HfArgumentParser
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
    if dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while another still uses it
        dist.destroy_process_group()
