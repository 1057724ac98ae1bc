"""prime next to TRL's GRPOTrainer on the same work, and prime's step next to its own pieces.

    python3 -m venv --system-site-packages /tmp/trlvenv
    /tmp/trlvenv/bin/pip install -r requirements-bench.txt
    python bench/same_work.py --trl-python /tmp/trlvenv/bin/python [--rounds 3 --steps 6 --warmup 2]

The work, for both: a 4.1M-parameter Qwen2 built from a config (no download) with a byte-level BPE
of 516 tokens, 16 prompts x K=4 samples per step (one mini-batch of all 64), 64 new tokens at T=1
(top_k 0, top_p 1), CPU fp32, 3-digit addition scored by verifier.py, no KL, one PPO epoch, no
accuracy filter. TRL: beta=0 (no reference model) and generation aligned with the optimizer step
(no old log-prob pass), gradient checkpointing off as in prime (TRL's default, on, is run too, for
reference). prime: --no-prm (outcome-only RLOO) and the default PRIME step (implicit PRM + frozen
reference), each as it runs by default (--share-prompts: each distinct prompt's forward computed
once for its K responses, in the rollout's prefill and in training; less arithmetic than the
work as TRL does it, the same numbers up to rounding) and with --no-share-prompts (one forward
per sequence, as TRL). Each system is a fresh `prime.py` or TRL process per run, run in turn
(TRL, TRL with checkpointing, the four prime runs, pieces; repeated --rounds times) so a change
of load hits all of them alike; each run waits for an idle machine and is rerun (--tries) if
other processes took more than --max-others of the CPUs meanwhile (the tables show the worst
share kept); the first --warmup steps of every run are left out of the medians. prime's step is
`perf/step_seconds` from its metrics.jsonl (eval is not in it); TRL's is on_step_begin ->
on_step_end.
The pieces are timed alone in this process, with and without --share-prompts: generate
(rollout.HFRollout), one no-grad forward, one forward+backward+AdamW step; and the verifier's 64
items (its worker processes).
"""

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPTS, K, NEW_TOKENS, LR = 16, 4, 64, 5e-5
PRIME_FLAGS = [
    "--prompts-per-step",
    str(PROMPTS),
    "--samples-per-prompt",
    str(K),
    "--max-response-len",
    str(NEW_TOKENS),
    "--temperature",
    "1",
    "--top-p",
    "1",
    "--filter-low",
    "0",
    "--filter-high",
    "1",
    "--mini-batch-size",
    str(PROMPTS * K),
    "--micro-batch-size",
    str(PROMPTS * K),
    "--lr",
    str(LR),
]


def build_work(folder):
    """The model folder (4.1M Qwen2 + 516-token byte BPE), train.jsonl and a one-row eval.jsonl."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    import bootstrap
    import data

    # bootstrap.build_tokenizer's recipe; argparse's source is extra text that takes the
    # vocabulary to 516
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        data.addition_question(a, b) + data.addition_solution(a, b)
        for a, b in data.addition_pairs(2000, 0)
    ]
    corpus += [
        bootstrap.CHAT_TEMPLATE,
        *bootstrap.SPECIAL,
        *inspect.getsource(argparse).splitlines(),
    ]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=516,
            special_tokens=bootstrap.SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=bootstrap.CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
        config.eos_token_id,
        config.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, rows in (("train", data.addition_rows(2000, 7)), ("eval", data.addition_rows(1, 8))):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return sum(p.numel() for p in model.parameters()), len(tokenizer)


def run_prime(folder, steps, extra):
    """perf/step_seconds and rollout/response_len of each step of one fresh prime.py run."""
    run_dir = tempfile.mkdtemp(prefix="same-work-prime-", dir=folder)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "prime.py"),
        "--model",
        folder,
        "--data",
        f"{folder}/train.jsonl",
        "--eval-data",
        f"{folder}/eval.jsonl",
        "--run-dir",
        run_dir,
        "--steps",
        str(steps),
        "--eval-every",
        str(steps),
        *PRIME_FLAGS,
        *extra,
    ]
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [
        (m["perf/step_seconds"], m["rollout/response_len"])
        for m in lines
        if "perf/step_seconds" in m
    ]


def run_trl(folder, steps, python, checkpointing=False):
    out = os.path.join(folder, f"trl-{time.time_ns()}.json")
    with open(out + ".log", "w") as log:
        subprocess.run(
            [
                python,
                os.path.abspath(__file__),
                "--trl-worker",
                folder,
                str(steps),
                out,
                str(int(checkpointing)),
            ],
            check=True,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return json.load(open(out))


def trl_worker(folder, steps, out, checkpointing):
    """One GRPOTrainer run on the work in `folder` (run with TRL's interpreter): writes each step's
    (seconds, mean completion length). TRL turns gradient checkpointing on by default (it recomputes
    the forward in the backward: not the same work as prime's default, so off unless asked)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import verifier

    rows = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"))]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["reward_model"]["ground_truth"]} for r in rows]
    )

    def reward(completions, answer, **_):  # the verifier prime uses, here in-process
        return [
            verifier.math_reward_with_reason(c[0]["content"], a)[0]
            for c, a in zip(completions, answer)
        ]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], None

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=os.path.join(folder, "trl-out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_steps=steps,
        learning_rate=LR,
        per_device_train_batch_size=PROMPTS * K,
        gradient_accumulation_steps=1,
        num_generations=K,
        steps_per_generation=1,
        num_iterations=1,
        beta=0.0,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        use_vllm=False,
        disable_dropout=True,
        loss_type="dapo",
        seed=0,
        gradient_checkpointing=checkpointing,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        callbacks=[timer],
        processing_class=AutoTokenizer.from_pretrained(folder, padding_side="left"),
    )
    assert trainer.ref_model is None and config.generation_batch_size == PROMPTS * K
    trainer.train()
    lengths = [
        h["completions/mean_length"]
        for h in trainer.state.log_history
        if "completions/mean_length" in h
    ]
    json.dump(list(zip(timer.seconds, lengths)), open(out, "w"))


def time_pieces(folder, reps):
    """{piece: [seconds]} of prime's necessary pieces, timed alone: one warm-up call each, then
    reps; generate and the forwards as prime runs them by default (each prompt once) and, named
    "... (--no-share-prompts)", one forward per sequence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import batching
    import data
    import prime
    import rollout

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    policy, ref = load().train(), load().eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR)
    engines = {
        share: rollout.HFRollout(load(), tokenizer, NEW_TOKENS, 1.0, 1.0, share)
        for share in (True, False)
    }
    rows = [json.loads(line) for line in open(os.path.join(folder, "train.jsonl"))][:PROMPTS]
    rows = [r for r in rows for _ in range(K)]
    prompts = data.prompt_token_ids(tokenizer, rows)
    state = {}

    def generate():
        state["responses"] = engines[state["share"]].generate(prompts)[0]
        state["batch"] = batching.collate(prompts, state["responses"], engines[True].pad_id)

    def forward():
        args = prime.Args(
            mini_batch_size=PROMPTS * K, micro_batch_size=PROMPTS * K, share_prompts=state["share"]
        )
        prime.batched_logprobs(ref, state["batch"], args, {1.0})

    def forward_backward():
        ids, attn, mask = state["batch"]
        logp = prime.token_logprobs(
            policy,
            dict(input_ids=ids, attention_mask=attn),
            mask.shape[1],
            1.0,
            share_prompts=state["share"],
        )
        ((logp * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def verify():
        rollout.outcome_rewards(
            tokenizer.batch_decode(state["responses"], skip_special_tokens=True), rows
        )

    times = {}
    for share, suffix in ((True, ""), (False, " (--no-share-prompts)")):
        state["share"] = share
        for name, fn in (
            ("generate", generate),
            ("forward", forward),
            ("forward+backward", forward_backward),
            ("verify", verify),
        )[: 4 if share else 3]:
            times[name + suffix] = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                fn()
                if i:
                    times[name + suffix].append(time.perf_counter() - t0)
    return times


def busy_cpu_seconds():
    """(CPU-seconds the machine has been busy, all processes; this process's and its ended
    children's)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return (sum(f) - f[3] - f[4]) / os.sysconf(
        "SC_CLK_TCK"
    ), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def print_machine():
    """The command and the machine's state at start (threads and load decide CPU timings)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {os.getloadavg()[0]:.2f} (1 min) at start"
    )


def others_share(fn):
    """(fn(), the share of the machine's CPUs that other processes used while it ran)."""
    (all0, own0), t0 = busy_cpu_seconds(), time.time()
    out = fn()
    (all1, own1), seconds = busy_cpu_seconds(), time.time() - t0
    return out, max(0.0, (all1 - all0) - (own1 - own0)) / (seconds * os.cpu_count())


def measure(fn, max_others, tries):
    """fn() run when the machine is idle (others below max_others for a 2 s look), again if
    another process took more than max_others of the CPUs meanwhile: (result, others' share), last
    try kept."""
    for _ in range(tries):
        while others_share(lambda: time.sleep(2))[1] > max_others:
            time.sleep(10)
        out, others = others_share(fn)
        if others <= max_others:
            break
    return out, others


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--trl-python", default=sys.executable, help="an interpreter that has TRL (see above)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="steps per run")
    p.add_argument(
        "--warmup", type=int, default=2, help="first steps of each run left out of the medians"
    )
    p.add_argument("--reps", type=int, default=3, help="timings of each piece per round")
    p.add_argument(
        "--max-others",
        type=float,
        default=0.05,
        help="rerun a run if other processes took more "
        "than this share of the CPUs during it (other jobs slow PyTorch many-fold)",
    )
    p.add_argument("--tries", type=int, default=3, help="runs of each at most, per round")
    a = p.parse_args()
    print_machine()
    folder = tempfile.mkdtemp(prefix="same-work-")
    params, vocab = build_work(folder)
    print(
        f"work: Qwen2 {params / 1e6:.2f}M params, vocab {vocab}, {PROMPTS} prompts x K={K}, "
        f"{NEW_TOKENS} new tokens, fp32; folder {folder}\n"
    )
    runs = {
        "TRL GRPOTrainer": lambda: run_trl(folder, a.steps, a.trl_python),
        "TRL, its default gradient checkpointing": lambda: run_trl(
            folder, a.steps, a.trl_python, True
        ),
        "prime --no-prm": lambda: run_prime(folder, a.steps, ["--no-prm"]),
        "prime --no-prm --no-share-prompts": lambda: run_prime(
            folder, a.steps, ["--no-prm", "--no-share-prompts"]
        ),
        "prime (PRIME)": lambda: run_prime(folder, a.steps, []),
        "prime (PRIME) --no-share-prompts": lambda: run_prime(
            folder, a.steps, ["--no-share-prompts"]
        ),
    }
    steps, others, pieces = (
        {name: [] for name in runs},
        {name: [] for name in [*runs, "pieces"]},
        {},
    )
    for r in range(a.rounds):
        for name, run in runs.items():
            result, share = measure(run, a.max_others, a.tries)
            steps[name] += result[a.warmup :]
            others[name].append(share)
            print(
                f"round {r + 1}: {name}: "
                f"{statistics.median(s for s, _ in result[a.warmup :]):.2f} s/step "
                f"(other processes: {share:.0%} of the CPUs)",
                flush=True,
            )
        result, share = measure(lambda: time_pieces(folder, a.reps), a.max_others, a.tries)
        others["pieces"].append(share)
        for name, t in result.items():
            pieces.setdefault(name, []).extend(t)
    med = {name: statistics.median(s for s, _ in v) for name, v in steps.items()}
    piece = {name: statistics.median(v) for name, v in pieces.items()}
    trl = med["TRL GRPOTrainer"]
    print(
        "\n| system | median s/step | steps | x TRL (first row) | mean response tokens "
        "| others' CPU share, worst run |\n|---|---:|---:|---:|---:|---:|"
    )
    for name, v in steps.items():
        print(
            f"| {name} | {med[name]:.2f} | {len(v)} | {med[name] / trl:.2f} | "
            f"{statistics.mean(n for _, n in v):.1f} | {max(others[name]):.0%} |"
        )
    print(
        f"\n| piece (alone, this process; others' CPU share, worst round: "
        f"{max(others['pieces']):.0%}) | median s | n |\n|---|---:|---:|"
    )
    for name, v in pieces.items():
        print(f"| {name} | {piece[name]:.3f} | {len(v)} |")
    sums = {}
    for suffix, flag in (("", ""), (" (--no-share-prompts)", " --no-share-prompts")):
        gen, fwd, fb = (
            piece[name + suffix] for name in ("generate", "forward", "forward+backward")
        )
        sums[f"prime --no-prm{flag}"] = ("generate + policy fwd+bwd", gen + fb)
        sums[f"prime (PRIME){flag}"] = (
            "generate + ref fwd + PRM fwd+bwd + policy fwd+bwd",
            gen + fwd + 2 * fb,
        )
    print("\n| system | its necessary pieces (alike) | sum s | step / sum |\n|---|---|---:|---:|")
    for name, (what, total) in sums.items():
        print(f"| {name} | {what} | {total:.2f} | {med[name] / total:.2f} |")
    no_share = "prime (PRIME) --no-share-prompts"
    print(
        f"\ntargets: prime --no-prm <= 0.85x TRL: {med['prime --no-prm'] / trl:.2f}x (x TRL's "
        f"default, checkpointing: "
        f"{med['prime --no-prm'] / med['TRL, its default gradient checkpointing']:.2f}x; "
        f"--no-share-prompts: {med['prime --no-prm --no-share-prompts'] / trl:.2f}x); PRIME step "
        f"<= 1.1x its pieces: {med['prime (PRIME)'] / sums['prime (PRIME)'][1]:.2f}x "
        f"(--no-share-prompts: "
        f"{med[no_share] / sums[no_share][1]:.2f}x; verify, not "
        f"in the sums: {piece['verify']:.3f} s); "
        f"load average (1 min) at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl-worker"]:
        trl_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
    else:
        main()
