"""Rewarder: grades rollouts, feeds results back to the selector, assembles train batches.

Grading runs in a thread pool while the loop keeps draining the rollout queue;
results are processed in arrival order so batches stay deterministic for a given
arrival order. Dynamic sampling (drop zero-variance groups, carry the surplus) and
the staleness rule live in pipeline.batching.Accumulator.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, Full, Queue

import ray

from pipeline.batching import Accumulator
from pipeline.selection import SELECTORS
from pipeline.types import ScoredGroup, TrainBatch


def make_scorer(reward_cfg, kind: str = "", format_score: float | None = None):
    """reward.kind (or `kind`, for an eval set graded differently) -> score(response, ground_truth) -> float.

    format_score None = reward.format_score (training); evaluation passes 0.0: accuracy counts right answers only.
    """
    if (kind or reward_cfg.kind) == "tiny":
        from pipeline.tiny import tiny_score
        return tiny_score
    from pipeline.rewards import Grader
    fmt = reward_cfg.format_score if format_score is None else format_score
    return Grader(timeout_s=reward_cfg.timeout_s, max_chars=reward_cfg.max_chars, n_workers=reward_cfg.num_threads,
                  prestart=True, format_score=fmt)


def score_all(scorer, texts: list, truths: list) -> list[float]:
    """Every (text, truth) pair through the scorer: in parallel where it can (Grader.score_many)."""
    many = getattr(scorer, "score_many", None)
    return many(zip(texts, truths)) if many else [scorer(t, g) for t, g in zip(texts, truths)]


class Rewarder:
    def __init__(self, cfg, selector=None, rollout_q=None, train_q=None):
        self.cfg, self.selector, self.rollout_q, self.train_q = cfg, selector, rollout_q, train_q
        self.score = make_scorer(cfg.reward)
        self.scorers = {}                              # eval scorers by kind (no format score), built on first use
        self.scorers_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(cfg.reward.num_threads)
        post_filter = SELECTORS[cfg.selector.name].post_filter
        self.acc = Accumulator(cfg.train.batch_size, post_filter=post_filter)
        self.consume_lock = threading.Lock()   # a checkpoint's cut: no group between acc and ledger
        self.reported = {"timeouts": 0, "errors": 0}   # grading counters already sent to the selector
        self.stopped = False

    def grade(self, groups) -> list[ScoredGroup]:
        """Score every sample (runs on a pool thread): all samples of the request at once, so a
        burst of stalled checks costs ~count x timeout / reward.num_threads, not count x timeout."""
        samples = [(s.text, g.prompt.ground_truth) for g in groups for s in g.samples]
        scores = iter(score_all(self.score, [t for t, _ in samples], [g for _, g in samples]))
        return [ScoredGroup(g, tuple(next(scores) for _ in g.samples)) for g in groups]

    def grading_counts(self) -> dict:
        """reward/timeouts and reward/errors since the last call (the scorer's running counters)."""
        now = {k: getattr(self.score, "counters", {}).get(k, 0) for k in self.reported}
        delta = {f"reward/{k}": now[k] - self.reported[k] for k in now}
        self.reported = now
        return delta

    def accuracy(self, texts: list[str], truths: list[str], kind: str = "") -> float:
        """Mean reward of the responses (greedy: accuracy; k per prompt: avg@k), graded by
        `kind`'s scorer ("" = reward.kind), built on first use: math-verify starts worker processes."""
        kind = kind or self.cfg.reward.kind
        with self.scorers_lock:
            if kind not in self.scorers:
                self.scorers[kind] = make_scorer(self.cfg.reward, kind, format_score=0.0)
        scores = score_all(self.scorers[kind], texts, truths)
        return sum(scores) / len(scores) if scores else 0.0

    def consume(self, rollouts, scored: list[ScoredGroup]) -> list[TrainBatch]:
        """Accumulate scored groups and cut every batch that is now full.

        Two synchronous reports per request, in order: first each group's rewards and fate
        (the selector refuses groups whose ticket was re-issued meanwhile, when the generator
        that made them was given up for dead: those never reach a batch), then each cut
        batch's tickets, so the ledger knows a batch is queued before the learner settles it.
        """
        results = [{"ticket": g.group.ticket, "uid": g.group.prompt.uid, "rewards": g.rewards,
                    "fate": self.acc.fate(g), "response_len": sum(len(s.token_ids) for s in g.group.samples)}
                   for g in scored]
        refused = set(self._call(self.selector.report, results, [], rollouts.gen_seconds, rollouts.tokens,
                                 rollouts.sync_seconds, self.grading_counts()) or ())
        for g in scored:
            if g.group.ticket not in refused:
                self.acc.add(g)
        batches, moves = [], []
        while True:
            stale = self.acc.drop_stale(self.cfg.pipeline.max_staleness)
            groups = self.acc.pop_batch()
            moves.append(([g.group.ticket for g in groups or []], [g.group.ticket for g in stale]))
            if groups is None:
                break
            batches.append(TrainBatch(self.acc.batches_emitted, tuple(groups)))
        self._call(self.selector.report, [], moves)
        return batches

    def run(self) -> None:
        """The rewarder's loop (a long-running actor call): consumes graded requests in arrival
        order as soon as each one's grading ends, while a reader thread keeps the grading pool fed.

        One thread doing both waited on the rollout queue (up to its 50 ms timeout) before it
        looked at a finished grade: ~80 ms from a request's end to its batch on tiny, twice per
        step when a batch needs a top-up.
        """
        graded: Queue = Queue(maxsize=2 * self.cfg.reward.num_threads)
        failed: list[BaseException] = []
        reader = threading.Thread(target=self._read, args=(graded, failed), name="rewarder-read", daemon=True)
        reader.start()
        while not self.stopped:
            try:
                rollouts, fut = graded.get(timeout=0.05)
            except Empty:
                if failed:
                    raise failed[0]
                continue
            scored = fut.result()
            with self.consume_lock:
                batches = self.consume(rollouts, scored)
            for batch in batches:
                self._put_batch(batch)

    def _read(self, graded: Queue, failed: list) -> None:
        """Rollout queue -> grading pool -> `graded`, in arrival order; an error ends run()."""
        try:
            while not self.stopped:
                try:
                    rollouts = ray.get(self.rollout_q.get(timeout=0.05)[0])
                except Empty:
                    continue
                item = (rollouts, self.pool.submit(self.grade, rollouts.groups))
                while not self.stopped:   # at most 2 x num_threads graded or grading ahead of consume
                    try:
                        graded.put(item, timeout=0.05)
                        break
                    except Full:
                        continue
        except BaseException as e:   # noqa: BLE001  (handed to run(), which raises it)
            failed.append(e)

    def _put_batch(self, batch: TrainBatch) -> None:
        ref = ray.put(batch)
        while not self.stopped:      # blocks while the learner is busy: back-pressure
            try:
                self.train_q.put([ref], timeout=0.5)
                return
            except Full:
                continue

    def _call(self, method, *args):
        """Actor handles in Ray (waited for), plain objects in unit tests."""
        return ray.get(method.remote(*args)) if hasattr(method, "remote") else method(*args)

    def checkpoint_state(self) -> dict:
        """The selector's state and our carried groups, at one instant: while we hold the lock no
        group is between the accumulator and the ledger, so `carried` tickets are exactly these."""
        from pipeline.checkpoint import encode_group
        with self.consume_lock:
            return {"selector": self._call(self.selector.state_dict),
                    "carried": [encode_group(g) for g in self.acc.waiting]}

    def restore(self, carried: list[dict], version: int) -> None:
        """Carried groups from a checkpoint wait again, as they were; the next batch is version + 1."""
        from pipeline.checkpoint import decode_group
        with self.consume_lock:
            self.acc.waiting.extend(decode_group(g) for g in carried)
            self.acc.batches_emitted = version

    def stop(self) -> None:
        self.stopped = True

    def pid(self) -> int:
        """The actor's process id (fault injection kills it from outside, as a crash would)."""
        import os
        return os.getpid()
