"""Grading under adversarial output: a burst of responses that each stall math-verify.

    python -m bench.grading                       # 16 stalls, 4 grading processes, 5 s timeout
    python -m bench.grading --count 8 --threads 2 --timeout 2

Each stalled check (\\boxed{9^{9^{9^{9}}}} makes sympy build a huge integer in C code) is cut
at the timeout and its worker process killed, so a burst can cost no less than
ceil(count / threads) x timeout. Two figures, each a ratio to that ideal:

  grader    Grader.score_many over the burst (the grading machinery alone)
  rewarder  Rewarder.grade on one request whose samples are the burst (the path a run takes;
            it graded a request's samples one after another, ~count x timeout)

and one for "the rewarder's other work goes on meanwhile": a clean request of `--clean`
easy responses submitted while the burst is being graded; its latency over one timeout
(it waits for the first worker to free up, not for the whole burst).
Timing is wall clock on whatever else the machine runs: compare the ratios, not seconds.
"""
from __future__ import annotations

import argparse
import math
import threading
import time

STALL = r"the answer is \boxed{9^{9^{9^{9}}}}"


def _request(texts: list[str], truth: str, n: int):
    """One request's groups: texts split into groups of n samples."""
    from pipeline.types import Prompt, RolloutGroup, Sample
    prompt = Prompt(uid="bench:0", token_ids=(1,), ground_truth=truth)
    return [RolloutGroup(i, prompt, tuple(Sample((1,), t, (0.0,), True) for t in texts[i:i + n]), 0)
            for i in range(0, len(texts), n)]


def _rewarder(threads: int, timeout: float):
    from omegaconf import OmegaConf

    from actors.rewarder import Rewarder
    cfg = OmegaConf.create({"reward": {"kind": "math", "timeout_s": timeout, "max_chars": 10_000,
                                       "num_threads": threads, "num_cpus": 1.0},
                            "selector": {"name": "none"}, "train": {"batch_size": 8},
                            "pipeline": {"max_staleness": 1}})
    return Rewarder(cfg)


def _warm(grade, threads: int) -> None:
    """Start every worker process first: start-up (~1 s to import sympy) is not grading time."""
    grade([(r"\boxed{1}", "1")] * threads * 2)


def bench(count: int, threads: int, timeout: float, clean: int) -> dict:
    from pipeline.rewards import Grader
    ideal = math.ceil(count / threads) * timeout
    g = Grader(timeout_s=timeout, n_workers=threads)
    _warm(g.score_many, threads)
    t0 = time.perf_counter()
    assert g.score_many([(STALL, "1")] * count) == [0.0] * count
    grader_s = time.perf_counter() - t0
    timeouts = g.counters["timeouts"]
    g.close()

    r = _rewarder(threads, timeout)
    _warm(r.score.score_many, threads)
    done = {}

    def clean_request():
        time.sleep(0.5)   # the burst holds every worker by now
        t = time.perf_counter()
        scored = r.grade(_request([r"\boxed{\frac{1}{2}}"] * clean, "0.5", 8))
        done["clean_s"] = time.perf_counter() - t
        done["clean_ok"] = all(x == 1.0 for s in scored for x in s.rewards)

    side = threading.Thread(target=clean_request)
    t0 = time.perf_counter()
    side.start()
    scored = r.grade(_request([STALL] * count, "1", 8))
    rewarder_s = time.perf_counter() - t0
    side.join()
    assert all(x == 0.0 for s in scored for x in s.rewards) and done["clean_ok"]
    counts = r.grading_counts()
    r.score.close()
    return {"count": count, "threads": threads, "timeout_s": timeout, "ideal_s": ideal,
            "grader_s": grader_s, "grader_ratio": grader_s / ideal, "grader_timeouts": timeouts,
            "rewarder_s": rewarder_s, "rewarder_ratio": rewarder_s / ideal,
            "reward/timeouts": counts["reward/timeouts"], "clean_s": done["clean_s"],
            "clean_over_timeout": done["clean_s"] / timeout}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=16, help="stalled responses in the burst")
    ap.add_argument("--threads", type=int, default=4, help="grading processes (reward.num_threads)")
    ap.add_argument("--timeout", type=float, default=5.0, help="reward.timeout_s")
    ap.add_argument("--clean", type=int, default=8, help="easy responses graded during the burst")
    a = ap.parse_args(argv)
    res = bench(a.count, a.threads, a.timeout, a.clean)
    print(f"{res['count']} stalls x {res['timeout_s']:g} s through {res['threads']} grading processes: "
          f"ideal {res['ideal_s']:.1f} s")
    print(f"  grader    {res['grader_s']:6.1f} s  ratio {res['grader_ratio']:.2f}  (timeouts {res['grader_timeouts']})")
    print(f"  rewarder  {res['rewarder_s']:6.1f} s  ratio {res['rewarder_ratio']:.2f}  "
          f"(reward/timeouts {res['reward/timeouts']})")
    print(f"  a clean request of {a.clean} during the burst: {res['clean_s']:.1f} s "
          f"= {res['clean_over_timeout']:.2f} x timeout")


if __name__ == "__main__":
    main()
