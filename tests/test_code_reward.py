"""Tests for the code reward: scoring of APPS-style tests, and that the sandbox holds.

The sandbox tests run real hostile programs, so they need bubblewrap (`apt-get install -y
bubblewrap`) and skip without it; without it code_reward runs tests unisolated (and warns).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import verifier
from verifier import code_reward, code_reward_with_reason, extract_code, score_batch

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

DOUBLE = {"inputs": ["1\n", "2\n", "10\n"], "outputs": ["2\n", "4\n", "20\n"]}


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nprint(1)\n```") is None
    assert extract_code("no code") is None


@needs_bwrap
def test_stdin_programs_score_the_fraction_passed():
    assert code_reward(block("print(int(input()) * 2)"), DOUBLE) == 1.0
    assert code_reward(block("n = int(input())\nprint(n * 2 if n < 5 else 0)"), json.dumps(DOUBLE)) == pytest.approx(2 / 3)
    assert code_reward_with_reason(block("print(1/0)"), DOUBLE) == (0.0, "wrong")
    assert code_reward_with_reason("print(int(input()) * 2)", DOUBLE) == (0.0, "no_answer")


@needs_bwrap
def test_output_comparison_is_tolerant():
    assert code_reward(block("print('1 2   ')\nprint(3)\nprint()"), {"inputs": [""], "outputs": ["1 2\n3"]}) == 1.0
    assert code_reward(block("print(1/3)"), {"inputs": [""], "outputs": ["0.333333"]}) == 1.0
    assert code_reward(block("print(1.0, 2)"), {"inputs": [""], "outputs": ["1 2.0000000001"]}) == 1.0
    assert code_reward(block("print(10**20 + 1)"), {"inputs": [""], "outputs": [str(10**20)]}) == 0.0
    assert code_reward(block("print('a')\nprint('b')"), {"inputs": [""], "outputs": [["a", "b"]]}) == 1.0  # lines
    assert code_reward(block("print('yes')"), {"inputs": [""], "outputs": ["YES"]}) == 0.0


@needs_bwrap
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


@needs_bwrap
def test_cannot_write_outside_its_temp_dir(tmp_path):
    targets = [os.path.join(os.path.dirname(__file__), f"pwned_{os.getpid()}"), f"/root/pwned_{os.getpid()}",
               str(tmp_path / "pwned")]
    code = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n" \
           "open('mine.txt', 'w').write('x')\nopen('/tmp/also_mine', 'w').write('x')\nprint('ok')" % targets
    assert code_reward(block(code), {"inputs": [""], "outputs": ["ok"]}) == 1.0  # its own dir and /tmp work
    for path in targets:
        assert not os.path.exists(path), path


@needs_bwrap
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


@needs_bwrap
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


@needs_bwrap
def test_cannot_allocate_8_gib():
    code = "x = bytearray(8 << 30)\nprint('ok')"
    assert code_reward_with_reason(block(code), {"inputs": [""], "outputs": ["ok"]}) == (0.0, "wrong")


@needs_bwrap
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


@needs_bwrap
def test_infinite_loop_scores_zero_within_its_timeout():
    t = time.perf_counter()
    assert code_reward(block("while True:\n    pass"), DOUBLE, timeout_s=1) == 0.0
    assert time.perf_counter() - t < 3 * 1 + 3  # three tests, one second each, plus start-up


@needs_bwrap
def test_output_is_capped():
    assert code_reward(block("print('x' * (5 << 20))"), {"inputs": [""], "outputs": ["x"]}) == 0.0


@needs_bwrap
def test_score_batch_code_items():
    rewards, info = score_batch([block("print(int(input()) * 2)"), block("print(0)"), "no code"],
                                [DOUBLE, json.dumps(DOUBLE), DOUBLE], ["code"] * 3)
    assert rewards == [1.0, 0.0, 0.0]
    assert info == {"ok": 1, "wrong": 1, "no_answer": 1}


def test_without_bwrap_it_warns_once_and_still_scores(monkeypatch, capsys):
    monkeypatch.setattr(verifier, "_BWRAP_STATUS", None)
    monkeypatch.setattr(verifier.shutil, "which", lambda name: None)
    assert code_reward(block("print(int(input()) * 2)"), DOUBLE) == 1.0
    assert code_reward(block("print(int(input()) * 2)"), DOUBLE) == 1.0
    assert capsys.readouterr().err.count("WITHOUT isolation") == 1


def test_score_batch_warns_once_not_once_per_worker(monkeypatch, capfd):
    monkeypatch.setattr(verifier, "_BWRAP_STATUS", None)
    monkeypatch.setattr(verifier.shutil, "which", lambda name: None)
    rewards, _ = score_batch([block("print(int(input()) * 2)")] * 3, [DOUBLE] * 3, ["code"] * 3, workers=2)
    assert rewards == [1.0] * 3
    assert capfd.readouterr().err.count("WITHOUT isolation") == 1  # the workers were told, not re-probed
