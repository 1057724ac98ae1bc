"""run_math.sh: every flag it passes exists in prime.Args and carries the paper's value."""


from conftest import fake_executable, printed_command

import cli
import prime


def test_run_math_sh_flags_parse_to_the_papers_recipe(tmp_path):
    # prints the command line instead of launching 8 GPUs
    env = fake_executable(tmp_path, "torchrun")
    out = printed_command("run_math.sh", "--seed", "3", env=env)
    assert out[:2] == ["--nproc_per_node=8", "prime.py"]
    args, _ = cli.parse(prime.Args, out[2:])
    expected = dict(
        rollout="vllm",
        prompts_per_step=256,
        samples_per_prompt=4,
        filter_low=0.2,
        filter_high=0.8,
        max_prompt_len=1024,
        max_response_len=3072,
        temperature=1.0,
        top_p=1.0,
        lr=5e-7,
        weight_decay=0.01,
        grad_clip=1.0,
        prm_lr=1e-6,
        prm_weight_decay=0.0,
        prm_grad_clip=10.0,
        beta=0.05,
        prm_update="after",
        reference="sft",
        granularity="token",
        reward_norm="batch_norm",
        rloo_variant="official",
        whiten=True,
        gamma=1.0,
        clip_eps=0.2,
        ppo_epochs=1,
        mini_batch_size=256,
        kl_coef=0.0,
        gradient_checkpointing=True,
        vllm_sleep=True,
        entropy_coef=0.0,
        eval_every=16,
        save_every=16,
        eval_samples=16,
        eval_temperature=0.3,
        eval_top_p=0.95,
        seed=3,
    )
    assert {k: getattr(args, k) for k in expected} == expected


def test_run_math_sh_launches_on_several_nodes_with_torchruns_rendezvous(tmp_path):
    env = dict(fake_executable(tmp_path, "torchrun"), NNODES="2", NODE_RANK="1", MASTER="host0")
    out = printed_command("run_math.sh", env=env)
    assert out[:12] == [
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "host0:29500",
        "--rdzv-id",
        "prime",
        "--nproc_per_node=8",
        "prime.py",
    ]
