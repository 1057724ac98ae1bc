"""The run directory: args.json, metrics.jsonl, samples.jsonl, eval.json / eval.md, checkpoints.

    RUN_DIR/args.json            the flags of the run (rewritten on --resume with the new
                                 --steps, ...)
    RUN_DIR/metrics.jsonl        one line per step (flushed every step)
    RUN_DIR/samples.jsonl        a few responses per eval with their per-token implicit rewards
    RUN_DIR/eval.json, eval.md   every evaluation so far
    RUN_DIR/checkpoint-<step>/   policy/ and prm/ as HF folders + trainer_state.pt (the newest only)

A run directory that holds a run is never overwritten by accident (prime.resolve_args refuses);
a checkpoint is written to a temp folder and renamed into place, so a crash mid-save leaves the
previous one whole; `--resume` restores the whole trainer state (`TrainState`) as one object.
"""
import contextlib
import glob
import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from types import SimpleNamespace

import torch

import distributed
import vision

RUN_FILES = ("args.json", "metrics.jsonl", "samples.jsonl", "eval.json", "eval.md")


def checkpoints(run_dir):
    """Complete checkpoints in run_dir, oldest first (a save in progress is a .tmp folder)."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint-[0-9]*[0-9]")))


def run_files(run_dir):
    """What in run_dir belongs to a run (empty: no run there)."""
    return ([p for p in (os.path.join(run_dir, f) for f in RUN_FILES) if os.path.exists(p)]
            + checkpoints(run_dir))


def read_args(run_dir):
    """The flags a run in run_dir was started with (a dict), or None if it holds no args.json."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def start(args, default):
    """Create (or on --resume reopen) the run directory and write args.json; with --overwrite,
    first remove the run it holds. Every rank gets rank 0's folder (`default` is a timestamped
    name when --run-dir is empty). Returns its path."""
    run_dir = distributed.gather_objects(args.run_dir or default)[0]
    if distributed.rank() == 0:
        if args.overwrite:
            for path in run_files(run_dir):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            # the flags + the processes, which resume must match
            json.dump({**asdict(args), "world_size": distributed.world_size()}, f, indent=2)
        print(f"run dir: {run_dir}" + (" (resumed)" if args.resume else ""))
    distributed.gather_objects(None)  # a barrier: no rank writes into the folder before it exists
    return run_dir


@contextlib.contextmanager
def on_interrupt(run_dir, world):
    """Ctrl-C stops with one line: where the last checkpoint is and the command that resumes it."""
    try:
        yield
    except KeyboardInterrupt:
        if distributed.rank() == 0:
            saved = checkpoints(run_dir)
            launcher = "python" if world == 1 else f"torchrun --nproc_per_node={world}"
            print(f"\ninterrupted: last checkpoint {saved[-1]}; resume with: {launcher} prime.py "
                  f"--run-dir {run_dir} --resume" if saved else
                  f"\ninterrupted: no checkpoint in {run_dir} (--save-every N writes them)",
                  file=sys.stderr)
        raise SystemExit(130) from None


class RunLog:
    """What a run writes as it goes: metrics.jsonl and samples.jsonl (one JSON object per line,
    flushed after every write, so a crash loses at most the steps since the last checkpoint),
    eval.json / eval.md, and with --report-to the same metrics, names and steps in TensorBoard or
    Weights & Biases. Rank 0 writes; other ranks write nowhere. Resuming at `resume_step` first
    drops what was logged after it (a crash after the save)."""

    def __init__(self, run_dir, args, resume_step=None):
        self.run_dir, self.args, self.main = run_dir, args, distributed.rank() == 0
        paths = [os.path.join(run_dir, name) for name in ("metrics.jsonl", "samples.jsonl")]
        if not self.main:
            paths = [os.devnull] * 2
        elif resume_step is not None:
            for path in paths:
                _truncate_jsonl(path, resume_step)
        self.files = [open(path, "a" if resume_step is not None else "w") for path in paths]
        self.tracker = (_tracker(args, run_dir, resume_step)
                        if self.main and args.report_to != "none" else None)

    def metrics(self, metrics):
        self._write(self.files[0], [metrics])
        if self.tracker is not None:
            self.tracker.metrics(metrics)

    def samples(self, records):
        self._write(self.files[1], records)

    def evals(self, history, step, result):
        """Add an evaluation (rollout.evaluate's result) to `history` (the TrainState's), write
        eval.json, eval.md and the tracker's table; return its metrics (eval/accuracy, per source,
        pass@k with --eval-samples > 1, the trigger rate)."""
        history.append({"step": step, **result})
        if self.main:
            table = write_eval_report(self.run_dir, history, self.args, show=self.args.eval_only)
            if self.tracker is not None:
                self.tracker.table(step, table)
        pass_at = ({f"eval/pass@{k}": v for k, v in result["pass_at_k"].items()}
                   if self.args.eval_samples > 1 else {})
        return {"eval/accuracy": result["accuracy"], **pass_at,
                "eval/trigger_rate": result["trigger_rate"],
                **{f"eval/accuracy/{source}": acc for source, acc in result["per_source"].items()}}

    @staticmethod
    def _write(f, records):
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()

    def close(self):
        for f in self.files:
            f.close()
        if self.tracker is not None:
            self.tracker.close()


def _tracker(args, run_dir, resume_step=None):
    """--report-to's writer: TensorBoard event files in RUN_DIR/tensorboard, or a W&B run (online,
    or a local one with WANDB_MODE=offline) whose id comes from the run directory, so that
    --resume continues the same W&B run. TensorBoard's event files are append-only: a resumed run
    marks the steps after its checkpoint purged (TensorBoard hides what the crashed run logged
    there), as metrics.jsonl is truncated; W&B keeps the crashed run's values of those steps."""
    def numbers(m):  # the numbers of a metrics dict, its step left out
        return {k: float(v) for k, v in m.items() if k != "step" and isinstance(v, (int, float))}

    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)
        return SimpleNamespace(
            metrics=lambda m: ([writer.add_scalar(k, v, m["step"]) for k, v in numbers(m).items()]
                               and writer.flush()),
            table=lambda step, md: writer.add_text("eval", md.replace("\n", "  \n"), step),
            close=writer.close)
    import wandb
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prime"), dir=run_dir,
                     config=asdict(args),
                     name=os.path.basename(os.path.abspath(run_dir)), resume="allow",
                     id=hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16])

    def table(step, md):
        rows = [[cell.strip() for cell in line.strip("|").split("|")]
                for line in md.splitlines()[2:] if line]
        run.log({"eval/table": wandb.Table(columns=rows[0], data=rows[2:])}, step=step)
    return SimpleNamespace(metrics=lambda m: run.log(numbers(m), step=m["step"]), table=table,
                           close=run.finish)


def _truncate_jsonl(path, last_step):
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(lines)


def sample_records(step, tokenizer, batch, q, outcome, beta, n, rows=None):
    """The first n responses of a batch (with their prompt, and its images as base64 PNG if its
    row has any) and their per-token implicit rewards beta*q_t, for samples.jsonl
    (bench/render_samples.py draws them). q: None without a PRM."""
    ids, attn, mask = batch[:3]
    R, records = mask.shape[1], []
    for i in range(min(n, len(ids))):
        length = int(mask[i].sum())
        tokens = ids[i, -R:][:length].tolist()
        records.append({"step": step, "outcome": outcome[i].item(),
                        "prompt": tokenizer.decode(ids[i, :-R][attn[i, :-R].bool()]),
                        "tokens": [tokenizer.decode([t]) for t in tokens],
                        "rewards": [] if q is None else (beta * q[i, :length]).tolist()})
        if rows and rows[i].get("images"):
            records[-1]["images"] = [vision.png_base64(im) for im in rows[i]["images"]]
    return records


def write_eval_report(run_dir, history, args, show=False):
    """eval.json (every evaluation so far) and eval.md (a table: one row per eval step, one
    column per data_source, pass@k with --eval-samples); `show` also prints it. Returns it."""
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(history, f, indent=2)
    how = "greedy" if args.eval_temperature == 0 else \
        f"avg@{args.eval_samples}, T={args.eval_temperature}, top_p={args.eval_top_p}"
    sources = sorted({s for h in history for s in h["per_source"]})
    # greedy: pass@1 = accuracy
    ks = [k for k in history[-1].get("pass_at_k", {}) if args.eval_samples > 1]
    lines = [f"Accuracy ({how})", "",
             "| step | all | " + " | ".join(sources + [f"pass@{k}" for k in ks]) + " |",
             "|---:" * (len(sources) + len(ks) + 2) + "|"]
    lines += [f"| {h['step']} | {h['accuracy']:.1%} | " + " | ".join(
        [f"{h['per_source'].get(s, float('nan')):.1%}" for s in sources]
        + [f"{h.get('pass_at_k', {}).get(k, float('nan')):.1%}" for k in ks]) + " |"
        for h in history]
    with open(os.path.join(run_dir, "eval.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))
    return "\n".join(lines)


class TrainState:
    """Everything besides weights and optimizer moments that a run needs to continue exactly where
    it stopped, saved and restored as one: the step, the data position, every random generator
    (per rank), the PRM-trust average of --adaptive-process-coef and the eval history.

    Creating it seeds the global generators (torch, python) with seed + rank: sampling differs by
    rank, while every rank reads the same data stream and takes its own slice."""

    def __init__(self, stream, seed, rank):
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        self.step, self.stream, self.evals, self.prm_trust = 0, stream, [], 0.5
        self.shuffle = torch.Generator().manual_seed(seed + rank)  # mini-batch order
        # --outcome-noise's own stream
        self.noise = torch.Generator().manual_seed(seed + rank + 1_000_003)

    def state_dict(self):
        """A collective: gathers every rank's generators (checkpoints are written by rank 0)."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "shuffle": self.shuffle.get_state(), "noise": self.noise.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"step": self.step, "stream": self.stream.state_dict(), "evals": self.evals,
                "prm_trust": self.prm_trust, "rng": distributed.gather_objects(rng)}

    def load_state_dict(self, state, rank):
        self.step, self.evals, self.prm_trust = state["step"], state["evals"], state["prm_trust"]
        self.stream.load_state_dict(state["stream"])
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.shuffle.set_state(rng["shuffle"])
        self.noise.set_state(rng["noise"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])


def save(run_dir, trained, tokenizer, state):
    """checkpoint-<step>/: policy/ and prm/ as HF folders (loadable by transformers and vLLM as they
    are), their optimizers and the TrainState. `trained`: {"policy": (model, optimizer), "prm":
    (model, optimizer) or None}. Every rank calls it (gathering sharded weights is a collective);
    rank 0 writes to a temp folder and renames it into place, then removes older checkpoints."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    # rank 0 gets everything, on CPU
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trained = {name: pair for name, pair in trained.items() if pair is not None}
    weights = {name: get_model_state_dict(m, options=full) for name, (m, _) in trained.items()}
    opt_states = {name: get_optimizer_state_dict(m, opt, options=full)
                  for name, (m, opt) in trained.items()}
    trainer_state = state.state_dict()
    if distributed.rank() != 0:
        return
    final = os.path.join(run_dir, f"checkpoint-{state.step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (model, _) in trained.items():
        model.save_pretrained(os.path.join(tmp, name), state_dict=weights[name])
    tokenizer.save_pretrained(os.path.join(tmp, "policy"))
    if getattr(tokenizer, "image_inputs", None) is not None:  # a vision model: its processor
        tokenizer.image_inputs.save(os.path.join(tmp, "policy"))
    torch.save({**trainer_state, "optimizers": opt_states}, os.path.join(tmp, "trainer_state.pt"))
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-1]:
        shutil.rmtree(old)


def restore(checkpoint, trained, state, rank):
    """Load a checkpoint's optimizers and TrainState into `trained` (as for `save`) and `state`;
    the weights were loaded with the models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    saved = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=False)
    for name, pair in trained.items():
        if pair is not None:
            set_optimizer_state_dict(*pair, saved["optimizers"][name],
                                     options=StateDictOptions(full_state_dict=True))
    state.load_state_dict(saved, rank)
