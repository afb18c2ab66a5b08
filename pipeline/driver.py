"""The driver: place the actors, wire the queues, follow the learner, log, evaluate.

It reads like the paper's loop, but each stage is an actor running its own loop:
  selector --prompt_q--> generators --rollout_q--> rewarder --train_q--> learner
      ^------------- rewards / ledger -------------'   (weights via WeightStore)
The driver does no maths: it starts the loops, then for every learner step writes
one metrics row, evaluates every `eval.every` steps and shows a progress bar.
"""
from __future__ import annotations

import threading
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.util.queue import Queue

from actors.generator import Generator
from actors.learner import train_loop_per_worker
from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from actors.weights import WeightStore
from pipeline.metrics import MetricsLog, Progress
from pipeline.preflight import PreflightError, shortfall
from pipeline.world import World, load_world


def run(cfg) -> Path:
    """Train with cfg; returns the run directory."""
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.name}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    world = load_world(cfg)
    started_ray = init_ray(cfg)
    if why := shortfall(cfg, ray.cluster_resources()):   # Ray Train would wait forever instead
        if started_ray:
            ray.shutdown()
        raise PreflightError(why)
    p = Pipeline(cfg, world, run_dir)
    try:
        p.start()
        with MetricsLog(run_dir / "metrics.jsonl") as log, Progress(cfg.trainer.total_steps) as bar:
            log.write({"step": 0, "policy_version": 0, **world.skipped, **p.evaluate(None)})
            for step in range(1, cfg.trainer.total_steps + 1):
                row = p.next_step()
                last = step == cfg.trainer.total_steps
                if last or (cfg.eval.every and step % cfg.eval.every == 0):
                    row.update(p.evaluate(row.pop("weights")))
                row.pop("weights", None)
                log.write(row)
                bar.update(row)
        p.finish()
    finally:
        p.stop()
        if started_ray:
            ray.shutdown()
    return run_dir


def init_ray(cfg) -> bool:
    """ray.address: "" attaches to a running cluster (RAY_ADDRESS or `ray start`) or starts
    one; "local" always starts a private local instance; anything else is an address."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}}
    local = dict(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.dashboard, runtime_env=env)
    if cfg.ray.address == "local":
        ray.init(address="local", **local)
        return True
    try:
        ray.init(address=cfg.ray.address or "auto", runtime_env=env)
    except ConnectionError:
        if cfg.ray.address:
            raise
        ray.init(**local)
    return True


def generator_placement(cfg) -> dict:
    """Actor options for one generator: plain resources, or a placement group when a vLLM
    engine spans several GPUs (tensor parallel); vLLM's Ray executor then places its
    workers in the group the actor was scheduled into."""
    r = cfg.rollout
    tp = r.vllm.tensor_parallel_size
    if r.num_gpus == 0:   # CPU: an in-process vLLM engine starts in seconds instead of ~15 s
        env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}}
        return {"num_cpus": r.num_cpus, "num_gpus": 0, "runtime_env": env}
    if tp <= 1:
        return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=600)
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_capture_child_tasks=True)}


def _trainer_class():
    """TorchTrainer minus Ray Train's PlacementGroupCleaner.

    The cleaner asks the state API whether the train controller is alive and treats a
    missed lookup as death: on 2 busy cores it removed the live learner's placement
    group mid-run (seen here at step ~430; the same flaw is noted in ray-project/ray
    PR 65447's review). Our driver owns the job, so the group is freed when it exits.
    """
    from ray.train.torch import TorchTrainer

    class PipelineTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]
    return PipelineTrainer


class Pipeline:
    """The actors and queues of one run."""

    def __init__(self, cfg, world: World, run_dir: Path):
        r, pl = cfg.rollout, cfg.pipeline
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        free = {"num_cpus": 0}
        self.prompt_q = Queue(pl.prompt_queue_size, actor_options=free)
        self.rollout_q = Queue(pl.rollout_queue_size, actor_options=free)
        self.train_q = Queue(pl.train_queue_size, actor_options=free)
        self.metrics_q = Queue(actor_options=free)
        self.store = ray.remote(WeightStore).options(**free).remote()
        self.selector = ray.remote(PromptSelector).options(num_cpus=cfg.selector.num_cpus, max_concurrency=4).remote(
            cfg, world.train, self.prompt_q)
        self.generators = [ray.remote(Generator).options(**generator_placement(cfg), max_concurrency=4)
                           .remote(cfg, world.model_dir, world.tokenizer_dir, self.store, self.prompt_q,
                                   self.rollout_q, index=i) for i in range(r.num_generators)]
        self.rewarder = ray.remote(Rewarder).options(num_cpus=cfg.reward.num_cpus, max_concurrency=4).remote(
            cfg, self.selector, self.rollout_q, self.train_q)
        self.trainer = self._trainer()
        self.loops, self.fit_error, self.fit_thread = [], None, None

    def _trainer(self):
        from ray.train import RunConfig, ScalingConfig
        t = self.cfg.train
        config = {"cfg": OmegaConf.to_container(self.cfg), "model_dir": self.world.model_dir,
                  "pad_id": self.world.pad_id, "store": self.store, "selector": self.selector,
                  "train_q": self.train_q, "metrics_q": self.metrics_q}
        return _trainer_class()(train_loop_per_worker, train_loop_config=config,
                            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                                         resources_per_worker={"CPU": t.cpus_per_worker, **(
                                                             {"GPU": t.gpus_per_worker} if t.use_gpu else {})}),
                            run_config=RunConfig(name="learner", storage_path=str(self.run_dir / "ray_train")))

    def start(self) -> None:
        self.loops = [self.selector.run.remote(), self.rewarder.run.remote(),
                      *[g.run.remote() for g in self.generators]]
        self.fit_thread = threading.Thread(target=self._fit, daemon=True)
        self.fit_thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except Exception as e:  # surfaced by next_step
            self.fit_error = e

    def next_step(self) -> dict:
        """Block until the learner reports its next step; fail loudly if any stage died."""
        while True:
            try:
                return self.metrics_q.get(timeout=1.0)
            except Exception as e:
                if not isinstance(e, ray.util.queue.Empty):
                    raise
            done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
            for ref in done:
                ray.get(ref)   # re-raises the stage's error
            if done:
                raise RuntimeError("a pipeline stage stopped before training finished")
            if self.fit_error:
                raise RuntimeError(f"the learner failed: {self.fit_error}") from self.fit_error

    def evaluate(self, weights) -> dict:
        """Held-out accuracy of the policy that produced `weights` (None = initial) on every
        eval set: greedy `eval/<name>/accuracy`, plus `eval/<name>/avg@k` (mean reward of k
        samples per prompt) when avg_k > 1. `eval/accuracy` repeats the first set's greedy
        accuracy: the progress bar and the benchmarks read that one key."""
        # 1) queue every generation at once, so no generator idles between sets
        jobs = []   # (metric key, reward kind, (response refs, truths))
        for s in self.world.eval:
            jobs.append((f"eval/{s.name}/accuracy", s.reward, self._generate(s.prompts, weights, 0)))
            if s.avg_k > 1:
                jobs.append((f"eval/{s.name}/avg@{s.avg_k}", s.reward, self._generate(s.prompts, weights, s.avg_k)))
        # 2) grade each job as its responses arrive, with its set's own scorer
        graded = {key: self.rewarder.accuracy.remote([t for _, ts in ray.get(refs) for t in ts], truths, reward)
                  for key, reward, (refs, truths) in jobs}
        row = {key: ray.get(ref) for key, ref in graded.items()}
        row.update({f"eval/{s.name}/prompts": len(s.prompts) for s in self.world.eval})
        row["eval/accuracy"] = row[f"eval/{self.world.eval[0].name}/accuracy"]
        return row

    def _generate(self, prompts: list, weights, k: int) -> tuple[list, list[str]]:
        """Shard prompts over the generators (k = 0 greedy, else k samples each); returns the
        response refs and the ground truth of every response, in the same order."""
        shards = [prompts[i::len(self.generators)] for i in range(len(self.generators))]
        refs = [g.evaluate.remote(s, self.cfg.rollout.max_new_tokens, weights, k)
                for g, s in zip(self.generators, shards) if s]
        return refs, [p.ground_truth for s in shards for p in s for _ in range(max(k, 1))]

    def stop(self) -> None:
        for a in [self.selector, self.rewarder, *self.generators]:
            a.stop.remote()
        ray.wait(self.loops, num_returns=len(self.loops), timeout=10)

    def finish(self) -> None:
        """After the last step: let Ray Train's fit() return before Ray may shut down."""
        self.fit_thread.join(timeout=60)
