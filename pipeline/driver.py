"""The driver: place the actors, wire the queues, follow the learner, log, evaluate.

It reads like the paper's loop, but each stage is an actor running its own loop:
  selector --prompt_q--> generators --rollout_q--> rewarder --train_q--> learner
      ^------------- rewards / ledger -------------'   (weights via WeightStore)
The driver does no maths: it starts the loops, then for every learner step writes
one metrics row, evaluates every `eval.every` steps and shows a progress bar.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.generator import Generator
from actors.learner import train_loop_per_worker
from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from actors.weights import WeightStore, remove_slots
from pipeline import checkpoint as ck
from pipeline.checkpoint import step_dir
from pipeline.faults import DeathBudget, StageFailed, one_line, stalled_stage
from pipeline.faults import parse as parse_faults
from pipeline.lifecycle import GracefulStop, RunFailed, eval_due, plan_restart, plan_resume, resume_command
from pipeline.evaluate import evaluate_sets
from pipeline.metrics import Progress
from pipeline.sinks import open_sinks
from pipeline.preflight import PreflightError, shortfall
from pipeline import placement
from pipeline.placement import Node, Plan
from pipeline.transport import Slot
from pipeline.world import World, load_world

log = logging.getLogger(__name__)


def run(cfg) -> Path:
    """Train with cfg (fresh, resumed or already finished, as run.resume decides); returns the run
    directory. A learner or rewarder failure restarts the pipeline from the newest checkpoint (at
    most train.max_failures times); a dead generator is restarted in place by Ray."""
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.name}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan, state = plan_resume(cfg, run_dir)
    if plan.kind == "finished":
        print(plan.message)
        return run_dir
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    world = load_world(cfg)
    started_ray = init_ray(cfg)
    if why := shortfall(cfg, ray.cluster_resources()):   # Ray Train would wait forever instead
        if started_ray:
            ray.shutdown()
        raise PreflightError(why)
    stop, failures = GracefulStop(), 0
    try:
        while True:
            try:
                step = _attempt(cfg, world, run_dir, plan, state, stop, attempt=failures)
                break
            except StageFailed as e:
                failures += 1
                if not e.recoverable or failures > cfg.train.max_failures or stop.requested:
                    raise RunFailed(_failure_message(e, run_dir, failures, cfg)) from None
                plan, state = plan_restart(run_dir)
                log.warning("%s; restarting the pipeline from %s (failure %d of train.max_failures=%d)",
                            e, plan.checkpoint or "the start", failures, cfg.train.max_failures)
    finally:
        if started_ray:
            ray.shutdown()
        stop.restore()
    if stop.requested:
        print(f"stopped after step {step}: checkpoint {step_dir(run_dir, step)}\n"
              f"resume with: {resume_command(run_dir)}")
    return run_dir


def _attempt(cfg, world, run_dir: Path, plan, state, stop, attempt: int) -> int:
    """One life of the pipeline, from `plan`'s checkpoint (or the start) to the end or a stop;
    returns the last step trained. Raises StageFailed when a stage dies."""
    p = Pipeline(cfg, world, run_dir, resume=plan.checkpoint, state=state, attempt=attempt)
    total, step = cfg.trainer.total_steps, plan.step
    try:
        p.start()
        # a resume keeps the rows up to its checkpoint; a restart with no checkpoint yet keeps none
        keep = plan.step if state else (-1 if attempt else None)
        with open_sinks(cfg, run_dir, resume_after_step=keep) as mlog, Progress(total, initial=plan.step) as bar:
            if not state:
                mlog.write({"step": 0, "policy_version": 0, **world.skipped, **p.evaluate(None)})
            elif (mlog.metrics.last_step or 0) < plan.step:   # the checkpoint was saved, its row never written
                mlog.write({**state["row"], **(p.evaluate(None) if eval_due(cfg, plan.step) else {})})
            for step in range(plan.step + 1, total + 1):
                row = p.next_step(stop)
                if eval_due(cfg, step):   # the learner pinned this version for us
                    row.update(p.evaluate(row["weights"]))
                    p.store.unpin.remote(row["weights"][0])
                p.last_weights = row["weights"]
                stopping = row.pop("stopping")
                row.pop("weights")
                mlog.write(row)
                bar.update(row)
                if stopping:
                    break
        p.finish()
    finally:
        p.stop()
    return step


def _failure_message(e: StageFailed, run_dir: Path, failures: int, cfg) -> str:
    found = ck.checkpoints(run_dir)
    where = (f"resume from {found[-1][1]} (step {found[-1][0]}) with: {resume_command(run_dir)}" if found
             else "no checkpoint was written yet")
    if e.recoverable and failures > cfg.train.max_failures:
        return f"{e} (failure {failures}, more than train.max_failures={cfg.train.max_failures}); {where}"
    return f"{e}; {where}"


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


def place(cfg) -> Plan:
    """Nodes for the learner and each generator (pipeline/placement.py), from the live cluster."""
    r, t = cfg.rollout, cfg.train
    gen_gpus = r.vllm.tensor_parallel_size if r.vllm.tensor_parallel_size > 1 else r.num_gpus
    nodes = [Node(n["NodeID"], n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]
    try:
        out = placement.plan(nodes, generators=r.num_generators, gen_gpus=gen_gpus, workers=t.num_workers,
                             worker_gpus=t.gpus_per_worker, use_gpu=t.use_gpu)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if out.learner_node or any(out.generator_nodes):
        log.info("placement: %s", out.why)
    return out


def generator_placement(cfg, node: str | None = None) -> dict:
    """Actor options for one generator: its resources, pinned to `node` when the plan says, or a
    placement group when a vLLM engine spans several GPUs (tensor parallel); vLLM's Ray executor
    then places its workers in the group the actor was scheduled into."""
    r = cfg.rollout
    tp = r.vllm.tensor_parallel_size
    env = {"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR", **placement.generator_env(r.num_gpus)}}
    if tp <= 1:
        where = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} if node else {}
        return {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "runtime_env": env, **where}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK",
                         bundle_label_selector=[{"ray.io/node-id": node}] * tp if node else None)
    ray.get(pg.ready(), timeout=600)
    return {"num_cpus": 0, "num_gpus": 0, "runtime_env": env, "scheduling_strategy": PlacementGroupSchedulingStrategy(
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

    def __init__(self, cfg, world: World, run_dir: Path, resume: Path | None = None, state: dict | None = None,
                 attempt: int = 0):
        if attempt:   # injected faults fire once, in the first life of the pipeline
            cfg = OmegaConf.merge(cfg, {"faults": {"kill": "", "stall": ""}})
        r, pl = cfg.rollout, cfg.pipeline
        self.cfg, self.world, self.run_dir, self.resume, self.attempt = cfg, world, run_dir, resume, attempt
        version = state["version"] if state else 0
        # a resumed run's generators start from the checkpoint's policy, already at its version
        model_dir = str(resume / "policy") if resume else world.model_dir
        free = {"num_cpus": 0}
        self.prompt_q = Queue(pl.prompt_queue_size, actor_options=free)
        self.rollout_q = Queue(pl.rollout_queue_size, actor_options=free)
        self.train_q = Queue(pl.train_queue_size, actor_options=free)
        self.metrics_q = Queue(actor_options=free)
        self.store = ray.remote(WeightStore).options(**free).remote(version)
        # a thread for each generator's waiting take(), and four for the loop, reports and settles
        self.selector = ray.remote(PromptSelector).options(
            num_cpus=cfg.selector.num_cpus, max_concurrency=4 + cfg.rollout.num_generators).remote(
            cfg, world.train, self.prompt_q)
        # max_restarts=-1: Ray restarts a dead generator (it reloads the newest weights from the
        # store); our DeathBudget decides when one has died too often
        self.plan = place(cfg)
        self.generators = [ray.remote(Generator).options(**generator_placement(cfg, node), max_concurrency=4,
                                                          max_restarts=-1)
                           .remote(cfg, model_dir, world.tokenizer_dir, self.store, self.prompt_q,
                                   self.rollout_q, index=i, version=version, selector=self.selector)
                           for i, node in enumerate(self.plan.generator_nodes)]
        self.rewarder = ray.remote(Rewarder).options(num_cpus=cfg.reward.num_cpus, max_concurrency=4).remote(
            cfg, self.selector, self.rollout_q, self.train_q)
        if state:   # before any loop runs: lost work re-issued, carried groups waiting again
            ray.get(self.selector.restore.remote(state["selector"]))
            ray.get(self.rewarder.restore.remote(state["carried"], version))
        self.trainer = self._trainer()
        self.loops, self.fit_error, self.fit_thread, self.stop_sent = [], None, None, False
        self.deaths = DeathBudget(r.max_deaths, r.death_window_min * 60)
        self.faults = [f for f in parse_faults(cfg.faults.kill) if f.stage != "learner"]   # the learner fires its own
        self.last_step_at, self.stepped = time.monotonic(), False
        self.last_weights = None      # the newest (version, slot, remote) seen: its directory is removed at the end

    def _trainer(self):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        t = self.cfg.train
        config = {"cfg": OmegaConf.to_container(self.cfg), "model_dir": self.world.model_dir,
                  "tokenizer_dir": self.world.tokenizer_dir, "run_dir": str(self.run_dir),
                  "resume_from": str(self.resume) if self.resume else None, "rewarder": self.rewarder,
                  "pad_id": self.world.pad_id, "store": self.store, "selector": self.selector,
                  "train_q": self.train_q, "metrics_q": self.metrics_q}
        # Ray Train's experiment directory is RUN_DIR/checkpoints: the learner reports each
        # committed step_<N> there, so Ray Train's restore and pruning see our checkpoints.
        run_config = RunConfig(name=ck.CHECKPOINTS, storage_path=str(self.run_dir),
                               checkpoint_config=CheckpointConfig(num_to_keep=self.cfg.trainer.keep_checkpoints),
                               failure_config=FailureConfig(max_failures=0))
        return _trainer_class()(train_loop_per_worker, train_loop_config=config,
                            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                                         resources_per_worker={"CPU": t.cpus_per_worker, **(
                                                             {"GPU": t.gpus_per_worker} if t.use_gpu else {})},
                                                         placement_strategy=self.plan.learner_strategy(),
                                                         label_selector=self.plan.learner_label()),
                            run_config=run_config)

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

    def next_step(self, stop: "GracefulStop | None" = None) -> dict:
        """Block until the learner reports its next step; restart dead generators, raise
        StageFailed for any other dead stage and when no step comes within pipeline.step_timeout_s.
        A requested stop is passed on: the learner checkpoints after the step it is in."""
        while True:
            if stop is not None and stop.requested and not self.stop_sent:
                ray.get(self.selector.request_stop.remote())
                self.stop_sent = True
            self.check_stages()   # every time: a dead generator is noticed even while steps keep coming
            try:
                row = self.metrics_q.get(timeout=1.0)
                self.last_step_at, self.stepped = time.monotonic(), True
                self._inject(row["step"])
                return row
            except ray.util.queue.Empty:
                pass
            # the first step also waits for Ray Train to start and load the model: three timeouts' grace
            limit = self.cfg.pipeline.step_timeout_s * (1 if self.stepped else 3)
            if time.monotonic() - self.last_step_at > limit:
                raise StageFailed("watchdog", self._hang_report(), recoverable=False)

    def check_stages(self) -> None:
        """Restart generators that died (their work is re-issued); any other dead stage fails."""
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        for k in sorted(self.loops.index(ref) for ref in done):   # the selector first: others fail after it
            ref = self.loops[k]
            name = ["selector", "rewarder", *[f"generator {i}" for i in range(len(self.generators))]][k]
            try:
                ray.get(ref)
                why = "its loop ended before training finished"
            except ray.exceptions.RayActorError as e:
                if k >= 2:
                    self._restart_generator(k - 2, e)
                    continue
                why = f"the actor died ({one_line(e)})"
            except Exception as e:   # noqa: BLE001 - a stage's own error, reported in one line
                why = one_line(e)
            raise StageFailed(name, why, recoverable=name == "rewarder")
        if self.fit_error:
            raise StageFailed("learner", one_line(self.fit_error), recoverable=True)

    def _restart_generator(self, i: int, error: Exception) -> None:
        """Count the death, re-issue what the generator held, wait for Ray's restart, resume its loop."""
        n = self.deaths.record(i)
        if self.deaths.exhausted(i):
            raise StageFailed(f"generator {i}", f"died {n} times within rollout.death_window_min="
                              f"{self.cfg.rollout.death_window_min} min (rollout.max_deaths="
                              f"{self.cfg.rollout.max_deaths}); last error: {one_line(error)}", recoverable=False)
        lost = ray.get(self.selector.generator_lost.remote(i))
        log.warning("generator %d died (%s): Ray restarts it; %d prompts it held re-issued", i, one_line(error), lost)
        deadline = time.monotonic() + 600   # a vLLM engine on a loaded node takes minutes to come back
        while True:   # calls to a restarting actor fail at once (ActorUnavailableError): ask until it answers
            try:
                ray.get(self.generators[i].pid.remote(), timeout=30)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() > deadline:
                    raise StageFailed(f"generator {i}", f"did not come back within 600 s after dying "
                                      f"({one_line(e)})", recoverable=False) from None
                time.sleep(1.0)
        self.loops[2 + i] = self.generators[i].run.remote()

    def _inject(self, step: int) -> None:
        """faults.kill, driver side: SIGKILL a stage's process after `step`, as a crash would."""
        for f in [f for f in self.faults if f.step == step]:
            self.faults.remove(f)
            actor = {"generator": self.generators[min(f.index, len(self.generators) - 1)],
                     "rewarder": self.rewarder, "selector": self.selector}[f.stage]
            pid = ray.get(actor.pid.remote())
            log.warning("faults.kill: SIGKILL %s %d (pid %d) after step %d", f.stage, f.index, pid, step)
            os.kill(pid, signal.SIGKILL)

    def _hang_report(self) -> str:
        """What each stage holds when no step came in time, and which one we wait on."""
        def ask(ref, default):
            try:
                return ray.get(ref, timeout=10)
            except Exception:   # noqa: BLE001 - a frozen actor does not answer: that is the finding
                return default
        status = ask(self.selector.status.remote(), None)
        if status is None:
            return f"no learner step for {self.cfg.pipeline.step_timeout_s:.0f} s; stalled stage: selector (not answering)"
        pl = self.cfg.pipeline
        queues = {"prompt_q": ask(self.prompt_q.actor.qsize.remote(), -1),
                  "rollout_q": ask(self.rollout_q.actor.qsize.remote(), -1), "rollout_q_max": pl.rollout_queue_size,
                  "train_q": ask(self.train_q.actor.qsize.remote(), -1), "train_q_max": pl.train_queue_size}
        log.error("hang report: queues %s; selector %s", queues, status)
        return (f"no learner step for {pl.step_timeout_s:.0f} s (pipeline.step_timeout_s); stalled stage: "
                f"{stalled_stage(status, queues, pl.step_timeout_s)}; queues prompt/rollout/train = "
                f"{queues['prompt_q']}/{queues['rollout_q']}/{queues['train_q']}, ledger {status['ledger']}")

    def evaluate(self, weights) -> dict:
        """eval/* metrics of the policy that produced `weights` (None = initial), computed as
        `python -m pipeline.evaluate` computes them for a saved model."""
        for _ in range(3):   # a generator that dies mid-evaluation is restarted; the evaluation is redone
            try:
                return evaluate_sets(self.generators, self.rewarder, self.world.eval, self.cfg, weights)
            except ray.exceptions.RayActorError:
                ray.wait(self.loops[2:], num_returns=1, timeout=30)
                self.check_stages()
        raise StageFailed("generators", "evaluation failed three times (generators keep dying)", recoverable=False)

    def stop(self) -> None:
        """End every loop, then kill every actor of this pipeline, so a restart starts clean (the
        learner's queue goes too, which ends a Ray Train run still waiting on it)."""
        for a in [self.selector, self.rewarder, *self.generators]:
            a.stop.remote()
        ray.wait(self.loops, num_returns=len(self.loops), timeout=10)
        for a in [self.selector, self.rewarder, *self.generators, self.store,
                  *[q.actor for q in (self.prompt_q, self.rollout_q, self.train_q, self.metrics_q)]]:
            ray.kill(a, no_restart=True)
        if self.fit_thread is not None:
            self.fit_thread.join(timeout=120)
        self._remove_slots()

    def _remove_slots(self) -> None:
        """Free the shared memory of the published versions, on the node that holds them."""
        slot = self.last_weights[1] if self.last_weights else None
        if not isinstance(slot, Slot):
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        where = NodeAffinitySchedulingStrategy(slot.node, soft=True) if slot.node else None
        try:
            ray.get(ray.remote(remove_slots).options(num_cpus=0, scheduling_strategy=where).remote(slot.path),
                    timeout=60)
        except Exception as e:   # noqa: BLE001 - a node gone with its shared memory: nothing left to free
            log.warning("could not remove the weight slots in %s: %s", Path(slot.path).parent, one_line(e))

    def finish(self) -> None:
        """After the last step: let Ray Train's fit() return before Ray may shut down."""
        self.fit_thread.join(timeout=60)
