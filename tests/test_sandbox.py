"""sandbox.py: that the sandbox holds against hostile programs, that code never runs without it
unless allowed, and the worker pool (deadlines, dead and slow workers, interrupts, cleanup).

The hostile programs run only where `sandbox.sandbox_status()` has proven that the sandbox starts
(bubblewrap: `apt-get install -y bubblewrap`), and skip elsewhere;
`test_the_sandbox_works_where_it_is_expected` fails, not skips, where bubblewrap is installed (or
CI is set) but the sandbox does not start.

Most pool tests run workers that score with `TEST_SERVE` below rather than verifier.score_one:
they start in a blink (no math-verify to import), so the pool's mechanics are tested in
milliseconds; `test_score_batch_scores_each_item_with_verifier_score_one` runs the real workers.
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

import sandbox
from sandbox import SandboxUnavailable, score_batch

sandboxed = pytest.mark.skipif(sandbox.sandbox_status() != "ok",
                               reason=f"no sandbox here ({sandbox.sandbox_status()}): "
                                      "hostile code never runs without one")


def run(program: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """`program` run in the sandbox: (exited 0 in time, its stdout)."""
    ok, out, _ = sandbox.run_python(program, "", timeout_s)
    return ok, out.decode(errors="replace")


def poll(condition, bound_s: float) -> bool:
    """Whether `condition()` came true within `bound_s` seconds (checked every 0.05 s). Bounds
    are generous: on time a poll ends at once; late, it fails rather than hangs."""
    end = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


# =============================================================================================
# The sandbox: hostile programs

@sandboxed
def test_runs_on_our_python_in_its_temp_dir():
    # Not on another Python that the loader falls back to where `nobody` cannot reach our files
    # (then simple programs still pass, on the system's libpython and stdlib).
    ok, out = run("import os, sys\nprint(sys.version)\nprint(sys.prefix)\nprint(os.getcwd())")
    assert ok and out.splitlines() == [*sys.version.splitlines(), sys.prefix, "/tmp/work"]


@sandboxed
def test_cannot_write_outside_its_temp_dir(tmp_path):
    targets = [os.path.join(os.path.dirname(__file__), f"pwned_{os.getpid()}"),
               f"/root/pwned_{os.getpid()}", str(tmp_path / "pwned")]
    code = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n"
            "    except OSError:\n        pass\n"
            "open('mine.txt', 'w').write('x')\nopen('/tmp/also_mine', 'w').write('x')\n"
            "print('ok')" % targets)
    assert run(code) == (True, "ok\n")  # its own dir and /tmp work
    for path in targets:
        assert not os.path.exists(path), path


@sandboxed
def test_cannot_reach_the_network():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'hi')\nprint('ok')")
    try:
        assert run(code) == (False, "")
        # A connection made would be waiting in the backlog by now (the kernel completes it).
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@sandboxed
def test_cannot_kill_our_processes():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    code = ("import os, signal\n"
            f"for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "print('ok')")
    try:
        assert run(code) == (True, "ok\n")  # it ran to its end, not killing its own sandbox
        with pytest.raises(subprocess.TimeoutExpired):
            victim.wait(timeout=0.2)  # still running; and so are we
    finally:
        victim.kill()
        victim.wait()


@sandboxed
def test_cannot_allocate_8_gib():
    assert run("x = bytearray(8 << 30)\nprint('ok')") == (False, "")


@sandboxed
def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert run(code, timeout_s=0.5) == (False, "")
    # the machine is fine: we can still start processes, and nothing of the bomb is left
    assert subprocess.run(["true"]).returncode == 0
    if os.getuid() == 0:  # the bomb ran as nobody: none of nobody's processes may be left
        def nobodys():
            return subprocess.run(["ps", "-u", str(sandbox.NOBODY), "-o", "pid="],
                                  capture_output=True, text=True).stdout.split()
        assert poll(lambda: nobodys() == [], 30), nobodys()


@sandboxed
def test_a_program_that_never_ends_is_killed_at_its_timeout():
    # It sleeps: no CPU limit ends it, only the wall-clock kill (the bound is the slack of a
    # busy machine; without the kill it would run for ever).
    t = time.perf_counter()
    assert run("import time\nwhile True:\n    time.sleep(1)", timeout_s=0.5) == (False, "")
    assert time.perf_counter() - t < 30


@sandboxed
def test_output_is_capped():
    ok, out = run("print('x' * (5 << 20))")
    assert not ok and len(out) <= sandbox.MAX_OUTPUT_BYTES  # killed when it wrote past the cap


def test_the_sandbox_works_where_it_is_expected():
    # The hostile tests above skip without a sandbox; where one is expected this fails instead, so
    # a broken sandbox (e.g. one that cannot see the interpreter) cannot pass CI as "skipped".
    if shutil.which("bwrap") is None and not os.environ.get("CI"):
        pytest.skip("bubblewrap is not installed and CI is not set: no sandbox is expected here")
    assert sandbox.sandbox_status() == "ok"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_sandbox_that_cannot_start_is_reported_with_bwraps_own_error(monkeypatch):
    monkeypatch.setattr(sandbox, "_SANDBOX_STATUS", None)
    monkeypatch.setattr(sandbox, "_BWRAP", ["bwrap", "--no-such-option"])
    status = sandbox.sandbox_status()
    assert status.startswith("bwrap is installed but could not run Python in a sandbox (")
    assert "no-such-option" in status


def make_venv(parent) -> str:
    """A venv in `parent` (fast: no pip) that sees our packages, also where this suite runs from
    a venv whose base lacks them: a .pth file in its site-packages adds ours."""
    venv = os.path.join(parent, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
                   check=True, timeout=300)
    python = os.path.join(venv, "bin", "python")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([python, "-c", where], capture_output=True, text=True, check=True,
                             timeout=300).stdout.strip()
    with open(os.path.join(purelib, "ours.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path
                          if os.path.basename(p) in ("site-packages", "dist-packages")))
    return venv


def run_in(venv, script: str) -> list:
    """The JSON that `script` prints, run by the venv's python with sandbox importable."""
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script], capture_output=True,
                         text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(sandbox.__file__)))
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
        targets = [os.path.join(venv, "pwned"), os.path.join(root, "pwned"),
                   f"/root/pwned_{os.getpid()}",
                   os.path.join(os.path.dirname(__file__), f"pwned_{os.getpid()}")]
        write = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n"
                 "    except OSError:\n        pass\nprint('ok')" % targets)
        got = run_in(venv, "import json, sandbox\n"
                           "out = lambda program: sandbox.run_python(program, '', 60)[1].decode()\n"
                           "print(json.dumps([sandbox.sandbox_status(),\n"
                           f"    out('import sys; print(sys.prefix)'), out({write!r})]))")
        assert got == ["ok", venv + "\n", "ok\n"]  # sandboxed; it ran in that venv; wrote in vain
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
    status, refused = run_in(venv, "import json, sandbox\ntry:\n"
                                   "    sandbox.score_batch(['print(1)'], ['1'], ['code'])\n"
                                   "except sandbox.SandboxUnavailable as e:\n"
                                   "    print(json.dumps([sandbox.sandbox_status(), str(e)]))")
    assert status.startswith("the sandbox runs another Python") and "nobody" in status
    assert refused.startswith(f"sandbox.py: generated code cannot run sandboxed here: {status}. ")


# =============================================================================================
# Never without the sandbox, unless allowed

@pytest.fixture
def no_sandbox(monkeypatch):
    """This process sees no bubblewrap, whatever the machine has (the workers are told so)."""
    monkeypatch.setattr(sandbox, "_SANDBOX_STATUS", None)
    monkeypatch.setattr(sandbox, "_WARNED_UNSANDBOXED", False)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)


def test_without_a_sandbox_code_is_refused_unless_allowed(no_sandbox, capsys):
    with pytest.raises(SandboxUnavailable) as refused:
        sandbox.run_python("print(1)", "", 5)
    message = str(refused.value)
    assert isinstance(refused.value, RuntimeError) and "\n" not in message
    assert message.startswith("sandbox.py: generated code cannot run sandboxed here: bubblewrap "
                              "(bwrap) is not installed. Fix that")
    assert "apt-get install -y bubblewrap" in message and "--allow-unsandboxed-code" in message
    assert capsys.readouterr().err == ""
    # allowed: it runs with the resource limits only, in its temp dir on the host (the sandbox
    # would show it as /tmp/work), and says so once
    allowed = {"allow_unsandboxed": True}
    assert sandbox.run_python("print(int(input()) * 2)", "2\n", 5, **allowed)[:2] == (True, b"4\n")
    cwd = sandbox.run_python("import os; print(os.getcwd())", "", 5, **allowed)[1].decode()
    assert os.path.basename(cwd.strip()).startswith("prime_test_")
    assert capsys.readouterr().err.count("WITHOUT isolation") == 1


# =============================================================================================
# The pool with its real workers: verifier.score_one

DOUBLE = {"inputs": ["1\n", "2\n", "10\n"], "outputs": ["2\n", "4\n", "20\n"]}


def block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_score_batch_scores_each_item_with_verifier_score_one():
    # First of the pool's tests: in the whole suite it reuses the workers an earlier file started.
    responses = [r"\boxed{5}", r"\boxed{\frac12}", r"\boxed{4}", "no box",
                 r"\boxed{" + "1" * 2000 + "}", r"\boxed{1}", None,
                 block("print(int(input()) * 2)"), block("print(0)"), "no code"]
    truths = ["5", "0.5", "5", "5", "1", "1", "1", DOUBLE, json.dumps(DOUBLE), DOUBLE]
    abilities = ["math"] * 5 + ["poetry", "math"] + ["code"] * 3
    rewards, info = score_batch(responses, truths, abilities, allow_unsandboxed=True)  # benign code
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert info == {"ok": 3, "wrong": 2, "no_answer": 2, "too_long": 1, "unknown_ability": 1,
                    "error": 1}


# =============================================================================================
# The pool, its workers scoring with TEST_SERVE's `score`

# ability "echo": 1 if the response is the ground truth; "code": the response is a program, 1 if
# it prints the ground truth; "hang": never returns; "die": the worker dies mid-item.
TEST_SERVE = """
import os, time, sandbox
def score(response, truth, ability, allow_unsandboxed):
    if ability == "hang":
        time.sleep(3600)
    if ability == "die":
        os._exit(1)
    if ability == "code":
        ok, out, _ = sandbox.run_python(response, "", 600, allow_unsandboxed=allow_unsandboxed)
        right = ok and out.decode().strip() == truth
    else:
        right = response == truth
    return (1.0, "ok") if right else (0.0, "wrong")
sandbox._serve(score)
"""
# A deadline for items that take microseconds: all its margin is for a busy machine.
DEADLINE_S = 0.5


@pytest.fixture
def quick_workers(monkeypatch):
    """The pool's workers score with TEST_SERVE; the pool is emptied before and after."""
    sandbox._close_pool()
    monkeypatch.setattr(sandbox, "_SERVE", TEST_SERVE)
    yield
    sandbox._close_pool()


def test_score_batch_counts_reasons_and_a_bad_item_scores_zero(quick_workers):
    assert score_batch([], [], []) == ([], {})
    rewards, info = score_batch(["a", "a", object(), "x", "c"], ["a", "b", "x", "x", "c"],
                                ["echo", "echo", "echo", "die", "echo"], workers=2)
    # object() is not JSON: never sent. "die": its worker died mid-item and was replaced; the
    # rest went on.
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert info == {"ok": 2, "wrong": 1, "error": 2}


def test_score_batch_stuck_item_times_out_and_the_rest_finish(quick_workers):
    rewards, info = score_batch(["x"] + ["a"] * 5, ["x"] + ["a"] * 5, ["hang"] + ["echo"] * 5,
                                workers=2, timeout=DEADLINE_S)
    assert (rewards, info) == ([0.0] + [1.0] * 5, {"timeout": 1, "ok": 5})
    assert all(w.item is None for w in sandbox._POOL)  # the stuck worker was replaced
    assert score_batch(["a"] * 2, ["a"] * 2, ["echo"] * 2, workers=2) == ([1.0] * 2, {"ok": 2})


def fake_python(tmp_path, monkeypatch, shell: str):
    """Workers start through `shell` (a /bin/sh script that ends by running the real python, or
    not); the pool is empty (quick_workers), so the next batch starts them."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{shell}\n")
    script.chmod(0o755)
    monkeypatch.setattr(sandbox.sys, "executable", str(script))


def test_a_worker_starting_slowly_costs_no_item_its_deadline(quick_workers, tmp_path, monkeypatch):
    # Issue 12: a cold worker took longer to start than the deadline, and right answers scored 0.
    # Start-up takes twice the deadline here: the items wait for the worker, not on its clock.
    fake_python(tmp_path, monkeypatch, f'sleep {2 * DEADLINE_S}\nexec {sys.executable} "$@"')
    assert score_batch(["a"] * 4, ["a"] * 4, ["echo"] * 4, workers=2,
                       timeout=DEADLINE_S) == ([1.0] * 4, {"ok": 4})


def test_a_worker_dying_while_it_starts_is_replaced(quick_workers, tmp_path, monkeypatch):
    died = tmp_path / "died"  # the first start dies (as if OOM-killed), the next one works
    fake_python(tmp_path, monkeypatch,
                f'[ -e {died} ] || {{ touch {died}; exit 3; }}\nexec {sys.executable} "$@"')
    assert score_batch(["a"] * 2, ["a"] * 2, ["echo"] * 2, workers=1) == ([1.0] * 2, {"ok": 2})
    assert died.exists()


def test_workers_that_cannot_start_raise_rather_than_wait_forever(quick_workers, tmp_path,
                                                                  monkeypatch):
    fake_python(tmp_path, monkeypatch, "exit 3")
    with pytest.raises(RuntimeError, match="keep exiting while they start"):
        score_batch(["a"] * 4, ["a"] * 4, ["echo"] * 4, workers=2)


def test_score_batch_reuses_its_workers_and_replaces_dead_ones(quick_workers):
    score_batch(["a"] * 2, ["a"] * 2, ["echo"] * 2, workers=2)
    pids = [w.proc.pid for w in sandbox._POOL[:2]]
    score_batch(["a"] * 2, ["a"] * 2, ["echo"] * 2, workers=2)
    assert [w.proc.pid for w in sandbox._POOL[:2]] == pids  # warm: no start-up per batch
    sandbox._POOL[0].proc.kill()
    sandbox._POOL[0].proc.wait()
    assert score_batch(["a"] * 4, ["a"] * 4, ["echo"] * 4, workers=2) == ([1.0] * 4, {"ok": 4})
    assert sandbox._POOL[0].proc.pid != pids[0]


def test_score_batch_worker_dead_before_its_item_is_sent(quick_workers):
    score_batch(["a"], ["a"], ["echo"], workers=1)
    worker = sandbox._POOL[0]
    worker.proc.kill()
    worker.proc.wait()
    worker.send(0, "[]", 60.0)  # what a batch does if the worker dies between two items
    assert worker.receive() is None


def test_score_batch_interrupted_leaves_no_late_reply_behind(quick_workers, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    score_batch(["a"], ["a"], ["echo"], workers=1)  # a ready worker: the next item is sent at once
    with monkeypatch.context() as mp:
        mp.setattr(sandbox, "wait", interrupted)  # Ctrl-C while an item is in flight
        with pytest.raises(KeyboardInterrupt):
            score_batch(["a"], ["a"], ["echo"], workers=1)
    assert sandbox._POOL == []  # its worker had an item in flight: closed
    # The interrupted item's reply ("ok") would otherwise be read as the answer to this one.
    assert score_batch(["a"], ["x"], ["echo"], workers=1) == ([0.0], {"wrong": 1})


def test_score_batch_from_a_script_without_a_main_guard(tmp_path):
    # Workers never import the caller's main script (a multiprocessing pool would re-run it).
    script = tmp_path / "score.py"
    script.write_text(f"import sandbox\nsandbox._SERVE = {TEST_SERVE!r}\n"
                      "print(sandbox.score_batch(['2', 'x'], ['2', '2'], ['echo'] * 2))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(sandbox.__file__))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.stdout.strip() == "([1.0, 0.0], {'ok': 1, 'wrong': 1})", out.stderr


def test_without_a_sandbox_score_batch_refuses_code_before_scoring_anything(quick_workers,
                                                                            no_sandbox, tmp_path,
                                                                            capfd):
    ran = tmp_path / "ran"  # a program that leaves a trace if it runs
    touch = f"open({str(ran)!r}, 'w').close()\nprint(2)"
    with pytest.raises(SandboxUnavailable):
        score_batch(["a", touch], ["a", "2"], ["echo", "code"])
    assert not ran.exists()
    assert score_batch(["a"], ["a"], ["echo"]) == ([1.0], {"ok": 1})  # no code: no sandbox needed
    assert capfd.readouterr().err == ""
    # Allowed. The workers are told there is no sandbox: sandboxed (had they probed again), the
    # program could not write `ran`, and would score 0.
    rewards, info = score_batch([touch] * 3 + ["a"], ["2"] * 3 + ["a"], ["code"] * 3 + ["echo"],
                                workers=2, allow_unsandboxed=True)
    assert (rewards, info) == ([1.0] * 4, {"ok": 4}) and ran.exists()
    assert capfd.readouterr().err.count("WITHOUT isolation") == 1  # the workers did not warn again


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


def test_without_a_sandbox_a_killed_worker_leaves_no_test_process_behind(quick_workers,
                                                                         no_sandbox):
    # Allowed to run unsandboxed, a program (and its child) still running when its worker is
    # killed at the batch deadline must die with the worker, not sleep on for 10 minutes.
    marker = f"prime_leak_{os.getpid()}_{time.monotonic_ns()}"
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}]"
    code = (f"import os, subprocess, sys\nsubprocess.Popen({sleeper})\n"  # a child ...
            f"os.execv(sys.executable, {sleeper})")  # ... and the program itself
    worker = sandbox._Worker()  # driven by hand, to kill it only once both are running
    try:
        worker.send(0, json.dumps([code, "", "code", sandbox.sandbox_status(), True]), 600)
        assert poll(lambda: len(processes_with(marker)) == 2, 300), processes_with(marker)
        worker.close()
        assert poll(lambda: processes_with(marker) == [], 60), processes_with(marker)  # not 600
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
    # The trainer SIGKILLed (the OOM killer) while a worker runs a long item: a program that
    # sleeps for 10 minutes. The worker and the program die with the trainer.
    marker = f"prime_orphan_{os.getpid()}_{time.monotonic_ns()}"
    program = (f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; "
               f"time.sleep(600)', {marker!r}])")
    script = tmp_path / "trainer.py"
    script.write_text(
        "import json, sys, time, sandbox\n"
        "sandbox.shutil.which = lambda name: None  # unsandboxed: no pid namespace kills it\n"
        f"sandbox._SERVE = {TEST_SERVE!r}\n"
        "worker = sandbox._Worker()\n"
        "assert worker.receive() == 'ready'\n"
        f"item = [{program!r}, '', 'code', sandbox.sandbox_status(), True]\n"
        "worker.send(0, json.dumps(item), 3600)\n"
        "print(worker.proc.pid, flush=True)\n"
        "time.sleep(3600)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(sandbox.__file__))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env=env)
    worker_pid = None
    try:
        worker_pid = int(trainer.stdout.readline())
        assert poll(lambda: len(processes_with(marker)) == 1, 300)  # the worker is busy with it
        trainer.kill()
        trainer.wait()
        assert poll(lambda: not alive(worker_pid) and processes_with(marker) == [], 60), \
            processes_with(marker)
    finally:
        trainer.kill()
        left = processes_with(marker) + ([worker_pid] if worker_pid and alive(worker_pid) else [])
        for pid in left:
            os.kill(pid, signal.SIGKILL)


# =============================================================================================
# The pool with its real workers on a busy machine (slow: several seconds)

# A program that loops while its per-test timeout (5 s) is longer than the batch deadline below: a
# stuck item. It is benign, so it may run where there is no sandbox (allow_unsandboxed=True).
LOOP, LOOP_TESTS = "```python\nwhile True: pass\n```", {"inputs": ["1"], "outputs": ["1"]}
# Correct answers: the fast path, and two that go through math-verify (its first call is slow).
RIGHT = [r"\boxed{3}", r"\boxed{\frac{6}{2}}", r"\boxed{3.0}"] * 2


@pytest.mark.slow
def test_score_batch_on_a_busy_machine_with_cold_workers():
    # Issue 12: with both cores busy, a cold worker (or the replacement of a timed-out one) took
    # longer to import math-verify than the deadline, and correct answers scored 0. Only an item's
    # own work counts now. The workers and more hogs than cores share one core here (affinity is
    # inherited), leaving the other to the rest of the machine; no bound on the batch's time.
    cpus = os.sched_getaffinity(0)
    hogs = []
    try:
        os.sched_setaffinity(0, {min(cpus)})
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        sandbox._close_pool()  # cold workers, started while their core is busy
        rewards, info = score_batch([LOOP, LOOP] + RIGHT, [LOOP_TESTS] * 2 + ["3"] * 6,
                                    ["code"] * 2 + ["math"] * 6, workers=2, timeout=1.5,
                                    allow_unsandboxed=True)
        assert rewards == [0.0, 0.0] + [1.0] * 6
        assert info == {"timeout": 2, "ok": 6}
    finally:
        os.sched_setaffinity(0, cpus)
        for hog in hogs:
            hog.kill()
            hog.wait()
        sandbox._close_pool()  # its workers are tied to one core
