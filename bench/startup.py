"""Start-up against dataset size: `prime.py --steps 1` on a 300-row and a 300,000-row parquet of
Eurus-2-style math rows (the fixture's, repeated), wall time and peak memory of each.

    python bench/startup.py [--rows 300,300000] [--model PATH]

Training rows are read and checked as they are drawn, so start-up should not grow with the file
(target: the large file within 1.5x the time and +1 GiB the peak memory of the small one). Peak
memory is the child's maximum resident set (getrusage). The embedded model must be cached
(run `python bootstrap.py` once) unless --model is given.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "eurus2_sample.jsonl")


def write_rows(path, n):
    import pyarrow
    import pyarrow.parquet
    rows = [json.loads(line) for line in open(FIXTURE)]
    rows = [r for r in rows if r["ability"] == "math"]
    table = pyarrow.Table.from_pylist([dict(rows[i % len(rows)], extra_info={"index": i})
                                       for i in range(n)])
    pyarrow.parquet.write_table(table, path)


def run(data, model, out):
    """(seconds, peak RSS in GiB) of one `prime.py --steps 1` in its own process."""
    cmd = [sys.executable, os.path.join(ROOT, "prime.py"), "--data", data, "--steps", "1",
           "--prompts-per-step", "16", "--eval-size", "50", "--filter-low", "0",
           "--filter-high", "1", "--max-response-len", "32", "--run-dir", out,
           *(["--model", model] if model else [])]
    # a fresh parent per run: RUSAGE_CHILDREN's peak is then this run's (its largest process)
    wrapper = ("import resource, subprocess, sys, time; t0 = time.time(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.stderr.write(p.stderr[-3000:] if p.returncode else '')")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.stderr:
        sys.exit(proc.stderr)
    seconds, kib = proc.stdout.split()
    return float(seconds), int(kib) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="300,300000")
    parser.add_argument("--model", default="", help="model folder ('' = the cached embedded model)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    work = tempfile.mkdtemp(prefix="prime-startup-")
    print(f"load average {os.getloadavg()[0]:.2f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("\n| rows | parquet MB | wall s (start + 1 step) | peak RSS GiB |\n|---:|---:|---:|---:|")
    for n in sizes:
        path = os.path.join(work, f"rows{n}.parquet")
        write_rows(path, n)
        seconds, peak = run(path, args.model, os.path.join(work, f"run{n}"))
        print(f"| {n:,} | {os.path.getsize(path) / 1e6:.1f} | {seconds:.1f} | {peak:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
