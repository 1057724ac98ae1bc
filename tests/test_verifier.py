"""verifier.py: boxed-answer extraction and the math outcome reward; the code reward (extracting
the program, comparing its output with the tests', the fraction passed); score_one, the one
function the worker pool calls per item. The sandbox and the pool are tested in test_sandbox.py.

The programs run here are benign: they run with `allow_unsandboxed=True`, sandboxed wherever the
sandbox starts, so these tests also run where it does not.
"""

import json
import threading
import time

import pytest
from math_verify.errors import TimeoutException

import sandbox
import verifier
from sandbox import SandboxUnavailable
from verifier import (
    code_reward,
    code_reward_with_reason,
    extract_boxed,
    extract_code,
    math_reward,
    math_reward_with_reason,
    score_one,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left(\frac{a}{b}, c^{2}\right)}", r"\left(\frac{a}{b}, c^{2}\right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped set braces are not groups
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # ... even when unpaired
        (r"first \boxed{1}, finally \boxed{2}", "2"),  # last box wins
        (r"\boxed{1} then \fbox{3}", "3"),
        (r"\fbox{3} then \boxed {4}", "4"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{1} but then \boxed{\frac{1}{2}", None),  # truncated final box: no fallback
        (r"\boxed{1}}", "1"),
        (r"\boxed 5", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deep_and_long():
    deep = "{" * 1000 + "x" + "}" * 1000
    assert extract_boxed(r"\boxed{" + deep + "}") == deep
    # One linear scan: these take milliseconds; a quadratic scan or a recursion would take minutes
    # or overflow the stack, so the bound only needs to catch that, on however busy a machine.
    t = time.perf_counter()
    assert extract_boxed(r"\boxed{" + "{" * 200_000) is None
    assert extract_boxed("a " * 100_000 + r"\boxed{7}") == "7"
    assert time.perf_counter() - t < 10.0


CASES = [
    # (response, ground_truth, expected reward)
    (r"The answer is \boxed{42}.", "42", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{7}", "-7", 0.0),
    (r"\boxed{41}", "42", 0.0),
    (r"\boxed{007}", "7", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{11.99}", "12", 0.0),
    (r"\boxed{12.0}", "12", 1.0),
    (r"\boxed{\frac{24}{2}}", "12", 1.0),
    (r"\boxed{(2,1)}", "(1,2)", 0.0),
    (r"\boxed{[0,1]}", "[0,1)", 0.0),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),  # sets are unordered
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{5 \text{ cm}}", "5", 1.0),
    (r"\boxed{-\infty}", r"\infty", 0.0),
    (r"\fbox{8}", "8", 1.0),
    (r"\boxed{1 \text{ or } 5}", "5", 0.0),  # hedging between candidates earns nothing
    (r"first \boxed{3}, corrected: \boxed{5}", "5", 1.0),
    (r"first \boxed{5}, corrected: \boxed{3}", "5", 0.0),
    # percentages, sets, intervals, tuples, matrices
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{50\%}", r"50\%", 1.0),
    (r"\boxed{0.5}", r"50\%", 1.0),
    (r"\boxed{25\%}", "50", 0.0),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1.0),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    (r"\boxed{(0,1)}", "(0,1)", 1.0),
    (r"\boxed{(0,1]}", "(0,1)", 0.0),
    (r"\boxed{[0,1]}", "[0,1]", 1.0),
    (r"\boxed{[2,\infty)}", r"[2,\infty)", 1.0),
    (r"\boxed{(2,\infty)}", r"[2,\infty)", 0.0),
    (r"\boxed{(-\infty,3)\cup(3,\infty)}", r"(-\infty,3)\cup(3,\infty)", 1.0),
    (r"\boxed{(1,2,3)}", "(1,2,3)", 1.0),
    (r"\boxed{(1,2,3)}", "(1,3,2)", 0.0),
    (r"\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}", 0.0),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    # thousands separators, degrees, scientific notation (`1.5e3` is left out: in LaTeX the e
    # could be Euler's number, and math-verify scores it 0)
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{1{,}000{,}000}", "1000000", 1.0),
    (r"\boxed{12,345}", "12345", 1.0),
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{30^{\circ}}", r"30^\circ", 1.0),
    (r"\boxed{45^\circ}", "30", 0.0),
    (r"\boxed{1.5 \times 10^{3}}", "1500", 1.0),
    (r"\boxed{2 \times 10^{-3}}", "0.002", 1.0),
    (r"\boxed{3 \times 10^{3}}", "300", 0.0),
    # pi, surds, near misses
    (r"\boxed{2\pi}", r"2\pi", 1.0),
    (r"\boxed{\pi r^2}", r"r^2\pi", 1.0),
    (r"\boxed{6.28}", r"2\pi", 0.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    (r"\boxed{1+\sqrt{5}}", r"\sqrt{5}+1", 1.0),
    (r"\boxed{\frac{1+\sqrt{5}}{2}}", r"\frac{1-\sqrt{5}}{2}", 0.0),
    (r"\boxed{100}", "101", 0.0),
    (r"\boxed{0.333}", r"\frac13", 0.0),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", 0.0),
    # fractions, algebra, units, answer forms
    (r"\boxed{-\frac{1}{2}}", r"\frac{-1}{2}", 1.0),
    (r"\boxed{\frac{10}{4}}", r"\frac52", 1.0),
    (r"\boxed{2.5}", r"\frac52", 1.0),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
    (r"\boxed{x^2+1}", "(x-1)(x+1)", 0.0),
    (r"\boxed{y = 2x + 3}", "2x+3", 1.0),
    (r"\boxed{\$5.00}", "5", 1.0),
    (r"\boxed{5 \text{ dollars}}", "5", 1.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    (r"\boxed{\infty}", r"\infty", 1.0),
    (r"\boxed{x \in [1, 3)}", "[1,3)", 1.0),
    (r"\boxed{3, 5}", r"5, 3", 1.0),  # a bare list of solutions is a set; (1,2) above is a tuple
    (r"\boxed{10^{2}}", "100", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{\binom{5}{2}}", "10", 1.0),
    (r"\boxed{5!}", "120", 1.0),
    (r"\boxed{\log_2 8}", "3", 1.0),
    (r"\boxed{0.1 + 0.2}", "0.3", 1.0),
]


@pytest.mark.parametrize("response, ground_truth, expected", CASES)
def test_math_reward(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected


def test_reasons():
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (1.0, "ok")
    assert math_reward_with_reason(r"\boxed{0.6}", r"\frac12") == (0.0, "wrong")
    assert math_reward_with_reason("The answer is 5.", "5") == (0.0, "no_answer")
    assert math_reward_with_reason(r"\boxed{ }", "5") == (0.0, "no_answer")


def test_checker_exception_scores_zero(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("checker crashed")

    monkeypatch.setattr(verifier, "verify", boom)
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (0.0, "error")


def test_checker_timeout_scores_zero(monkeypatch):
    def slow(*args, **kwargs):
        raise TimeoutException("Operation timed out!")  # what math-verify's alarm handler raises

    monkeypatch.setattr(verifier, "verify", slow)
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (0.0, "timeout")


def test_long_response_returns_quickly():
    t = time.perf_counter()
    assert math_reward("word " * 40_000 + r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert time.perf_counter() - t < 10.0  # milliseconds; a scan quadratic in the length: minutes


# Answers that make sympy compute for ever run into math-verify's timeouts (a second or two each):
# one of them runs by default, the others with the slow tests.
slow = pytest.mark.slow
PATHOLOGICAL = [
    # (response, reasons it may score 0 with): each must return 0, never hang or raise
    (r"\boxed{9^{9^{9^{9}}}}", {"timeout", "wrong"}),
    pytest.param(r"\boxed{1000000!}", {"timeout", "wrong"}, marks=slow),
    pytest.param(r"\boxed{(10^{10})!}", {"timeout", "wrong"}, marks=slow),
    pytest.param(r"\boxed{2^{2^{40}}}", {"timeout", "wrong"}, marks=slow),
    pytest.param(r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", {"timeout", "wrong"},
                 marks=slow),  # deep, under the cap
    (r"\boxed{" + "{" * 1000 + "1" + "}" * 1000 + "}", {"too_long"}),  # thousand-deep nesting
    (r"\boxed{" + r"\frac{1}{" * 1000 + "2" + "}" * 1000 + "}", {"too_long"}),
    (r"\boxed{" + "1+" * 100_000 + "1}", {"too_long"}),  # a 200k-character answer
    (r"\boxed{" + "(" * 100_000 + "1" + ")" * 100_000 + "}", {"too_long"}),
    (r"\boxed{\frac{1}{2}", {"no_answer"}),  # unbalanced braces
    (r"\boxed{\left( 1 }", {"wrong", "error"}),  # unbalanced \left
    (r"\boxed{}}}{{{5}", {"no_answer"}),
    ("\\boxed{5\x00}", {"invalid"}),  # NUL byte
    ("\x00" * 1000 + "\\boxed{\x00}", {"invalid"}),
]


@pytest.mark.parametrize("response, reasons", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_score_zero_quickly(response, reasons, monkeypatch):
    # math-verify's own timeouts end these: 1 s each here (signal.alarm takes whole seconds).
    monkeypatch.setattr(verifier, "VERIFY_TIMEOUT_S", 1)
    t = time.perf_counter()
    reward, reason = math_reward_with_reason(response, "5")
    assert reward == 0.0 and reason in reasons
    # The timeouts add up to 3 s at most; the rest is slack for a busy machine. A hang fails.
    bound = 2 * verifier.PARSE_TIMEOUT_S + verifier.VERIFY_TIMEOUT_S + 20
    assert time.perf_counter() - t < bound


def test_thread_is_refused():
    errors = []

    def call():
        try:
            math_reward(r"\boxed{1}", "1")
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# =============================================================================================
# Code: the program, its output against the tests', the fraction passed

DOUBLE = {"inputs": ["1\n", "2\n", "10\n"], "outputs": ["2\n", "4\n", "20\n"]}
BENIGN = {"allow_unsandboxed": True}  # sandboxed where the sandbox starts, else limits only


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("```python\na = 1\n```\n```python\nb = 2") == "a = 1\n"  # truncated last
    assert extract_code("```\nprint(1)\n```") is None
    assert extract_code("no code") is None


@pytest.mark.parametrize("got, expected, same", [
    ("1 2   \n3\n\n", "1 2\n3", True),  # trailing spaces and blank lines
    ("0.3333333333333333\n", "0.333333", True),  # numbers: floats to 1e-6
    ("1.0 2\n", "1 2.0000000001", True),
    (f"{10**20 + 1}\n", str(10**20), False),  # integers exactly
    ("1 2\n", "1 2 3", False),
    ("yes\n", "YES", False),
    ("a b\n", "a  b", False),  # not numbers: line by line
    ("a\nb\n", verifier._as_text(["a", "b"]), True),  # APPS: a list of lines
])
def test_same_stdout(got, expected, same):
    assert verifier._same_stdout(got, expected) is same


@pytest.mark.parametrize("got, expected, same", [
    (3, 3, True),
    (2.0000000001, 2, True),  # numbers: floats to 1e-6
    ([1, 2], [1, 2], True),  # a returned tuple, after the JSON round trip
    ([1, 2], [[1, 2]], True),  # APPS: the expected value wrapped in a one-element list
    ([1, 2.0000000001], [1, 2.0], False),  # inside lists: exact
    (3, [3, 4], False),
    ("3", 3, False),
])
def test_same_return(got, expected, same):
    assert verifier._same_return(got, expected) is same


def test_stdin_program_scores_the_fraction_passed():
    half = block("n = int(input())\nprint(n * 2 if n < 5 else 0)")
    reward, reason = code_reward_with_reason(half, json.dumps(DOUBLE), **BENIGN)  # tests as JSON
    assert (reward, reason) == (pytest.approx(2 / 3), "partial")
    lines = {"inputs": [["2", "3"]], "outputs": [["5"]]}  # APPS: stdin and stdout as lists of lines
    assert code_reward_with_reason(block("print(int(input()) + int(input()))"), lines,
                                   **BENIGN) == (1.0, "ok")
    assert code_reward_with_reason(block("print(1/0)"), {"inputs": ["1"], "outputs": [""]},
                                   **BENIGN) == (0.0, "wrong")  # a crash is a failed test
    no_block = "print(int(input()) * 2)"
    assert code_reward_with_reason(no_block, DOUBLE, **BENIGN) == (0.0, "no_answer")


def test_call_based_function_and_class_solution():
    pair = {"fn_name": "pair", "inputs": [[1]], "outputs": [[1, 2.0]]}
    noisy = "def pair(x):\n    print('noise')\n    return (x, 2.0)"
    assert code_reward(block(noisy), pair, **BENIGN) == 1.0  # its prints are not its return value
    add = {"fn_name": "add", "inputs": [[[1], [2]]], "outputs": [[[1, 2]]]}
    leetcode = "class Solution:\n    def add(self, a: List[int], b) -> int:\n        return a + b"
    assert code_reward(block(leetcode), add, **BENIGN) == 1.0  # List needs no import (LeetCode)
    around = "def add(a, b):\n    import sys\n    sys.__stdout__.write('x')\n    return a + b"
    assert code_reward(block(around), add, **BENIGN) == 0.0  # printed around the driver's JSON


@pytest.mark.skipif(sandbox.sandbox_status() != "ok", reason="no sandbox here")
def test_code_runs_in_the_sandbox():
    # /tmp/work is where the sandbox mounts a test's temp dir (test_sandbox.py tests the sandbox)
    assert code_reward(block("import os\nprint(os.getcwd())"),
                       {"inputs": [""], "outputs": ["/tmp/work"]}) == 1.0


def test_malformed_tests_are_a_data_error():
    with pytest.raises(ValueError, match="inputs"):
        code_reward(block("print(1)"), {"inputs": ["1"], "outputs": []}, **BENIGN)


# =============================================================================================
# score_one: what the pool's workers call per item

def test_score_one_routes_by_ability_and_scores_a_bad_item_zero(capsys):
    assert score_one(r"\boxed{\frac12}", "0.5", "math") == (1.0, "ok")
    tests = json.dumps({"inputs": ["2"], "outputs": ["4"]})
    assert score_one(block("print(int(input()) * 2)"), tests, "code", **BENIGN) == (1.0, "ok")
    assert score_one(r"\boxed{1}", "1", "poetry") == (0.0, "unknown_ability")
    capsys.readouterr()
    # A checker that raises scores its item 0 ("error") and says why on stderr; never raises.
    assert score_one(None, "1", "math") == (0.0, "error")
    assert "math item scored 0, the checker raised AttributeError" in capsys.readouterr().err
    assert score_one(r"\boxed{1}", None, "math") == (0.0, "error")
    assert score_one(block("print(1)"), "not json", "code", **BENIGN) == (0.0, "error")
    assert score_one(block("print(1)"), {"inputs": ["1"]}, "code", **BENIGN) == (0.0, "error")


def test_score_one_without_a_sandbox_raises_before_looking_at_the_response(monkeypatch):
    # Not an item's fault but the setup's: raised (the trainer stops), never scored 0.
    monkeypatch.setattr(sandbox, "_SANDBOX_STATUS", "bubblewrap (bwrap) is not installed")
    with pytest.raises(SandboxUnavailable, match="--allow-unsandboxed-code"):
        score_one("no code at all", DOUBLE, "code")
    with pytest.raises(SandboxUnavailable):
        code_reward(block("print(int(input()) * 2)"), DOUBLE)
    assert score_one(r"\boxed{1}", "1", "math") == (1.0, "ok")  # math needs no sandbox
