"""Outcome rewards (PRIME's "outcome verifier"): the task's answer checking; forks replace it.

- Math: 1 if the last \\boxed{} answer equals the ground truth, else 0. Equivalence is decided by
  math-verify (fractions vs decimals, `x = 5` vs `5`, intervals, sets, ...), after a fast path for
  the common exact and integer cases.
- Code: the fraction of the row's tests that the last ```python block passes, each test run by
  sandbox.py in its own process under bubblewrap with resource limits (see `code_reward`). Where
  the sandbox cannot start, code rewards refuse to run (`sandbox.SandboxUnavailable`) unless the
  caller passes `allow_unsandboxed=True` (the trainer's `--allow-unsandboxed-code`): then limits
  only.
- `score_one(response, ground_truth, ability, allow_unsandboxed)`: one item's (reward, reason),
  routed by the row's ability. The trainer never calls it directly: `sandbox.score_batch` calls it
  in worker processes, one item at a time, each under a hard deadline.

What a fork for a new task replaces: `score_one` and what it calls, keeping its contract (one
item in, (reward in [0, 1], reason) out; a bad item scores 0 with a reason, never raises; code
runs only through `sandbox.run_python`, and SandboxUnavailable is raised, not swallowed). What it
keeps: sandbox.py, the sandbox for generated code and the worker pool with its deadlines.

math-verify times out with `signal.alarm`, which works only in a process's main thread: call
`math_reward` from the main thread or from worker processes (as `sandbox.score_batch` does), never
from a thread. Calling it from a thread raises at once rather than silently scoring everything 0.
"""

import json
import math
import re
import sys
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

import sandbox

# Seconds per math-verify stage; signal.alarm takes whole seconds. A normal answer takes under
# 0.1 s once warm, so only pathological answers hit these. Worst case 1 + 1 + 2 = 4 s per item.
PARSE_TIMEOUT_S = 1  # each of: parse gold, parse answer
VERIFY_TIMEOUT_S = 2
# Real final answers are short; anything longer is refused before sympy sees it, so a
# 200k-character or thousand-deep "answer" costs microseconds, not a timeout.
MAX_ANSWER_CHARS = 1000

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# One token per brace or backslash escape, so `\{` and `\}` (set braces) do not count as groups.
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)
_INT = re.compile(r"-?\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`; None if none or unbalanced.

    As in the MATH / PRIME `last_boxed_only_string`, "last" means the last opening: an unbalanced
    final box (a truncated response) gives None, not an earlier, intermediate box.
    One regex scan from that opening: linear time, no recursion, so deep nesting is fine.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    opening = _BOX_OPEN.match(text, start) if start >= 0 else None
    if opening is None:
        return None
    depth = 1
    for tok in _BRACE_TOKENS.finditer(text, opening.end()):
        if tok.group() == "{":
            depth += 1
        elif tok.group() == "}":
            depth -= 1
            if depth == 0:
                return text[opening.end() : tok.start()]
    return None


def math_reward_with_reason(response: str, ground_truth: str) -> tuple[float, str]:
    """(reward, reason), reason one of "ok", "wrong", "no_answer", "too_long", "invalid",
    "timeout", "error".

    Never raises for a bad response: an exception inside the checker scores that item 0 ("error").
    (The official PRIME verifier gives the whole batch 0.5 when one item raises.)
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "math_reward uses math-verify's signal.alarm timeouts, which only work in a main "
            "thread: call it from the main thread or from worker processes, not from a thread"
        )
    # Only a boxed answer counts, no lenient fallback to "the last number in the text": a lenient
    # extractor is a reward-hacking surface (the policy learns to list many candidate numbers).
    answer = extract_boxed(response)
    if answer is None or not answer.strip():
        return 0.0, "no_answer"
    answer, ground_truth = answer.strip(), ground_truth.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        return 0.0, "too_long"
    if "\x00" in answer:  # no real answer contains NUL: refuse it rather than parse it
        return 0.0, "invalid"
    # Fast path (~2 us vs 1-4 ms in math-verify): the trainer scores hundreds of responses per
    # step, and most answers (GSM-style) are exact copies of the ground truth or plain integers.
    if answer == ground_truth:
        return 1.0, "ok"
    try:
        if _INT.fullmatch(answer) and _INT.fullmatch(ground_truth):
            ok = int(answer) == int(ground_truth)  # math-verify agrees (checked on 1000 pairs)
        else:
            # Wrap both in \boxed{} so math-verify takes the whole string as the answer.
            # raise_on_error=True so a timeout or crash is reported as such rather than as "wrong".
            limits = dict(parsing_timeout=PARSE_TIMEOUT_S, raise_on_error=True)
            gold = parse(f"\\boxed{{{ground_truth}}}", **limits)
            pred = parse(f"\\boxed{{{answer}}}", **limits)
            ok = verify(gold, pred, timeout_seconds=VERIFY_TIMEOUT_S,  # gold first
                        raise_on_error=True)
    except TimeoutException:  # derives from BaseException, so `except Exception` would miss it
        return 0.0, "timeout"
    except Exception:
        return 0.0, "error"
    return (1.0, "ok") if ok else (0.0, "wrong")


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer in `response` is mathematically equivalent to `ground_truth`."""
    return math_reward_with_reason(response, ground_truth)[0]


# ==============================================================================================
# Code: run the response's program against the row's tests, each test in its own sandbox.
#
# Reward = fraction of tests passed, a soft label that PRIME's BCE loss takes as it is. The
# official PRIME `prime_code.compute_score` returns 1 only if every test passes (its "continuous"
# option: the fraction of the first 10 tests); we use the fraction of all tests so partly correct
# programs are told apart, and no block of code scores 0 (official: the whole response is run).

TEST_TIMEOUT_S = 5.0  # wall clock per test, as in the official code

_CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
# LeetCode-style solutions use these names without importing them.
_CALL_HEADER = ("from typing import *\nfrom collections import *\n"
                "import math, heapq, bisect, itertools, functools, re\n")
# Runs a call-based test: the solution's prints go nowhere, the return value goes to stdout as JSON.
_CALL_DRIVER = """
import contextlib, io, json, sys
fn_name, args = sys.argv[1], json.loads(sys.stdin.read())
with contextlib.redirect_stdout(io.StringIO()):
    ns = {"__name__": "solution"}
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    owner = ns["Solution"]() if hasattr(ns.get("Solution"), fn_name) else None
    result = getattr(owner, fn_name) if owner else ns[fn_name]
    result = result(*args)
print(json.dumps(result))
"""


def extract_code(text: str) -> str | None:
    """The last complete ```python fenced block in `text`, or None. A truncated final block does
    not count (the official `split('```python')[-1]` would run it, or the whole response)."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def _run_test(code, fn_name, test_input, timeout_s, allow_unsandboxed: bool):
    """`sandbox.run_python` of `code` on one test: (exited 0 in time, its stdout, its stderr)."""
    if fn_name is None:  # stdin/stdout program
        return sandbox.run_python(code, _as_text(test_input), timeout_s,
                                  allow_unsandboxed=allow_unsandboxed)
    # call-based: the input is the list of arguments; the driver runs solution.py
    return sandbox.run_python(_CALL_HEADER + code, json.dumps(test_input), timeout_s,
                              ("-c", _CALL_DRIVER, fn_name), allow_unsandboxed)


def _as_text(value) -> str:
    """APPS stores some stdin/stdout tests as lists of lines."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_stdout(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace per line and trailing blank lines; if the expected output is
    all numbers, compared token by token as numbers (integers exactly, floats to 1e-6)."""
    def lines(s):
        return [line.rstrip() for line in s.rstrip().splitlines()]

    if lines(got) == lines(expected):
        return True
    want, have = expected.split(), got.split()
    if len(want) != len(have) or not want:
        return False
    try:
        for w, h in zip(want, have):
            if re.fullmatch(r"[-+]?\d+", w) and re.fullmatch(r"[-+]?\d+", h):
                if int(w) != int(h):
                    return False
            elif not math.isclose(float(w), float(h), rel_tol=1e-6, abs_tol=1e-6):
                return False
    except ValueError:  # a token that is not a number
        return False
    return True


def _same_return(got, expected) -> bool:
    """Call-based: as APPS, a tuple equals a list (JSON round trip), and an expected value may be
    wrapped in a one-element list; floats to 1e-6."""
    if got == expected or (isinstance(expected, list) and len(expected) == 1
                           and got == expected[0]):
        return True
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-6)
    return False


def code_reward_with_reason(response: str, tests, timeout_s: float = TEST_TIMEOUT_S,
                            allow_unsandboxed: bool = False) -> tuple[float, str]:
    """(fraction of tests passed, reason), reason one of "ok" (all), "partial", "wrong" (none),
    "no_answer" (no ```python block). Raises ValueError for malformed `tests` (a data error), and
    SandboxUnavailable where the sandbox cannot start, unless `allow_unsandboxed`."""
    sandbox.require_sandbox(allow_unsandboxed)  # refused before looking at the response
    if isinstance(tests, str):
        tests = json.loads(tests)
    inputs, outputs = ((tests.get("inputs"), tests.get("outputs")) if isinstance(tests, dict)
                       else (None, None))
    if (not inputs or not isinstance(inputs, list) or not isinstance(outputs, list)
            or len(inputs) != len(outputs)):
        raise ValueError("code tests need equal-length non-empty lists 'inputs' and 'outputs', "
                         f"got {str(tests)[:200]}")
    code = extract_code(response)
    if code is None:
        return 0.0, "no_answer"
    fn_name = tests.get("fn_name")
    passed = 0
    for test_input, expected in zip(inputs, outputs):
        ok, out, _ = _run_test(code, fn_name, test_input, timeout_s, allow_unsandboxed)
        if not ok:
            continue
        text = out.decode(errors="replace")
        if fn_name is None:
            passed += _same_stdout(text, _as_text(expected))
        else:
            try:
                passed += _same_return(json.loads(text), expected)
            except ValueError:  # the program printed around the driver, or crashed mid-line
                pass
    reward = passed / len(inputs)
    return reward, "ok" if reward == 1 else "partial" if reward > 0 else "wrong"


def code_reward(response: str, tests, timeout_s: float = TEST_TIMEOUT_S,
                allow_unsandboxed: bool = False) -> float:
    """Fraction of the Eurus-2 / APPS `tests` ({"inputs", "outputs"[, "fn_name"]}, a dict or JSON
    string) that the last ```python block in `response` passes; each test runs in a fresh process
    under bubblewrap (read-only host, no network, own pid namespace, only a temp dir writable) with
    CPU, memory, file-size and process limits and a wall-clock timeout of `timeout_s`
    (`sandbox.run_python`). Where the sandbox cannot start it raises SandboxUnavailable, or with
    `allow_unsandboxed` runs the tests with the limits only."""
    return code_reward_with_reason(response, tests, timeout_s, allow_unsandboxed)[0]


# ==============================================================================================
# One item: what sandbox.score_batch's workers call, and what a fork replaces.

def score_one(response: str, ground_truth, ability: str,
              allow_unsandboxed: bool = False) -> tuple[float, str]:
    """(reward, reason) for one item; "math" -> math_reward, "code" -> code_reward (the ground
    truth is the tests JSON). Never raises for a bad item: an exception scores 0 with reason
    "error". SandboxUnavailable is raised: it is the caller's setup, not the item."""
    try:
        if ability == "math":
            return math_reward_with_reason(response, ground_truth)
        if ability == "code":
            return code_reward_with_reason(response, ground_truth,
                                           allow_unsandboxed=allow_unsandboxed)
        return 0.0, "unknown_ability"
    except sandbox.SandboxUnavailable:
        raise
    except Exception as e:
        message = f"verifier: {ability} item scored 0, the checker raised {type(e).__name__}: {e}"
        print(message[:500], file=sys.stderr, flush=True)
        return 0.0, "error"
