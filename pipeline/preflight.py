"""Preflight: what must hold before any actor starts. The resource arithmetic is pure (no Ray).

Ray queues an actor it cannot place instead of failing, and Ray Train retries a worker
group it cannot place forever ("Error count: 2 (max allowed: inf)"), so a run that asks
for too much waits without a word. Every actor of a run lives for the whole run, so the
sum of what they reserve must fit in the cluster at once:

    shortfall(cfg, {"CPU": 2.0})   # -> None, or one line: the shortfall and the keys to change
    check_before_ray(cfg)          # run.py: run dir, model paths, a local Ray's CPUs/GPUs

The queues, the weight store and Ray Train's controller reserve 0 CPUs
(ray/train/v2/api/data_parallel_trainer.py creates the controller with num_cpus=0).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import UserError

EPS = 1e-4   # Ray keeps resources in fixed point with 4 decimals


class PreflightError(UserError):
    """The cluster cannot hold the actors the config asks for."""


def demand(cfg) -> dict[str, list[tuple[str, float, tuple[str, ...]]]]:
    """{"CPU": [...], "GPU": [...]}: every reservation as (what, amount, the keys that set it)."""
    r, t, tp = cfg.rollout, cfg.train, cfg.rollout.vllm.tensor_parallel_size
    g, w = r.num_generators, cfg.train.num_workers
    gens = ("rollout.num_generators",)
    if r.num_gpus > 0 and tp > 1:   # a STRICT_PACK placement group of tp x {GPU: 1, CPU: 1} each
        pg = (f"generators {g} x rollout.vllm.tensor_parallel_size={tp}", g * tp,
              gens + ("rollout.vllm.tensor_parallel_size",))
        cpu, gpu = [pg], [pg]
    else:
        cpu = [(f"generators {g} x rollout.num_cpus={r.num_cpus:g}", g * r.num_cpus, gens + ("rollout.num_cpus",))]
        gpu = [(f"generators {g} x rollout.num_gpus={r.num_gpus:g}", g * r.num_gpus, gens + ("rollout.num_gpus",))]
    learners = ("train.num_workers",)
    cpu += [(f"learner {w} x train.cpus_per_worker={t.cpus_per_worker:g}", w * t.cpus_per_worker,
             learners + ("train.cpus_per_worker",)),
            (f"selector.num_cpus={cfg.selector.num_cpus:g}", cfg.selector.num_cpus, ("selector.num_cpus",)),
            (f"reward.num_cpus={cfg.reward.num_cpus:g}", cfg.reward.num_cpus, ("reward.num_cpus",))]
    if t.use_gpu:
        gpu.append((f"learner {w} x train.gpus_per_worker={t.gpus_per_worker:g}", w * t.gpus_per_worker,
                    learners + ("train.gpus_per_worker", "train.use_gpu=false")))
    return {"CPU": [c for c in cpu if c[1] > 0], "GPU": [c for c in gpu if c[1] > 0]}


def shortfall(cfg, resources: dict, local: bool = False) -> str | None:
    """None if the cluster's total `resources` ({"CPU": n, "GPU": m}) hold every actor of the run,
    else one line naming each short resource, what asks for it and the keys to change.
    `local`: the cluster is a Ray this run starts itself, so ray.num_cpus can grow it."""
    problems = []
    for kind, asks in demand(cfg).items():
        need, have = sum(a for _, a, _ in asks), float(resources.get(kind, 0.0))
        if need <= have + EPS:
            continue
        keys = list(dict.fromkeys(k for *_, ks in asks for k in ks))
        more = " or raise ray.num_cpus" if kind == "CPU" and local else ""
        parts = ", ".join(what if f"={a:g}" in what and " x " not in what else f"{what} = {a:g}"
                          for what, a, _ in asks)
        problems.append(f"the run needs {need:g} {kind} ({parts}) but the Ray cluster has "
                        f"{have:g}; change {', '.join(keys)}{more}")
    return "preflight: " + "; ".join(problems) if problems else None


def local_resources(cfg) -> dict | None:
    """What a Ray started by this run will have, without starting it; None when the run attaches
    to a cluster (only ray.cluster_resources() knows that one) or the GPUs cannot be counted."""
    if cfg.ray.address != "local":
        return None
    gpus = _local_gpus()
    if gpus is None:
        return None
    cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _local_gpus() -> int | None:
    """GPUs a local Ray would detect, counted as Ray counts them: NVML's device count capped by
    CUDA_VISIBLE_DEVICES (ray/_private/resource_and_label_spec.py, _get_num_accelerators)."""
    if not os.path.exists("/proc/driver/nvidia") and not os.path.exists("/dev/nvidiactl"):
        return 0   # no NVIDIA driver: NVML cannot start, Ray counts 0 (and importing Ray costs seconds)
    try:   # imports Ray's modules, starts nothing
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as nvidia
        count = nvidia.get_current_node_num_accelerators()
        visible = nvidia.get_current_process_visible_accelerator_ids()
    except Exception:   # noqa: BLE001  (a private API: if it moved, the check after ray.init remains)
        return None
    return count if visible is None else min(count, len(visible))


def check_before_ray(cfg) -> None:
    """Everything about the run's inputs that can be known before Ray starts: the run directory,
    the model and tokenizer paths, and, for a Ray this run starts itself, its CPUs and GPUs."""
    from pipeline.world import check_model_paths
    check_run_dir(cfg)
    check_model_paths(cfg)
    resources = local_resources(cfg)
    why = shortfall(cfg, resources, local=True) if resources is not None else None
    if why:
        raise PreflightError(why)


def check_run_dir(cfg) -> Path:
    """The run directory exists (created here) and takes files; else one line naming the key."""
    path = Path(cfg.run.dir or f"runs/{cfg.run.name}").expanduser()
    key = "run.dir" if cfg.run.dir else "run.name"
    fix = "choose another run.dir"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):   # mode bits do not bind root: try a write
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to the run directory {path} ({e.strerror}); {fix}") from None
    return path
