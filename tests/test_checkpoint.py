"""checkpoint.py: a run directory is never overwritten by accident, --resume continues the same
run exactly with its saved flags, Ctrl-C says how to resume, the trackers get every metric."""

import json
import os

import pytest
import torch
from conftest import run_prime, weights

import checkpoint
import cli
import prime

pytestmark = pytest.mark.usefixtures("fake_verifier")


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
    assert [m["step"] for m in out["metrics"]] == [0, 1] and checkpoint.checkpoints(
        str(run_dir)
    ) == []
    assert json.load(open(run_dir / "args.json"))["seed"] == 1


def test_resume_keeps_the_saved_flags_and_refuses_ones_that_change_the_run(
    finished, tiny_model_dir
):
    run_dir, _ = finished
    # from the command line: flags not given again keep their saved values (here lr 1e-3, not 5e-5)
    args, given = cli.parse(
        prime.Args, ["--run-dir", str(run_dir), "--resume", "--steps", "3", "--eval-every", "2"]
    )
    resumed = cli.resolve(args, given)
    assert (resumed.steps, resumed.eval_every, resumed.lr, resumed.samples_per_prompt) == (
        3,
        2,
        1e-3,
        2,
    )
    for argv, flag in [
        (["--lr", "1e-4"], "--lr 0.0001 (saved: 0.001)"),
        (["--seed", "5"], "--seed 5 (saved: 0)"),
        (["--model", tiny_model_dir + "/"], "--model"),
    ]:
        with pytest.raises(cli.UsageError, match="would change what it computes") as e:
            cli.resolve(*cli.parse(prime.Args, ["--run-dir", str(run_dir), "--resume", *argv]))
        assert flag in str(e.value)
    out = prime.main(resumed, given)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and out["eval"][1] == metrics[-1][
        "eval/accuracy"
    ]
    # args.json records the extended run
    assert json.load(open(run_dir / "args.json"))["steps"] == 3


def test_resuming_a_run_started_with_overwrite_keeps_it(tiny_model_dir, tmp_path):
    """args.json records --overwrite; a resume must not take it from there and delete the run."""
    run_dir = tmp_path / "run"
    run_prime(tiny_model_dir, run_dir, save_every=1, overwrite=True)
    args, given = cli.parse(prime.Args, ["--run-dir", str(run_dir), "--resume", "--steps", "3"])
    prime.main(args, given)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert checkpoint.checkpoints(str(run_dir)) == [str(run_dir / "checkpoint-000003")]


def without_timings(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in metrics]


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    """4 steps straight vs 2 steps + resume + 2 steps: same metrics and weights."""
    straight = run_prime(tiny_model_dir, tmp_path / "straight", steps=4, save_every=2)
    split = tmp_path / "split"
    run_prime(tiny_model_dir, split, steps=2, save_every=2)
    # a crash after the checkpoint: a logged step 3 and a half-written save must not leak in
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "rollout/accuracy": -1}) + "\n")
    os.makedirs(split / "checkpoint-000004.tmp" / "policy")
    evals = json.load(open(split / "eval.json"))
    json.dump(evals + [dict(evals[-1], step=3)], open(split / "eval.json", "w"))
    resumed = run_prime(tiny_model_dir, split, steps=4, save_every=2, resume=True)
    assert [m["step"] for m in resumed["metrics"]] == [0, 1, 2, 3, 4]
    assert without_timings(resumed["metrics"]) == without_timings(straight["metrics"])
    assert json.load(open(split / "eval.json")) == json.load(
        open(tmp_path / "straight" / "eval.json")
    )
    for name in ("policy", "prm"):
        assert torch.equal(weights(resumed[name]), weights(straight[name])), name
    assert [os.path.basename(c) for c in checkpoint.checkpoints(str(split))] == [
        "checkpoint-000004"
    ]


def test_resume_needs_a_checkpoint(tiny_model_dir, tmp_path):
    run_prime(tiny_model_dir, tmp_path / "run")  # --save-every 0: nothing to resume
    with pytest.raises(cli.UsageError, match="no complete checkpoint"):
        run_prime(tiny_model_dir, tmp_path / "run", resume=True)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
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
    assert err == (
        f"interrupted: last checkpoint {tmp_path / 'run' / 'checkpoint-000001'}; resume with: "
        f"python prime.py --run-dir {tmp_path / 'run'} --resume"
    )


def test_tensorboard_gets_every_metric_with_its_name_and_step(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_prime(tiny_model_dir, tmp_path / "run", report_to="tensorboard")
    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
    )
    events.Reload()
    for m in out["metrics"]:  # the same names, steps and values as metrics.jsonl
        for key, value in m.items():
            if key != "step":
                logged = {e.step: e.value for e in events.Scalars(key)}
                assert logged[m["step"]] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    assert "eval/text_summary" in events.Tags()["tensors"]  # the eval table, at each eval


def test_tensorboard_after_resume_has_one_value_per_step(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, save = tmp_path / "run", checkpoint.save
    with monkeypatch.context() as m:  # as if it crashed after logging step 3 and saved only step 1
        m.setattr(checkpoint, "save", lambda *a: save(*a) if a[-1].step == 1 else None)
        run_prime(tiny_model_dir, run_dir, report_to="tensorboard", steps=3, save_every=1)
    # 2, 3 again
    run_prime(tiny_model_dir, run_dir, report_to="tensorboard", steps=3, save_every=1, resume=True)
    # the crashed run's events are still on disk
    assert len(os.listdir(run_dir / "tensorboard")) == 2
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for key in ["policy/loss", "rollout/accuracy"]:
        assert [e.step for e in events.Scalars(key)] == [1, 2, 3], key
        assert [e.value for e in events.Scalars(key)] == pytest.approx(
            [m[key] for m in metrics[1:]]
        ), key


def test_wandb_offline_writes_a_local_run_and_resume_continues_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_prime(tiny_model_dir, tmp_path / "run", report_to="wandb", save_every=2)
    runs = [p for p in os.listdir(tmp_path / "run" / "wandb") if p.startswith("offline-run-")]
    assert len(runs) == 1 and any(
        f.endswith(".wandb") for f in os.listdir(tmp_path / "run" / "wandb" / runs[0])
    )
    run_prime(tiny_model_dir, tmp_path / "run", report_to="wandb", resume=True, steps=3)
    ids = {
        p.rsplit("-", 1)[1]
        for p in os.listdir(tmp_path / "run" / "wandb")
        if p.startswith("offline-run-")
    }
    assert len(ids) == 1  # one W&B run id for the resumed run
