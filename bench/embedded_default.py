"""The embedded default, measured end to end: `python prime.py` from an empty model cache.

    python bench/embedded_default.py [--keep-cache] [extra prime.py flags ...]

Builds the tiny model from scratch in a fresh cache (warm-up included, unless --keep-cache), runs
PRIME with the default flags, and prints the wall-clock time and the greedy eval curve. The
targets of the project's embedded default: at most 15 minutes on a 2-core CPU, and at least +10
points of held-out greedy accuracy from the warm-up model to the final policy.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    extra = [a for a in sys.argv[1:] if a != "--keep-cache"]
    cache = (os.path.expanduser("~/.cache/prime") if "--keep-cache" in sys.argv
             else tempfile.mkdtemp(prefix="prime-cache-"))
    run_dir = tempfile.mkdtemp(prefix="prime-run-")
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "prime.py"), "--cache-dir", cache,
                    "--run-dir", run_dir, *extra], check=True, cwd=ROOT)
    minutes = (time.time() - t0) / 60
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [(m["step"], m["eval/accuracy"]) for m in metrics if "eval/accuracy" in m]
    print(f"\nrun dir: {run_dir}\n\n| step | eval accuracy | rollout accuracy (last 10 steps) "
          f"| PRM pairwise accuracy (last 10) |")
    print("|---:|---:|---:|---:|")

    def mean(window, key, fmt):  # of `key` over the metrics rows in `window`; "-" without it
        if not (window and key in window[0]):
            return "-"
        return format(sum(m[key] for m in window) / len(window), fmt)

    for step, acc in evals:
        window = [m for m in metrics if step - 10 < m["step"] <= step and "rollout/accuracy" in m]
        print(f"| {step} | {acc:.1%} | {mean(window, 'rollout/accuracy', '.1%')} "
              f"| {mean(window, 'prm/accuracy', '.3f')} |")
    gain = 100 * (evals[-1][1] - evals[0][1])
    print(f"\nwall clock {minutes:.1f} min (target <= 15); eval {evals[0][1]:.1%} -> "
          f"{evals[-1][1]:.1%} ({gain:+.1f} points, target >= +10)")


if __name__ == "__main__":
    main()
