"""Tests for the code reward: scoring of APPS-style tests, that the sandbox holds, and that code
never runs without it unless allowed.

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
import time

import pytest

import verifier
from verifier import SandboxUnavailable, code_reward, code_reward_with_reason, extract_code, score_batch

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
