"""Rule-based math reward: 1.0 if the response's last \\boxed{} answer equals the ground truth.

    score(response, ground_truth)               # -> 0.0 or 1.0, never raises, never hangs
    Grader(timeout_s=5.0).score_many(pairs)     # parallel, with its own counters

Equality is decided by math-verify (`parse` + `verify`, which call sympy), so "0.5",
"\\frac{1}{2}" and "1/2" all match. Two hazards shape this file:
1. math-verify's own timeout uses signal.alarm, which only works on the main thread; the
   Rewarder calls us from Ray actor threads. So we pass parsing_timeout=None /
   timeout_seconds=None and enforce the timeout ourselves.
2. sympy can spend minutes inside ONE C-level big-integer operation (try
   \\boxed{9^{9^{9^{9}}}}) while holding the GIL: a thread-pool timeout then never even
   fires (measured: > 60 s), and a thread cannot be killed anyway. So grading runs in a
   few lazily started worker *processes*; one that overruns is killed and replaced
   (a fresh worker takes ~0.7 s to import sympy; that is not counted as grading time).
"""
from __future__ import annotations

import functools
import gc
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_START_TIMEOUT_S = 600.0   # importing sympy: ~0.7 s idle; 200 s measured on 2 cores shared by 5 agents


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, \\fbox{...} or `\\boxed 5`; None if absent/unbalanced."""
    start, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(cmd)
    if text.startswith(" ", i):  # `\boxed 5`: one token, up to whitespace or `$`
        words = text[i:].split()
        return (words[0].split("$")[0] or None) if words else None
    if not text.startswith("{", i):
        return None              # e.g. `\boxedsomething`: not a box
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2               # skip escaped chars: `\{` `\}` are literal braces, `\\` a newline
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None                  # unbalanced: the response was cut off mid-answer


def _as_latex(answer: str) -> str:
    """`$...$` around an answer, once: Gaokao golds already come as "$-1-\\sqrt{3}$"."""
    answer = answer.strip()
    while len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    return "$" + answer + "$"


# --- runs inside a worker process -------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _parse_gold(gold_latex: str) -> list:
    """Parsed gold, cached: each prompt's gold is graded against n rollouts."""
    from math_verify import parse
    return parse(gold_latex, parsing_timeout=None)


def _verify(pred: str, gold_latex: str) -> bool:
    """math-verify with its signal-based timeouts off (we time out from the parent)."""
    from math_verify import parse, verify
    gold = _parse_gold(gold_latex)
    return bool(gold) and verify(gold, parse(pred, parsing_timeout=None), timeout_seconds=None)


def _warm_up() -> None:
    """The slow imports, before the first timed request: math_verify, and the LaTeX grammar
    and sympy parts its first parse loads lazily (seconds on a loaded box)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    _verify("$\\frac{1}{2}$", "$0.5$")


def _serve(request_fd: int, reply_fd: int, alarm_s: int) -> None:
    """Worker loop: say ready, then answer (pred, gold) -> (ok, bool|str)."""
    requests, replies = Connection(request_fd, writable=False), Connection(reply_fd, readable=False)
    try:
        replies.send("ready")
    except OSError:
        return                   # the parent gave up on us before we started
    while True:
        try:
            pred, gold = requests.recv()
        except (EOFError, OSError):
            return               # the parent closed the pipe or died
        # Self-destruct if the parent died mid-task and nobody will kill us: SIGALRM with its
        # default action ends the process even inside C code (no Python handler is involved).
        signal.alarm(alarm_s)
        try:
            replies.send((True, _verify(pred, gold)))
        except Exception as e:   # noqa: BLE001  (sympy raises anything)
            # Only the type: str() of a sympy error can itself hang (math-verify warns so).
            replies.send((False, type(e).__name__))
        signal.alarm(0)


def _fork_server(control_fd: int, alarm_s: int) -> None:
    """Warm up once, then fork one ready worker per request on the control socket.

    A stalled worker is killed and replaced; started from scratch, a replacement spends
    ~0.7 s (5-10 s on 2 loaded cores) importing sympy, which a burst of stalls pays in
    full each time. Forked from this warm, single-threaded process it is ready in ms.
    """
    _warm_up()
    gc.freeze()   # keep the warm heap out of the children's collections: fewer copy-on-write pages
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps the workers we fork
    control = socket.socket(fileno=control_fd)
    control.sendall(b"ready")
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 2)
        except OSError:
            return
        if len(fds) != 2:
            return               # the parent closed the socket
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _warm_up()   # ms when warm; on a thrashing box the pages it touches are copied here, untimed
            _serve(fds[0], fds[1], alarm_s)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        control.sendall(struct.pack("!i", pid))


# --- parent side ------------------------------------------------------------------------

class _GradingError(Exception):
    """math-verify/sympy raised inside the worker (the worker itself is still healthy)."""


def _launch(args: list[str], pass_fds: tuple) -> subprocess.Popen:
    """A plain `python -m pipeline.rewards` child rather than multiprocessing: "spawn" re-runs
    the caller's __main__ script in the child, and "fork" is unsafe in a multi-threaded Ray
    actor (gRPC threads). Forking happens only in our own single-threaded fork server."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", __name__, *args], env=env, pass_fds=pass_fds,
                            stdin=subprocess.DEVNULL)


class _ForkServer:
    """Parent side of _fork_server: fork() returns a ready-to-use _Worker in milliseconds."""

    def __init__(self, timeout_s: float) -> None:
        mine, theirs = socket.socketpair()
        self.alarm_s = math.ceil(timeout_s) + 10
        self.proc = _launch(["fork-server", str(theirs.fileno()), str(self.alarm_s)], (theirs.fileno(),))
        theirs.close()
        self.control, self.lock, self.ready = mine, threading.Lock(), False

    def fork(self) -> "_Worker":
        """Raises if the server died or did not start within _START_TIMEOUT_S."""
        with self.lock:
            if not self.ready:
                self.control.settimeout(_START_TIMEOUT_S)
                if self.control.recv(5) != b"ready":
                    raise RuntimeError("grading fork server did not start")
                self.ready = True
            request_r, request_w = os.pipe()
            reply_r, reply_w = os.pipe()
            try:
                socket.send_fds(self.control, [b"f"], [request_r, reply_w])
                reply = self.control.recv(4)
            finally:
                os.close(request_r)
                os.close(reply_w)
            if len(reply) != 4:
                raise RuntimeError("grading fork server died")
            return _Worker(request_w, reply_r, pid=struct.unpack("!i", reply)[0])

    def close(self) -> None:
        self.control.close()     # the server sees EOF and exits; its workers see EOF too
        self.proc.kill()
        self.proc.wait()


class _Worker:
    """One grading process behind two pipes: forked by the fork server, or (if that fails)
    started on its own, which then warms up before saying ready."""

    def __init__(self, request_w: int, reply_r: int, pid: int = 0, proc: subprocess.Popen | None = None):
        self.requests = Connection(request_w, readable=False)
        self.replies = Connection(reply_r, writable=False)
        self.pid, self.proc, self.ready = pid, proc, False

    @classmethod
    def launch(cls, timeout_s: float) -> "_Worker":
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        proc = _launch([str(request_r), str(reply_w), str(math.ceil(timeout_s) + 10)], (request_r, reply_w))
        os.close(request_r)
        os.close(reply_w)
        return cls(request_w, reply_r, proc=proc)

    def send(self, pred: str, gold_latex: str) -> None:
        """Start one check; raises if the worker died or never started."""
        if not self.ready:  # startup time is not grading time: wait for it separately
            if not self.replies.poll(_START_TIMEOUT_S):
                raise RuntimeError("grading worker did not start")
            self.replies.recv()  # "ready", or EOFError if it died (its stderr says why)
            self.ready = True
        self.requests.send((pred, gold_latex))

    def result(self, timeout_s: float):
        """The verdict of the check in flight, or _PENDING if it is still running after timeout_s."""
        if not self.replies.poll(timeout_s):
            return _PENDING
        ok, value = self.replies.recv()
        if not ok:
            raise _GradingError(value)
        return value

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:   # the fork server's child: it reaps it
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.requests.close()
        self.replies.close()


_PENDING = object()   # a check still running


class Grader:
    """Scores responses in up to `n_workers` processes; counts what went wrong.

    Workers go to callers first come, first served, so one caller's burst of stalls cannot
    starve another's (an eval, the next request), and a stall's replacement is forked from
    a warm fork server, so a burst of stalls costs ~ count x timeout / n_workers, not that
    plus a sympy import per stall (measured before: 5 s per 2 s stall on 2 loaded cores).
    """

    def __init__(self, timeout_s: float = 5.0, max_chars: int = 10_000, n_workers: int = 0,
                 prestart: bool = False, format_score: float = 0.0):
        self.timeout_s = timeout_s        # seconds per (parse + verify) before scoring 0.0
        self.format_score = format_score  # reward for a \boxed answer that is wrong (the authors' 0.1)
        self.max_chars = max(1, max_chars)  # keep the response's tail: the answer is at the end
        self.n_workers = n_workers or min(4, os.cpu_count() or 1)  # grading processes
        self.counters = {"graded": 0, "timeouts": 0, "errors": 0, "no_answer": 0, "truncated": 0}
        self._lock = threading.Lock()     # counters
        self._pool = threading.Condition()  # guards everything below
        self._idle: deque[_Worker] = deque()
        self._waiting: deque[object] = deque()  # callers waiting for a worker, in arrival order
        self._n_started = 0               # worker slots in use or idle (<= n_workers)
        self._server: _ForkServer | None = None   # started with the first worker, or now
        self._server_failed = False
        if prestart:   # the rewarder: let sympy import while the rest of the pipeline starts
            self._fork_server()

    def score(self, response: str, ground_truth: str) -> float:
        """1.0 if the last boxed answer (else the whole response) matches; format_score if a
        boxed answer was extracted but is wrong (verl's latex_math reward); 0.0 otherwise."""
        self._count("graded")
        if not isinstance(response, str) or not isinstance(ground_truth, str):
            self._count("errors")
            return 0.0
        if len(response) > self.max_chars:
            self._count("truncated")
            response = response[-self.max_chars:]
        boxed = extract_boxed(response)
        if boxed is None:
            self._count("no_answer")  # still let math-verify look for a final answer
        pred = response if boxed is None else _as_latex(boxed)
        if self._verify(pred, _as_latex(ground_truth)):
            return 1.0
        return 0.0 if boxed is None else self.format_score

    __call__ = score   # a Grader is the scorer: make_scorer hands it out, counters and all

    def score_many(self, pairs) -> list[float]:
        """score() over (response, ground_truth) pairs, n_workers at a time, in order.

        Threads per call, not one shared pool: a shared FIFO pool would queue a second
        caller behind every check of the first; with threads per call, callers take
        turns at the workers as each one frees up.
        """
        pairs = list(pairs)
        if len(pairs) <= 1:
            return [self.score(*pair) for pair in pairs]
        with ThreadPoolExecutor(min(self.n_workers, len(pairs)), thread_name_prefix="grader") as threads:
            return list(threads.map(lambda pair: self.score(*pair), pairs))

    def close(self) -> None:
        """Stop the idle workers and the fork server; a busy worker is killed when its check
        ends or times out."""
        with self._pool:
            workers, server = list(self._idle), self._server
            self._idle.clear()
            self._server = None
        for w in workers:
            w.kill()
        if server is not None:
            server.close()

    def _verify(self, pred: str, gold_latex: str) -> bool:
        """Run one check in a worker; a worker that times out or fails is replaced."""
        worker = self._acquire()
        if worker is None:
            self._count("errors")
            self._release(None)
            return False
        try:
            verdict = self._check(worker, pred, gold_latex)
        except _GradingError as e:  # sympy failed on this pair: the worker is fine
            log.debug("grading failed: %s", e)
            verdict = None
            self._count("errors")
        except Exception:  # noqa: BLE001  (the worker died or did not start)
            log.warning("grading worker failed; replacing it", exc_info=True)
            verdict, worker = None, self._replace(worker, "errors")
        else:
            if verdict is None:
                worker = self._replace(worker, "timeouts")
        self._release(worker)
        return bool(verdict)

    def _check(self, worker: _Worker, pred: str, gold_latex: str) -> bool | None:
        """The verdict, or None on timeout."""
        worker.send(pred, gold_latex)
        verdict = worker.result(self.timeout_s)
        return None if verdict is _PENDING else verdict

    def _acquire(self) -> _Worker | None:
        """A worker for this caller once every earlier caller has one: an idle one, else a new
        slot while fewer than n_workers exist. None if a new one cannot be started."""
        me = object()
        with self._pool:
            self._waiting.append(me)
            while not (self._waiting[0] is me and (self._idle or self._n_started < self.n_workers)):
                self._pool.wait()
            self._waiting.popleft()
            self._pool.notify_all()
            if self._idle:
                return self._idle.popleft()
            self._n_started += 1
        return self._new_worker()

    def _release(self, worker: _Worker | None) -> None:
        """Hand a worker back; None frees its slot (it could not be replaced)."""
        with self._pool:
            if worker is None:
                self._n_started -= 1
            else:
                self._idle.append(worker)
            self._pool.notify_all()

    def _replace(self, worker: _Worker, counter: str) -> _Worker | None:
        # A hung sympy call cannot be interrupted, only killed with its process.
        self._count(counter)
        worker.kill()
        return self._new_worker()

    def _new_worker(self) -> _Worker | None:
        """A worker forked from the fork server; a plain process if the server cannot run;
        None (logged) if neither can be started (out of processes or file descriptors)."""
        server = self._fork_server()
        if server is not None:
            try:
                return server.fork()
            except Exception:  # noqa: BLE001
                log.warning("grading fork server failed; starting workers on their own", exc_info=True)
                with self._pool:
                    self._server_failed, self._server = True, None
                server.close()
        try:
            return _Worker.launch(self.timeout_s)
        except Exception:  # noqa: BLE001
            log.warning("cannot start a grading worker", exc_info=True)
            return None

    def _fork_server(self) -> _ForkServer | None:
        """The fork server, started on first use (Popen returns at once; it warms up on its own)."""
        with self._pool:
            if self._server is None and not self._server_failed:
                try:
                    self._server = _ForkServer(self.timeout_s)
                except Exception:  # noqa: BLE001
                    log.warning("cannot start the grading fork server", exc_info=True)
                    self._server_failed = True
            return self._server

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1


_default: Grader | None = None
_default_lock = threading.Lock()


def score(response: str, ground_truth: str) -> float:
    """Grader().score with a shared, lazily created default Grader."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
    return _default.score(response, ground_truth)


if __name__ == "__main__":  # the fork server, or (its fallback) one grading worker
    if sys.argv[1] == "fork-server":
        _fork_server(*map(int, sys.argv[2:4]))
    else:
        _warm_up()
        _serve(*map(int, sys.argv[1:4]))
