"""Verifier throughput: 1,000 GSM-style math responses and 100 small code responses through
`sandbox.score_batch` (worker processes scoring each item with `verifier.score_one`).

    python bench/verifier_speed.py [--workers 2]

Math answers mix the integer fast path (most GSM answers) with forms that need math-verify
(`\\$1,200`, `12.50`, `\\frac{3}{4}`) and misses; code responses are short stdin programs and
call-based functions with 3 tests each, every test its own sandboxed process. The first batch
also pays for starting the workers (each imports math-verify), reported separately.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sandbox import score_batch  # noqa: E402


def math_items(n, rng):
    responses, truths = [], []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        kind = rng.random()
        if kind < 0.6:
            answer, truth = str(a + b), str(a + b)  # exact: fast path
        elif kind < 0.7:
            # dollars, thousands separator
            answer, truth = f"\\${(a + b) * 10:,}", str((a + b) * 10)
        elif kind < 0.8:
            answer, truth = f"{a}.50", f"\\frac{{{2 * a + 1}}}{{2}}"
        elif kind < 0.95:
            answer, truth = str(a + b + 1), str(a + b)  # wrong
        else:
            responses.append(f"{a} plus {b} is {a + b}.")  # no box
            truths.append(str(a + b))
            continue
        responses.append(f"First, {a} + {b}. Carrying gives the total.\n"
                         f"The answer is \\boxed{{{answer}}}.")
        truths.append(truth)
    return responses, truths


def code_items(n, rng):
    stdin_tests = {"inputs": ["3 4\n", "10 -2\n", "0 0\n"], "outputs": ["7\n", "8\n", "0\n"]}
    call_tests = {"fn_name": "add", "inputs": [[3, 4], [10, -2], [0, 0]], "outputs": [7, 8, 0]}
    programs = [
        (stdin_tests, "a, b = map(int, input().split())\nprint(a + b)"),  # all pass
        (stdin_tests, "a, b = map(int, input().split())\nprint(a + abs(b))"),  # 2 of 3
        (call_tests,
         "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b"),
        (call_tests, "def add(a, b):\n    return a * b"),  # 1 of 3
    ]
    responses, truths = [], []
    for _ in range(n):
        tests, code = rng.choice(programs)
        responses.append(f"Read the numbers and add them.\n```python\n{code}\n```")
        truths.append(tests)
    return responses, truths


def timed(name, responses, truths, ability, workers):
    t = time.perf_counter()
    rewards, info = score_batch(responses, truths, [ability] * len(responses), workers=workers)
    seconds = time.perf_counter() - t
    print(f"{name:28s} {len(responses):5d} items  {seconds:6.2f} s  "
          f"{len(responses) / seconds:7.1f} items/s  "
          f"mean reward {sum(rewards) / len(rewards):.3f}  {info}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    args = parser.parse_args()
    rng = random.Random(0)
    t = time.perf_counter()
    score_batch([r"\boxed{1}"] * args.workers, ["1"] * args.workers, ["math"] * args.workers,
                workers=args.workers)
    print(f"first batch (starts the workers, which import math-verify): "
          f"{time.perf_counter() - t:.2f} s")
    timed("math (GSM-style)", *math_items(1000, rng), "math", args.workers)
    timed("code (3 sandboxed tests each)", *code_items(100, rng), "code", args.workers)


if __name__ == "__main__":
    main()
