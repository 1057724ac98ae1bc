"""Outcome rewards for math: 1 if the last \\boxed{} answer equals the ground truth, else 0.

This is the task-specific half of the reward (PRIME's "outcome verifier"); forks replace this file.
Equivalence is decided by math-verify (fractions vs decimals, `x = 5` vs `5`, intervals, sets, ...),
after a fast path for the common exact and integer cases.

math-verify times out with `signal.alarm`, which works only in a process's main thread: call
`math_reward` from the main thread or from worker processes (e.g. `multiprocessing.Pool`), never
from a thread. Calling it from a thread raises at once rather than silently scoring everything 0.
"""

import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# Seconds per math-verify stage (parse gold, parse answer, compare); signal.alarm takes whole
# seconds. A normal answer takes under 0.1 s once warm, so only pathological answers hit this.
TIMEOUT_S = 2

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
    """(reward, reason), reason one of "ok", "wrong", "no_answer", "timeout", "error".

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
            limits = dict(parsing_timeout=TIMEOUT_S, raise_on_error=True)
            gold = parse(f"\\boxed{{{ground_truth}}}", **limits)
            pred = parse(f"\\boxed{{{answer}}}", **limits)
            ok = verify(gold, pred, timeout_seconds=TIMEOUT_S, raise_on_error=True)  # gold first
    except TimeoutException:  # derives from BaseException, so `except Exception` would miss it
        return 0.0, "timeout"
    except Exception:
        return 0.0, "error"
    return (1.0, "ok") if ok else (0.0, "wrong")


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer in `response` is mathematically equivalent to `ground_truth`."""
    return math_reward_with_reason(response, ground_truth)[0]
