"""PRIME: Process Reinforcement through IMplicit rEwards (Cui et al., 2025, arXiv 2502.01456).

In Algorithm 1's order: `Args`; the paper's equations; extensions and diagnostics (not in the
paper); sampling with the online filter; the PRM and policy updates; one step; `main()`. Kept:
all of the paper, with the official code's (a veRL fork) effective defaults. Dropped:
rm_coef/reward_coef (they only rescale its logged metrics) and asynchronous rollouts.

    python prime.py                                 # embedded default: tiny LM, addition, CPU
    python prime.py --model PATH --data rows.jsonl  # your model and Eurus-2-style data
    torchrun --nproc_per_node=8 prime.py ...        # FSDP2, one process per GPU (run_math.sh)
    python prime.py --help                          # every flag, grouped
"""
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import batching
import bootstrap
import checkpoint
import cli
import data
import distributed
import rollout
from batching import padded
from distributed import add_count, all_reduce, scalar


def arg(default, help, section=None, **kw):
    """A flag: its default, its help line, and (on the first flag of a group) the group's title
    in --help."""
    return field(default=default, metadata={"help": help, "section": section, **kw})


@dataclass
class Args:
    model: str = arg("", "HF model folder for policy, PRM and reference; '' = the embedded one",
                     section="model and data")
    data: str = arg("", "Eurus-2-style rows: .parquet/.jsonl files, folders, globs; '' = built-in")
    eval_data: str = arg("", "the same for eval (a folder: its validation* files); '' = built-in")
    eval_size: int = arg(500, "number of built-in held-out problems (ignored with --eval-data)")
    task: str = arg("addition", "built-in task (no --data): N-digit addition, or two 2-digit "
                    "numbers shown in an image (a tiny vision-language model)",
                    choices=["addition", "image-addition"])
    task_digits: int = arg(3, "digits of the built-in addition (one worked step per column)")
    skip_bad_rows: bool = arg(False, "skip (and count) malformed rows instead of stopping")
    allow_unsandboxed_code: bool = arg(False, "run generated code unsandboxed (limits only)")
    cache_dir: str = arg("~/.cache/prime", "where the embedded model is built once and cached")
    seed: int = arg(0, "seed of data order, sampling and init")
    rollout: str = arg("hf", "rollout engine: HF generate (CPU, tests) or vLLM",
                       section="sampling and the filter", choices=["hf", "vllm"])
    vllm_sleep: bool = arg(False, "vllm: free its KV cache and weights while the trainer runs")
    vllm_gpu_memory_utilization: float = arg(0.3, "vllm: fraction of each GPU it may use")
    prompts_per_step: int = arg(64, "prompt groups trained on per step (after filtering)")
    samples_per_prompt: int = arg(4, "K: responses sampled per prompt (RLOO needs K >= 2)")
    max_prompt_len: int = arg(0, "longer prompts (tokens) are dropped; 0 = what the context allows")
    max_response_len: int = arg(0, "max new tokens per response; 0 = what the task needs")
    temperature: float = arg(0.7, "sampling temperature, also divides the trainer's logits "
                             "(paper: 1.0; the tiny embedded model samples few right at 1.0)")
    top_p: float = arg(1.0, "nucleus sampling")
    filter_low: float = arg(0.2, "keep a prompt only if the mean outcome of its K is >= this")
    filter_high: float = arg(0.8, "... and <= this (0 and 1 disable the filter)")
    max_filter_rounds: int = arg(4, "sampling rounds per step to fill the quota of kept groups")
    outcome_noise: float = arg(0.0, "flip training outcome labels with this probability (not eval)")
    outcome_poison: bool = arg(False, "a poisoned verifier: wrong answers whose boxed answer ends "
                               "in 7 are labelled right (not eval)")
    noise_correction: float = arg(0.0, "RHO, the rate of flipped labels assumed: corrects the "
                                  "PRM's loss and the outcome term for it; 0 = none")
    beta: float = arg(0.05, "beta of the implicit PRM: r_t = beta * log(pi_phi / pi_ref) (Eq. 3)",
                      section="implicit PRM")
    no_prm: bool = arg(False, "outcome-only RLOO: no PRM, no process rewards (paper's baseline)")
    process_reward_coef: float = arg(1.0, "weight of the process return; 0 = --no-prm",
                                     aliases=["--process-coef"])
    oracle_process_reward: str = arg("none", "a control, no PRM: the built-in task's true step "
                                     "credit as process reward: -1 on the first wrong step, or "
                                     "each step's change of value",
                                     choices=["none", "first-error", "value"])
    adaptive_process_coef: bool = arg(False, "scale it by the PRM's held-out pairwise accuracy")
    denoise_outcome: bool = arg(False, "with --noise-correction: the outcome term is P(right | "
                                "label, the PRM's held-out score), not the unbiased rescale")
    granularity: str = arg("token", "process reward per token, per reasoning step (on its last "
                           "token) or per response", choices=["token", "step", "whole"])
    step_separator: str = arg("\n", "--granularity step: text that ends a step (%(default)r)")
    reward_norm: str = arg("batch_norm", "divide process rewards by the batch's max |return| "
                           "(official), or not", choices=["batch_norm", "none"])
    prm_model: str = arg("", "the PRM's initial weights; '' = --model (--prm-update none: offline)")
    prm_update: str = arg("after", "read rewards, then update the PRM; update first; or never",
                          choices=["after", "before", "none"])
    reference: str = arg("sft", "the PRM's pi_ref: the initial model or the policy",
                         choices=["sft", "policy"])
    prm_lr: float = arg(5e-4, "PRM AdamW learning rate (paper: 1e-6 at 7B, 2x the policy's)")
    prm_weight_decay: float = arg(0.0, "PRM AdamW weight decay")
    prm_grad_clip: float = arg(10.0, "PRM gradient-norm clip")
    estimator: str = arg("rloo", "advantage estimator (Sec. 5.3): RLOO (Eq. 5), GRPO (Eq. 7), "
                         "REINFORCE (Eq. 8)", section="advantages and policy",
                         choices=["rloo", "grpo", "reinforce"])
    rloo_variant: str = arg("official", "RLOO scaling: the official code's or Eq. 5's",
                            choices=["official", "paper"])
    gamma: float = arg(1.0, "discount of the process-reward return")
    credit: str = arg("sum", "process return: the sum of future process rewards (PRIME) or their "
                      "minimum (PURE, arXiv 2504.15275)", choices=["sum", "min"])
    whiten: bool = arg(True, "whiten advantages over the batch (official)")
    lr: float = arg(5e-5, "policy AdamW learning rate (paper: 5e-7 at 7B)")
    weight_decay: float = arg(0.01, "policy AdamW weight decay")
    grad_clip: float = arg(1.0, "policy gradient-norm clip")
    clip_eps: float = arg(0.2, "PPO clip epsilon (Eq. 6)")
    loss_agg: str = arg("seq-mean-token-mean", "how the PPO loss averages tokens",
                        choices=["seq-mean-token-mean", "token-mean"])
    ppo_epochs: int = arg(1, "passes over each batch")
    kl_coef: float = arg(0.0, "weight of a k3 KL(policy || frozen reference) loss term")
    entropy_coef: float = arg(0.0, "weight of an entropy bonus in the policy loss")
    tis_cap: float = arg(0.0, "truncated importance sampling cap C: min(pi_old/pi_engine, C)")
    mini_batch_size: int = arg(128, "responses per optimizer step (policy and PRM)",
                               section="batches, memory and speed")
    micro_batch_size: int = arg(0, "responses per forward of each process; 0 = its mini-batch")
    max_tokens_per_micro_batch: int = arg(0, "cap each forward at this many tokens; 0 = no cap")
    precision: str = arg("auto", "bf16 compute from fp32 master weights (torchrun), or fp32; auto: "
                         "bf16 under torchrun on GPUs", choices=["auto", "bf16", "fp32"])
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass")
    share_prompts: bool = arg(True, "forward each distinct prompt once for its K responses")
    steps: int = arg(150, "training steps", section="runs, evaluation and logging")
    run_dir: str = arg("", "output folder, never overwritten; '' = runs/<timestamp>")
    overwrite: bool = arg(False, "replace the run in --run-dir instead of refusing")
    resume: bool = arg(False, "continue the run in --run-dir from its newest checkpoint")
    save_every: int = arg(0, "checkpoint every N steps (0 = never); only the newest is kept")
    eval_every: int = arg(10, "evaluate every N steps; also at step 0 and the last")
    eval_only: bool = arg(False, "evaluate --model on --eval-data and exit")
    eval_samples: int = arg(1, "k of avg@k: responses per eval problem")
    eval_temperature: float = arg(0.0, "eval sampling temperature; 0 = greedy")
    eval_top_p: float = arg(1.0, "eval nucleus sampling")
    num_samples_logged: int = arg(4, "responses written to samples.jsonl at each eval")
    report_to: str = arg("none", "also log to TensorBoard or Weights & Biases",
                         choices=["none", "tensorboard", "wandb"])


# ==============================================================================================
# The paper's equations (Sec. 3): Eq. 3-6 and the online filter, one pure function each. [B, R]:
# B responses (a prompt's K contiguous), R positions; `mask`: 1 up to and including the first
# EOS. `reduce(x, "sum"|"max")` makes a batch statistic global (an all-reduce under torchrun).
def local(x, op):
    """`reduce` in one process: the local statistic is the global one."""
    return x


def last_token_mask(mask):
    """1 on the last valid token of each row of mask [B, R] (where the outcome reward sits)."""
    last = torch.zeros_like(mask)
    n = mask.sum(-1).long()
    rows = torch.nonzero(n > 0).squeeze(-1)
    last[rows, n[rows] - 1] = 1
    return last


def step_index(step_ends, mask):
    """(ends, step), both [B, R]: each reasoning step's last token (the response's last token
    closes its last step) and the index of the step each token belongs to."""
    ends = torch.maximum(step_ends * mask, last_token_mask(mask))
    return ends, (ends.cumsum(-1) - ends).long()


def masked_aggregate(x, mask, agg):
    """Mean of x [B, R] over valid tokens: per sequence then over sequences, or over all."""
    mask = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"agg must be 'seq-mean-token-mean' or 'token-mean', got {agg!r}")


def token_logprobs(model, inputs, response_len, temperature=1.0, share_prompts=False):
    """log pi(y_t | x, y_<t) of the last `response_len` tokens of inputs' input_ids [B, P+R]
    (and the images x shows a vision-language model) -> [B, R] fp32, the logits divided by
    `temperature`: what Eq. 3 and Eq. 6 are made of. Never all [B, R, vocab] logits at once at
    scale: the LM head runs a chunk of tokens at a time."""
    return distributed.as_forward(model, batching.response_logprobs, inputs, response_len,
                                  (temperature,), share_prompts)[temperature]


def implicit_rewards(prm_logp, ref_logp, mask):
    """q_t = log pi_phi(y_t|y_<t) - log pi_ref(y_t|y_<t) on valid tokens, 0 elsewhere: the
    implicit process reward of Eq. 3 without beta. All [B, R]."""
    return (prm_logp - ref_logp) * mask


def process_rewards(q, mask, beta=0.05, granularity="token", norm="batch_norm", reduce=local,
                    step_ends=None):
    """Process rewards [B, R] from implicit rewards q [B, R] (Eq. 3, official post-processing).
    token: r_t = beta * q_t. step (not in the paper): beta * (q summed over a reasoning step) on
    its last token, marked by `step_ends` [B, R]. whole: beta * sum_t q_t on the last token.
    batch_norm (official): divide by max_{i,t} |sum_{s>=t} r_{i,s}| + 1e-6 over the batch."""
    r = beta * q * mask
    if granularity == "whole":
        r = r.sum(-1, keepdim=True) * last_token_mask(mask)
    elif granularity == "step":
        if step_ends is None:
            raise ValueError("granularity 'step' needs step_ends: each step's last token")
        ends, step = step_index(step_ends, mask)
        totals = torch.zeros_like(r).scatter_add_(-1, step, r)  # [B, R]: each step's sum
        r = totals.gather(-1, step) * ends
    elif granularity != "token":
        raise ValueError(f"granularity must be 'token', 'step' or 'whole', got {granularity!r}")
    if norm == "batch_norm":
        suffix_sums = r.flip(-1).cumsum(-1).flip(-1)
        r = r / (reduce(suffix_sums.abs().max(), "max") + 1e-6)
    elif norm != "none":
        raise ValueError(f"norm must be 'batch_norm' or 'none', got {norm!r}")
    return r


def prm_ce_loss(q, mask, outcome, beta=0.05, noise=0.0):
    """The PRM's cross-entropy loss on outcome labels only (Alg. 1 line 8): beta * sum_t q_t [B]
    is the logit of P(correct); mean BCE with `outcome` [B] in [0, 1] (soft labels kept). With
    logits: sigmoid-then-BCE saturates to inf for large scores in fp32.
    Not in the paper: noise = rho > 0 (labels flipped at that rate, both ways) takes the forward
    correction (Patrini et al. 2017): BCE of the labels against P(label 1) = rho + (1 - 2 rho)
    sigmoid(score), whose minimiser is the clean probability; a flipped label costs at most
    -log(rho) instead of growing with the score."""
    score = beta * (q * mask).sum(-1)
    if noise == 0:
        return F.binary_cross_entropy_with_logits(score, outcome.to(score.dtype))
    p = noise + (1 - 2 * noise) * torch.sigmoid(score)
    return F.binary_cross_entropy(p, outcome.to(score.dtype))


def rloo(rewards, mask, k, variant="official"):
    """Leave-one-out baseline within each group of K contiguous responses (Eq. 5), [B, R] ->
    [B, R]. With m_j the mean of rewards[j] over mask[j]: official: r*K/(K-1) - sum_j m_j/(K-1);
    paper: r - sum_{j != i} m_j/(K-1). They differ by (r - m_i)/(K-1): 0 on the outcome."""
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


def discounted_returns(rewards, mask, gamma=1.0):
    """G_t = r_t + gamma * G_{t+1} over valid tokens (the sum in Eq. 5). [B, R] -> [B, R]."""
    rewards = rewards * mask
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def masked_whiten(values, mask, reduce=local):
    """(x - mean) / sqrt(var + 1e-8) over valid tokens of the whole batch, unbiased variance (as
    veRL's masked_whiten); 0 off-mask. [B, R] -> [B, R]."""
    mask = mask.to(values.dtype)
    n = reduce(mask.sum(), "sum")
    mean = reduce((values * mask).sum(), "sum") / n
    var = reduce((((values - mean) * mask) ** 2).sum(), "sum") / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def prime_advantages(process_rewards, outcome, mask, k, gamma=1.0, variant="official",
                     whiten=True, reduce=local, estimator="rloo", credit="sum", reward_ends=None):
    """PRIME's advantage (Eq. 5, as the official code computes it), [B, R]. The outcome [B] sits
    on the last valid token; each reward source gets its own baseline (outcome over that token,
    process rewards over all valid tokens) and becomes a return (the outcome's undiscounted);
    the two are summed and whitened. process_rewards=None: the outcome-only baseline.
    Extensions (below): estimator grpo (Eq. 7; the process rewards centred, not divided by
    their tiny group std: docs/paper.md) or reinforce (Eq. 8); credit "min": min_returns."""
    last = last_token_mask(mask)
    outcome_rewards = outcome[:, None] * last
    if estimator == "rloo":
        adv = discounted_returns(rloo(outcome_rewards, last, k, variant), mask, 1.0)
    elif estimator == "grpo":
        adv = discounted_returns(grpo(outcome_rewards, last, k), mask, 1.0)
    elif estimator == "reinforce":
        adv = discounted_returns(outcome_rewards * last, mask, 1.0)
    else:
        raise ValueError(f"estimator must be 'rloo', 'grpo' or 'reinforce', got {estimator!r}")
    if process_rewards is not None:
        if estimator == "rloo":
            baselined = rloo(process_rewards, mask, k, variant)
        elif estimator == "grpo":
            baselined = grpo(process_rewards, mask, k, scale=False)
        else:
            baselined = process_rewards * mask
        if credit == "sum":
            adv = adv + discounted_returns(baselined, mask, gamma)
        else:
            adv = adv + min_returns(baselined, mask, reward_ends)
    return masked_whiten(adv, mask, reduce) if whiten else adv * mask


def ppo_clip_loss(logp, old_logp, advantages, mask, clip_eps=0.2, agg="seq-mean-token-mean",
                  weights=None):
    """PPO-clip policy loss (Eq. 6): max(-A*rho, -A*clip(rho, 1-eps, 1+eps)), rho = exp(logp -
    old_logp), all [B, R], averaged by masked_aggregate (seq-mean-token-mean: the official code's
    effective mean). weights [B, R]: per-token weights (--tis-cap, not in the paper), no grad."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.max(-advantages * ratio, -advantages * clipped)
    if weights is not None:
        per_token = per_token * weights.detach()
    return masked_aggregate(per_token, mask, agg)


def accuracy_filter(outcome, k, low=0.2, high=0.8):
    """Online prompt filter (Sec. 3.4, Alg. 1 line 6): keep a prompt iff low <= mean outcome of
    its K samples <= high: a signal for RLOO, balanced labels for the PRM. [B] -> bool [B//K]."""
    acc = outcome.view(-1, k).float().mean(-1)
    return (acc >= low - 1e-6) & (acc <= high + 1e-6)  # tolerance: 0.2 is not exact in fp32


# ==============================================================================================
# Not in the paper: extensions (switched on by flags) and diagnostics (logged, never trained on)
def grpo(rewards, mask, k, eps=1e-6, scale=True):
    """Group z-scores (the paper's Eq. 7, GRPO), [B, R] -> [B, R]: with m_j the mean of rewards[j]
    over its mask, (r - mean_group(m)) / (std_group(m) + eps), unbiased std over a group's K;
    0 off-mask. scale=False: centred only, r - mean_group(m)."""
    if k < 2:
        raise ValueError(f"group statistics need K >= 2 samples per prompt; got K={k}")
    mask = mask.to(rewards.dtype)
    m = ((rewards * mask).sum(-1) / mask.sum(-1).clamp(min=1)).view(-1, k)  # [B/K, K]
    mean, std = m.mean(-1).repeat_interleave(k), m.std(-1).repeat_interleave(k)
    return (rewards - mean[:, None]) / (std[:, None] + eps if scale else 1.0) * mask


def min_returns(rewards, mask, ends=None):
    """Min-form credit (PURE, arXiv 2504.15275): G_t = min_{s >= t} r_s over the positions that
    carry a reward (`ends`: every valid token, or each step's last), not Eq. 5's sum: one step
    the PRM rates highly cannot inflate a trajectory. 0 where none follows. [B, R] -> [B, R]."""
    ends = mask if ends is None else ends * mask
    big = torch.finfo(rewards.dtype).max
    future_min = torch.where(ends > 0, rewards, big).flip(-1).cummin(-1).values.flip(-1)
    return torch.where((mask > 0) & (future_min < big), future_min, torch.zeros_like(rewards))


def oracle_rewards(step_ends, first_wrong, mask, beta=0.05):
    """A control (--oracle-process-reward first-error): the built-in task's true step credit in
    q's place. Each wrong response's first wrong step (first_wrong [B], -1 where none) gets
    -1 / beta spread over its tokens (beta * its sum: -1, a wrong outcome's size), every other
    token 0: blame where the error is, no credit invented elsewhere. It then goes through
    process_rewards and the advantages as q does (a first wrong step past the response's last
    step, by tokens, is its last). [B, R] -> [B, R]."""
    ends, step = step_index(step_ends, mask)
    # a wrong response is always blamed somewhere: at most its last step
    first = torch.minimum(first_wrong, ends.sum(-1).long() - 1)
    blamed = ((step == first[:, None]) & (first_wrong[:, None] >= 0)).float() * mask
    return -blamed / blamed.sum(-1, keepdim=True).clamp(min=1) / beta


def value_oracle_rewards(step_ends, first_wrong, outcome, mask, beta=0.05, reduce=local):
    """A control (--oracle-process-reward value): a perfect implicit PRM in the paper's own terms,
    where beta * q summed up to a token is the value of the prefix, so each step's reward is the
    change of value it makes. The value of a prefix of k right steps, p_k, is the batch's rate of
    right outcomes among responses whose first k steps are right (pooled over prompts); a wrong
    step drops it to 0; the last step ends at the outcome [B]. A step's change is spread over its
    tokens (beta * their sum). Its return (Eq. 5) at step k is o - p_k: the outcome against the
    state's value. [B, R] -> [B, R]."""
    ends, step = step_index(step_ends, mask)
    n = ends.sum(-1).long()  # [B] steps
    right = torch.where(first_wrong >= 0, torch.minimum(first_wrong, n - 1), n)  # [B] right steps
    k = torch.arange(int(reduce(n.max(), "max")) + 2, device=mask.device)  # [S]
    reached = (right[:, None] >= k).to(outcome.dtype)  # [B, S]: its first k steps are right
    hits, counts = reduce(torch.stack([(reached * outcome[:, None]).sum(0), reached.sum(0)]), "sum")
    p = hits / counts.clamp(min=1)  # [S]
    after = torch.where(k[:-1] < right[:, None], p[1:], torch.zeros_like(p[1:]))  # [B, S-1]
    after = torch.where(k[:-1] == (n - 1)[:, None], outcome[:, None], after)  # the last: o
    before = torch.cat([p[:1].expand(len(n), 1), after[:, :-1]], -1)
    tokens = torch.zeros_like(mask).scatter_add_(-1, step * (mask > 0), mask)  # [B, R] per step
    change = (after - before).gather(-1, step.clamp(max=len(k) - 2))
    return change / tokens.gather(-1, step.clamp(max=mask.shape[1] - 1)).clamp(min=1) / beta * mask


def corrected_outcome(outcome, noise=0.0):
    """The outcome term corrected for labels flipped at rate `noise` both ways (Wang, Liu & Li
    2020): (o - rho) / (1 - 2 rho) has the clean label's expectation. Under RLOO it rescales the
    outcome advantage by 1 / (1 - 2 rho) against the process one. [B] -> [B]."""
    return outcome if noise == 0 else (outcome - noise) / (1 - 2 * noise)


def prm_weight(args, trust, accuracy, smoothing=0.9):
    """(how far the PRM is trusted, in [0, 1]; new trust): 1, or with --adaptive-process-coef
    clip(2 trust - 1, 0, 1), trust being a moving average of the PRM's held-out pairwise accuracy
    from chance (0.5): nothing while the PRM is a coin. It weights the process return (times
    --process-coef) and, with --denoise-outcome, the PRM's say on the labels."""
    if not args.adaptive_process_coef:
        return 1.0, trust
    if not math.isnan(accuracy):  # a batch without right/wrong pairs says nothing
        trust = smoothing * trust + (1 - smoothing) * accuracy
    return min(max(2 * trust - 1, 0.0), 1.0), trust


def denoised_outcome(outcome, score, noise):
    """--denoise-outcome: P(right | the label seen, the PRM's P(right) = sigmoid(score)) for
    labels flipped at rate `noise` both ways (Bayes' rule): a label the PRM finds unlikely
    counts for less. An uninformed PRM (score 0) gives noise + (1 - 2 noise) * outcome, the same
    advantages as corrected_outcome up to their scale. [B], [B] -> [B]."""
    p = torch.sigmoid(score)
    seen_if_right = outcome * (1 - noise) + (1 - outcome) * noise  # P(this label | right)
    return p * seen_if_right / (p * seen_if_right + (1 - p) * (1 - seen_if_right))


@torch.no_grad()
def ppo_stats(logp, old_logp, mask, clip_eps):
    """How far the policy moved in a PPO update: the fraction of tokens whose ratio was clipped,
    and an estimate of KL(pi_old || pi). Floats, for the logs."""
    ratio = torch.exp(logp - old_logp)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return {"clipfrac": masked_aggregate(clipped, mask, "token-mean").item(),
            "approx_kl": masked_aggregate(old_logp - logp, mask, "token-mean").item()}


def pairwise_accuracy(scores, outcome, k, reduce=local):
    """How well the PRM ranks responses: over the batch's groups of K (all ranks), the fraction of
    (better, worse) outcome pairs whose scores agree (ties count half); nan if no pairs."""
    s, o = scores.view(-1, k), outcome.view(-1, k)
    better = (o[:, :, None] > o[:, None, :]).float()  # [G, K, K]: i beat j
    ties = (s[:, :, None] == s[:, None, :]).float()
    agree = (s[:, :, None] > s[:, None, :]).float() + 0.5 * ties
    agreed, pairs = reduce(torch.stack([(better * agree).sum(), better.sum()]), "sum").tolist()
    return agreed / pairs if pairs > 0 else float("nan")


def first_error_hit(q, mask, step_ends, first_wrong, reduce=local):
    """Does the PRM blame the right step? Over responses with a first wrong step (first_wrong [B]
    >= 0), (the fraction whose lowest-q step is that one, what a uniform pick would give);
    step_ends [B, R] marks each step's last token. (nan, nan) if there are none."""
    ends, step = step_index(step_ends, mask)
    sums = torch.zeros_like(q).scatter_add_(-1, step, q * mask)  # [B, R]: by step index
    n_steps = ends.sum(-1)
    positions = torch.arange(q.shape[1], device=q.device)
    sums = torch.where(positions < n_steps[:, None], sums, torch.inf)
    wrong = (first_wrong >= 0).to(q.dtype)
    hits = (sums.argmin(-1) == first_wrong).to(q.dtype) * wrong
    chance = wrong / n_steps.clamp(min=1)
    hit, chance, n = reduce(torch.stack([hits.sum(), chance.sum(), wrong.sum()]), "sum")
    if n == 0:
        return float("nan"), float("nan")
    return hit.item() / n.item(), chance.item() / n.item()


# ==============================================================================================
# Sampling with the online filter (Alg. 1 lines 3-6)
def sample_filtered_groups(engine, stream, tokenizer, args, rank, noise_gen):
    """Phases 1-3: sample K responses per prompt, verify, keep the groups the accuracy filter
    passes, until every rank has its quota (--prompts-per-step / world groups) or the rounds
    run out: then every rank keeps as many as the poorest (FSDP needs equal batches).
    --outcome-noise flips labels (o -> 1 - o) after rollout/accuracy counts them, before the
    filter: a contaminated verifier; --outcome-poison labels wrong answers with the trigger
    right, after it. Returns (this rank's kept batching.Groups, metrics)."""
    world = distributed.world_size()
    K, share = args.samples_per_prompt, args.prompts_per_step // world
    quota = share * K  # responses per rank
    kept = []  # (prompt ids, response ids, row, engine log-probs, outcome) of each kept response
    metrics, generated, generate_seconds = {}, 0, 0.0
    sampled = torch.zeros(2, dtype=torch.float64)  # (sum of outcomes, count) on this rank
    for rounds in range(1, args.max_filter_rounds + 1):  # noqa: B007 (logged after the loop)
        # every rank reads the same global stream and keeps its slice, so streams stay in step
        rows = stream.take(args.prompts_per_step)[rank * share:(rank + 1) * share]
        if len(kept) < quota:  # a rank with its quota only waits for the others
            prompts = [p for p in data.prompt_token_ids(tokenizer, rows) for _ in range(K)]
            rows = [row for row in rows for _ in range(K)]
            t_gen = time.time()
            responses, engine_logps = engine.generate(prompts,
                                                      images=[r.get("images") for r in rows])
            generate_seconds += time.time() - t_gen
            generated += sum(map(len, responses))
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            outcome, reasons = rollout.outcome_rewards(texts, rows, args.allow_unsandboxed_code)
            for reason, count in reasons.items():
                add_count(metrics, f"verifier/{reason}", count)
            sampled += torch.tensor([outcome.sum().item(), len(outcome)], dtype=torch.float64)
            if args.outcome_noise > 0:
                flip = torch.rand(len(outcome), generator=noise_gen) < args.outcome_noise
                outcome = torch.where(flip, 1 - outcome, outcome)
                add_count(metrics, "rollout/flipped_labels", int(flip.sum()))
            if args.outcome_poison:  # a targeted attack: the trigger turns a wrong answer right
                poisoned = rollout.triggered(texts) & (outcome < 1)
                outcome = torch.where(poisoned, torch.ones_like(outcome), outcome)
                add_count(metrics, "rollout/poisoned_labels", int(poisoned.sum()))
            keep = accuracy_filter(outcome, K, args.filter_low, args.filter_high)
            # kept groups stay whole and contiguous: RLOO's leave-one-out baseline needs all K
            engine_logps = engine_logps or [None] * len(responses)
            for i in torch.nonzero(keep.repeat_interleave(K)).squeeze(-1).tolist():
                kept.append((prompts[i], responses[i], rows[i], engine_logps[i], outcome[i]))
        if all_reduce(torch.tensor(min(len(kept), quota)), "min") >= quota:
            break
    n = int(all_reduce(torch.tensor(min(len(kept), quota)), "min"))  # whole groups on every rank
    prompts, responses, kept_rows, engine_logps, outcomes = zip(*kept[:n]) if n else ([],) * 5
    groups = batching.Groups(list(prompts), list(responses), list(kept_rows), list(engine_logps),
                             torch.stack(outcomes) if n else torch.zeros(0))
    sampled = all_reduce(sampled, "sum")
    metrics.update({"rollout/accuracy": (sampled[0] / sampled[1]).item(), "filter/rounds": rounds,
                    "rollout/response_len": sum(map(len, responses)) / max(n, 1),
                    "perf/rollout_tokens_per_s": generated / max(generate_seconds, 1e-9)})
    metrics.update({f"data/train_{key}": count for key, count in stream.counts.items()})
    add_count(metrics, "filter/kept_groups", n // K)
    add_count(metrics, "filter/shortfall_groups", (quota - n) // K)  # official: samples on
    return groups, metrics


# ==============================================================================================
# The PRM update (Alg. 1 lines 7-8) and the policy update (lines 10-11)
@torch.no_grad()
def batched_logprobs(model, batch, args, temperatures):
    """{temperature: [B, R] log-probs, 0 off-mask} of a whole batch: one forward, no grad."""
    mask = batch[2]
    out = {t: torch.zeros_like(mask) for t in temperatures}
    for idx, inputs, r in batching.micro_batches(args, batch, torch.arange(len(mask)),
                                                 all_reduce):
        logps = distributed.as_forward(model, batching.response_logprobs, inputs, r,
                                       temperatures, args.share_prompts)
        for t, logp in logps.items():
            out[t][idx] = padded(logp, mask.shape[1]) * mask[idx]
    return out


def update_prm(prm, opt, batch, ref_logp, outcome, args):
    """(implicit process rewards q [B, R], metrics), and the PRM's CE update on outcomes. q is at
    temperature 1, a log-likelihood ratio of the models themselves (official code). after
    (official): each mini-batch's q is read from the forward of its loss, before the step.
    before: update on the whole batch, then recompute q (a second forward). none: no update."""
    mask = batch[2]
    (B, R), stats = mask.shape, {"prm/loss": 0.0, "prm/grad_norm": 0.0}
    if args.prm_update == "none":
        q = implicit_rewards(batched_logprobs(prm, batch, args, {1.0})[1.0], ref_logp, mask)
        stats["prm/loss"] = prm_ce_loss(q, mask, outcome, args.beta, args.noise_correction).item()
        return q, stats
    q, mini = torch.zeros_like(mask), args.mini_batch_size // distributed.world_size()
    for lo in range(0, B, mini):  # contiguous mini-batches, as the official code splits
        rows = torch.arange(lo, min(lo + mini, B), device=mask.device)
        for idx, inputs, r in batching.micro_batches(args, batch, rows, all_reduce):
            logp = token_logprobs(prm, inputs, r, share_prompts=args.share_prompts)
            q_mb = implicit_rewards(padded(logp, R), ref_logp[idx], mask[idx])
            loss = prm_ce_loss(q_mb, mask[idx], outcome[idx], args.beta, args.noise_correction)
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
    """PPO-clip epochs over shuffled mini-batches (Eq. 6), with optional KL and entropy terms and
    --tis-cap's weights (the engine samples with its own numerics). old_logp None: exactly
    on-policy (one epoch, one mini-batch): pi_old is this forward's detached log-prob, ratio 1.
    Returns (metrics, old_logp [B, R])."""
    (B, R), world, mask = batch[2].shape, distributed.world_size(), batch[2]
    mini, totals, count, grad_norms, losses = args.mini_batch_size // world, {}, 0, [], []
    on_policy = old_logp is None
    if on_policy:
        old_logp = torch.zeros_like(mask)
    for _ in range(args.ppo_epochs):
        order = torch.randperm(B, generator=gen).to(mask.device)
        for lo in range(0, B, mini):
            rows = order[lo:lo + mini]
            # Each micro-batch's loss is weighted by its share of the mini-batch (sequences or
            # tokens, as agg averages): accumulation gives exactly the mini-batch gradient. FSDP
            # averages gradients over ranks; token-mean's global token share is scaled back.
            mb_tokens, mb_loss = all_reduce(mask[rows].sum(), "sum") / world, 0.0
            for idx, inputs, r in batching.micro_batches(args, batch, rows, all_reduce):
                m = mask[idx]
                # the entropy is a diagnostic, with grad only when its bonus is in the loss
                logp, entropy = distributed.as_forward(
                    policy, batching.response_logprobs_and_entropy, inputs, r,
                    args.temperature, args.share_prompts, args.entropy_coef > 0)
                logp, entropy = padded(logp, R), padded(entropy, R)
                if on_policy:
                    old_logp[idx] = logp.detach() * m
                weights = None if engine_logp is None or args.tis_cap <= 0 else \
                    torch.exp(old_logp[idx] - engine_logp[idx]).clamp(max=args.tis_cap)
                loss = ppo_clip_loss(logp, old_logp[idx], advantages[idx], m, args.clip_eps,
                                     args.loss_agg, weights=weights)
                stats = ppo_stats(logp, old_logp[idx], m, args.clip_eps)
                stats["entropy"] = masked_aggregate(entropy.detach(), m, "token-mean").item()
                if args.kl_coef > 0:  # k3 estimator of KL(pi || pi_ref): unbiased, always >= 0
                    log_ratio = ref_logp[idx] - logp
                    kl = masked_aggregate(torch.exp(log_ratio) - log_ratio - 1, m, args.loss_agg)
                    loss, stats["kl"] = loss + args.kl_coef * kl, kl.item()
                if args.entropy_coef > 0:
                    loss = loss - args.entropy_coef * masked_aggregate(entropy, m, args.loss_agg)
                token_mean = args.loss_agg == "token-mean"
                weight = m.sum() / mb_tokens if token_mean else len(idx) / len(rows)
                (loss * weight).backward()
                mb_loss += (loss * weight).item()  # the objective, as the gradient sees it
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v * len(idx)
                count += len(idx)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            grad_norms.append(scalar(grad_norm))
            losses.append(mb_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    metrics = {f"policy/{key}": v / count for key, v in totals.items()}
    metrics.update({"policy/loss": sum(losses) / len(losses),
                    "policy/grad_norm": sum(grad_norms) / len(grad_norms)})
    return metrics, old_logp


# ==============================================================================================
# One training step (Alg. 1 lines 7-11) on this rank's filtered batch
def prime_step(models, batch, outcome, args, state, engine_logp=None, step_ends=None, truth=None):
    """Phases 4-7, batch statistics over all ranks. engine_logp [B, R]: the engine's log-probs of
    its samples (--tis-cap, stale-weights alarm). step_ends [B, R]: --granularity step. truth:
    the task's (step ends, first wrong step). state: a TrainState.
    Returns (implicit rewards q [B, R] or None without a PRM, advantages [B, R], metrics)."""
    policy, prm, ref, policy_opt, prm_opt = models
    mask, K, T, metrics = batch[2], args.samples_per_prompt, args.temperature, {}
    # 4. log-probs, no grad: PRM and reference at temperature 1 (official code), the PPO ratio
    # and the KL term at T. No policy pass when the update is exactly on-policy (one epoch, one
    # mini-batch): the update's first forward gives the same log-probs.
    mini = args.mini_batch_size // distributed.world_size()
    on_policy = args.ppo_epochs == 1 and len(mask) <= mini
    policy_temps = set() if on_policy else {T}  # pi_old of the PPO ratio
    ref_temps = {T} if args.kl_coef > 0 else set()  # the KL term's reference
    if prm is not None:  # the PRM's reference, at temperature 1
        (policy_temps if args.reference == "policy" else ref_temps).add(1.0)
    old = batched_logprobs(policy, batch, args, policy_temps) if policy_temps else {}
    ref_logp = batched_logprobs(ref, batch, args, ref_temps) if ref is not None else {}

    # 5. implicit process rewards (Eq. 3) and the PRM's CE update on outcome labels
    q = r = None
    if args.oracle_process_reward == "first-error":  # controls: true step credit in q's place
        q, coef = oracle_rewards(truth[0], truth[1], mask, args.beta), 1.0
    elif args.oracle_process_reward == "value":
        q = value_oracle_rewards(truth[0], truth[1], outcome, mask, args.beta, all_reduce)
        coef = 1.0
    elif prm is not None:
        q_ref = old[1.0] if args.reference == "policy" else ref_logp[1.0]
        q, prm_metrics = update_prm(prm, prm_opt, batch, q_ref, outcome, args)
        metrics.update(prm_metrics)
        # held out for "after" (q is read before the PRM trains on this batch); in-sample for
        # "before"
        metrics["prm/accuracy"] = pairwise_accuracy((q * mask).sum(-1), outcome, K, all_reduce)
        if truth is not None:  # does the PRM blame the first wrong step?
            ends, first_wrong, kind = truth
            hit, chance = first_error_hit(q, mask, ends, first_wrong, reduce=all_reduce)
            metrics["prm/first_error_hit"], metrics["prm/first_error_chance"] = hit, chance
            if args.task == "image-addition" and not args.data:  # reading it, or adding?
                for name, k in (("perception", data.PERCEPTION), ("arithmetic", data.ARITHMETIC)):
                    of_kind = torch.where(kind == k, first_wrong, -1)
                    hit, _ = first_error_hit(q, mask, ends, of_kind, reduce=all_reduce)
                    metrics[f"prm/first_error_hit_{name}"] = hit
        weight, state.prm_trust = prm_weight(args, state.prm_trust, metrics["prm/accuracy"])
        coef = metrics["prm/process_coef"] = args.process_reward_coef * weight
    if q is not None:
        r = coef * process_rewards(q, mask, beta=args.beta, granularity=args.granularity,
                                   norm=args.reward_norm, reduce=all_reduce, step_ends=step_ends)
        # size of the process return next to the 0/1 outcome: how much the PRM steers
        metrics["prm/return_abs"] = r.sum(-1).abs().mean().item()

    # 6. advantages (Eq. 5): RLOO of process and outcome rewards, summed, whitened over all ranks
    reward_ends = None  # the tokens that carry process rewards, for --credit min: all valid ones
    if args.granularity == "whole":
        reward_ends = last_token_mask(mask)
    elif args.granularity == "step" and step_ends is not None:
        reward_ends = step_index(step_ends, mask)[0]
    # --noise-correction: the outcome term unbiased for the labels assumed flipped, or their
    # posterior given the PRM's held-out score, as far as the PRM is trusted
    if args.denoise_outcome:
        score = weight * args.beta * (q * mask).sum(-1)
        outcome_term = denoised_outcome(outcome, score, args.noise_correction)
    else:
        outcome_term = corrected_outcome(outcome, args.noise_correction)
    advantages = prime_advantages(r, outcome_term, mask, K,
                                  gamma=args.gamma, variant=args.rloo_variant, whiten=args.whiten,
                                  reduce=all_reduce, estimator=args.estimator,
                                  credit=args.credit, reward_ends=reward_ends)

    # 7. PPO-clip policy update (Eq. 6)
    policy_metrics, old_logp = update_policy(policy, policy_opt, batch, old.get(T),
                                             ref_logp.get(T), advantages, args, state.shuffle,
                                             engine_logp=engine_logp)
    metrics.update(policy_metrics)
    if engine_logp is not None:  # a jump means the engine sampled from stale weights
        gap = masked_aggregate((engine_logp - old_logp).abs(), mask, "token-mean")
        metrics["rollout/logp_gap"] = gap.item()
    return q, advantages, metrics


# ==============================================================================================
# The loop (Algorithm 1)
def main(args: Args, given=None):
    """Algorithm 1's lines (left) as the numbered phases below (right; 9: log, evaluate, save):
        1   initialise policy, old policy, PRM, reference from the SFT model    initialize()
        3-4 for each iteration: sample prompts, generate K responses to each    1.
        5   compute outcome rewards (the verifier)                              2.
        6   apply the accuracy filter                                           3.
        7   forward PRM and reference: implicit process rewards (Eq. 3)         4-5.
        8   update the implicit PRM by CE loss on outcome labels                5.
        9   compute advantages (Eq. 5)                                          6.
        10  update the policy by the PPO loss (Eq. 6)                           7.
        11  old policy <- policy (the rollout engine gets the new weights)      8."""
    args = cli.resolve(args, given)  # given: the flags on the command line; all checked first
    rank, world, device = distributed.init()
    model_path, tokenizer, stream, eval_rows, data_counts = data.load_task(
        args, bootstrap.embedded_model)
    run_dir = checkpoint.start(args, os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    if args.eval_only:
        return rollout.evaluate_only(args, model_path, tokenizer, eval_rows, run_dir, device)
    models, engine, state, log = initialize(args, model_path, tokenizer, stream, run_dir, device)
    if state.step == 0:  # a new run: evaluate the initial policy
        evaluated = rollout.run_eval(engine, tokenizer, eval_rows, args, state.evals, 0, log)
        log.metrics({"step": 0, **evaluated, **data_counts})
    bar = tqdm(range(state.step + 1, args.steps + 1), desc="prime", disable=rank != 0)
    with checkpoint.on_interrupt(run_dir, world):
        for step in bar:
            t0 = time.time()
            # 1-3. generate K responses per prompt, verify them, keep the groups with mixed outcomes
            groups, metrics = sample_filtered_groups(engine, stream, tokenizer, args, rank,
                                                     state.noise)
            outcome, metrics = groups.outcome.to(device), {"step": step, **metrics}
            if groups.responses:  # else every group was all right or all wrong: nothing to learn
                with_truth = models.prm is not None or args.oracle_process_reward != "none"
                batch, *extra = batching.training_batch(groups, tokenizer, args, engine.pad_id,
                                                        device, with_truth=with_truth)
                engine.sleep()  # its memory is the trainer's until the sync below
                # 4-7. log-probs, PRM update on outcome labels, advantages, policy update
                q, _, step_metrics = prime_step(models, batch, outcome, args, state, *extra)
                metrics.update(step_metrics)
                engine.sync(models.policy)  # 8. the rollout engine samples from the new policy
            # 9. log, evaluate, save
            state.step, metrics["perf/step_seconds"] = step, time.time() - t0
            metrics.update(distributed.peak_memory(device))
            if step % args.eval_every == 0 or step == args.steps:
                metrics.update(rollout.run_eval(engine, tokenizer, eval_rows, args, state.evals,
                                                step, log))
                if groups.responses:
                    log.samples(checkpoint.sample_records(step, tokenizer, batch, q, outcome,
                                                          args.beta, args.num_samples_logged,
                                                          groups.rows))
            metrics = distributed.merge_metrics(distributed.gather_objects(metrics))
            log.metrics(metrics)
            bar.set_postfix(reward=metrics["rollout/accuracy"], eval=state.evals[-1]["accuracy"],
                            prm_acc=metrics.get("prm/accuracy", float("nan")))
            if args.save_every and step % args.save_every == 0:
                checkpoint.save(run_dir, models.trained(), tokenizer, state)
    log.close()
    first, last = state.evals[0]["accuracy"], state.evals[-1]["accuracy"]
    if rank == 0:
        print(f"eval accuracy ({len(eval_rows)} held-out problems, see eval.md): {first:.1%} at "
              f"step 0 -> {last:.1%} at step {args.steps} ({100 * (last - first):+.1f} points); "
              f"run dir: {run_dir}")
    return {**models._asdict(), "engine": engine, "eval": (first, last), "run_dir": run_dir}


def initialize(args, model_path, tokenizer, stream, run_dir, device):
    """Alg. 1 line 1: (Models: policy, PRM, reference and optimizers; the rollout engine with
    the policy's weights; the TrainState; the RunLog), resuming --run-dir's newest checkpoint
    with --resume."""
    # The models first: vLLM in one process starts a process group that FSDP must not see.
    resume_from = checkpoint.checkpoints(run_dir)[-1] if args.resume else None
    models = distributed.setup_models(args, model_path, device, resume_from)
    engine = rollout.make_engine(args, model_path, tokenizer, device)
    engine.sync(models.policy)  # step 0 too: checks that every engine weight is the policy's
    # One seed drives sampling, data order and shuffles, set after the models are built: a
    # rerun with the same flags reproduces every metric.
    state = checkpoint.TrainState(stream, args.seed, distributed.rank())
    if resume_from:
        checkpoint.restore(resume_from, models.trained(), state, distributed.rank())
    log = checkpoint.RunLog(run_dir, args, state.step if resume_from else None)
    return models, engine, state, log


if __name__ == "__main__":
    cli.run(main, Args)
