"""Running untrusted code, and scoring batches in worker processes: the plumbing under verifier.py.

A fork that replaces the task (verifier.py) keeps this file as it is.
- The sandbox: `run_python` runs a generated program in a fresh process under bubblewrap
  (read-only host, private /tmp, only a temp dir writable, no network, own pid namespace) with
  CPU, memory, file-size and process limits and a wall-clock kill. Where the sandbox cannot start
  (`sandbox_status()`), code is refused (`SandboxUnavailable`) unless the caller passes
  `allow_unsandboxed=True` (the trainer's `--allow-unsandboxed-code`): then limits only.
- The pool: `score_batch` scores a whole batch in worker processes, each item with
  `verifier.score_one`, under a hard per-item deadline that counts only the item's own work: a
  worker gets items once it has started and warmed up.

Imports point one way: verifier imports this file, never the reverse; only the workers import
verifier, in their own processes (see `_SERVE`).
"""

import atexit
import ctypes
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from multiprocessing.connection import wait

# ==============================================================================================
# The sandbox: one generated program in its own process, bubblewrap + resource limits + a kill.

MEMORY_BYTES = 2 << 30  # address space per test
MAX_OUTPUT_BYTES = 1 << 20  # stdout kept per test; writing more kills the program (RLIMIT_FSIZE)
MAX_PROCS = 64  # RLIMIT_NPROC, counted per user: that is why tests run as `nobody` under root
NOBODY = 65534

_BWRAP = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--perms", "1777",
          "--tmpfs", "/tmp", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
          "--die-with-parent", "--new-session"]
_SANDBOX_STATUS = None  # None until probed: "ok", or why the sandbox is unavailable
_WARNED_UNSANDBOXED = False


class SandboxUnavailable(RuntimeError):
    """Generated code would run without the sandbox, and the caller did not allow that."""


def sandbox_status() -> str:
    """"ok" if generated code runs sandboxed here, else why not. Probed once per process by running
    Python in the sandbox just as a test runs, so what a bare `bwrap` check misses (an interpreter
    the sandbox hides, namespaces the kernel refuses) is caught too."""
    global _SANDBOX_STATUS
    if _SANDBOX_STATUS is None:
        if shutil.which("bwrap") is None:
            _SANDBOX_STATUS = "bubblewrap (bwrap) is not installed"
        elif os.getuid() == 0 and shutil.which("setpriv") is None:
            _SANDBOX_STATUS = ("setpriv (util-linux) is not installed: under root, tests run as "
                               "nobody through it")
        else:
            # It must be our Python: where `nobody` cannot read it (a venv in a 0700 folder) the
            # loader can fall back to another libpython, and tests would run on another version.
            # 60 s: a sandboxed Python starts in ~0.1 s; only a broken sandbox, never a busy
            # machine, should fail this, as a failure stops every run with code rows.
            ours = " ".join(f"{sys.version} {sys.prefix}".split())  # as `out` below: one line
            ok, out, err = _run_python("import sys; print(sys.version, sys.prefix)", "", 60.0,
                                       ("solution.py",), sandboxed=True)
            # one line each
            out, err = (" ".join(b.decode(errors="replace").split()) for b in (out, err))
            if not ok:
                _SANDBOX_STATUS = ("bwrap is installed but could not run Python in a sandbox "
                                   f"({err[-300:] or 'no error'})")
            elif out != ours:
                _SANDBOX_STATUS = (f"the sandbox runs another Python ({out}) than ours ({ours}): "
                                   "under root, tests run as nobody, who must be able to read ours")
            else:
                _SANDBOX_STATUS = "ok"
    return _SANDBOX_STATUS


def require_sandbox(allow_unsandboxed: bool) -> None:
    """Return if generated code can run sandboxed, or if the caller allows it to run with resource
    limits only (then warn, once per process); else raise SandboxUnavailable. The trainer calls it
    at start-up when its data has code rows, so a run fails at once, not at its first code batch."""
    global _WARNED_UNSANDBOXED
    status = sandbox_status()
    if status == "ok":
        return
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            f"sandbox.py: generated code cannot run sandboxed here: {status}. Fix that "
            "(bubblewrap: apt-get install -y bubblewrap; it needs unprivileged user namespaces), "
            "or pass --allow-unsandboxed-code (allow_unsandboxed=True) to run it with resource "
            "limits only")
    if not _WARNED_UNSANDBOXED:
        _WARNED_UNSANDBOXED = True
        print(f"WARNING: sandbox.py: {status}; generated code runs WITHOUT isolation, as allowed "
              "(resource limits only: it can read and write your files and use the network)",
              file=sys.stderr, flush=True)


def run_python(program: str, stdin: str, timeout_s: float, args=("solution.py",),
               allow_unsandboxed: bool = False) -> tuple[bool, bytes, bytes]:
    """Run `program` with our Python, `python -I *args` (by default the program itself), fed
    `stdin`, in a fresh temp dir that holds it as solution.py: (exited with status 0 within
    `timeout_s` seconds, its stdout up to MAX_OUTPUT_BYTES, the start of its stderr).

    Sandboxed (see `_sandbox_command`), with the limits of `_limit_resources`. Where the sandbox
    cannot start it raises SandboxUnavailable, or with `allow_unsandboxed` runs the program with
    the limits only."""
    require_sandbox(allow_unsandboxed)
    return _run_python(program, stdin, timeout_s, args, sandboxed=sandbox_status() == "ok")


def _run_python(program, stdin: str, timeout_s, args, sandboxed: bool) -> tuple[bool, bytes, bytes]:
    """`run_python` without the check: `_run_sandboxed` of `program` in a fresh temp dir."""
    workdir = tempfile.mkdtemp(prefix="prime_test_")
    try:
        if sandboxed and os.getuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the test runs as nobody, see _sandbox_command
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(program)
        argv = [sys.executable, "-I", *args]
        return _run_sandboxed(argv, workdir, stdin.encode(), timeout_s, sandboxed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _die_with_parent(parent_pid: int):
    """Be SIGKILLed when the process that started this one dies, however it dies (SIGKILL, the
    OOM killer): an orphan would run its item, or its test program, to the end (Linux's
    PR_SET_PDEATHSIG; elsewhere a no-op). If the parent is already gone, exit now. The kernel
    ties this to the parent's thread that started us: workers started from a thread that ends
    die with it, and the next batch replaces them (as any dead worker)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: not Linux
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _limit_resources(timeout_s, limit_procs: bool):
    """preexec_fn: the limits every test runs under (set in the child before exec, inherited), in
    its own process group, so that one kill reaches every child it forks (see _run_sandboxed).

    RLIMIT_NPROC counts all processes of a user, so it is set only where the test runs as
    `nobody` (see _sandbox_command); a normal user's limit would count their own trainer. Either
    way the pid namespace and the wall-clock kill end every process of a test."""
    parent = os.getpid()

    def apply():
        os.setpgid(0, 0)
        # dies with its worker, however the worker dies (a killed trainer kills its workers); what
        # an unsandboxed program forks is not covered (_Worker.close finds those, when it runs)
        _die_with_parent(parent)
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(timeout_s) + 1,) * 2)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_OUTPUT_BYTES,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if limit_procs:
            resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCS,) * 2)
    return apply


def _python_dirs(hidden):
    """The folders of our Python and its packages (what a test's `python -I` reads) that lie under
    one of `hidden`, without those inside another: the sandbox binds them back, read-only."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)),  # a venv's python links to its base
            *(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))}
    under = sorted(d for d in dirs
                   if os.path.isdir(d) and any(d.startswith(h + "/") for h in hidden))
    return [d for i, d in enumerate(under)
            if not any(d.startswith(outer + "/") for outer in under[:i])]


def _sandbox_command(argv, workdir):
    """`argv` wrapped in bubblewrap: read-only host, private /tmp, only `workdir` writable, no
    network, own pid namespace (the test cannot see or signal our processes, and all its
    processes die with it)."""
    # Under root: root ignores RLIMIT_NPROC (a fork bomb would take every pid on the machine)
    # and can read /root, so /root is hidden too and the test runs as `nobody`.
    root = os.getuid() == 0
    hidden = ["/tmp", "/root"] if root else ["/tmp"]
    command = _BWRAP + (["--perms", "0755", "--tmpfs", "/root"] if root else [])
    # Those tmpfs mounts would hide our Python where it lives under them (a venv under /tmp, pyenv
    # under /root): bind its folders back, and only those, not the rest of a folder above. Their
    # parents are made 0755 (bwrap would make them 0700), so `nobody` reaches them even where a
    # parent is private on the host (/root, a mkdtemp).
    for d in _python_dirs(hidden):
        parts = d.split("/")  # ["", "tmp", ..., name]: the parents below /tmp or /root
        command += [a for i in range(3, len(parts))
                    for a in ("--perms", "0755", "--dir", "/".join(parts[:i]))]
        command += ["--ro-bind", d, d]
    command += ["--bind", workdir, "/tmp/work", "--chdir", "/tmp/work"]
    if root:
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    return command + list(argv)


def _run_sandboxed(argv, workdir, stdin: bytes, timeout_s,
                   sandboxed: bool) -> tuple[bool, bytes, bytes]:
    """Run one test program; (exited with status 0 in time, its stdout up to MAX_OUTPUT_BYTES, the
    start of its stderr). Without `sandboxed`, only the resource limits and the kill apply.

    stdin, stdout and stderr are temp files outside the sandbox, not pipes: nothing can deadlock,
    and the output size is capped by RLIMIT_FSIZE rather than by how fast we read."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # and none of our secrets
    as_nobody = sandboxed and os.getuid() == 0
    with (tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout,
          tempfile.TemporaryFile() as ferr):
        fin.write(stdin)
        fin.seek(0)
        # Its own process group (see _limit_resources) but our session, not a new one: if this
        # worker is killed first, _Worker.close finds what the test left by that session.
        proc = subprocess.Popen(_sandbox_command(argv, workdir) if sandboxed else argv, stdin=fin,
                                stdout=fout, stderr=ferr, cwd=workdir, env=env,
                                preexec_fn=_limit_resources(timeout_s, as_nobody))
        try:
            returncode = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:  # the whole group: bwrap, and without bwrap every child the test forked
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        fout.seek(0)
        ferr.seek(0)
        return returncode == 0, fout.read(MAX_OUTPUT_BYTES), ferr.read(4096)


# ==============================================================================================
# Batches: many items in worker processes, each with a hard deadline.
#
# Processes, not threads: math-verify's timeouts use signal.alarm. The workers are plain
# `python -c "import sandbox, verifier; ..."` subprocesses, started once and reused for the whole
# run, talking one JSON line per item each way: they never import the trainer's main script
# (torch, transformers: seconds per start) and share no lock, so a stuck item (sympy in C code,
# which no alarm interrupts) is handled by killing its worker and starting a fresh one.
# A worker's start (imports, ~1.5 s here, far more on a busy machine) is not an item's time: it
# says "ready" once warm, and only then gets an item and that item's deadline.

ITEM_TIMEOUT_S = 60.0
_HERE = os.path.dirname(os.path.abspath(__file__))
# What a worker runs: the pool's one tie to the task. verifier imports this file, so this file
# names verifier only here, for the worker's own process to import: no import cycle.
_SERVE = "import sandbox, verifier; sandbox._serve(verifier.score_one)"


def _serve(score):
    """Worker loop: warm up and say "ready", then read one JSON item per line on stdin and write
    its (reward, reason), `score(response, ground_truth, ability, allow_unsandboxed)`, on stdout."""
    global _SANDBOX_STATUS, _WARNED_UNSANDBOXED
    _die_with_parent(int(os.environ["PRIME_VERIFIER_PARENT"]))  # a killed trainer leaves no worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a stray print in a checker goes to stderr, not into the replies
    _WARNED_UNSANDBOXED = True  # the trainer warns, once for all its workers
    # One tiny math item, scored and dropped, so that no real item pays for the checker's first
    # call (math-verify's first call costs ~180 ms). A task without math scores it as it likes.
    score(r"\boxed{\frac{1}{2}}", "0.5", "math", False)
    replies.write('"ready"\n')
    replies.flush()
    for line in sys.stdin:  # ends when the trainer closes the pipe or dies
        response, ground_truth, ability, sandbox_status, allow_unsandboxed = json.loads(line)
        if sandbox_status is not None:
            _SANDBOX_STATUS = sandbox_status  # probed once, in the trainer
        replies.write(json.dumps(score(response, ground_truth, ability, allow_unsandboxed)) + "\n")
        replies.flush()


class _Worker:
    """A scoring subprocess in its own session, with its own temp dir (removed with it, with what a
    killed test left). It takes items once it has said "ready"."""

    def __init__(self):
        self.tmp_dir = tempfile.mkdtemp(prefix="prime_verifier_")
        path = os.pathsep.join(p for p in (_HERE, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, TMPDIR=self.tmp_dir, PRIME_VERIFIER_PARENT=str(os.getpid()),
                   PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self.ready = False
        self.item = None  # index of the item in flight
        self.deadline = math.inf

    def send(self, i, line: str, timeout):
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died: its stdout is at EOF, so `receive` reports it
            pass
        self.item, self.deadline = i, time.monotonic() + timeout

    def receive(self):
        """The worker's next line: "ready" once started, then the reply to the item in flight;
        None if the worker died."""
        line = self.proc.stdout.readline()
        self.item, self.deadline = None, math.inf
        return json.loads(line) if line else None

    def close(self):
        """Kill the worker and whatever its tests left running. Sandboxed, a test dies with bwrap
        (--die-with-parent, pid namespace); without bwrap, a test's program and its children would
        outlive a worker killed at its deadline, so every process left in the worker's session is
        killed too (found in /proc), sweeping again until a sweep finds nobody new: a child
        forked during one sweep is caught by the next."""
        # reaped only after the sweep: till then its pid, the session's id, stays taken
        self.proc.kill()
        signalled = set()
        while True:
            found = set()
            for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
                try:
                    if pid not in signalled and os.getsid(pid) == self.proc.pid:
                        os.kill(pid, signal.SIGKILL)
                        found.add(pid)
                except OSError:  # gone meanwhile
                    pass
            if not found:
                break
            signalled |= found
        self.proc.wait()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


_POOL: list[_Worker] = []  # started on first use, reused by every batch, closed at exit


@atexit.register
def _close_pool():
    while _POOL:
        _POOL.pop().close()


def score_batch(responses, ground_truths, abilities, workers: int = 2,
                timeout: float = ITEM_TIMEOUT_S,
                allow_unsandboxed: bool = False) -> tuple[list[float], dict[str, int]]:
    """Rewards for a batch, each item scored by `verifier.score_one` in one of `workers`
    processes, and how many items had each reason ("ok", "wrong", "partial", "no_answer",
    "timeout", "error", ...). An item still running `timeout` seconds after a ready worker got it
    scores 0 ("timeout"): its worker is killed and replaced. Never raises for a bad item. For code,
    `timeout` bounds all of an item's tests together (each test has its own timeout,
    verifier.TEST_TIMEOUT_S): keep it above their sum.

    Raises SandboxUnavailable, before scoring anything, if the batch has code items (ability
    "code": they run generated code) and the sandbox cannot start, unless `allow_unsandboxed`
    (then code runs with resource limits only)."""
    items = list(zip(responses, ground_truths, abilities, strict=True))
    status = None  # what the workers are told, so that they neither probe nor warn again
    if any(ability == "code" for _, _, ability in items):
        require_sandbox(allow_unsandboxed)
        status = sandbox_status()
    rewards, reasons = [0.0] * len(items), ["timeout"] * len(items)
    todo = deque(range(len(items)))
    while len(_POOL) < min(max(workers, 1), len(items)):
        _POOL.append(_Worker())
    pool = _POOL[:max(workers, 1)]
    for worker in pool:
        if worker.proc.poll() is not None:  # died since the last batch (e.g. the OOM killer)
            _replace(worker, pool)
    died_starting = 0
    try:
        while True:
            for worker in pool:
                while todo and worker.ready and worker.item is None:
                    i = todo.popleft()
                    try:
                        line = json.dumps([*items[i], status, allow_unsandboxed])
                    except (TypeError, ValueError):  # not a string or a tests dict
                        reasons[i] = "error"
                        continue
                    worker.send(i, line, timeout)
            busy = [w for w in pool if w.item is not None]
            if not busy and not todo:
                break
            # Starting workers are waited for without a deadline: no item's clock runs for them.
            starting = [w for w in pool if not w.ready]
            left = min((w.deadline for w in busy), default=math.inf) - time.monotonic()
            readable = wait([w.proc.stdout for w in busy + starting],
                            timeout=None if left == math.inf else max(0.0, left))
            for worker in busy + starting:
                if worker.proc.stdout in readable:
                    i, reply = worker.item, worker.receive()
                    if not worker.ready and reply is not None:
                        worker.ready = True
                    elif not worker.ready:  # died while starting: once per worker may be bad luck
                        died_starting += 1
                        if died_starting > len(pool):
                            raise RuntimeError(
                                "sandbox.py: scoring workers keep exiting while they start "
                                f"(`python -c '{_SERVE}'`); their error is printed above")
                        _replace(worker, pool)
                    elif reply is None:  # the worker died (segfault, OOM kill)
                        reasons[i] = "error"
                        _replace(worker, pool)
                    else:
                        rewards[i], reasons[i] = reply
                elif time.monotonic() >= worker.deadline:  # reasons[i] is already "timeout"
                    _replace(worker, pool)
    finally:
        for worker in pool:
            # interrupted (Ctrl-C): its late reply must not reach the next batch
            if worker.item is not None:
                worker.close()
                _POOL.remove(worker)
    return rewards, dict(Counter(reasons))


def _replace(worker, pool):
    worker.close()
    fresh = _Worker()
    pool[pool.index(worker)] = _POOL[_POOL.index(worker)] = fresh
