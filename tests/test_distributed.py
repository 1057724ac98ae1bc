"""World-size invariance under FSDP2: the same step with 1 process and with 2 (gloo on CPU).

One process trains on the whole batch; two processes, each sharding the models with FSDP2, train
on half of it each. Advantages (batch_norm max and whitening are all-reduced), losses, gradients
(FSDP averages them) and the weights streamed into the rollout engine must agree.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (
    ROOT,
    TINY,
    all_right,
    flags,
    image_rows,
    parity_scores,
    ragged_batch,
    tiny_vlm_dir,
    weights,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import batching
import checkpoint
import data
import distributed
import prime
import rollout
import sandbox
import vision
from distributed import free_port

K, GROUPS, LR = 2, 4, 0.5


def fixed_batch():
    """8 responses (4 groups of K=2) of ragged lengths, with mixed outcomes in every group."""
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 40, (int(n),), generator=gen).tolist()
        for n in torch.randint(3, 7, (GROUPS,), generator=gen)
    ]
    prompts = [p for p in prompts for _ in range(K)]
    responses = [
        torch.randint(3, 40, (n,), generator=gen).tolist() for n in [2, 5, 3, 3, 6, 1, 4, 6]
    ]
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0])
    return prompts, responses, outcome


def one_step(model_dir, prm_dir, rank, world, loss_agg, **overrides):
    """Policy/PRM SGD step on this rank's share of the fixed batch -> advantages, metrics, weights.
    The PRM (prm_dir) starts away from its reference, so q is O(0.1) from the first step (where
    they are equal q is float noise that differs with micro-batch shapes, and that batch_norm
    would scale up to O(1))."""
    args = prime.Args(
        **{
            "model": model_dir,
            "samples_per_prompt": K,
            "mini_batch_size": K * GROUPS,
            "micro_batch_size": 2,
            "loss_agg": loss_agg,
            "beta": 0.5,
            "prm_model": prm_dir,
            **overrides,
        }
    )
    policy, prm, ref, *_ = distributed.setup_models(args, model_dir, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompts, responses, outcome = fixed_batch()
    share = slice(rank * len(prompts) // world, (rank + 1) * len(prompts) // world)
    batch = batching.collate(prompts[share], responses[share], tokenizer.pad_token_id)
    # SGD: the weight change is lr * gradient, so weights compare gradients (Adam's first step
    # is ~lr * sign(g), which float noise in a near-zero gradient can flip)
    models = distributed.Models(
        policy,
        prm,
        ref,
        torch.optim.SGD(policy.parameters(), lr=LR),
        torch.optim.SGD(prm.parameters(), lr=LR),
    )
    state = checkpoint.TrainState(None, seed=0, rank=0)
    for _ in range(2):  # the second step starts from the first's updates
        q, advantages, metrics = prime.prime_step(models, batch, outcome[share], args, state)
    engine = rollout.HFRollout(
        AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, args.max_response_len
    )
    engine.sync(policy)
    return {
        "advantages": [a[m.bool()] for a, m in zip(advantages, batch[2])],
        "metrics": metrics,
        "engine": {k: v.clone() for k, v in engine.model.state_dict().items()},
    }


def bf16_steps(model_dir, rank, world):
    """Four steps on this rank's half of the fixed batch with GPUs' precision (--precision bf16):
    FSDP2 computes in bf16 from fp32 master weights and reduces gradients in fp32; the frozen
    reference holds bf16 weights. -> q of step 1, the metrics, how far the policy moved along the
    first step's advantages, and the dtypes seen."""
    args = prime.Args(
        model=model_dir,
        samples_per_prompt=K,
        mini_batch_size=K * GROUPS,
        micro_batch_size=K * GROUPS // world,
        beta=0.5,
        precision="bf16",
        lr=1e-3,
        prm_lr=1e-3,
    )
    models = distributed.setup_models(args, model_dir, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompts, responses, outcome = fixed_batch()
    share = slice(rank * len(prompts) // world, (rank + 1) * len(prompts) // world)
    batch = batching.collate(prompts[share], responses[share], tokenizer.pad_token_id)

    def logp():
        return prime.batched_logprobs(models.policy, batch, args, {args.temperature})[
            args.temperature
        ]

    before, state, metrics = logp(), checkpoint.TrainState(None, seed=0, rank=rank), []
    for step in range(4):
        q, advantages, step_metrics = prime.prime_step(models, batch, outcome[share], args, state)
        metrics.append(step_metrics)
        if step == 0:
            q1, advantages1 = q, advantages
    with torch.no_grad():
        logits = models.policy(input_ids=batch[0], attention_mask=batch[1]).logits
    return {
        "q1": q1,
        "metrics": metrics,
        "gain": (advantages1 * (logp() - before)).sum().item(),
        "dtypes": {
            "policy": {
                p.dtype for group in models.policy_opt.param_groups for p in group["params"]
            },
            "ref": {p.dtype for p in models.ref.parameters()},
            "compute": logits.dtype,
        },
    }


def chunked_head(model_dir):
    """Log-probs with the LM head a chunk of 3 tokens at a time, and their full gradients by
    name, on the fixed batch (all of it on every rank, so FSDP's averaged gradients are the
    one-process ones), with and without shared prompts, through FSDP2's sharded weights."""
    model = distributed.load_model(model_dir, torch.device("cpu"))
    batching.LOGITS_BUDGET = 3 * model.config.vocab_size
    prompts, responses, _ = fixed_batch()
    ids, attn, mask = batching.collate(prompts, responses, 0)
    out = {}
    for share in (False, True):
        logp = prime.token_logprobs(
            model, dict(input_ids=ids, attention_mask=attn), mask.shape[1], 0.7, share_prompts=share
        )
        (logp * mask).sum().backward()
        full = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        out[share] = {"logp": (logp * mask).detach(), "grads": full}
        model.zero_grad(set_to_none=True)
    return out


def vision_logprobs(model_dir):
    """Log-probs of fixed responses to image rows and their full gradients by name, through a
    vision-language model sharded by distributed.load_model (its vision blocks too), all rows on
    every rank (FSDP's averaged gradients are then the one-process ones); and which of its
    blocks are FSDP modules."""
    from torch.distributed.fsdp import FSDPModule

    model = distributed.load_model(model_dir, torch.device("cpu"))
    tokenizer = data.load_tokenizer(model_dir)
    ids, attn, mask, pixels = image_batch(tokenizer)
    logp = prime.token_logprobs(model, dict(input_ids=ids, attention_mask=attn, **pixels), 3)
    (logp * mask).sum().backward()
    return {
        "logp": (logp * mask).detach(),
        # (CLIP's post_layernorm gets none: LLaVA reads the last layer's hidden states)
        "grads": {
            n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None
        },
        "sharded": {
            n: isinstance(m, FSDPModule)
            for n, m in model.named_modules()
            if n.endswith(("layers.0", "layers.1"))
        },
    }


def image_batch(tokenizer):
    """Four image rows and fixed ragged responses: (input_ids, attention_mask, mask, pixels)."""
    rows = image_rows(4, 32)
    responses = [[5, 6, 7], [8, 9], [10], [11, 12, 13]]
    prompts = data.prompt_token_ids(tokenizer, rows)
    ids, attn, mask = batching.collate(prompts, responses, tokenizer.pad_token_id)
    return ids, attn, mask, vision.collate(data.row_pixels(tokenizer, rows))


def rank_main(rank, world, port, model_dir, prm_dir, out_dir, job):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if job == "steps":
            steps = {
                agg: one_step(model_dir, prm_dir, rank, world, agg, share_prompts=False)
                for agg in ("seq-mean-token-mean", "token-mean")
            }
            # --share-prompts (the default): micro-batches of 4 hold both responses of some prompts
            steps["shared"] = one_step(
                model_dir, prm_dir, rank, world, "token-mean", micro_batch_size=4
            )
            torch.save(steps, os.path.join(out_dir, f"rank{rank}.pt"))
        elif job == "value-oracle":
            mine = (t[rank * 2 : rank * 2 + 2] for t in VALUE_ORACLE_BATCH)
            q = prime.value_oracle_rewards(*mine, 0.5, reduce=distributed.all_reduce)
            torch.save(q, os.path.join(out_dir, f"rank{rank}.pt"))
        elif job == "vision":
            torch.save(vision_logprobs(model_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        elif job == "chunked":
            torch.save(chunked_head(model_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        elif job == "bf16":
            torch.save(bf16_steps(model_dir, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        else:  # the whole trainer for two steps, with a checkpoint
            sandbox.score_batch = parity_scores
            settings = dict(TWO_RANKS, model=model_dir)
            prime.main(
                prime.Args(**settings, run_dir=os.path.join(out_dir, "run"), steps=2, save_every=2)
            )
            # rank 0 answers everything right, so its groups never pass the filter: at the round
            # limit every rank trains on as many groups as the poorest rank has (none)
            if rank == 0:
                sandbox.score_batch = all_right
            # the default filter, 3 rounds
            settings.update(filter_low=0.2, filter_high=0.8, max_filter_rounds=3)
            prime.main(prime.Args(**settings, run_dir=os.path.join(out_dir, "starved"), steps=1))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


# (step ends, first wrong step, outcome, mask): rank 1's responses have more steps than rank 0's
VALUE_ORACLE_BATCH = (
    torch.tensor([[0.0, 1, 0, 0, 0, 0]] * 2 + [[1.0, 0, 1, 0, 1, 0]] * 2),
    torch.tensor([-1, 0, 2, -1]),
    torch.tensor([1.0, 0, 0, 1]),
    torch.tensor([[1.0, 1, 1, 0, 0, 0]] * 2 + [[1.0] * 6] * 2),
)

# 2 prompts x K=2 on each of two ranks
TWO_RANKS = dict(TINY, prompts_per_step=4, mini_batch_size=8)


def spawn(job, model_dir, out_dir, prm_dir=None):
    mp.spawn(rank_main, args=(2, free_port(), model_dir, prm_dir, str(out_dir), job), nprocs=2)


@pytest.mark.slow
def test_one_step_agrees_with_one_and_two_processes(tiny_model_dir, perturbed_model_dir, tmp_path):
    spawn("steps", tiny_model_dir, tmp_path, perturbed_model_dir)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # shared: two ranks with --share-prompts
    for agg in ("seq-mean-token-mean", "token-mean", "shared"):
        single = one_step(
            tiny_model_dir,
            perturbed_model_dir,
            0,
            1,
            "token-mean" if agg == "shared" else agg,
            share_prompts=False,
        )
        two = [r[agg] for r in ranks]
        adv_single, adv_two = (
            torch.cat(single["advantages"]),
            torch.cat(two[0]["advantages"] + two[1]["advantages"]),
        )
        assert adv_single.abs().max() > 0.1 and torch.allclose(adv_single, adv_two, atol=1e-5), agg
        for key in (
            "prm/loss",
            "policy/loss",
            "prm/return_abs",
            "policy/grad_norm",
            "prm/grad_norm",
        ):
            mean_two = sum(t["metrics"][key] for t in two) / 2
            assert mean_two == pytest.approx(single["metrics"][key], rel=1e-4, abs=1e-6), (agg, key)
        assert single["metrics"]["prm/return_abs"] > 0
        # every rank streamed the same full weights into its engine, equal to the 1-process policy
        for name, w in single["engine"].items():
            assert torch.allclose(two[0]["engine"][name], w, atol=1e-6), (agg, name)
            assert torch.equal(two[0]["engine"][name], two[1]["engine"][name]), (agg, name)


@pytest.mark.slow
def test_value_oracle_pools_its_values_over_ranks(tmp_path):
    """p_k, the value of k right steps, is pooled over every rank's responses: two ranks holding
    half the batch each give one process's rewards."""
    spawn("value-oracle", None, tmp_path)
    two = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    single = prime.value_oracle_rewards(*VALUE_ORACLE_BATCH, 0.5)
    # rank 0 alone would see p_1 = 1 (its one response with a right first step), not the pooled 2/3
    half = prime.value_oracle_rewards(*(t[:2] for t in VALUE_ORACLE_BATCH), 0.5)
    assert not torch.allclose(half, single[:2])
    torch.testing.assert_close(two, single)


@pytest.mark.slow
def test_bf16_fsdp2_as_gpus_run_it(tiny_model_dir, tmp_path):
    """GPUs' precision on two CPU processes (gloo): bf16 compute, fp32 master weights and gradient
    reductions, a bf16 reference. PRM and reference compute the same way, so q is exactly 0 at
    step 1; a few steps on one batch fit the PRM to its labels and move the policy along the
    advantages."""
    spawn("bf16", tiny_model_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["dtypes"] == {
            "policy": {torch.float32},
            "ref": {torch.bfloat16},
            "compute": torch.bfloat16,
        }
        assert torch.count_nonzero(r["q1"]) == 0  # exactly: not noise that batch_norm would blow up
        first, last = r["metrics"][0], r["metrics"][-1]
        assert (
            first["prm/loss"] == pytest.approx(math.log(2), abs=1e-6)
            and first["prm/return_abs"] == 0.0
        )
        assert last["prm/loss"] < first["prm/loss"] - 0.01
    # sum_t A_t (log pi_after - log pi_before) over both ranks
    assert sum(r["gain"] for r in ranks) > 0.1


@pytest.mark.slow
def test_trainer_runs_with_two_processes(tiny_model_dir, tmp_path):
    spawn("main", tiny_model_dir, tmp_path)
    run_dir = tmp_path / "run"
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["filter/kept_groups"] == 4  # 2 groups on each rank
        assert m["verifier/ok"] + m["verifier/wrong"] == 8  # counts summed over ranks
        assert m["rollout/logp_gap"] < 1e-4  # the engines sampled from the trainer's weights
        assert "eval/accuracy" in m and "policy/loss" in m
    # the checkpoint's policy is a plain HF folder (gathered from the shards)
    ckpt = checkpoint.checkpoints(str(run_dir))[-1]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "policy"))
    assert json.load(open(os.path.join(ckpt, "policy", "config.json")))["architectures"] == [
        "Qwen2ForCausalLM"
    ]
    assert not torch.equal(
        model.model.embed_tokens.weight,
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.embed_tokens.weight,
    )
    assert len(torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["rng"]) == 2
    starved = [json.loads(line) for line in open(tmp_path / "starved" / "metrics.jsonl")][1]
    assert (
        starved["filter/rounds"] == 3
        and starved["filter/kept_groups"] == 0
        and "policy/loss" not in starved
    )
    # rank 0 sampled all 3 rounds of 2 prompts x K=2; rank 1 stopped once it had its quota
    assert 3 * 4 + 4 <= starved["verifier/ok"] + starved.get("verifier/wrong", 0) <= 2 * 3 * 4


def test_counts_are_summed_over_ranks_and_everything_else_averaged():
    ranks = [{}, {}]
    for m, (ok, loss) in zip(ranks, [(3, 0.5), (4, 1.5)]):
        distributed.add_count(m, "verifier/ok", ok)
        distributed.add_count(m, "a/new_count", 1)  # a new count needs no list of keys to be summed
        m.update({"prm/loss": loss, "rollout/accuracy": 0.25})
    merged = distributed.merge_metrics(ranks)
    assert merged == {"verifier/ok": 7, "a/new_count": 2, "prm/loss": 1.0, "rollout/accuracy": 0.25}
    assert (
        isinstance(merged["verifier/ok"], distributed.Count)
        and json.dumps(merged["verifier/ok"]) == "7"
    )


@pytest.mark.slow
def test_torchrun_with_the_default_batch_flags(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node=2 prime.py as users run it: no batch flags (64 prompts x K=4 a
    step, a mini-batch of 128, the micro-batch each process's share of it). Only the model, the
    length of the run and the filter (the tiny model answers nothing right) are set."""
    run_dir = tmp_path / "run"
    flags = [
        "--model",
        tiny_model_dir,
        "--steps",
        "1",
        "--eval-size",
        "8",
        "--filter-low",
        "0",
        "--filter-high",
        "1",
    ]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "prime.py",
            *flags,
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.load(open(run_dir / "args.json"))
    assert (saved["world_size"], saved["mini_batch_size"], saved["micro_batch_size"]) == (
        2,
        128,
        64,
    )
    step = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1]
    assert step["filter/kept_groups"] == 64 and "policy/loss" in step and "prm/loss" in step


@pytest.mark.slow
def test_two_launchers_on_two_nodes_agree_with_one_launcher(tiny_model_dir, tmp_path):
    """torchrun's own multi-node launch (c10d rendezvous; here two nodes on 127.0.0.1, one process
    each) runs the same training as one launcher with two processes."""
    argv = [
        "prime.py",
        "--model",
        tiny_model_dir,
        "--steps",
        "2",
        "--save-every",
        "2",
        *flags(TWO_RANKS),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(torchrun_flags, run_dir):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *torchrun_flags,
                *argv,
                "--run-dir",
                str(run_dir),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    one = launch(["--nproc-per-node", "2", "--standalone"], tmp_path / "one")
    assert one.wait(timeout=900) == 0, one.stderr.read().decode()[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        launch(
            [
                "--nnodes",
                "2",
                "--node-rank",
                str(i),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "prime-test",
            ],
            tmp_path / "two",
        )
        for i in range(2)
    ]
    for node in nodes:
        assert node.wait(timeout=900) == 0, node.stderr.read().decode()[-3000:]

    def read(run_dir):
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
            for line in open(run_dir / "metrics.jsonl")
        ]

    assert read(tmp_path / "two") == read(tmp_path / "one") and len(read(tmp_path / "one")) == 3
    assert checkpoint.checkpoints(str(tmp_path / "two")) == [
        str(tmp_path / "two" / "checkpoint-000002")
    ]


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir):
    """--gradient-checkpointing recomputes activations in the backward pass: same gradients."""
    batch = ragged_batch()
    advantages = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * batch[2]
    changes = []
    for checkpointing in (False, True):
        args = prime.Args(
            no_prm=True,
            gradient_checkpointing=checkpointing,
            mini_batch_size=6,
            micro_batch_size=3,
            grad_clip=1e9,
        )
        policy = distributed.setup_models(args, tiny_model_dir, torch.device("cpu")).policy
        assert policy.is_activation_checkpointing == checkpointing
        before = weights(policy)
        prime.update_policy(
            policy,
            torch.optim.SGD(policy.parameters(), lr=1.0),
            batch,
            None,
            None,
            advantages,
            args,
            torch.Generator().manual_seed(0),
        )
        changes.append(weights(policy) - before)
    assert changes[0].abs().max() > 1e-3
    torch.testing.assert_close(changes[1], changes[0], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_head_under_fsdp2(tied, tiny_model_dir, tmp_path):
    """The LM head's weight is a shard outside a forward: token_logprobs runs as a forward
    method of the root (register_fsdp_forward_method), for a tied head (the embedded model's)
    and an untied one. Log-probs and gradients equal one process's whole logits."""
    model_dir = tiny_model_dir
    if not tied:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.config.tie_word_embeddings = False
        untied = AutoModelForCausalLM.from_config(model.config)
        untied.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            untied.lm_head.weight.copy_(model.lm_head.weight + 0.01)
        model_dir = str(tmp_path / "untied")
        untied.save_pretrained(model_dir)
    spawn("chunked", model_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings == tied
    prompts, responses, _ = fixed_batch()
    ids, attn, mask = batching.collate(prompts, responses, 0)
    R = mask.shape[1]
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    whole = (logits[:, -R - 1 : -1].float() / 0.7).log_softmax(-1)
    whole = whole.gather(-1, ids[:, -R:, None]).squeeze(-1) * mask
    whole.sum().backward()
    for share in (False, True):
        for rank in ranks:
            torch.testing.assert_close(rank[share]["logp"], whole.detach(), atol=1e-5, rtol=1e-5)
            for name, p in model.named_parameters():
                torch.testing.assert_close(rank[share]["grads"][name], p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_vision_blocks_are_sharded_too(tmp_path):
    """A LLaVA under FSDP2 with 2 gloo processes: its vision encoder's layers are FSDP units as
    the text decoder's are, and log-probs of responses to image rows and every gradient (vision
    tower and projector included) equal one process's."""
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_vlm_dir(tmp_path / "llava", "llava")
    spawn("vision", model_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    ids, attn, mask, pixels = image_batch(data.load_tokenizer(model_dir))
    logp = prime.token_logprobs(model, dict(input_ids=ids, attention_mask=attn, **pixels), 3)
    (logp * mask).sum().backward()
    for rank in ranks:
        assert rank["sharded"] == {
            "model.vision_tower.encoder.layers.0": True,
            "model.vision_tower.encoder.layers.1": True,
            "model.language_model.layers.0": True,
            "model.language_model.layers.1": True,
        }
        torch.testing.assert_close(rank["logp"], (logp * mask).detach(), atol=1e-5, rtol=1e-5)
        assert set(rank["grads"]) == {n for n, p in model.named_parameters() if p.grad is not None}
        for name, grad in rank["grads"].items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
        assert rank["grads"]["model.vision_tower.embeddings.patch_embedding.weight"].abs().sum() > 0
