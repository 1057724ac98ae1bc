"""PRIME: Process Reinforcement through IMplicit rEwards (Cui et al., 2025, arXiv 2502.01456).

The algorithm, read top to bottom like the paper: the config, the math (one pure function per
equation), the PRM and policy updates, sampling with the online filter, one training step, and
main() (Algorithm 1). The plumbing lives beside it: cli.py (flags checked), data.py (rows, tasks,
batches), rollout.py (engines, evaluation), distributed.py (the models under FSDP2, all-reduces),
checkpoint.py (run directory, resume), verifier.py (outcome rewards).

    python prime.py                                 # embedded default: tiny LM, 3-digit addition, CPU
    python prime.py --model PATH --data rows.jsonl  # your model and Eurus-2-style data
    torchrun --nproc_per_node=8 prime.py ...        # FSDP2, one process per GPU (see run_math.sh)
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
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import bootstrap
import checkpoint
import cli
import data
import distributed
import rollout
from data import collate, padded
from distributed import Models, add_count, all_reduce, scalar, setup_models


def arg(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    # model and data; empty strings select the embedded default (see bootstrap.py)
    model: str = arg("", "HF model folder for policy, PRM and reference; '' = the embedded tiny model")
    data: str = arg("", "Eurus-2-style rows: .parquet or .jsonl files, folders (their train* files) or "
                        "globs, comma-separated; '' = built-in addition")
    eval_data: str = arg("", "the same for eval (a folder: its validation* files); '' = built-in held-out "
                             "addition")
    eval_size: int = arg(500, "number of built-in held-out problems (ignored with --eval-data)")
    task_digits: int = arg(3, "digits of the built-in addition (one worked step per column); its embedded "
                              "model is built once per value")
    skip_bad_rows: bool = arg(False, "skip (and count) malformed data rows instead of stopping at the first")
    allow_unsandboxed_code: bool = arg(False, "score code rows where the bubblewrap sandbox cannot start: "
                                              "generated code then runs as you, with resource limits only")
    cache_dir: str = arg("~/.cache/prime", "where the embedded default model is built once and cached")
    run_dir: str = arg("", "output folder; '' = runs/<timestamp>. A folder that holds a run is refused "
                           "unless --resume or --overwrite")
    overwrite: bool = arg(False, "replace the run in --run-dir (args, logs, checkpoints) instead of refusing")
    seed: int = arg(0, "seed of data order, sampling and init")
    # rollout
    rollout: str = arg("hf", "rollout engine: HF generate (CPU, tests, GPU fallback) or vLLM (GPU)",
                             choices=["hf", "vllm"])
    vllm_sleep: bool = arg(False, "vllm: free its KV cache and offload its weights while the trainer runs")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm: fraction of each GPU for its weights and KV cache "
                                                  "(the rest: sharded policy, PRM, reference, optimizers)")
    steps: int = arg(150, "training steps (each: sample, verify, filter, PRM update, policy update)")
    prompts_per_step: int = arg(64, "prompt groups trained on per step (after filtering)")
    samples_per_prompt: int = arg(4, "K: responses sampled per prompt (RLOO needs K >= 2)")
    max_prompt_len: int = arg(0, "prompts longer than this (tokens) are dropped; 0 = 1024, or less: what the "
                                 "model's context (max_position_embeddings) leaves beside the responses")
    max_response_len: int = arg(0, "max new tokens per response; 0 = 1024 with --data (at most half the model's "
                                   "context), else what the built-in task's worked solutions take (48 at 3 digits)")
    temperature: float = arg(0.7, "sampling temperature, also divides the trainer's logits (paper: 1.0; the "
                                  "tiny embedded model samples 7%% right at 1.0 vs 46%% greedy, 24%% at 0.7)")
    top_p: float = arg(1.0, "nucleus sampling")
    filter_low: float = arg(0.2, "keep a prompt only if the mean outcome of its K samples is >= this")
    filter_high: float = arg(0.8, "... and <= this (0 and 1 disable the filter)")
    max_filter_rounds: int = arg(4, "sampling rounds per step to fill the quota of kept groups")
    # implicit PRM
    beta: float = arg(0.05, "beta of the implicit PRM: r_t = beta * log(pi_phi / pi_ref) (Eq. 3)")
    no_prm: bool = arg(False, "outcome-only RLOO: no PRM, no process rewards (the paper's baseline)")
    process_reward_coef: float = arg(1.0, "weight of the process return in the advantage; 0 = --no-prm",
                                          aliases=["--process-coef"])
    adaptive_process_coef: bool = arg(False, "scale the process weight by the PRM's smoothed held-out "
                                             "pairwise accuracy: 0 at chance, full at 100%%")
    granularity: str = arg("token", "process reward per token, per reasoning step (on its last token) or per "
                                    "response (on the last token)", choices=["token", "step", "whole"])
    step_separator: str = arg("\n", "--granularity step: text that ends a reasoning step (a token containing "
                                    "it closes the step) (default: %(default)r, a newline)")
    outcome_noise: float = arg(0.0, "flip each training outcome label (o -> 1-o) with this probability: a "
                                    "contaminated verifier (eval is never flipped)")
    reward_norm: str = arg("batch_norm", "scale process rewards by the batch's max |return| (official)",
                                         choices=["batch_norm", "none"])
    prm_model: str = arg("", "the PRM's initial weights (same tokenizer); '' = --model (paper). With "
                             "--prm-update none: a PRM trained beforehand, the paper's offline PRM")
    prm_update: str = arg("after", "read rewards then update the PRM (single forward), update first, or "
                                   "never", choices=["after", "before", "none"])
    reference: str = arg("sft", "pi_ref of the PRM: the frozen initial model, or the current policy",
                                choices=["sft", "policy"])
    prm_lr: float = arg(5e-4, "PRM AdamW learning rate (paper: 1e-6 at 7B, 2x the policy's; the PRM must "
                              "adapt faster than the policy drifts, see README)")
    prm_weight_decay: float = arg(0.0, "PRM AdamW weight decay")
    prm_grad_clip: float = arg(10.0, "PRM gradient-norm clip")
    # advantages and policy
    estimator: str = arg("rloo", "advantage estimator (Sec. 5.3): RLOO (Eq. 5), GRPO group scores (Eq. 7, "
                                 "see prime_advantages), REINFORCE (Eq. 8)",
                         choices=["rloo", "grpo", "reinforce"])
    rloo_variant: str = arg("official", "RLOO scaling: official code, or the paper's Eq. 5",
                                        choices=["official", "paper"])
    gamma: float = arg(1.0, "discount of the process-reward return")
    credit: str = arg("sum", "process return: the sum of future process rewards (PRIME) or their minimum "
                             "(PURE's min-form, arXiv 2504.15275)", choices=["sum", "min"])
    whiten: bool = arg(True, "whiten advantages over the batch (official; --no-whiten: raw advantages)")
    lr: float = arg(5e-5, "policy AdamW learning rate (paper: 5e-7 at 7B)")
    weight_decay: float = arg(0.01, "policy AdamW weight decay")
    grad_clip: float = arg(1.0, "policy gradient-norm clip")
    clip_eps: float = arg(0.2, "PPO clip epsilon (Eq. 6)")
    loss_agg: str = arg("seq-mean-token-mean", "how the PPO loss averages tokens",
                                               choices=["seq-mean-token-mean", "token-mean"])
    ppo_epochs: int = arg(1, "passes over each batch")
    mini_batch_size: int = arg(128, "responses per optimizer step (policy and PRM)")
    micro_batch_size: int = arg(0, "responses per forward/backward of each process (gradient accumulation); "
                                   "0 = its whole share of the mini-batch (--mini-batch-size / processes)")
    max_tokens_per_micro_batch: int = arg(0, "also cap each forward at this many tokens, padding included, "
                                             "responses sorted by length (verl's dynamic batch); 0 = no cap")
    precision: str = arg("auto", "bf16 (under torchrun): FSDP2 computes in bf16 from fp32 master weights and "
                                 "reduces gradients in fp32, frozen copies (reference, rollout engine) are bf16; "
                                 "fp32: fp32 throughout; auto: bf16 under torchrun on GPUs, else fp32",
                         choices=["auto", "bf16", "fp32"])
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (policy and PRM): "
                                              "less memory, ~30%% more compute")
    share_prompts: bool = arg(True, "forward each distinct prompt of a micro-batch (and of a rollout) once, its "
                                    "KV cache shared by its K responses: the prompt's compute / K, the same "
                                    "numbers up to float rounding (in training, not with --gradient-checkpointing)")
    tis_cap: float = arg(0.0, "truncated importance sampling: weight each token's policy loss by "
                              "min(pi_old / pi_engine, C) for the engine-vs-trainer mismatch; 0 = off")
    kl_coef: float = arg(0.0, "weight of a k3 KL(policy || frozen reference) loss term")
    entropy_coef: float = arg(0.0, "weight of an entropy bonus in the policy loss")
    # logging
    eval_every: int = arg(10, "evaluate every N steps; also at step 0 and the last")
    eval_only: bool = arg(False, "evaluate --model on --eval-data (eval.json, eval.md in --run-dir) and exit")
    eval_samples: int = arg(1, "k of avg@k: responses per eval problem (PRIME's authors now report avg@16)")
    eval_temperature: float = arg(0.0, "eval sampling temperature; 0 = greedy (authors' avg@16 uses 0.3, "
                                       "top_p 0.95: greedy scores move between vLLM versions)")
    eval_top_p: float = arg(1.0, "eval nucleus sampling")
    save_every: int = arg(0, "write a checkpoint every N steps (0 = never); only the newest is kept")
    resume: bool = arg(False, "continue the run in --run-dir from its newest checkpoint, with its flags")
    num_samples_logged: int = arg(4, "responses written to samples.jsonl at each eval")
    report_to: str = arg("none", "also send every metric to TensorBoard (pip install tensorboard) or "
                                 "Weights & Biases (pip install wandb; WANDB_MODE=offline: a local run)",
                         choices=["none", "tensorboard", "wandb"])


# ==============================================================================================
# The math. Tensors are [B, R]: B responses (the K samples of a prompt contiguous), R response
# positions. `mask` is 1 on response tokens up to and including the first EOS. `reduce(x, op)`
# turns a local batch statistic into a global one ("sum" or "max"); identity in one process,
# an all-reduce under torchrun, so results do not depend on the number of GPUs.
def _local(x, op):
    return x


def token_logprobs(model, input_ids, attention_mask, response_len, temperature=1.0, with_entropy=False,
                   share_prompts=False):
    """log pi(y_t | x, y_<t) of the last `response_len` tokens of input_ids [B, P+R] -> [B, R] fp32.

    The token at position p is predicted by the logits at p-1. Prompts are left-padded, so
    position ids come from the attention mask (pitfall: otherwise every padded prompt is shifted).
    Log-softmax in fp32 (bf16 rounding becomes noise in q = log pi_phi - log pi_ref), one row at a
    time: without grad only one row's fp32 [R, vocab] copy exists at once (with grad, autograd
    keeps every row's; the model's own logits are [B, R, vocab] in its dtype either way).
    `temperature`: a float, or a set of them: one forward, {temperature: [B, R]}. with_entropy
    also returns the entropy [B, R] (at the highest temperature), with grad only if "grad".
    share_prompts: the prompt's compute divided by K (see shared_prompt_logits)."""
    temps = sorted(temperature, reverse=True) if isinstance(temperature, (set, frozenset)) else [temperature]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if share_prompts and not model.is_activation_checkpointing:  # the same on every rank: FSDP's
        # collectives need as many forwards on each
        logits = shared_prompt_logits(model, input_ids, attention_mask, position_ids, response_len)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=response_len + 1, use_cache=False).logits[:, :-1]
    targets = input_ids[:, -response_len:]
    logps, entropies = {t: [] for t in temps}, []
    for row_logits, row_targets in zip(logits, targets):
        for t in temps:
            row = row_logits.float() / t
            lse = row.logsumexp(-1)  # [R]
            logps[t].append(row.gather(-1, row_targets[:, None]).squeeze(-1) - lse)
            if with_entropy and t == temps[0]:
                with torch.set_grad_enabled(with_entropy == "grad" and torch.is_grad_enabled()):
                    entropies.append(lse - (row.softmax(-1) * row).sum(-1))
    logp = {t: torch.stack(rows) for t, rows in logps.items()}
    logp = logp if isinstance(temperature, (set, frozenset)) else logp[temperature]
    return (logp, torch.stack(entropies)) if with_entropy else logp


def shared_prompt_logits(model, input_ids, attention_mask, position_ids, response_len):
    """token_logprobs' logits [B, R, vocab] with each distinct prompt (its ids and padding) run
    once: the responses that share it attend to its KV cache, indexed out to them (the index's
    backward sums their gradients). The same numbers up to float rounding. Not under gradient
    checkpointing: HF drops a cache passed to a checkpointed layer.
    Two forwards whatever the shapes, as FSDP needs (as many on every rank): the prompts, whose last
    position predicts the first response token, then every response token (the last one's logits
    predict nothing). Both are in the loss's graph, so FSDP gathers each layer again for backward."""
    P = input_ids.shape[1] - response_len
    cache, last = rollout.shared_prompt_cache(model, input_ids[:, :P], attention_mask[:, :P])
    rest = model(input_ids=input_ids[:, P:], attention_mask=attention_mask, position_ids=position_ids[:, P:],
                 cache=cache, use_cache=True).logits
    return torch.cat([last, rest[:, :-1]], 1)


def implicit_rewards(prm_logp, ref_logp, mask):
    """q_t = log pi_phi(y_t|y_<t) - log pi_ref(y_t|y_<t) on valid tokens, 0 elsewhere: the implicit
    process reward of Eq. 3 without beta. All [B, R]."""
    return (prm_logp - ref_logp) * mask


def process_rewards(q, mask, beta=0.05, granularity="token", norm="batch_norm", reduce=_local,
                    step_ends=None):
    """Process rewards [B, R] from implicit rewards q [B, R] (Eq. 3, official-code post-processing).

    token: r_t = beta * q_t. step: beta * (sum of q over a reasoning step) on the step's last
    token, `step_ends` [B, R] marking those. whole: beta * sum_t q_t on the last valid token.
    batch_norm (official): divide by max_{i,t} |sum_{s>=t} r_{i,s}| + 1e-6 over the batch, so the
    largest process return is 1, on the scale of the 0/1 outcome."""
    r = beta * q * mask
    if granularity == "whole":
        r = r.sum(-1, keepdim=True) * last_token_mask(mask)
    elif granularity == "step":
        if step_ends is None:
            raise ValueError("granularity 'step' needs step_ends, the mask of each step's last token")
        ends, step = step_index(step_ends, mask)
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


def grpo(rewards, mask, k, eps=1e-6, scale=True):
    """Group z-scores (paper Eq. 7, GRPO-style), [B, R] -> [B, R]: with m_j the mean of rewards[j]
    over its mask, (r - mean_group(m)) / (std_group(m) + eps), unbiased std over the K of a
    group; 0 off-mask. On the outcome (one rewarded token) it is the familiar GRPO advantage.
    scale=False: centred only, r - mean_group(m) (what prime_advantages uses on process rewards)."""
    if k < 2:
        raise ValueError(f"group statistics need K >= 2 samples per prompt; got K={k}")
    mask = mask.to(rewards.dtype)
    m = ((rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)).view(-1, k)  # [B/K, K]
    mean, std = m.mean(-1).repeat_interleave(k), m.std(-1).repeat_interleave(k)
    return (rewards - mean[:, None]) / (std[:, None] + eps if scale else 1.0) * mask


def discounted_returns(rewards, mask, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1} over valid tokens (the sum in Eq. 5). [B, R] -> [B, R]."""
    rewards = rewards * mask
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def min_returns(rewards, mask, ends=None):
    """Min-form credit (PURE, Cheng et al. 2025, arXiv 2504.15275): G_t = min_{s >= t} r_s over the
    positions that carry a reward (`ends`: every valid token, or each step's last), instead of
    the sum of Eq. 5: a trajectory is worth its worst future step, so one step the PRM rates
    highly cannot inflate it. 0 where no rewarded position follows. [B, R] -> [B, R]."""
    ends = mask if ends is None else ends * mask
    big = torch.finfo(rewards.dtype).max
    future_min = torch.where(ends > 0, rewards, big).flip(-1).cummin(-1).values.flip(-1)
    return torch.where((mask > 0) & (future_min < big), future_min, torch.zeros_like(rewards))


def masked_whiten(values, mask, reduce=_local):
    """(x - mean) / sqrt(var + 1e-8) over valid tokens of the whole batch, unbiased variance (as
    veRL's masked_whiten); 0 off-mask. [B, R] -> [B, R]."""
    mask = mask.to(values.dtype)
    n = reduce(mask.sum(), "sum")
    mean = reduce((values * mask).sum(), "sum") / n
    var = reduce((((values - mean) * mask) ** 2).sum(), "sum") / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def prime_advantages(process_rewards, outcome, mask, k, gamma=1.0, variant="official", whiten=True,
                     reduce=_local, estimator="rloo", credit="sum", reward_ends=None):
    """PRIME's advantage (Eq. 5, as the official code computes it), [B, R].

    The outcome [B] sits on the last valid token; a baseline is applied to each reward source on
    its own (outcome over that one token, process rewards over all valid tokens); each becomes a
    return (outcome undiscounted, so every token carries it); the two are summed and whitened.
    estimator: rloo (Eq. 5), grpo (Eq. 7) or reinforce (no baseline, Eq. 8: A_t = r_o +
    sum_{s>=t} gamma^(s-t) r_s). process_rewards=None gives the outcome-only baseline. credit
    "min": the process return is min_returns (over `reward_ends`), not the discounted sum.
    grpo departs from the literal Eq. 7 on the process rewards: they are centred by the group mean
    but not divided by its std. That std of per-response mean process rewards is tiny (~0.0035 on
    the embedded task), so z-scored per-token rewards summed over ~30 tokens made the process
    return 25-90x the outcome's and the policy collapsed following a PRM at chance; centred, they
    keep batch_norm's scale and the process weight (--process-coef) keeps its meaning."""
    baselines = {"rloo": (lambda r, m: rloo(r, m, k, variant),) * 2,
                 "grpo": (lambda r, m: grpo(r, m, k), lambda r, m: grpo(r, m, k, scale=False)),
                 "reinforce": (lambda r, m: r * m,) * 2}[estimator]  # (outcome's, process rewards')
    last = last_token_mask(mask)
    adv = discounted_returns(baselines[0](outcome[:, None] * last, last), mask, 1.0)
    if process_rewards is not None:
        baselined = baselines[1](process_rewards, mask)
        adv = adv + (discounted_returns(baselined, mask, gamma) if credit == "sum" else
                     min_returns(baselined, mask, reward_ends))
    return masked_whiten(adv, mask, reduce) if whiten else adv * mask


def ppo_clip_loss(logp, old_logp, advantages, mask, clip_eps=0.2, agg="seq-mean-token-mean",
                  return_stats=False, weights=None):
    """PPO-clip policy loss (Eq. 6): max(-A*rho, -A*clip(rho, 1-eps, 1+eps)), rho = exp(logp -
    old_logp), all [B, R]. agg: seq-mean-token-mean (mean over sequences of each one's token mean:
    what the official code effectively does) or token-mean (over all valid tokens of the batch).
    weights [B, R]: per-token weights of the loss (truncated importance sampling), no grad."""
    ratio = torch.exp(logp - old_logp)
    per_token = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    per_token = per_token if weights is None else per_token * weights.detach()
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


def step_index(step_ends, mask):
    """(ends, step), both [B, R]: each reasoning step's last token (the response's last token closes
    its last step) and the index of the step each token belongs to."""
    ends = torch.maximum(step_ends * mask, last_token_mask(mask))
    return ends, (ends.cumsum(-1) - ends).long()


def last_token_mask(mask):
    """1 on the last valid token of each row of mask [B, R] (where the outcome reward sits)."""
    last = torch.zeros_like(mask)
    n = mask.sum(-1).long()
    rows = torch.nonzero(n > 0).squeeze(-1)
    last[rows, n[rows] - 1] = 1
    return last


def pairwise_accuracy(scores, outcome, k, reduce=_local):
    """Within each group of K, the fraction of (better, worse) outcome pairs whose scores are
    ordered the same way (ties count half): how well the PRM ranks responses. nan if no pairs.
    Pairs are counted over the whole batch (all ranks, with reduce)."""
    s, o = scores.view(-1, k), outcome.view(-1, k)
    better = (o[:, :, None] > o[:, None, :]).float()  # [G, K, K]: i beat j
    agree = (s[:, :, None] > s[:, None, :]).float() + 0.5 * (s[:, :, None] == s[:, None, :]).float()
    agreed, pairs = reduce(torch.stack([(better * agree).sum(), better.sum()]), "sum").tolist()
    return agreed / pairs if pairs > 0 else float("nan")


def first_error_hit(q, mask, step_ends, first_wrong, reduce=_local):
    """Does the PRM blame the right step? Over the responses with a first wrong step (first_wrong
    [B] >= 0; -1: right, or no step truth), the fraction whose lowest-reward step (q summed over
    each step's tokens; step_ends [B, R] marks each step's last token) is that step, and what a
    uniform pick among each response's steps would give. (nan, nan) if there are none."""
    ends, step = step_index(step_ends, mask)
    sums = torch.zeros_like(q).scatter_add_(-1, step, q * mask)
    n_steps = ends.sum(-1)
    sums = torch.where(torch.arange(q.shape[1], device=q.device) < n_steps[:, None], sums, torch.inf)
    wrong = (first_wrong >= 0).to(q.dtype)
    hits = (sums.argmin(-1) == first_wrong).to(q.dtype) * wrong
    chance = wrong / n_steps.clamp(min=1)
    hit, chance, n = reduce(torch.stack([hits.sum(), chance.sum(), wrong.sum()]), "sum")
    return (hit.item() / n.item(), chance.item() / n.item()) if n > 0 else (float("nan"), float("nan"))


def micro_batches(batch, rows, args):  # as many forwards on every rank: under FSDP each is a collective
    return data.micro_batches(batch, rows, args.micro_batch_size, args.max_tokens_per_micro_batch, all_reduce)


@torch.no_grad()
def batched_logprobs(model, batch, args, temperatures):
    """{temperature: [B, R] log-probs} of a whole batch, in micro-batches, without grad; 0 off-mask."""
    mask = batch[2]
    out = {t: torch.zeros_like(mask) for t in temperatures}
    for idx, ids, attn, r in micro_batches(batch, torch.arange(len(mask)), args):
        logps = token_logprobs(model, ids, attn, r, frozenset(temperatures), share_prompts=args.share_prompts)
        for t, logp in logps.items():
            out[t][idx] = padded(logp, mask.shape[1]) * mask[idx]
    return out


# ==============================================================================================
# Training: the PRM update (Alg. 1 lines 6-8) and the policy update (lines 9-11)
def update_prm(prm, opt, batch, ref_logp, outcome, args):
    """Implicit process rewards q [B, R] for this batch, and the PRM's CE update on outcomes. The
    PRM and its reference score at temperature 1: q is a log-likelihood ratio of the models
    themselves, as in the official code (only the policy's log-probs use the sampling temperature).

    after (official default): each mini-batch's q comes from the same forward that computes the
    loss, read before the step (one forward). before: update on the whole batch first, then
    recompute q with the updated PRM (a second forward). none: the PRM is never updated."""
    mask = batch[2]
    (B, R), stats = mask.shape, {"prm/loss": 0.0, "prm/grad_norm": 0.0}
    if args.prm_update == "none":
        q = implicit_rewards(batched_logprobs(prm, batch, args, {1.0})[1.0], ref_logp, mask)
        stats["prm/loss"] = prm_ce_loss(q, mask, outcome, args.beta).item()
        return q, stats
    q, mini = torch.zeros_like(mask), args.mini_batch_size // distributed.world_size()
    for lo in range(0, B, mini):  # contiguous mini-batches, as the official code splits
        rows = torch.arange(lo, min(lo + mini, B), device=mask.device)
        for idx, ids, attn, r in micro_batches(batch, rows, args):
            logp = token_logprobs(prm, ids, attn, r, share_prompts=args.share_prompts)
            q_mb = implicit_rewards(padded(logp, R), ref_logp[idx], mask[idx])
            loss = prm_ce_loss(q_mb, mask[idx], outcome[idx], args.beta)
            (loss * len(idx) / len(rows)).backward()  # mean over the mini-batch's sequences
            q[idx] = q_mb.detach()
            stats["prm/loss"] += loss.item() * len(idx) / B
        grad_norm = torch.nn.utils.clip_grad_norm_(prm.parameters(), args.prm_grad_clip)
        stats["prm/grad_norm"] += scalar(grad_norm) / math.ceil(B / mini)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.prm_update == "before":
        q = implicit_rewards(batched_logprobs(prm, batch, args, {1.0})[1.0], ref_logp, mask)
    return q, stats


def update_policy(policy, opt, batch, old_logp, ref_logp, advantages, args, gen, engine_logp=None):
    """PPO-clip epochs over shuffled mini-batches (Eq. 6), with optional KL and entropy terms, and
    with --tis-cap C each token's loss weighted by min(pi_old / pi_engine, C) (truncated importance
    sampling: the engine sampled from its own numerics, bf16 or vLLM's kernels). old_logp None:
    the update is exactly on-policy (one epoch, one mini-batch), so pi_old is this forward's own
    detached log-prob and the ratio is 1 at every token. Returns (metrics, old_logp [B, R])."""
    (B, R), world, mask = batch[2].shape, distributed.world_size(), batch[2]
    mini, totals, count, grad_norms, losses = args.mini_batch_size // world, {}, 0, [], []
    on_policy, old_logp = old_logp is None, torch.zeros_like(mask) if old_logp is None else old_logp
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, generator=gen).to(mask.device)
        for lo in range(0, B, mini):
            rows = order[lo:lo + mini]
            # Each micro-batch's loss is weighted by its share of the mini-batch (sequences or
            # tokens, as agg averages), so accumulation gives exactly the mini-batch gradient.
            # Under FSDP gradients are averaged over ranks, which hold equal numbers of sequences;
            # for token-mean each rank's share of the global tokens is scaled back by world size.
            mb_tokens, mb_loss = all_reduce(mask[rows].sum(), "sum") / world, 0.0
            for idx, ids_mb, attn_mb, r in micro_batches(batch, rows, args):
                m = mask[idx]
                logp, entropy = token_logprobs(policy, ids_mb, attn_mb, r, args.temperature,
                                               with_entropy="grad" if args.entropy_coef > 0 else True,
                                               share_prompts=args.share_prompts)
                logp, entropy = padded(logp, R), padded(entropy, R)
                if on_policy:
                    old_logp[idx] = logp.detach() * m
                weights = None if engine_logp is None or args.tis_cap <= 0 else \
                    torch.exp(old_logp[idx] - engine_logp[idx]).clamp(max=args.tis_cap)
                loss, stats = ppo_clip_loss(logp, old_logp[idx], advantages[idx], m, args.clip_eps,
                                            args.loss_agg, return_stats=True, weights=weights)
                stats["entropy"] = masked_aggregate(entropy.detach(), m, "token-mean").item()
                if args.kl_coef > 0:  # k3 estimator of KL(pi || pi_ref): unbiased, always >= 0
                    log_ratio = ref_logp[idx] - logp
                    kl = masked_aggregate(torch.exp(log_ratio) - log_ratio - 1, m, args.loss_agg)
                    loss, stats["kl"] = loss + args.kl_coef * kl, kl.item()
                if args.entropy_coef > 0:
                    loss = loss - args.entropy_coef * masked_aggregate(entropy, m, args.loss_agg)
                weight = (m.sum() / mb_tokens) if args.loss_agg == "token-mean" else len(idx) / len(rows)
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
            **{f"policy/{key}": v / count for key, v in totals.items()}}, old_logp


def process_coef(args, trust, accuracy, smoothing=0.9):
    """(weight of the process return, new trust). Fixed (--process-coef), or --adaptive-process-coef:
    trust, a moving average of the PRM's held-out pairwise accuracy (from chance, 0.5), gives the
    weight coef * clip(2 trust - 1, 0, 1): nothing while the PRM is no better than a coin."""
    if not args.adaptive_process_coef:
        return args.process_reward_coef, trust
    if not math.isnan(accuracy):  # a batch without right/wrong pairs says nothing
        trust = smoothing * trust + (1 - smoothing) * accuracy
    return args.process_reward_coef * min(max(2 * trust - 1, 0.0), 1.0), trust


def prime_step(models, batch, outcome, args, state, engine_logp=None, step_ends=None, truth=None):
    """Phases 4-7 of one step on this rank's filtered batch: log-probs, PRM, advantages, policy
    update; batch-wide statistics over all ranks. engine_logp [B, R]: the engine's log-probs of
    what it sampled (stale-weights alarm, --tis-cap). step_ends [B, R]: --granularity step. truth:
    the task's (step ends, first wrong step), for prm/first_error_*. state: a TrainState.
    Returns the implicit rewards q [B, R] (None without a PRM), the advantages and the metrics."""
    policy, prm, ref, policy_opt, prm_opt = models
    mask, K, metrics = batch[2], args.samples_per_prompt, {}
    # 4. log-probs, no grad. The implicit reward compares PRM and reference at temperature 1
    # (official code); the PPO ratio and the KL term use the sampling temperature T, on both sides.
    # The policy's own pass is skipped when the update is exactly on-policy (one epoch, one
    # mini-batch): its ratio is 1, so the update's first forward gives the same log-probs.
    T, use_prm = args.temperature, prm is not None
    on_policy = args.ppo_epochs == 1 and len(mask) <= args.mini_batch_size // distributed.world_size()
    wanted = lambda *pairs: {t for t, needed in pairs if needed}
    policy_temps = wanted((T, not on_policy), (1.0, use_prm and args.reference == "policy"))
    old = batched_logprobs(policy, batch, args, policy_temps) if policy_temps else {}
    ref_temps = wanted((1.0, use_prm and args.reference == "sft"), (T, args.kl_coef > 0))
    ref_logp = batched_logprobs(ref, batch, args, ref_temps) if ref is not None else {}

    # 5. implicit process rewards and the PRM's CE update on outcome labels
    q = r = None
    if prm is not None:
        q_ref = (old if args.reference == "policy" else ref_logp)[1.0]
        q, prm_metrics = update_prm(prm, prm_opt, batch, q_ref, outcome, args)
        metrics.update(prm_metrics)
        # held out for "after" (q is read before the PRM trains on this batch); in-sample for "before"
        metrics["prm/accuracy"] = pairwise_accuracy((q * mask).sum(-1), outcome, K, all_reduce)
        if truth is not None:  # does the PRM blame the first wrong step?
            metrics["prm/first_error_hit"], metrics["prm/first_error_chance"] = first_error_hit(
                q, mask, *truth, all_reduce)
        coef, state.prm_trust = process_coef(args, state.prm_trust, metrics["prm/accuracy"])
        metrics["prm/process_coef"] = coef
        r = coef * process_rewards(q, mask, args.beta, args.granularity, args.reward_norm, all_reduce,
                                   step_ends)
        # size of the process return next to the 0/1 outcome: how much the PRM steers
        metrics["prm/return_abs"] = r.sum(-1).abs().mean().item()

    # 6. advantages: RLOO of process and outcome rewards, summed, whitened over all ranks
    ends = {"token": None, "whole": last_token_mask(mask)}.get(  # the tokens that carry process rewards
        args.granularity, None if step_ends is None else step_index(step_ends, mask)[0])
    advantages = prime_advantages(r, outcome, mask, K, args.gamma, args.rloo_variant, args.whiten, all_reduce,
                                  args.estimator, args.credit, ends)

    # 7. PPO-clip policy update
    policy_metrics, old_logp = update_policy(policy, policy_opt, batch, old.get(T), ref_logp.get(T),
                                             advantages, args, state.shuffle, engine_logp)
    metrics.update(policy_metrics)
    if engine_logp is not None:  # a jump means the engine sampled from stale weights
        gap = masked_aggregate((engine_logp - old_logp).abs(), mask, "token-mean")
        metrics["rollout/logp_gap"] = gap.item()
    return q, advantages, metrics


# ==============================================================================================
# Sampling with the online filter (Alg. 1 lines 2-5)
def sample_filtered_groups(engine, stream, tokenizer, args, rank, noise_gen):
    """Phases 1-3: sample K responses per prompt, verify, keep the groups that pass the accuracy
    filter; repeat until every rank has its quota (args.prompts_per_step / world groups), or the
    rounds run out: then every rank keeps as many groups as the rank with fewest has (equal
    batches keep FSDP's collectives in step; filter/kept_groups shows the shortfall).
    With --outcome-noise each label is flipped (o -> 1 - o, drawn from noise_gen) after it is
    counted in rollout/accuracy and before the filter: the trainer sees a contaminated verifier.
    Returns this rank's kept data.Groups and the metrics."""
    world = distributed.world_size()
    K, share = args.samples_per_prompt, args.prompts_per_step // world
    quota = share * K  # responses per rank
    prompts, responses, kept_rows, engine_logps, outcomes, metrics = [], [], [], [], [], {}
    sampled = torch.zeros(2, dtype=torch.float64)  # (sum of outcomes, count) on this rank
    generated, generate_seconds = 0, 0.0
    for rounds in range(1, args.max_filter_rounds + 1):
        # every rank reads the same global stream and keeps its slice, so streams stay in step
        rows = stream.take(args.prompts_per_step)[rank * share:(rank + 1) * share]
        if len(prompts) < quota:  # a rank with its quota only waits for the others
            p_ids, rows = [p for p in data.prompt_token_ids(tokenizer, rows) for _ in range(K)], \
                [row for row in rows for _ in range(K)]
            t_gen = time.time()
            r_ids, r_logps = engine.generate(p_ids)
            generate_seconds += time.time() - t_gen
            generated += sum(map(len, r_ids))
            texts = tokenizer.batch_decode(r_ids, skip_special_tokens=True)
            outcome, reasons = rollout.outcome_rewards(texts, rows, args.allow_unsandboxed_code)
            for reason, count in reasons.items():
                add_count(metrics, f"verifier/{reason}", count)
            sampled += torch.tensor([outcome.sum().item(), len(outcome)], dtype=torch.float64)
            if args.outcome_noise > 0:
                flip = torch.rand(len(outcome), generator=noise_gen) < args.outcome_noise
                outcome = torch.where(flip, 1 - outcome, outcome)
                add_count(metrics, "rollout/flipped_labels", int(flip.sum()))
            keep = accuracy_filter(outcome, K, args.filter_low, args.filter_high).repeat_interleave(K)
            # kept groups stay whole and contiguous: RLOO's leave-one-out baseline needs all K
            prompts += [p for p, k in zip(p_ids, keep) if k]
            responses += [r for r, k in zip(r_ids, keep) if k]
            kept_rows += [row for row, k in zip(rows, keep) if k]
            engine_logps += [lp for lp, k in zip(r_logps or [None] * len(keep), keep) if k]
            outcomes.append(outcome[keep])
        if all_reduce(torch.tensor(min(len(prompts), quota)), "min") >= quota:
            break
    n = int(all_reduce(torch.tensor(min(len(prompts), quota)), "min"))  # whole groups on every rank
    sampled = all_reduce(sampled, "sum")
    metrics.update({"rollout/accuracy": (sampled[0] / sampled[1]).item(), "filter/rounds": rounds,
                    "rollout/response_len": sum(map(len, responses[:n])) / max(n, 1),
                    "perf/rollout_tokens_per_s": generated / max(generate_seconds, 1e-9)})  # per rank
    add_count(metrics, "filter/kept_groups", n // K)
    add_count(metrics, "filter/shortfall_groups", (quota - n) // K)  # the official trainer samples on instead
    groups = data.Groups(prompts[:n], responses[:n], kept_rows[:n], engine_logps[:n], torch.cat(outcomes)[:n])
    return groups, metrics


# ==============================================================================================
# Setup and the loop (Algorithm 1)
def run_eval(engine, tokenizer, rows, args, state, step, log):
    """Evaluate the engine's policy, record it (eval.json, eval.md, tracker), return its metrics."""
    return log.evals(state.evals, step, rollout.evaluate(engine, tokenizer, rows, args.eval_samples,
                                                         args.eval_temperature, args.eval_top_p,
                                                         allow_unsandboxed=args.allow_unsandboxed_code))


def main(args: Args, given=None):
    """Algorithm 1. `given`: the flags set on the command line (see cli.resolve)."""
    from tqdm import tqdm
    args = cli.resolve(args, given)  # every flag, file and folder checked before any work
    rank, world, device = distributed.init()
    model_path, tokenizer, stream, eval_rows, data_counts = data.load_task(args, bootstrap.embedded_model)
    run_dir = checkpoint.start(args, os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    resume_from = checkpoint.checkpoints(run_dir)[-1] if args.resume else None
    if args.eval_only:  # no training: only the rollout engine is needed
        engine = rollout.make_engine(args, model_path, tokenizer, device)
        state, log = checkpoint.TrainState(stream, args.seed, rank), checkpoint.RunLog(run_dir, args)
        evaluated = run_eval(engine, tokenizer, eval_rows, args, state, 0, log)
        log.metrics({"step": 0, **evaluated})
        log.close()
        return {"engine": engine, "eval": evaluated}
    # The models before the engine: vLLM in one process starts a process group of its own, and
    # the models are sharded only when torchrun started one.
    models = setup_models(args, model_path, device, resume_from)
    engine = rollout.make_engine(args, model_path, tokenizer, device)
    engine.sync(models.policy)  # step 0 too: checks that every engine weight is loaded from the policy
    # One seed drives sampling, data order and shuffles, set after the models are built (building
    # the embedded model consumes random numbers only on its first run): a rerun with the same
    # flags reproduces every metric (tests rely on it to compare ablation switches).
    state = checkpoint.TrainState(stream, args.seed, rank)
    if resume_from:
        checkpoint.restore(resume_from, models.trained(), state, rank)
    log = checkpoint.RunLog(run_dir, args, state.step if resume_from else None)
    if not resume_from:
        evaluated = run_eval(engine, tokenizer, eval_rows, args, state, 0, log)
        log.metrics({"step": 0, **evaluated, **data_counts})
    bar = tqdm(range(state.step + 1, args.steps + 1), desc="prime", dynamic_ncols=True, disable=rank != 0)
    with checkpoint.on_interrupt(run_dir, world):
        for step in bar:
            t0 = time.time()
            # 1-3. generate K responses per prompt, verify them, keep the groups with mixed outcomes
            groups, metrics = sample_filtered_groups(engine, stream, tokenizer, args, rank, state.noise)
            outcome, metrics = groups.outcome.to(device), {"step": step, **metrics}
            metrics.update({f"data/train_{key}": n for key, n in stream.counts.items()})  # so far
            if groups.responses:  # else every group was all right or all wrong: nothing to learn this step
                batch, *extra = data.training_batch(groups, tokenizer, args, engine.pad_id, device,
                                                    with_truth=models.prm is not None)
                engine.sleep()  # its memory is the trainer's until the sync below
                # 4-7. log-probs, PRM update on outcome labels, advantages, PPO-clip policy update
                q, _, step_metrics = prime_step(models, batch, outcome, args, state, *extra)
                metrics.update(step_metrics)
                # 8. the rollout engine samples from the new policy
                engine.sync(models.policy)
            # 9. log, evaluate, save
            state.step, metrics["perf/step_seconds"] = step, time.time() - t0
            if device.type == "cuda":
                metrics["perf/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if step % args.eval_every == 0 or step == args.steps:
                metrics.update(run_eval(engine, tokenizer, eval_rows, args, state, step, log))
                if groups.responses:
                    log.samples(checkpoint.sample_records(step, tokenizer, batch, q, outcome, args.beta,
                                                          args.num_samples_logged))
            metrics = distributed.merge_metrics(distributed.gather_objects(metrics))
            log.metrics(metrics)
            bar.set_postfix(reward=f"{metrics['rollout/accuracy']:.3f}",
                            prm_acc=f"{metrics.get('prm/accuracy', float('nan')):.3f}",
                            eval=f"{state.evals[-1]['accuracy']:.3f}")
            if args.save_every and step % args.save_every == 0:
                checkpoint.save(run_dir, models.trained(), tokenizer, state)
    log.close()
    first, last = state.evals[0]["accuracy"], state.evals[-1]["accuracy"]
    if rank == 0:
        print(f"eval accuracy ({len(eval_rows)} held-out problems, see eval.md): {first:.1%} at step 0 -> "
              f"{last:.1%} at step {args.steps} ({100 * (last - first):+.1f} points); run dir: {run_dir}")
    return {**models._asdict(), "engine": engine, "eval": (first, last), "run_dir": run_dir}


if __name__ == "__main__":
    cli.run(main, Args)
