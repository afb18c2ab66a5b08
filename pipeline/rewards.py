"""Rule-based math reward: 1.0 if the response's last \\boxed{} answer equals the ground truth.

    score(response, ground_truth)               # -> 0.0 or 1.0, never raises, never hangs
    Grader(format_score=0.1).score(...)         # a wrong \\boxed answer scores 0.1 (the authors')
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
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_START_TIMEOUT_S = 120.0   # a fresh worker imports sympy: ~0.7 s, far more on a loaded box


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


def _serve(request_fd: int, reply_fd: int, alarm_s: int) -> None:
    """Worker loop: import math-verify, say ready, then answer (pred, gold) -> (ok, bool|str)."""
    import math_verify  # noqa: F401  (the slow import, before the first timed request)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    requests, replies = Connection(request_fd, writable=False), Connection(reply_fd, readable=False)
    replies.send("ready")
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


# --- parent side ------------------------------------------------------------------------

class _GradingError(Exception):
    """math-verify/sympy raised inside the worker (the worker itself is still healthy)."""


class _Worker:
    """One grading subprocess behind two pipes.

    A plain `python -m pipeline.rewards` child rather than multiprocessing: "spawn" re-runs
    the caller's __main__ script in the child, and "fork" is unsafe in a multi-threaded
    Ray actor (gRPC threads).
    """

    def __init__(self, timeout_s: float) -> None:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        args = [str(request_r), str(reply_w), str(math.ceil(timeout_s) + 10)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, *args], env=env,
                                     pass_fds=(request_r, reply_w), stdin=subprocess.DEVNULL)
        os.close(request_r)
        os.close(reply_w)
        self.requests = Connection(request_w, readable=False)
        self.replies = Connection(reply_r, writable=False)
        self.ready = False

    def verify(self, pred: str, gold_latex: str, timeout_s: float) -> bool | None:
        """The verdict, or None on timeout; raises if the worker failed or died."""
        if not self.ready:  # startup time is not grading time: wait for it separately
            if not self.replies.poll(_START_TIMEOUT_S):
                raise RuntimeError("grading worker did not start")
            self.replies.recv()  # "ready", or EOFError if it died (its stderr says why)
            self.ready = True
        self.requests.send((pred, gold_latex))
        if not self.replies.poll(timeout_s):
            return None
        ok, value = self.replies.recv()
        if not ok:
            raise _GradingError(value)
        return value

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.requests.close()
        self.replies.close()


class Grader:
    """Scores responses in up to `n_workers` processes; counts what went wrong."""

    def __init__(self, timeout_s: float = 5.0, max_chars: int = 10_000, n_workers: int = 0,
                 format_score: float = 0.0):
        self.timeout_s = timeout_s        # seconds per (parse + verify) before scoring 0.0
        self.format_score = format_score  # reward for a \boxed answer that is wrong (the authors' 0.1)
        self.max_chars = max_chars        # keep the response's tail: the answer is at the end
        self.n_workers = n_workers or min(4, os.cpu_count() or 1)  # grading processes
        self.counters = {"graded": 0, "timeouts": 0, "errors": 0, "no_answer": 0, "truncated": 0}
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._n_started = 0
        self._threads: ThreadPoolExecutor | None = None

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

    def score_many(self, pairs) -> list[float]:
        """score() over (response, ground_truth) pairs, n_workers at a time, in order."""
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.n_workers, thread_name_prefix="grader")
        return list(self._threads.map(lambda pair: self.score(*pair), pairs))

    def close(self) -> None:
        """Stop the idle workers; a busy one is killed when its check ends or times out."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        while not self._idle.empty():
            self._idle.get_nowait().kill()

    def _verify(self, pred: str, gold_latex: str) -> bool:
        """Run one check in a worker; a worker that times out or fails is replaced."""
        worker = self._acquire()
        if worker is None:
            self._count("errors")
            return False
        try:
            verdict = worker.verify(pred, gold_latex, self.timeout_s)
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
        if worker is not None:
            self._idle.put(worker)
        return bool(verdict)

    def _acquire(self) -> _Worker | None:
        """An idle worker, starting one if fewer than n_workers exist, else wait for one."""
        while True:
            with self._lock:
                start = self._idle.empty() and self._n_started < self.n_workers
                self._n_started += start
            if start:
                return self._start()
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                pass  # re-check: a worker that could not be restarted frees its slot

    def _replace(self, worker: _Worker, counter: str) -> _Worker | None:
        # A hung sympy call cannot be interrupted, only killed with its process.
        self._count(counter)
        worker.kill()
        return self._start()

    def _start(self) -> _Worker | None:
        """A new worker, or None (and one fewer counted) if it cannot be spawned."""
        try:
            return _Worker(self.timeout_s)
        except Exception:  # noqa: BLE001  (e.g. out of processes or file descriptors)
            log.warning("cannot start a grading worker", exc_info=True)
            with self._lock:
                self._n_started -= 1
            return None

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


if __name__ == "__main__":  # a grading worker, started by _Worker
    _serve(*map(int, sys.argv[1:4]))
