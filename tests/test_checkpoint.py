"""checkpoint.py: a run directory is never overwritten by accident, --resume continues the same
run with its saved flags, Ctrl-C says how to resume. (Exact resume: test_prime_step.py.)"""
import json
import os

import pytest

import checkpoint
import cli
import prime
import verifier
from conftest import parity_scores, run_prime


@pytest.fixture(autouse=True)
def fake_verifier(monkeypatch):
    monkeypatch.setattr(verifier, "score_batch", parity_scores)


@pytest.fixture
def finished(tiny_model_dir, tmp_path):
    """A finished 2-step run with a checkpoint at step 2, and the contents of its files."""
    run_dir = tmp_path / "run"
    run_prime(tiny_model_dir, run_dir, save_every=2)
    return run_dir, {f: open(run_dir / f).read() for f in checkpoint.RUN_FILES}


def test_a_new_run_into_a_finished_run_is_refused(finished, tiny_model_dir):
    run_dir, files = finished
    with pytest.raises(cli.UsageError, match="already holds a run: continue it with --resume"):
        run_prime(tiny_model_dir, run_dir, seed=1)
    assert {f: open(run_dir / f).read() for f in checkpoint.RUN_FILES} == files  # nothing touched
    # an explicit --overwrite replaces the whole run: no stale checkpoint left to mix into a resume
    out = run_prime(tiny_model_dir, run_dir, seed=1, steps=1, overwrite=True)
    assert [m["step"] for m in out["metrics"]] == [0, 1] and checkpoint.checkpoints(str(run_dir)) == []
    assert json.load(open(run_dir / "args.json"))["seed"] == 1


def test_resume_keeps_the_saved_flags_and_refuses_ones_that_change_the_run(finished, tiny_model_dir):
    run_dir, _ = finished
    # from the command line: flags not given again keep their saved values (here lr 1e-3, not 5e-5)
    args, given = cli.parse(prime.Args, ["--run-dir", str(run_dir), "--resume", "--steps", "3", "--eval-every", "2"])
    resumed = cli.resolve(args, given)
    assert (resumed.steps, resumed.eval_every, resumed.lr, resumed.samples_per_prompt) == (3, 2, 1e-3, 2)
    for argv, flag in [(["--lr", "1e-4"], "--lr 0.0001 (saved: 0.001)"), (["--seed", "5"], "--seed 5 (saved: 0)"),
                       (["--model", tiny_model_dir + "/"], "--model")]:
        with pytest.raises(cli.UsageError, match="would change what it computes") as e:
            cli.resolve(*cli.parse(prime.Args, ["--run-dir", str(run_dir), "--resume", *argv]))
        assert flag in str(e.value)
    out = prime.main(resumed, given)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and out["eval"][1] == metrics[-1]["eval/accuracy"]
    assert json.load(open(run_dir / "args.json"))["steps"] == 3  # args.json records the extended run


def test_resume_needs_a_checkpoint(tiny_model_dir, tmp_path):
    run_prime(tiny_model_dir, tmp_path / "run")  # --save-every 0: nothing to resume
    with pytest.raises(cli.UsageError, match="no complete checkpoint"):
        run_prime(tiny_model_dir, tmp_path / "run", resume=True)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    sample = prime.sample_filtered_groups

    def interrupted_at_step_2(engine, stream, *args):
        if stream.calls == 1:
            raise KeyboardInterrupt
        stream.calls += 1
        return sample(engine, stream, *args)
    monkeypatch.setattr(prime, "sample_filtered_groups", interrupted_at_step_2)
    monkeypatch.setattr(prime.data.AdditionStream, "calls", 0, raising=False)
    with pytest.raises(SystemExit) as e:
        run_prime(tiny_model_dir, tmp_path / "run", steps=3, save_every=1)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"interrupted: last checkpoint {tmp_path / 'run' / 'checkpoint-000001'}; resume with: "
                   f"python prime.py --run-dir {tmp_path / 'run'} --resume")
