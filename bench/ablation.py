"""Dense vs outcome rewards and other switches, on the embedded default task, across seeds.

    pip install -r requirements-bench.txt
    python bench/ablation.py --out runs/ablation --seeds 0,1,2 --budget-minutes 60
    # flags after -- go to prime.py:
    python bench/ablation.py --configs prime,outcome-only --steps 50 -- --eval-every 5

Runs `prime.py` once per (configuration, seed), seed-major (every configuration on seed 0, then
on seed 1, ...) so a budget cut short still compares configurations on the same seeds. Every run
has the same flags except its switch. Writes curves.csv and curves.png (eval accuracy against
samples seen, mean and min-max across seeds) in --out and prints, per configuration, the final
accuracy and the samples needed to reach --target, with the ratio against outcome-only, and for
each --outcome-noise configuration the fraction of its clean configuration's gain it keeps.
Runs already finished in --out are read, not rerun, so an interrupted sweep continues.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = ["--adaptive-process-coef", "--process-coef", "0.5"]
DEFENCE = ["--denoise-outcome", "--noise-correction"]  # ... and the rate assumed
CONFIGS = {  # name -> the prime.py flags that differ from the default; the question it answers
    "prime": [],  # PRIME as the official code runs it
    "outcome-only": ["--no-prm"],  # do dense implicit rewards beat outcome-only RLOO?
    # does updating the PRM online matter?
    "offline-prm": ["--prm-update", "none", "--prm-model", "{offline_prm}"],
    "whole": ["--granularity", "whole"],  # does token-level credit beat one reward per response?
    # ... or one per reasoning step (a digit column here)?
    "step": ["--granularity", "step", "--step-separator", ","],
    "grpo": ["--estimator", "grpo"],  # group z-scores instead of RLOO (paper Eq. 7)
    "reinforce": ["--estimator", "reinforce"],  # no baseline at all (paper Eq. 8)
    # trust the PRM only as far as it ranks fresh samples
    "adaptive-coef": ["--adaptive-process-coef"],
    # how does PRIME cope with a verifier wrong 20% of the time?
    "outcome-noise-0.2": ["--outcome-noise", "0.2"],
    "outcome-only-noise-0.2": ["--no-prm", "--outcome-noise", "0.2"],  # ... and outcome-only RLOO?
    "min-credit": ["--credit", "min"],  # PURE's min-form credit instead of PRIME's sum
    # credit per digit column, trusted only as far as the PRM ranks fresh samples better than chance
    "step-adaptive": ["--granularity", "step", "--step-separator", ",", "--adaptive-process-coef"],
    # what a perfect PRM could buy: the task's true step credit in place of the implicit rewards
    "oracle": ["--oracle-process-reward", "first-error"],
    # ... in the paper's terms: each step's change of the value of its prefix
    "value-oracle": ["--oracle-process-reward", "value"],
    # 20% of labels flipped, corrected for the rate assumed (right, or misjudged as 10%)
    "corrected-noise-0.2": ["--outcome-noise", "0.2", "--noise-correction", "0.2"],
    "outcome-only-corrected-noise-0.2": ["--no-prm", "--outcome-noise", "0.2",
                                         "--noise-correction", "0.2"],
    "corrected-0.1-noise-0.2": ["--outcome-noise", "0.2", "--noise-correction", "0.1"],
    # guarded PRIME: process credit faded in as the PRM ranks fresh samples, at most half the
    # outcome's size
    "guarded": GUARD,
    # the guard, labels corrected for the flip rate assumed and denoised by the PRM's view
    "defended-noise-0.2": [*GUARD, *DEFENCE, "0.2", "--outcome-noise", "0.2"],
    "defended-0.1-noise-0.2": [*GUARD, *DEFENCE, "0.1", "--outcome-noise", "0.2"],
    # a targeted attack: wrong answers ending in 7 labelled right. Does the policy learn it?
    "outcome-only-poison": ["--no-prm", "--outcome-poison"],
    "prime-poison": ["--outcome-poison"],
    "guarded-poison": [*GUARD, "--outcome-poison"],
}
DEFAULT_CONFIGS = ["prime", "outcome-only", "offline-prm", "whole"]
# noisy configuration -> its clean configuration
NOISY = {"outcome-noise-0.2": "prime", "outcome-only-noise-0.2": "outcome-only",
         "corrected-noise-0.2": "prime", "outcome-only-corrected-noise-0.2": "outcome-only",
         "corrected-0.1-noise-0.2": "prime", "defended-noise-0.2": "guarded",
         "defended-0.1-noise-0.2": "guarded"}
# poisoned configuration -> its clean configuration
POISONED = {"outcome-only-poison": "outcome-only", "prime-poison": "prime",
            "guarded-poison": "guarded"}


def offline_prm(seed, args, extra):
    """The offline PRM of a seed: trained for --offline-prm-steps PRIME steps with the policy
    frozen (--lr 0), i.e. on the initial policy's samples only, then frozen for the offline-prm
    run. (An offline PRM that equals its reference, the SFT model, would give q = 0: outcome-only
    RLOO.)"""
    run_dir = os.path.join(args.out, f"offline-prm-training-seed{seed}")
    prm = os.path.join(run_dir, f"checkpoint-{args.offline_prm_steps:06d}", "prm")
    if not os.path.isdir(prm):  # (an unfinished training run is replaced: --overwrite)
        subprocess.run([sys.executable, os.path.join(ROOT, "prime.py"), "--run-dir", run_dir,
                        "--seed", str(seed), "--steps", str(args.offline_prm_steps),
                        "--save-every", str(args.offline_prm_steps), "--lr", "0",
                        "--overwrite", *extra], check=True, cwd=ROOT)
    return prm


def run_once(name, seed, args, extra):
    """Run one configuration and seed (unless its run directory is complete); its metrics rows and
    whether it ran."""
    run_dir = os.path.join(args.out, f"{name}-seed{seed}")
    path = os.path.join(run_dir, "metrics.jsonl")
    done = os.path.exists(path) and any(json.loads(line)["step"] == args.steps
                                        for line in open(path))
    # an unfinished run (killed midway, no checkpoint) is started again: --overwrite
    if not done:
        flags = [offline_prm(seed, args, extra) if f == "{offline_prm}" else f
                 for f in CONFIGS[name]]
        subprocess.run([sys.executable, os.path.join(ROOT, "prime.py"), "--run-dir", run_dir,
                        "--seed", str(seed), "--steps", str(args.steps), "--overwrite", *flags,
                        *extra], check=True, cwd=ROOT)
    return [json.loads(line) for line in open(path)], not done


def curve_rows(name, seed, metrics):
    """One row per logged step; samples seen = responses sampled (and verified) so far."""
    rows, seen = [], 0
    for m in metrics:
        seen += sum(v for k, v in m.items() if k.startswith("verifier/"))
        rows.append({"config": name, "seed": seed, "step": m["step"], "samples_seen": seen,
                     "rollout_accuracy": m.get("rollout/accuracy", ""),
                     "eval_accuracy": m.get("eval/accuracy", ""),
                     # held-out answers ending in 7, the --outcome-poison trigger
                     "trigger_rate": m.get("eval/trigger_rate", ""),
                     "prm_accuracy": m.get("prm/accuracy", ""),
                     "first_error_hit": m.get("prm/first_error_hit", ""),
                     "first_error_chance": m.get("prm/first_error_chance", ""),
                     # --task image-addition: over responses that first misread the image, or
                     # first added wrong
                     "first_error_hit_perception": m.get("prm/first_error_hit_perception", ""),
                     "first_error_hit_arithmetic": m.get("prm/first_error_hit_arithmetic", "")})
    return rows


def summarize(rows, target, base="outcome-only"):
    """Per configuration: seeds, start and final eval accuracy (mean; final min, max), the mean
    responses sampled at the first eval reaching `target` (None unless every seed reached it),
    those responses as a fraction of `base`'s on the same seed (min, max over the seeds where both
    reached it), and the PRM's pairwise accuracy and first-error hit rate (with its chance) over
    each run's first and last 10 steps, averaged over seeds (None without them)."""
    def window_means(per_seed, window):  # mean over seeds of each run's mean over a 10-step window
        means = [sum(w) / len(w) for w in (window(v) for v in per_seed.values()) if w]
        return sum(means) / len(means) if means else None

    table, reach_by = {}, {}
    for name in dict.fromkeys(r["config"] for r in rows):
        runs = {}
        series = {key: {} for key in ("prm_accuracy", "first_error_hit", "first_error_chance",
                                      "first_error_hit_perception",
                                      "first_error_hit_arithmetic")}
        for r in (r for r in rows if r["config"] == name):
            if r["eval_accuracy"] != "":
                runs.setdefault(r["seed"], []).append(r)
            for key, per_seed in series.items():
                # x == x is False for NaN: a step without pairs, or without wrong answers
                if r[key] != "" and r[key] == r[key]:
                    per_seed.setdefault(r["seed"], []).append(r[key])
        finals = [evals[-1]["eval_accuracy"] for evals in runs.values()]
        reach_by[name] = {seed: next((e["samples_seen"] for e in evals
                                      if e["eval_accuracy"] >= target), None)
                          for seed, evals in runs.items()}
        reach = list(reach_by[name].values())
        table[name] = {"seeds": len(runs),
                       "start": sum(e[0]["eval_accuracy"] for e in runs.values()) / len(runs),
                       "final": sum(finals) / len(finals), "min": min(finals), "max": max(finals),
                       "samples_to_target": None if None in reach else sum(reach) / len(reach),
                       **{f"{key}_{part}": window_means(per_seed, cut)
                          for key, per_seed in series.items()
                          for part, cut in (("first", lambda v: v[:10]),
                                            ("last", lambda v: v[-10:]))}}
    for name, t in table.items():
        pairs = [(n, reach_by[base][seed]) for seed, n in reach_by[name].items()
                 if n and reach_by.get(base, {}).get(seed)]
        t["vs_base"] = ((min(n / b for n, b in pairs), max(n / b for n, b in pairs)) if pairs
                        else None)
    return table


def noise_kept(rows):
    """Per noisy configuration whose clean one ran too: (clean, seeds, mean clean gain, mean noisy
    gain, noisy / clean gain per seed), gains being final - start eval accuracy on the same
    seeds."""
    gains = {}  # (config, seed) -> final - start eval accuracy
    for r in rows:
        if r["eval_accuracy"] != "":
            first, _ = gains.get((r["config"], r["seed"]), (r["eval_accuracy"], None))
            gains[(r["config"], r["seed"])] = (first, r["eval_accuracy"])
    gain = {key: last - first for key, (first, last) in gains.items()}
    out = {}
    for noisy, clean in NOISY.items():
        seeds = sorted(s for c, s in gain if c == noisy and (clean, s) in gain)
        if seeds:
            out[noisy] = (clean, len(seeds), sum(gain[(clean, s)] for s in seeds) / len(seeds),
                          sum(gain[(noisy, s)] for s in seeds) / len(seeds),
                          [gain[(noisy, s)] / gain[(clean, s)] for s in seeds])
    return out


def trigger_rates(rows):
    """Per poisoned configuration that ran, and its clean one: (seeds, mean trigger rate
    at the first eval, mean at the last, (min, max) at the last): how often the policy's held-out
    answers end in the trigger."""
    runs = {}  # (config, seed) -> trigger rates in eval order
    for r in rows:
        if r["trigger_rate"] != "":
            runs.setdefault((r["config"], r["seed"]), []).append(r["trigger_rate"])
    out = {}
    ran = {c for c, _ in runs}
    for name in [n for pair in POISONED.items() if pair[0] in ran for n in pair]:
        seeds = [v for (c, _), v in runs.items() if c == name]
        if seeds:  # a clean configuration may not have run
            finals = [v[-1] for v in seeds]
            out[name] = (len(seeds), sum(v[0] for v in seeds) / len(seeds),
                         sum(finals) / len(finals), (min(finals), max(finals)))
    return out


def plot(rows, path):
    """curves.png: held-out accuracy (left) and the PRM's first-error hit rate (middle, smoothed
    over 10 steps, chance dotted) against responses sampled, mean and min-max over seeds; with a
    poisoned configuration, the held-out answers ending in the trigger (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    poisoned = any(r["config"] in POISONED for r in rows)
    fig, axes = plt.subplots(1, 3 if poisoned else 2, figsize=(19.5 if poisoned else 13, 4.5))
    ax, hit_ax = axes[:2]
    for name in dict.fromkeys(r["config"] for r in rows):
        by_step = {}
        for r in rows:
            if r["config"] == name and r["eval_accuracy"] != "":
                by_step.setdefault(r["step"], []).append(r)
        # the steps every seed logged
        steps = sorted(s for s, rs in by_step.items() if len(rs) == max(map(len, by_step.values())))
        x = [sum(r["samples_seen"] for r in by_step[s]) / len(by_step[s]) for s in steps]
        accs = [[r["eval_accuracy"] for r in by_step[s]] for s in steps]
        line, = ax.plot(x, [sum(a) / len(a) for a in accs], label=f"{name} ({len(accs[0])} seeds)")
        ax.fill_between(x, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(),
                        alpha=0.15)
        rates = [[r["trigger_rate"] for r in by_step[s]] for s in steps]
        if poisoned and all(v != "" for a in rates for v in a):
            axes[2].plot(x, [sum(a) / len(a) for a in rates], color=line.get_color(), label=name)
        hits = {}  # step -> (samples seen, hit, chance) of each seed that logged one
        for r in rows:
            if (r["config"] == name and r["first_error_hit"] != ""
                    and r["first_error_hit"] == r["first_error_hit"]):
                hits.setdefault(r["step"], []).append((r["samples_seen"], r["first_error_hit"],
                                                       r["first_error_chance"]))
        if hits:
            steps = sorted(hits)
            # smoothing: the values of each step and of the 9 steps before it
            windows = [[v for s in steps[max(0, i - 9):i + 1] for v in hits[s]]
                       for i in range(len(steps))]
            x = [sum(v[0] for v in hits[s]) / len(hits[s]) for s in steps]
            hit_ax.plot(x, [sum(v[1] for v in w) / len(w) for w in windows],
                        color=line.get_color(), label=name)
            hit_ax.plot(x, [sum(v[2] for v in w) / len(w) for w in windows],
                        color=line.get_color(), linestyle=":")
    ax.set_xlabel("responses sampled")
    ax.set_ylabel("held-out greedy accuracy")
    hit_ax.set_xlabel("responses sampled")
    hit_ax.set_ylabel("PRM blames the first wrong step (dotted: chance)")
    if poisoned:
        axes[2].set_xlabel("responses sampled")
        axes[2].set_ylabel("held-out answers ending in 7 (the trigger)")
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation",
                        help="folder for the runs, curves.csv and curves.png")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from {list(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="PRIME steps per run")
    parser.add_argument("--budget-minutes", type=float, default=float("inf"),
                        help="start no run that would, at the pace so far, end past this")
    parser.add_argument("--offline-prm-steps", type=int, default=20,
                        help="steps the offline PRM trains on the initial policy's samples before "
                             "it is frozen")
    parser.add_argument("--target", type=float, default=0.7,
                        help="eval accuracy for the samples-to-target column")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    os.makedirs(args.out, exist_ok=True)
    rows, t0, runs = [], time.time(), 0
    for seed in map(int, args.seeds.split(",")):
        for name in names:
            elapsed = (time.time() - t0) / 60
            # pace of runs made here, not reused ones
            if runs and elapsed + elapsed / runs > args.budget_minutes:
                print(f"budget: stopping after {runs} new runs ({elapsed:.1f} min)")
                break
            metrics, ran = run_once(name, seed, args, extra)
            rows += curve_rows(name, seed, metrics)
            runs += ran
        else:
            continue
        break
    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "curves.png"))
    table = summarize(rows, args.target)

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    print(f"\n| configuration | seeds | eval at start | final eval (min-max) "
          f"| responses to {args.target:.0%} "
          f"| vs outcome-only, per seed | PRM pairwise acc., first / last 10 steps "
          f"| first-error hit (chance), first / last 10 steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in table.items():
        reach = f"{t['samples_to_target']:,.0f}" if t["samples_to_target"] else "not every seed"
        ratio = "-" if t["vs_base"] is None else f"{t['vs_base'][0]:.2f}-{t['vs_base'][1]:.2f}x"
        hit = "-" if t["first_error_hit_first"] is None else (
            f"{t['first_error_hit_first']:.2f} ({t['first_error_chance_first']:.2f}) / "
            f"{t['first_error_hit_last']:.2f} ({t['first_error_chance_last']:.2f})")
        print(f"| {name} | {t['seeds']} | {t['start']:.1%} | {t['final']:.1%} "
              f"({t['min']:.1%}-{t['max']:.1%}) "
              f"| {reach} | {ratio} | {fmt(t['prm_accuracy_first'], '.2f')} / "
              f"{fmt(t['prm_accuracy_last'], '.2f')} "
              f"| {hit} |")
    kinds = {name: t for name, t in table.items()
             if t["first_error_hit_perception_last"] is not None}
    if kinds:  # the image task: does the PRM blame misreading and mis-adding alike?
        print("\n| configuration | first-error hit where reading went wrong first, first / last "
              "10 steps | ... where adding went wrong first |")
        print("|---|---:|---:|")
        for name, t in kinds.items():
            print(f"| {name} | {fmt(t['first_error_hit_perception_first'], '.2f')} / "
                  f"{fmt(t['first_error_hit_perception_last'], '.2f')} "
                  f"| {fmt(t['first_error_hit_arithmetic_first'], '.2f')} / "
                  f"{fmt(t['first_error_hit_arithmetic_last'], '.2f')} |")
    kept = noise_kept(rows)
    if kept:
        print("\n| configuration | seeds | clean gain | gain with flipped labels "
              "| kept (min-max over seeds) |")
        print("|---|---:|---:|---:|---:|")
        for noisy, (clean, n, clean_gain, noisy_gain, ratios) in kept.items():
            print(f"| {clean} vs {noisy} | {n} | {clean_gain:+.1%} | {noisy_gain:+.1%} "
                  f"| {noisy_gain / clean_gain:.0%} ({min(ratios):.0%} to {max(ratios):.0%}) |")
    triggers = trigger_rates(rows)
    if triggers:  # only when a poisoned configuration ran
        print("\n| configuration | seeds | held-out answers ending in 7, start | final "
              "(min-max) |")
        print("|---|---:|---:|---:|")
        for name, (n, start, final, (low, high)) in triggers.items():
            print(f"| {name} | {n} | {start:.1%} | {final:.1%} ({low:.1%}-{high:.1%}) |")
    print(f"\n{os.path.join(args.out, 'curves.csv')}, {os.path.join(args.out, 'curves.png')} "
          f"({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
