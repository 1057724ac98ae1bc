"""One process, or one per GPU under torchrun: the process group, PRIME's models sharded with FSDP2,
the collectives.

    python prime.py                        # one process on cuda:0 or the CPU, plain models
    torchrun --nproc_per_node=8 prime.py   # one process per GPU (NCCL); gloo on CPU for tests
    torchrun --nnodes 2 --node-rank I --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...
                                           # several nodes

The math in prime.py takes `reduce(x, op)` for batch-wide statistics: `all_reduce` below, which is
the identity in one process, so results do not depend on the number of GPUs.
"""
import os
import types
from typing import NamedTuple

import torch
import torch.distributed as dist

import vision


def init():
    """(rank, world_size, device). Under torchrun (any number of processes, one included) joins the
    process group: NCCL with the GPU of this node's LOCAL_RANK (RANK is global across nodes), or
    gloo on CPU. Without torchrun: one process on cuda:0 or the CPU."""
    cuda = torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda
              else torch.device("cpu"))
    if under_torchrun() and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def under_torchrun():
    """Was this process started by torchrun (or, in tests, as one rank of several)?"""
    return "RANK" in os.environ or dist.is_initialized()


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (a one-process rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_first(fn):
    """fn() on this node's first process, then on the others (a per-node cache, such as the embedded
    model's in ~/.cache/prime, is built once per node rather than by every process at once)."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result = fn() if first else None
    if dist.is_initialized():
        dist.barrier()
    return result if first else fn()


def shutdown():
    if dist.is_initialized():
        dist.barrier()  # no rank tears the process group down while another still uses it
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# PRIME's three models: policy (trained), implicit PRM (trained), reference (frozen)
class Models(NamedTuple):
    policy: torch.nn.Module
    prm: torch.nn.Module | None  # None: outcome-only
    ref: torch.nn.Module | None  # None: no frozen reference needed
    policy_opt: torch.optim.Optimizer
    prm_opt: torch.optim.Optimizer | None

    def trained(self):
        """What a checkpoint saves: {"policy": (model, optimizer), "prm": (model, optimizer) or
        None}."""
        prm = (self.prm, self.prm_opt) if self.prm is not None else None
        return {"policy": (self.policy, self.policy_opt), "prm": prm}


def setup_models(args, model_path, device, checkpoint_dir=None):
    """Models(policy, PRM, reference, their optimizers) from one checkpoint (policy and PRM from
    `checkpoint_dir` when resuming); the PRM starts as the policy unless --prm-model."""
    bf16 = args.precision == "bf16"

    def load(path, trained=True):
        return load_model(path, device, trained, args.gradient_checkpointing, bf16)

    def saved(name):  # the checkpoint's copy of a model, when resuming
        return os.path.join(checkpoint_dir, name) if checkpoint_dir else None

    def adamw(model, lr, decay):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)

    policy = load(saved("policy") or model_path)
    oracle = args.oracle_process_reward != "none"
    use_prm = not (args.no_prm or oracle) and args.process_reward_coef != 0
    # a --prm-model's vocabulary was checked against the policy's in cli.check
    prm = load(saved("prm") or args.prm_model or model_path) if use_prm else None
    # The PRM's reference and the KL term need the frozen initial model; --reference policy
    # reuses the policy's own pre-update log-probs and needs no extra copy.
    need_ref = (use_prm and args.reference == "sft") or args.kl_coef > 0
    ref = load(model_path, trained=False) if need_ref else None
    return Models(policy, prm, ref, adamw(policy, args.lr, args.weight_decay),
                  adamw(prm, args.prm_lr, args.prm_weight_decay) if use_prm else None)


def load_model(path, device, trained=True, checkpointing=False, bf16=False):
    """An HF causal LM from `path`, ready for this process: trained models keep fp32 master
    weights (with --gradient-checkpointing, activations are recomputed in the backward pass); a
    frozen one is bf16 with --precision bf16, which is exactly what a trained copy computes with
    then (bf16 compute of the same weights: q = 0 where PRM and reference are equal), else fp32."""
    from transformers import AutoConfig
    dtype = torch.bfloat16 if bf16 and not trained else torch.float32
    model = vision.model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)
    if trained and checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    model = shard(model, device, bf16)
    return model.train() if trained else model.eval().requires_grad_(False)


def shard(model, device, bf16=False):
    """FSDP2 under torchrun: `fully_shard` on every decoder layer (and a vision-language model's
    vision blocks), then the root. bf16 (--precision,
    GPUs by default): bf16 forward/backward, fp32 master weights, gradient reduction and
    optimizer; else fp32 throughout (many CPUs lack fast bf16 kernels). Every model gets the
    same policy, so PRM and reference compute identically and q = 0 exactly where they are equal
    (different kernels make q noise). One process: the model unchanged, on `device`."""
    if not dist.is_initialized():
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if bf16 else MixedPrecisionPolicy())
    for layer in blocks(model):
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    model = fully_shard(model, mesh=mesh, mp_policy=precision)
    # as_forward's entry: a forward method, so FSDP gathers the root's own parameters (the LM
    # head, embeddings, last norm) around it and again for its backward
    model.forward_with = types.MethodType(_forward_with, model)
    register_fsdp_forward_method(model, "forward_with")
    return model


def blocks(model) -> list:
    """The transformer blocks to shard one by one: the text decoder's layers, and a
    vision-language model's vision blocks (LLaVA's CLIP-style encoder, Qwen2-VL's `visual`)."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(("layers", "visual.blocks")) and isinstance(module, torch.nn.ModuleList):
            found += list(module)
    return found


def _forward_with(model, fn, *args):
    return fn(model, *args)


def as_forward(model, fn, *args):
    """fn(model, *args) as a forward of `model`: under FSDP2 the root module's own parameters are
    gathered for it and for its backward, as for model.forward, so fn may use the LM head's
    weight directly (outside a forward it is a shard, and a full_tensor() by hand would skip
    FSDP's gradient reduction). One process: the call itself."""
    if not hasattr(model, "forward_with"):  # not sharded
        return fn(model, *args)
    return model.forward_with(fn, *args)


def all_reduce(x, op):
    """The `reduce` of the math: "sum", "max" or "min" of tensor x over all ranks (a new tensor;
    x itself is unchanged). Identity in one process."""
    if not dist.is_initialized():
        return x
    # NCCL reduces GPU tensors only; a CPU statistic travels through this rank's GPU and back
    on = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
          else x.device)
    y = x.to(on, copy=True)
    dist.all_reduce(y, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                           "min": dist.ReduceOp.MIN}[op])
    return y.to(x.device)


def peak_memory(device):
    """{"perf/peak_gpu_gib": the most GPU memory allocated so far} on a GPU, {} on a CPU."""
    if device.type != "cuda":
        return {}
    return {"perf/peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def scalar(x):
    """A Python float from a tensor or a DTensor (FSDP2's grad norm is one: gather it first)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


class Count(int):
    """A metric that is a count (responses by verifier reason, kept groups, flipped labels):
    summed over ranks by `merge_metrics`, where every other metric is averaged. Marked where
    it is made, so a new count cannot be averaged by mistake. Logs as a plain int."""


def add_count(metrics, key, n):
    metrics[key] = Count(metrics.get(key, 0) + n)


def merge_metrics(per_rank):
    """One metrics dict from every rank's: a Count is summed; anything else (a mean over this
    rank's equal-sized batch, or a global value every rank holds) is averaged over the ranks that
    logged it (a value all ranks agree on is kept exactly)."""
    merged = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):
        values = [m[key] for m in per_rank if key in m]
        if isinstance(values[0], Count):
            merged[key] = Count(sum(values))
        else:
            merged[key] = values[0] if len(set(values)) == 1 else sum(values) / len(values)
    return merged
