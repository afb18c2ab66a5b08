"""Structured config: one dataclass per section, merged base.yaml + conf/<NAME>.yaml + CLI.

`load_config(["conf=qwen7b", "train.lr=2e-6"])` returns a validated OmegaConf object or
raises ConfigError with one line naming the key and why. Nothing heavy is imported
here (no torch, no ray) so a bad key fails in well under a second.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.faults import parse as parse_faults
from pipeline.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SELECTORS = ("greso", "mopps", "dynamic_sampling", "none")
SIZINGS = ("paper", "streaming")
ENGINES = ("auto", "vllm", "hf")
REWARDS = ("math", "tiny")
LOGGERS = ("jsonl", "tensorboard", "wandb")   # metric sinks (pipeline/sinks.py); each but jsonl an optional extra
SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")   # a set's name goes into metric keys: eval/<name>/accuracy


class ConfigError(UserError):
    """A config value that cannot run; the message is one line: `key: why`."""


@dataclass
class RunSection:
    name: str = "tiny"                 # run name; the run directory defaults to runs/<name>
    dir: str = ""                      # run directory; "" = runs/<name>
    seed: int = 0                      # seeds data order, selector RNG, sampling, init
    resume: str = "auto"               # auto: continue from the newest complete checkpoint in run.dir, if any | never | a checkpoint path
    overwrite: bool = False            # with nothing to resume: replace a previous run in run.dir instead of refusing
    loggers: List[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always) + tensorboard | wandb


@dataclass
class RaySection:
    address: str = ""                  # "" = attach to a running cluster if any, else start locally; "local" = always a new one
    num_cpus: Optional[float] = None   # CPUs for a locally started Ray (None = all)
    dashboard: bool = True             # start the Ray dashboard with a local Ray


@dataclass
class ModelSection:
    path: str = "tiny"                 # HF hub name or local dir; "tiny" = the locally built tiny model
    tokenizer: str = ""                # "" = same as path
    dtype: str = "float32"             # float32 | bfloat16 (learner compute dtype on GPU)


@dataclass
class TinySection:
    cache_dir: str = "~/.cache/greso"  # where the tiny world (model, tokenizer, splits) is built once
    num_train: int = 1024              # training prompts; RL cycles through them for many epochs
    num_eval: int = 512                # held-out prompts, never trained on
    warm_target: float = 0.3           # supervised warm start stops at this held-out accuracy


@dataclass
class DataSection:
    train: Any = "tiny"                # parquet (verl) / jsonl / HF dataset name / "tiny", or a list of them
    limit: Optional[int] = None        # use at most this many training rows
    max_prompt_tokens: int = 1024      # longer prompts are skipped and counted
    tiny: TinySection = field(default_factory=TinySection)


@dataclass
class SelectorSection:
    name: str = "greso"                # greso | mopps | dynamic_sampling | none
    alpha: float = 0.25                # target zero-variance ratio (GRESO α)
    p_easy: float = 0.5                # initial exploration probability for all-correct streaks
    p_hard: float = 0.5                # initial exploration probability for all-wrong streaks
    p_step: float = 0.01               # controller step after each training step
    p_min: float = 0.05                # controller lower bound
    p_max: float = 0.95                # controller upper bound
    keep_floor: float = 0.01           # a prompt is kept with probability at least this
    oversample: float = 1.25           # paper sizing: later rounds int(oversample * missing / (1 - last zvr))
    sizing: str = "streaming"          # paper: the authors' rounds | streaming: just in time (async)
    min_sampling: int = 64             # paper sizing: smallest later round (the authors' 64)
    easy_mean_min: float = 0.98        # a group is easy when its mean reward is >= this (the authors' value)
    hard_mean_max: float = 0.11        # a group is hard when its mean reward is <= this (the authors' value)
    probe_fraction: float = 0.02       # probes per prompt kept: skips rolled out anyway, never trained on
    mopps_decay: float = 1.0           # MoPPS λ: posterior decays toward the Beta(1,1) prior each update; 1 = no decay
    mopps_mode: str = "closest"        # closest: sampled rates nearest mopps_target | band: rates in the band
    mopps_target: float = 0.5          # MoPPS target success rate (closest mode)
    mopps_pool: float = 2.0            # closest mode: Thompson-sample this many candidates per prompt kept
    mopps_band_low: float = 0.25       # band mode: lowest sampled rate kept
    mopps_band_high: float = 0.75      # band mode: highest sampled rate kept
    num_cpus: float = 1.0              # CPUs reserved for the selector actor


@dataclass
class VLLMSection:
    tensor_parallel_size: int = 1      # GPUs per vLLM engine (a placement group per generator when > 1)
    gpu_memory_utilization: float = 0.85  # share of GPU memory vLLM may take (weights + KV cache)
    enforce_eager: bool = False        # skip CUDA graphs (faster start, slower decode)
    max_model_len: Optional[int] = None  # None = max_prompt_tokens + max_new_tokens
    kv_cache_gib: int = 1              # CPU build only: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    enable_sleep_mode: bool = False    # GPU: free weights/KV cache between rollouts when co-located
    multiprocessing: Optional[bool] = None  # engine core in a subprocess; None = vLLM's default on GPU (yes), no on CPU


@dataclass
class RolloutSection:
    engine: str = "hf"                 # auto | vllm | hf
    num_generators: int = 1            # generator actors, scaled independently of the learner
    n: int = 8                         # samples per prompt (group size)
    temperature: float = 1.0           # sampling temperature (behaviour log-probs use the same)
    top_p: float = 1.0                 # nucleus sampling mass
    max_new_tokens: int = 2560         # response length cap
    sampling_batch: int = 384          # prompts per sampling round (fixed for dynamic_sampling; cap for greso)
    request_size: int = 32             # prompts per request handed to one generator
    num_cpus: float = 1.0              # per generator actor
    num_gpus: float = 0.0              # per generator actor
    weight_sync: str = "shm"           # shm: slot files in node-local shared memory | object_store: the old pickled path
    max_deaths: int = 3                # a generator is restarted after a death, up to this many times ...
    death_window_min: float = 10.0     # ... within this many minutes; one more death ends the run
    vllm: VLLMSection = field(default_factory=VLLMSection)


@dataclass
class RewardSection:
    kind: str = "math"                 # math (math-verify on \boxed{}) | tiny (reversed-sum exact match)
    timeout_s: float = 5.0             # per-response grading timeout
    max_chars: int = 10_000            # grade only the last max_chars of a response
    format_score: float = 0.0          # math: a boxed but wrong answer (the authors' 0.1); not in eval
    num_threads: int = 4               # grading threads inside the rewarder
    num_cpus: float = 1.0              # CPUs reserved for the rewarder actor


@dataclass
class TrainSection:
    num_workers: int = 1               # Ray Train workers (DDP over gloo on CPU)
    use_gpu: bool = False              # train on GPUs (FSDP2); False = CPU DDP over gloo
    cpus_per_worker: float = 1.0       # CPUs reserved per Ray Train worker
    gpus_per_worker: float = 1.0       # GPUs per worker when use_gpu (< 1 shares a GPU with generators)
    batch_size: int = 256              # B: effective prompt groups per training step
    mini_batch_size: Optional[int] = None  # groups per optimiser step (ppo_mini_batch_size); None = batch
    micro_batch_size: int = 64         # samples per forward/backward on one worker
    micro_batch_tokens: int = 0        # if > 0: cut micro-batches by this token budget instead
    strategy: str = "auto"             # ddp | fsdp | auto (fsdp with GPUs, ddp over gloo on CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward (long responses)
    ppo_epochs: int = 1                # optimiser steps per batch (>1 exercises the PPO clip)
    lr: float = 1e-6                   # AdamW learning rate
    lr_schedule: str = "constant"      # constant | cosine (decay to lr * lr_min_ratio by the last step)
    lr_min_ratio: float = 0.1          # cosine floor, as a fraction of lr
    weight_decay: float = 0.0          # AdamW weight decay
    grad_clip: float = 1.0             # global gradient-norm clip
    clip_low: float = 0.2              # PPO ε_low
    clip_high: float = 0.28            # PPO ε_high (DAPO clip-higher)
    loss_agg: str = "token"            # token (DAPO) | seq
    adv_norm: str = "std"              # std (GRPO) | mean (Dr.GRPO)
    kl_coef: float = 0.0               # k3 KL to the initial policy; 0 = none (paper)
    entropy_coef: float = 0.0          # entropy bonus in the loss (the authors' 0.001)
    clip_ratio_c: Optional[float] = None  # dual clip (> 1) for A < 0; None = off (the authors')
    tis_cap: float = 2.0               # truncated importance weight cap for off-policy data; 0 = off
    max_failures: int = 1              # learner / rewarder failures survived by restarting the pipeline from the newest checkpoint


@dataclass
class PipelineSection:
    max_staleness: int = 1             # policy versions data may lag the update that uses it
    max_in_flight: int = 0             # most prompts in rollout; 0 = 2 x (max_staleness + 1) x sampling_batch
    prompt_queue_size: int = 8         # requests waiting for a generator
    rollout_queue_size: int = 16       # generated requests waiting for the rewarder
    train_queue_size: int = 1          # full batches waiting for the learner
    step_timeout_s: float = 1800.0     # hang watchdog: no learner step for this long ends the run, naming the stalled stage


@dataclass
class TrainerSection:
    total_steps: int = 500             # learner steps (= policy versions published)
    save_every: int = 100              # checkpoint every this many steps (0 = only at the end); also at the last step and on a graceful stop
    keep_checkpoints: int = 3          # newest checkpoints kept in run.dir/checkpoints


@dataclass
class EvalSet:
    name: str = ""                     # metric prefix eval/<name>/...; letters, digits, _ . -
    path: str = ""                     # jsonl/parquet path or HF dataset name; "tiny" = the tiny held-out split
    split: str = "test"                # HF dataset split (files have none)
    subset: Optional[str] = None       # HF dataset config/subset, e.g. OE_TO_maths_en_COMP (files have none)
    prompt_key: Optional[str] = None   # problem column; None = the first of prompt / problem / question
    answer_key: Optional[str] = None   # answer column, e.g. final_answer; None = reward_model.ground_truth / answer / solution
    limit: Optional[int] = None        # evaluate on at most this many prompts (None = all)
    avg_k: int = 1                     # 1 = greedy only; k > 1 also logs avg@k of k samples at rollout.temperature
    top_p: Optional[float] = None      # nucleus mass of the avg@k samples (the authors' 0.7); None = rollout.top_p
    reward: str = ""                   # "" = reward.kind | math | tiny


@dataclass
class EvalSection:
    every: int = 25                    # evaluate every this many steps (0 = only at the end)
    sets: List[EvalSet] = field(default_factory=list)  # held-out sets; eval/accuracy = the first set's greedy accuracy


@dataclass
class FaultsSection:
    kill: str = ""                     # test aid: e.g. generator:0@step=20, learner@step=30, rewarder@step=20 (comma-separated)
    stall: str = ""                    # test aid: e.g. generator:0@step=5 hangs that generator inside a request


@dataclass
class Config:
    conf: str = "tiny"                 # which conf/<NAME>.yaml was merged over base.yaml
    run: RunSection = field(default_factory=RunSection)
    ray: RaySection = field(default_factory=RaySection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    selector: SelectorSection = field(default_factory=SelectorSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    train: TrainSection = field(default_factory=TrainSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    faults: FaultsSection = field(default_factory=FaultsSection)


def load_config(argv: list[str]) -> DictConfig:
    """Merge schema <- base.yaml <- conf/<NAME>.yaml <- `key=value` overrides, then validate."""
    overrides = [a for a in argv if not a.startswith("conf=")]
    names = [a.split("=", 1)[1] for a in argv if a.startswith("conf=")]
    name = names[-1] if names else "tiny"
    path = CONF_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "base"))
        raise ConfigError(f"conf: no conf/{name}.yaml (known: {known})")
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(CONF_DIR / "base.yaml"),
                              OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    for arg in overrides:
        key = arg.split("=", 1)[0]
        _check_key(cfg, key)
        try:   # merge_with_dotlist, not a merged from_dotlist: `eval.sets.0.limit=8` edits one list item
            cfg.merge_with_dotlist([arg])
        except OmegaConfBaseException as e:   # an error inside a list item names the item's key only
            why = _one_line(e)
            raise ConfigError(why if why.startswith(key) else f"{key}: {why}") from None
    cfg.conf = name
    validate(cfg)
    return cfg


def _check_key(cfg: DictConfig, key: str) -> None:
    """An override must name an existing key (or list item); suggest the closest key if it doesn't."""
    node, path = cfg, []
    for part in key.split("."):
        if isinstance(node, ListConfig) and part.isdigit():
            _check(int(part) < len(node), key, f"no item {part}: {'.'.join(path)} has {len(node)}")
        elif not isinstance(node, DictConfig) or part not in node:
            known = list(node.keys()) if isinstance(node, DictConfig) else []
            near = difflib.get_close_matches(part, known, n=1)
            hint = f" (did you mean {'.'.join(path + near)}?)" if near else ""
            raise ConfigError(f"{key}: unknown key{hint}")
        node, path = node[int(part) if isinstance(node, ListConfig) else part], path + [part]


def _one_line(e: OmegaConfBaseException) -> str:
    """OmegaConf errors are multi-line; keep `full_key: first line of the reason`."""
    key = (getattr(e, "full_key", None) or "config").replace("[", ".").replace("]", "")   # sets[0] -> sets.0
    reason = str(e).splitlines()[0].strip()
    if "not in struct" in reason or "Key '" in reason and "not" in reason:
        reason = "unknown key"
    return f"{key}: {reason}"


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def validate(cfg: DictConfig) -> None:
    """Reject values that cannot run, before anything heavy starts."""
    s, r, t = cfg.selector, cfg.rollout, cfg.train
    _check(s.name in SELECTORS, "selector.name", f"must be one of {SELECTORS}, got {s.name!r}")
    _check(0 < s.alpha < 1, "selector.alpha", f"must lie in (0, 1), got {s.alpha}")
    _check(0 < s.p_min <= s.p_max < 1, "selector.p_min", "need 0 < p_min <= p_max < 1")
    for key in ("p_easy", "p_hard"):
        _check(s.p_min <= s[key] <= s.p_max, f"selector.{key}", f"must lie in [p_min, p_max], got {s[key]}")
    _check(0 < s.keep_floor < 1, "selector.keep_floor", "must lie in (0, 1)")
    _check(s.oversample >= 1, "selector.oversample", "must be >= 1")
    _check(s.sizing in SIZINGS, "selector.sizing", f"must be one of {SIZINGS}, got {s.sizing!r}")
    _check(s.min_sampling >= 1, "selector.min_sampling", f"must be >= 1, got {s.min_sampling}")
    _check(r.weight_sync in ("shm", "object_store"), "rollout.weight_sync",
           f"must be shm or object_store, got {r.weight_sync!r}")
    _check(0 <= s.hard_mean_max < s.easy_mean_min <= 1, "selector.easy_mean_min",
           f"need 0 <= hard_mean_max < easy_mean_min <= 1, got {s.hard_mean_max} / {s.easy_mean_min}")
    _check(0 <= s.probe_fraction < 1, "selector.probe_fraction", f"must lie in [0, 1), got {s.probe_fraction}")
    _check(0 < s.mopps_decay <= 1, "selector.mopps_decay", f"must lie in (0, 1], got {s.mopps_decay}")
    _check(s.mopps_mode in ("closest", "band"), "selector.mopps_mode", "must be closest or band")
    _check(0 < s.mopps_target < 1, "selector.mopps_target", "must lie in (0, 1)")
    _check(s.mopps_pool >= 1, "selector.mopps_pool", "must be >= 1")
    _check(0 <= s.mopps_band_low < s.mopps_band_high <= 1, "selector.mopps_band_low",
           "need 0 <= mopps_band_low < mopps_band_high <= 1")
    _check(r.engine in ENGINES, "rollout.engine", f"must be one of {ENGINES}, got {r.engine!r}")
    _check(r.n >= 2, "rollout.n", f"group size must be >= 2 (GRPO needs a spread), got {r.n}")
    _check(r.num_generators >= 1, "rollout.num_generators", "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", "must be > 0")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must lie in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.request_size >= 1, "rollout.request_size", "must be >= 1")
    _check(r.sampling_batch >= t.batch_size, "rollout.sampling_batch",
           f"must be >= train.batch_size ({t.batch_size}), got {r.sampling_batch}")
    _check(cfg.reward.kind in REWARDS, "reward.kind", "must be math or tiny")
    _check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(0 <= cfg.reward.format_score < 1, "reward.format_score",
           f"must lie in [0, 1), got {cfg.reward.format_score}")
    _check(t.num_workers >= 1, "train.num_workers", "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.batch_size % t.num_workers == 0, "train.batch_size",
           f"{t.batch_size} groups do not divide over train.num_workers={t.num_workers}")
    _check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    mini = t.mini_batch_size or t.batch_size
    _check(mini >= 1 and t.batch_size % mini == 0, "train.mini_batch_size",
           f"train.batch_size ({t.batch_size}) must be a multiple of it, got {t.mini_batch_size}")
    _check(mini % t.num_workers == 0, "train.mini_batch_size",
           f"{mini} groups per optimiser step do not divide over train.num_workers={t.num_workers}")
    _check(t.entropy_coef >= 0, "train.entropy_coef", "must be >= 0")
    _check(t.clip_ratio_c is None or t.clip_ratio_c > 1, "train.clip_ratio_c", "must be > 1, or null (off)")
    _check(t.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 0 (0 = off)")
    _check(t.strategy in ("auto", "ddp", "fsdp"), "train.strategy", "must be auto, ddp or fsdp")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(t.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "must be constant or cosine")
    _check(0 <= t.lr_min_ratio <= 1, "train.lr_min_ratio", "must lie in [0, 1]")
    _check(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
    _check(0 < t.clip_low < 1 and t.clip_high > 0, "train.clip_low", "need 0 < clip_low < 1, clip_high > 0")
    _check(t.loss_agg in ("token", "seq"), "train.loss_agg", "must be token or seq")
    _check(t.adv_norm in ("std", "mean"), "train.adv_norm", "must be std or mean")
    _check(t.kl_coef >= 0, "train.kl_coef", "must be >= 0")
    _check(t.tis_cap == 0 or t.tis_cap >= 1, "train.tis_cap", f"must be 0 (off) or >= 1, got {t.tis_cap}")
    _check(cfg.pipeline.max_staleness >= 0, "pipeline.max_staleness", "must be >= 0")
    _check(cfg.pipeline.max_in_flight >= 0, "pipeline.max_in_flight", "must be >= 0 (0 = automatic)")
    for key in ("prompt_queue_size", "rollout_queue_size", "train_queue_size"):
        _check(cfg.pipeline[key] >= 1, f"pipeline.{key}", "must be >= 1")
    _check(cfg.trainer.total_steps >= 1, "trainer.total_steps", "must be >= 1")
    _check(cfg.trainer.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = only at the end)")
    _check(r.max_deaths >= 0, "rollout.max_deaths", "must be >= 0")
    _check(r.death_window_min > 0, "rollout.death_window_min", "must be > 0")
    _check(t.max_failures >= 0, "train.max_failures", "must be >= 0")
    _check(cfg.pipeline.step_timeout_s > 0, "pipeline.step_timeout_s", "must be > 0")
    for key in ("kill", "stall"):
        try:
            parse_faults(cfg.faults[key])
        except ValueError as e:
            raise ConfigError(f"faults.{key}: {e}") from None
    _check(cfg.trainer.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
    _check(cfg.run.resume in ("auto", "never") or Path(cfg.run.resume).expanduser().is_dir(), "run.resume",
           f"must be auto, never or a checkpoint directory, got {cfg.run.resume!r}")
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    _check_eval_sets(cfg.eval.sets)
    _check_loggers(list(cfg.run.loggers))
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16")
    _check_data(cfg)
    _check_sizes(cfg)


def _check_sizes(cfg: DictConfig) -> None:
    """Seeds, counts, limits and resources the run uses, each at its boundary (or later inside an actor
    they fail: numpy on a negative seed, a 0-thread pool, a [:-5] slice, a 0-char tail = the whole text)."""
    d, w, r, t = cfg.data, cfg.reward, cfg.rollout, cfg.train
    _check(0 <= cfg.run.seed < 2**32, "run.seed", f"must lie in [0, 2**32) (numpy seeds), got {cfg.run.seed}")
    _check(cfg.ray.num_cpus is None or cfg.ray.num_cpus > 0, "ray.num_cpus", "must be > 0 or null (all)")
    _check(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null (all rows), got {d.limit}")
    _check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    for key in ("num_train", "num_eval"):
        _check(d.tiny[key] >= 1, f"data.tiny.{key}", f"must be >= 1, got {d.tiny[key]}")
    _check(0 < d.tiny.warm_target < 1, "data.tiny.warm_target", f"must lie in (0, 1), got {d.tiny.warm_target}")
    _check(w.num_threads >= 1, "reward.num_threads", f"must be >= 1, got {w.num_threads}")
    _check(w.max_chars >= 1, "reward.max_chars", f"must be >= 1 (the tail of a response that is graded), got {w.max_chars}")
    for key, value in (("selector.num_cpus", cfg.selector.num_cpus), ("reward.num_cpus", w.num_cpus),
                       ("rollout.num_cpus", r.num_cpus), ("rollout.num_gpus", r.num_gpus)):
        _check(value >= 0, key, f"must be >= 0, got {value}")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {t.cpus_per_worker}")
    _check(not t.use_gpu or t.gpus_per_worker > 0, "train.gpus_per_worker", "must be > 0 with train.use_gpu")
    _check(t.grad_clip > 0, "train.grad_clip", f"must be > 0 (0 would zero every gradient), got {t.grad_clip}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    v = r.vllm
    _check(v.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "must be >= 1")
    _check(v.tensor_parallel_size == 1 or r.num_gpus > 0, "rollout.vllm.tensor_parallel_size",
           "> 1 spans GPUs: set rollout.num_gpus > 0 too")
    _check(0 < v.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "must lie in (0, 1]")
    _check(v.max_model_len is None or v.max_model_len >= 1, "rollout.vllm.max_model_len", "must be >= 1 or null")
    _check(v.kv_cache_gib >= 1, "rollout.vllm.kv_cache_gib", "must be >= 1")


def _train_sources(train) -> list:
    """data.train as a list of sources (one string or a list of them)."""
    sources = [train] if isinstance(train, str) else list(train) if isinstance(train, ListConfig) else None
    _check(bool(sources) and all(isinstance(x, str) and x for x in sources), "data.train",
           f"must be a source (path or HF dataset name) or a non-empty list of them, got {train!r}")
    return sources


def _check_data(cfg: DictConfig) -> None:
    """Local data files must exist; hub names are resolved later (they need the network)."""
    sources = _train_sources(cfg.data.train)
    _check(len(sources) == 1 or "tiny" not in sources, "data.train", "tiny cannot be mixed with other sources")
    tiny = sources == ["tiny"]
    _check(tiny == (cfg.model.path == "tiny"), "data.train",
           "the tiny task and the tiny model go together (model.path=tiny <=> data.train=tiny)")
    _check(not tiny or cfg.reward.kind == "tiny", "reward.kind", "data.train=tiny needs reward.kind=tiny")
    keys = {**{f"data.train.{k}" if len(sources) > 1 else "data.train": src for k, src in enumerate(sources)},
            **{f"eval.sets.{i}.path": s.path for i, s in enumerate(cfg.eval.sets)}}
    for key, value in keys.items():
        if _looks_like_path(value):
            _check(Path(value).expanduser().exists(), key, f"file not found: {value}")
    for i, s in enumerate(cfg.eval.sets):
        _check(s.path != "tiny" or tiny, f"eval.sets.{i}.path", "tiny (the tiny held-out split) needs model.path=tiny")


def _check_eval_sets(sets) -> None:
    """Names become metric keys, so they must be unique and safe; every set needs a source."""
    _check(len(sets) > 0, "eval.sets", "list at least one held-out set: [{name: ..., path: ...}]")
    seen = set()
    for i, s in enumerate(sets):
        key = f"eval.sets.{i}"
        _check(bool(SET_NAME.fullmatch(s.name)), f"{key}.name",
               f"must be non-empty letters, digits, _ . - (it names the metrics), got {s.name!r}")
        _check(s.name not in seen, f"{key}.name", f"duplicate set name {s.name!r}")
        seen.add(s.name)
        _check(bool(s.path), f"{key}.path", "set a jsonl/parquet path, an HF dataset name or tiny")
        _check(s.limit is None or s.limit >= 1, f"{key}.limit", f"must be >= 1 or null (all), got {s.limit}")
        _check(s.avg_k >= 1, f"{key}.avg_k", f"must be >= 1 (1 = greedy only), got {s.avg_k}")
        _check(s.top_p is None or 0 < s.top_p <= 1, f"{key}.top_p", f"must lie in (0, 1] or be null, got {s.top_p}")
        _check(s.reward in ("", *REWARDS), f"{key}.reward", f"must be '' (= reward.kind), math or tiny, got {s.reward!r}")


def _check_loggers(names: list[str]) -> None:
    """Known, once each, jsonl among them; an optional sink's package must be installed (found, not imported)."""
    for name in names:
        _check(name in LOGGERS, "run.loggers", f"unknown logger {name!r}: choose from {LOGGERS}")
    _check(len(set(names)) == len(names), "run.loggers", f"lists a logger twice: {names}")
    _check("jsonl" in names, "run.loggers",
           "must include jsonl: metrics.jsonl is the run's record (resume and reports read it)")
    for name in names:
        _check(name == "jsonl" or importlib.util.find_spec(name) is not None, "run.loggers",
               f"{name} needs the {name} package: pip install 'greso[{name}]' (or pip install {name})")


def _looks_like_path(value: str) -> bool:
    return bool(value) and (value.endswith((".jsonl", ".json", ".parquet")) or "/" in value and
                            (value.startswith((".", "/", "~")) or Path(value).suffix != ""))


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
