"""verifier.py: boxed-answer extraction and the math outcome reward; batch scoring in worker
processes with deadlines; the code reward: scoring of APPS-style tests, that the sandbox holds,
and that code never runs without it unless allowed.

The sandbox tests run real hostile programs, so they run only where `verifier.sandbox_status()`
has proven that the sandbox starts (bubblewrap: `apt-get install -y bubblewrap`), and skip
elsewhere; `test_the_sandbox_works_where_it_is_expected` fails, not skips, where bubblewrap is
installed (or CI is set) but the sandbox does not start.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import verifier
from math_verify.errors import TimeoutException
from verifier import (SandboxUnavailable, code_reward, code_reward_with_reason, extract_boxed, extract_code,
                      math_reward, math_reward_with_reason, score_batch)


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
    t = time.perf_counter()
    assert extract_boxed(r"\boxed{" + "{" * 200_000) is None
    assert extract_boxed("a " * 100_000 + r"\boxed{7}") == "7"
    assert time.perf_counter() - t < 1.0


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


def test_no_box_scores_zero():
    assert math_reward_with_reason("The answer is 5.", "5") == (0.0, "no_answer")
    assert math_reward_with_reason(r"\boxed{ }", "5") == (0.0, "no_answer")


def test_reasons():
    assert math_reward_with_reason(r"\boxed{0.5}", r"\frac12") == (1.0, "ok")
    assert math_reward_with_reason(r"\boxed{0.6}", r"\frac12") == (0.0, "wrong")


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
    assert time.perf_counter() - t < 1.0


PATHOLOGICAL = [
    # (response, reasons it may score 0 with): each must return 0 within 5 s, never hang or raise
    (r"\boxed{9^{9^{9^{9}}}}", {"timeout", "wrong"}),
    (r"\boxed{1000000!}", {"timeout", "wrong"}),
    (r"\boxed{(10^{10})!}", {"timeout", "wrong"}),
    (r"\boxed{2^{2^{40}}}", {"timeout", "wrong"}),
    (r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", {"timeout", "wrong"}),  # deep, under the cap
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
def test_pathological_answers_score_zero_quickly(response, reasons):
    t = time.perf_counter()
    reward, reason = math_reward_with_reason(response, "5")
    assert reward == 0.0 and reason in reasons
    assert time.perf_counter() - t < 5.0


def test_score_batch_math_and_reasons():
    rewards, info = score_batch(
        [r"\boxed{5}", r"\boxed{\frac12}", r"\boxed{4}", "no box", r"\boxed{" + "1" * 2000 + "}", r"\boxed{1}"],
        ["5", "0.5", "5", "5", "1", "1"],
        ["math", "math", "math", "math", "math", "poetry"],
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert info == {"ok": 2, "wrong": 1, "no_answer": 1, "too_long": 1, "unknown_ability": 1}


def test_score_batch_bad_items_never_raise():
    rewards, info = score_batch([None, r"\boxed{1}", "```python\nprint(1)\n```", r"\boxed{2}"],
                                ["1", None, "not json", "2"], ["math", "math", "code", "math"])
    assert rewards == [0.0, 0.0, 0.0, 1.0]
    assert info == {"error": 3, "ok": 1}


# A program that loops while its per-test timeout (5 s) is longer than the batch deadline below: a
# stuck item. It is benign, so it may run where there is no sandbox (allow_unsandboxed=True).
LOOP, LOOP_TESTS = "```python\nwhile True: pass\n```", {"inputs": ["1"], "outputs": ["1"]}
# Correct answers: the fast path, and two that go through math-verify (its first call is slow).
RIGHT = [r"\boxed{3}", r"\boxed{\frac{6}{2}}", r"\boxed{3.0}"] * 2


def test_score_batch_stuck_item_times_out_and_the_rest_finish():
    # The stuck items score 0 as "timeout"; their workers are replaced and the other items finish.
    rewards, info = score_batch([LOOP, LOOP] + RIGHT, [LOOP_TESTS] * 2 + ["3"] * 6, ["code"] * 2 + ["math"] * 6,
                                workers=2, timeout=1.5, allow_unsandboxed=True)
    assert rewards == [0.0, 0.0] + [1.0] * 6
    assert info == {"timeout": 2, "ok": 6}


def test_score_batch_on_a_busy_machine_with_cold_workers():
    # Issue 12: with both cores busy, a cold worker (or the replacement of a timed-out one) took
    # longer to import math-verify than the deadline, and correct answers scored 0. Only an item's
    # own work counts now. More hogs than cores; no bound on the batch's time.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        verifier._close_pool()  # cold workers, started while the machine is busy
        rewards, info = score_batch([LOOP, LOOP] + RIGHT, [LOOP_TESTS] * 2 + ["3"] * 6, ["code"] * 2 + ["math"] * 6,
                                    workers=2, timeout=1.5, allow_unsandboxed=True)
        assert rewards == [0.0, 0.0] + [1.0] * 6
        assert info == {"timeout": 2, "ok": 6}
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def fake_python(tmp_path, monkeypatch, shell: str):
    """Workers start through `shell` (a /bin/sh script that ends by running the real python, or
    not); the pool is emptied so that the next batch starts them."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{shell}\n")
    script.chmod(0o755)
    verifier._close_pool()
    monkeypatch.setattr(verifier.sys, "executable", str(script))


def test_a_worker_starting_slowly_costs_no_item_its_deadline(tmp_path, monkeypatch):
    # Start-up takes 2 s, twice the deadline: the items wait for the worker, not on its clock.
    fake_python(tmp_path, monkeypatch, f'sleep 2\nexec {sys.executable} "$@"')
    try:
        assert score_batch(RIGHT, ["3"] * 6, ["math"] * 6, workers=2, timeout=1.0) == ([1.0] * 6, {"ok": 6})
    finally:
        verifier._close_pool()


def test_a_worker_dying_while_it_starts_is_replaced(tmp_path, monkeypatch):
    died = tmp_path / "died"  # the first start dies (as if OOM-killed), the next one works
    fake_python(tmp_path, monkeypatch, f'[ -e {died} ] || {{ touch {died}; exit 3; }}\nexec {sys.executable} "$@"')
    try:
        assert score_batch(RIGHT[:2], ["3"] * 2, ["math"] * 2, workers=1) == ([1.0] * 2, {"ok": 2})
        assert died.exists()
    finally:
        verifier._close_pool()


def test_workers_that_cannot_start_raise_rather_than_wait_forever(tmp_path, monkeypatch):
    fake_python(tmp_path, monkeypatch, "exit 3")
    try:
        with pytest.raises(RuntimeError, match="keep exiting while they start"):
            score_batch(RIGHT, ["3"] * 6, ["math"] * 6, workers=2)
    finally:
        verifier._close_pool()


def test_score_batch_empty():
    assert score_batch([], [], []) == ([], {})


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


def test_score_batch_reuses_its_workers_and_replaces_dead_ones():
    score_batch([r"\boxed{1}"] * 2, ["1"] * 2, ["math"] * 2, workers=2)
    pids = [w.proc.pid for w in verifier._POOL[:2]]
    score_batch([r"\boxed{1}"] * 2, ["1"] * 2, ["math"] * 2, workers=2)
    assert [w.proc.pid for w in verifier._POOL[:2]] == pids  # warm: no start-up per batch
    verifier._POOL[0].proc.kill()
    verifier._POOL[0].proc.wait()
    assert score_batch([r"\boxed{1}"] * 4, ["1"] * 4, ["math"] * 4, workers=2) == ([1.0] * 4, {"ok": 4})
    assert verifier._POOL[0].proc.pid != pids[0]


def test_score_batch_from_a_script_without_a_main_guard(tmp_path):
    # Workers never import the caller's main script (a multiprocessing pool would re-run it).
    script = tmp_path / "score.py"
    script.write_text("import verifier\nprint(verifier.score_batch([r'\\boxed{2}', 'x'], ['2', '2'], ['math'] * 2))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(verifier.__file__))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.strip() == "([1.0, 0.0], {'ok': 1, 'no_answer': 1})", out.stderr


def test_score_batch_interrupted_leaves_no_late_reply_behind(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(verifier, "wait", interrupted)  # Ctrl-C while items are in flight
        with pytest.raises(KeyboardInterrupt):
            score_batch([r"\boxed{1}"] * 2, ["1"] * 2, ["math"] * 2, workers=2)
    # The interrupted items' replies would otherwise be read as the answers to these.
    assert score_batch([r"\boxed{1}", "x"], ["2", "2"], ["math"] * 2, workers=2) == ([0.0, 0.0], {"wrong": 1, "no_answer": 1})


def test_score_batch_worker_dead_before_its_item_is_sent():
    score_batch([r"\boxed{1}"], ["1"], ["math"], workers=1)
    worker = verifier._POOL[0]
    worker.proc.kill()
    worker.proc.wait()
    worker.send(0, "[]", 60.0)  # what a batch does if the worker dies between two items
    assert worker.receive() is None


# =============================================================================================
# Code: scoring, the sandbox, and never without it unless allowed
sandboxed = pytest.mark.skipif(verifier.sandbox_status() != "ok",
                               reason=f"no sandbox here ({verifier.sandbox_status()}): hostile code never runs without one")

DOUBLE = {"inputs": ["1\n", "2\n", "10\n"], "outputs": ["2\n", "4\n", "20\n"]}


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nprint(1)\n```") is None
    assert extract_code("no code") is None


@sandboxed
def test_stdin_programs_score_the_fraction_passed():
    assert code_reward(block("print(int(input()) * 2)"), DOUBLE) == 1.0
    assert code_reward(block("n = int(input())\nprint(n * 2 if n < 5 else 0)"), json.dumps(DOUBLE)) == pytest.approx(2 / 3)
    assert code_reward_with_reason(block("print(1/0)"), DOUBLE) == (0.0, "wrong")
    assert code_reward_with_reason("print(int(input()) * 2)", DOUBLE) == (0.0, "no_answer")


@sandboxed
def test_output_comparison_is_tolerant():
    assert code_reward(block("print('1 2   ')\nprint(3)\nprint()"), {"inputs": [""], "outputs": ["1 2\n3"]}) == 1.0
    assert code_reward(block("print(1/3)"), {"inputs": [""], "outputs": ["0.333333"]}) == 1.0
    assert code_reward(block("print(1.0, 2)"), {"inputs": [""], "outputs": ["1 2.0000000001"]}) == 1.0
    assert code_reward(block("print(10**20 + 1)"), {"inputs": [""], "outputs": [str(10**20)]}) == 0.0
    assert code_reward(block("print('a')\nprint('b')"), {"inputs": [""], "outputs": [["a", "b"]]}) == 1.0  # lines
    assert code_reward(block("print('yes')"), {"inputs": [""], "outputs": ["YES"]}) == 0.0


@sandboxed
def test_call_based_function_and_class_solution():
    tests = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [3, [[1, 2]]]}
    assert code_reward(block("def add(a, b):\n    print('noise')\n    return a + b"), tests) == 1.0
    leetcode = "class Solution:\n    def add(self, a: List[int], b) -> int:\n        return a + b"
    assert code_reward(block(leetcode), tests) == 1.0  # List needs no import, as on LeetCode
    tuples = {"fn_name": "pair", "inputs": [[1]], "outputs": [[1, 2.0]]}
    assert code_reward(block("def pair(x):\n    return (x, 2.0000000001)"), tuples) == 0.0  # inside lists: exact
    assert code_reward(block("def pair(x):\n    return (x, 2.0)"), tuples) == 1.0  # a tuple equals a list
    assert code_reward(block("def add(a, b):\n    return a - b"), tests) == 0.0


def test_malformed_tests_are_a_data_error():
    with pytest.raises(ValueError, match="inputs"):
        code_reward(block("print(1)"), {"inputs": ["1"], "outputs": []})


@sandboxed
def test_cannot_write_outside_its_temp_dir(tmp_path):
    targets = [os.path.join(os.path.dirname(__file__), f"pwned_{os.getpid()}"), f"/root/pwned_{os.getpid()}",
               str(tmp_path / "pwned")]
    code = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n" \
           "open('mine.txt', 'w').write('x')\nopen('/tmp/also_mine', 'w').write('x')\nprint('ok')" % targets
    assert code_reward(block(code), {"inputs": [""], "outputs": ["ok"]}) == 1.0  # its own dir and /tmp work
    for path in targets:
        assert not os.path.exists(path), path


@sandboxed
def test_cannot_reach_the_network():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\nprint('ok')"
    try:
        assert code_reward(block(code), {"inputs": [""], "outputs": ["ok"]}) == 0.0
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@sandboxed
def test_cannot_kill_our_processes():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code = ("import os, signal\n"
            f"for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "print('ok')")
    try:
        code_reward(block(code), {"inputs": [""], "outputs": ["ok"]})
        time.sleep(0.2)
        assert victim.poll() is None  # still running; and so are we
    finally:
        victim.kill()
        victim.wait()


@sandboxed
def test_cannot_allocate_8_gib():
    code = "x = bytearray(8 << 30)\nprint('ok')"
    assert code_reward_with_reason(block(code), {"inputs": [""], "outputs": ["ok"]}) == (0.0, "wrong")


@sandboxed
def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t = time.perf_counter()
    assert code_reward(block(code), {"inputs": [""], "outputs": ["ok"]}, timeout_s=2) == 0.0
    assert time.perf_counter() - t < 10
    # the machine is fine: we can still start processes, and nothing of the bomb is left
    assert subprocess.run(["true"]).returncode == 0
    time.sleep(0.5)
    left = subprocess.run(["ps", "-u", str(verifier.NOBODY), "-o", "pid="], capture_output=True, text=True).stdout
    assert os.getuid() != 0 or left.split() == []


@sandboxed
def test_infinite_loop_scores_zero_within_its_timeout():
    t = time.perf_counter()
    assert code_reward(block("while True:\n    pass"), DOUBLE, timeout_s=1) == 0.0
    assert time.perf_counter() - t < 3 * 1 + 3  # three tests, one second each, plus start-up


@sandboxed
def test_output_is_capped():
    assert code_reward(block("print('x' * (5 << 20))"), {"inputs": [""], "outputs": ["x"]}) == 0.0


@sandboxed
def test_score_batch_code_items():
    rewards, info = score_batch([block("print(int(input()) * 2)"), block("print(0)"), "no code"],
                                [DOUBLE, json.dumps(DOUBLE), DOUBLE], ["code"] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    assert info == {"ok": 1, "wrong": 1, "no_answer": 1}


def test_the_sandbox_works_where_it_is_expected():
    # The hostile tests above skip without a sandbox; where one is expected this fails instead, so
    # a broken sandbox (e.g. one that cannot see the interpreter) cannot pass CI as "skipped".
    if shutil.which("bwrap") is None and not os.environ.get("CI"):
        pytest.skip("bubblewrap is not installed and CI is not set: no sandbox is expected here")
    assert verifier.sandbox_status() == "ok"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_sandbox_that_cannot_start_is_reported_with_bwraps_own_error(monkeypatch):
    monkeypatch.setattr(verifier, "_SANDBOX_STATUS", None)
    monkeypatch.setattr(verifier, "_BWRAP", ["bwrap", "--no-such-option"])
    status = verifier.sandbox_status()
    assert status.startswith("bwrap is installed but could not run Python in a sandbox (") and "no-such-option" in status


@sandboxed
def test_tests_run_on_our_python():
    # Not on another one that the loader falls back to where `nobody` cannot reach our files
    # (then simple programs still pass, on the system's libpython and stdlib).
    ours = {"inputs": [""], "outputs": [f"{sys.version}\n{sys.prefix}"]}
    assert code_reward(block("import sys\nprint(sys.version)\nprint(sys.prefix)"), ours) == 1.0


def make_venv(parent) -> str:
    """A venv in `parent` (fast: no pip) that sees our packages (math-verify), also where this
    suite runs from a venv whose base lacks them: a .pth file in its site-packages adds ours."""
    venv = os.path.join(parent, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True, timeout=300)
    python = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=300).stdout.strip()
    with open(os.path.join(purelib, "ours.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")))
    return venv


def run_in(venv, script: str) -> list:
    """The JSON that `script` prints, run by the venv's python with verifier importable."""
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.path.dirname(verifier.__file__)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@sandboxed
def test_sandbox_starts_python_from_a_venv_under_tmp():
    # Issue 12: the sandbox's private /tmp hid an interpreter in a venv under /tmp, the probe
    # failed, and code ran unsandboxed. The venv sits in a mkdtemp (0700, like pytest's own
    # tmp dirs), which `nobody` (the test's user under root) cannot enter on the host.
    root = tempfile.mkdtemp(prefix="prime_venv_", dir="/tmp")
    try:
        venv = make_venv(root)
        targets = [os.path.join(venv, "pwned"), os.path.join(root, "pwned"), f"/root/pwned_{os.getpid()}",
                   os.path.join(os.path.dirname(__file__), f"pwned_{os.getpid()}")]
        write = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n"
                 "        pass\nprint('ok')" % targets)
        got = run_in(venv, "import json, verifier\n"
                           "print(json.dumps([verifier.sandbox_status(),\n"
                           f"    verifier.code_reward({block('import sys; print(sys.prefix)')!r}, {{'inputs': [''], 'outputs': [{venv!r}]}}),\n"
                           f"    verifier.code_reward({block(write)!r}, {{'inputs': [''], 'outputs': ['ok']}})]))")
        assert got == ["ok", 1.0, 1.0]  # sandboxed; the test ran in that venv; it wrote in vain
        for path in targets:
            assert not os.path.exists(path), path
    finally:
        shutil.rmtree(root, ignore_errors=True)


@sandboxed
@pytest.mark.skipif(os.getuid() != 0, reason="only root's tests run as another user (nobody)")
def test_a_venv_that_nobody_can_read_is_refused(tmp_path):
    # A real broken sandbox, not a monkeypatched one: the venv itself is 0700, so the test (as
    # nobody) would run without it, on the base Python. Refused, and nothing is scored.
    venv = make_venv(tmp_path)
    os.chmod(venv, 0o700)
    status, refused = run_in(venv, "import json, verifier\ntry:\n"
                                   f"    verifier.score_batch([{block('print(1)')!r}], [{{'inputs': [''], 'outputs': ['1']}}], ['code'])\n"
                                   "except verifier.SandboxUnavailable as e:\n"
                                   "    print(json.dumps([verifier.sandbox_status(), str(e)]))")
    assert status.startswith("the sandbox runs another Python") and "nobody" in status
    assert refused.startswith(f"verifier.py: generated code cannot run sandboxed here: {status}. Fix that")


@pytest.fixture
def no_sandbox(monkeypatch):
    """This process sees no bubblewrap, whatever the machine has (the workers are told so)."""
    monkeypatch.setattr(verifier, "_SANDBOX_STATUS", None)
    monkeypatch.setattr(verifier, "_WARNED_UNSANDBOXED", False)
    monkeypatch.setattr(verifier.shutil, "which", lambda name: None)


def test_without_a_sandbox_code_reward_refuses_unless_allowed(no_sandbox, capsys):
    with pytest.raises(SandboxUnavailable) as refused:
        code_reward(block("print(int(input()) * 2)"), DOUBLE)
    message = str(refused.value)
    assert isinstance(refused.value, RuntimeError) and "\n" not in message
    assert "bwrap) is not installed" in message and "apt-get install -y bubblewrap" in message
    assert "--allow-unsandboxed-code" in message
    with pytest.raises(SandboxUnavailable):
        code_reward_with_reason("no code at all", DOUBLE)  # refused before looking at the response
    assert capsys.readouterr().err == ""
    # allowed: it runs with the resource limits only, and says so once
    assert code_reward(block("print(int(input()) * 2)"), DOUBLE, allow_unsandboxed=True) == 1.0
    assert code_reward_with_reason(block("print(0)"), DOUBLE, allow_unsandboxed=True) == (0.0, "wrong")
    assert capsys.readouterr().err.count("WITHOUT isolation") == 1


def test_without_a_sandbox_score_batch_refuses_code_before_scoring_anything(no_sandbox, tmp_path, capfd):
    ran = tmp_path / "ran"  # a program that leaves a trace if it runs
    touch = block(f"open({str(ran)!r}, 'w').close()\nprint(int(input()) * 2)")
    with pytest.raises(SandboxUnavailable):
        score_batch([r"\boxed{1}", touch], ["1", DOUBLE], ["math", "code"])
    assert not ran.exists()
    assert score_batch([r"\boxed{1}"], ["1"], ["math"]) == ([1.0], {"ok": 1})  # math needs no sandbox
    assert capfd.readouterr().err == ""
    rewards, info = score_batch([touch] * 3 + [r"\boxed{1}"], [DOUBLE] * 3 + ["1"], ["code"] * 3 + ["math"],
                                workers=2, allow_unsandboxed=True)
    assert (rewards, info) == ([1.0] * 4, {"ok": 4}) and ran.exists()
    assert capfd.readouterr().err.count("WITHOUT isolation") == 1  # the workers were told, not re-probed


def processes_with(marker: str) -> list[int]:
    """Live processes (not zombies, whose cmdline is empty) with `marker` in their argv."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:  # gone meanwhile
            pass
    return pids


def poll(condition, bound_s: float) -> bool:
    """Whether `condition()` came true within `bound_s` seconds (checked every 0.05 s)."""
    end = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_without_a_sandbox_a_killed_worker_leaves_no_test_process_behind(no_sandbox, tmp_path):
    # Allowed to run unsandboxed, a program (and its child) still running when its worker is
    # killed at the batch deadline must die with the worker, not sleep on for 10 minutes.
    marker = f"prime_leak_{os.getpid()}_{time.monotonic_ns()}"
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}]"
    code = (f"import os, subprocess, sys\nsubprocess.Popen({sleeper})\n"  # a child ...
            f"os.execv(sys.executable, {sleeper})")  # ... and the program itself
    worker = verifier._Worker()  # driven by hand, to kill it only once both are running
    try:
        worker.send(0, json.dumps([block(code), {"inputs": [""], "outputs": [""]}, "code",
                                   verifier.sandbox_status(), True]), 600)
        # Generous bounds: on time they pass at once; late, they fail rather than hang.
        assert poll(lambda: len(processes_with(marker)) == 2, 300), processes_with(marker)
        worker.close()
        assert poll(lambda: processes_with(marker) == [], 60), processes_with(marker)  # 60 s, not 600
    finally:
        worker.close()
        for pid in processes_with(marker):  # what a failure left behind
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_trainer_leaves_no_worker_and_no_test_program_behind(tmp_path):
    # The trainer SIGKILLed (the OOM killer) while a worker runs a long item: 60 tests of a program
    # that sleeps, 5 s each, 300 s in all. The worker and the program die with the trainer.
    marker = f"prime_orphan_{os.getpid()}_{time.monotonic_ns()}"
    program = block(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; "
                    f"time.sleep(600)', {marker!r}])")
    script = tmp_path / "trainer.py"
    script.write_text(
        "import json, sys, time, verifier\n"
        "verifier.shutil.which = lambda name: None  # unsandboxed: no pid namespace kills the program\n"
        "worker = verifier._Worker()\n"
        "assert worker.receive() == 'ready'\n"
        f"item = [{program!r}, {{'inputs': [''] * 60, 'outputs': [''] * 60}}, 'code', verifier.sandbox_status(), True]\n"
        "worker.send(0, json.dumps(item), 3600)\n"
        "print(worker.proc.pid, flush=True)\n"
        "time.sleep(3600)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(verifier.__file__))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker_pid = None
    try:
        worker_pid = int(trainer.stdout.readline())
        assert poll(lambda: len(processes_with(marker)) == 1, 300)  # the worker is busy with the item
        trainer.kill()
        trainer.wait()
        assert poll(lambda: not alive(worker_pid) and processes_with(marker) == [], 60), processes_with(marker)
    finally:
        trainer.kill()
        for pid in processes_with(marker) + ([worker_pid] if worker_pid and alive(worker_pid) else []):
            os.kill(pid, signal.SIGKILL)
