"""Checkpoints: what a run saves, where, how a resume finds one and checks it still fits.

    RUN_DIR/checkpoints/step_<N>/
      policy/          the policy in Hugging Face format, in model.dtype (what vLLM and users load)
      learner/         per-rank master weights, optimiser, LR schedule, RNG (pipeline.learner_state)
      pipeline.json    selector (history, p, RNG, probes), cursor, ledger, version, the rewarder's
                       carried groups, and the driver's metrics row for step N
      manifest.json    step, config and file list, written last
    RUN_DIR/final/     the last policy, in Hugging Face format
A checkpoint is written into step_<N>.tmp/ and renamed to step_<N>/ once its manifest is in:
a directory without a manifest is never loaded. Everything is JSON or safetensors, so loading
a checkpoint never executes a pickle. Pure Python (no torch, no Ray).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.types import Prompt, RolloutGroup, Sample, ScoredGroup

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step_(\d+)")
# Config keys whose change alters what the saved state means; everything else may change on resume
# (trainer.total_steps to extend a run, eval.*, lr, logging, placement, ...).
MUST_MATCH = ("selector.name", "rollout.n", "train.batch_size", "model.path", "model.tokenizer",
              "data.train", "data.limit", "data.max_prompt_tokens", "data.tiny.num_train",
              "data.tiny.num_eval", "data.tiny.warm_target", "reward.kind", "run.seed")
# What a run directory holds; run.overwrite=true removes exactly these.
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", CHECKPOINTS, "final", "ray_train", "tensorboard", "wandb",
               "wandb_run_id")


class ResumeError(ValueError):
    """A resume that cannot go ahead; the message is one line naming the key or path."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in run_dir, oldest first; an incomplete one is skipped with a warning."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = STEP_DIR.fullmatch(d.name)
        if not m or not d.is_dir():
            continue
        if not (d / MANIFEST).is_file():
            log.warning("checkpoint %s has no %s (interrupted while saving?): skipped", d, MANIFEST)
            continue
        found.append((int(m.group(1)), d))
    return sorted(found)


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint directory `path`; ResumeError if it is not a complete checkpoint."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ResumeError(f"run.resume: {path} is not a complete checkpoint (no {MANIFEST})")
    m = json.loads(f.read_text())
    if m.get("format") != FORMAT:
        raise ResumeError(f"run.resume: {path} has checkpoint format {m.get('format')}, this version reads {FORMAT}")
    return m


def write_json(path: Path, obj) -> None:
    """Write whole or not at all: a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(tmp_dir: Path, final_dir: Path, *, step: int, config: dict, extra: dict | None = None) -> Path:
    """Write the manifest (last), then rename tmp_dir to final_dir: the checkpoint now exists."""
    files = sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file())
    write_json(tmp_dir / MANIFEST, {"format": FORMAT, "step": step, "files": files, "config": config,
                                    **(extra or {})})
    if final_dir.exists():   # a re-save of the same step (a resume that ended where it began)
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    return final_dir


def check_compatible(saved: dict, cfg: dict, path: Path) -> None:
    """Refuse a resume whose config changes what the saved state means, naming the key."""
    for key in MUST_MATCH:
        a, b = _get(saved, key), _get(cfg, key)
        if a != b:
            raise ResumeError(f"{key}: the checkpoint {path} was made with {a!r}, this run asks for {b!r}; "
                              f"keep {key}={a} to resume, or start a new run.dir")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


@dataclass(frozen=True)
class Plan:
    """What run.resume decided for this run directory."""

    kind: str                   # fresh | resume | finished
    checkpoint: Path | None     # resume: the checkpoint to start from
    step: int                   # resume/finished: its step; fresh: 0
    message: str                # the one log line that says which


def plan(run_dir: Path, resume: str, *, overwrite: bool, total_steps: int) -> Plan:
    """Decide fresh / resume / finished for run.resume (auto | never | a checkpoint path)."""
    run_dir = Path(run_dir)
    if resume not in ("auto", "never"):
        path = Path(resume).expanduser().resolve()
        m = read_manifest(path)
        return Plan("resume", path, m["step"], f"resuming from {path} (step {m['step']})")
    found = checkpoints(run_dir) if resume == "auto" else []
    if found:
        step, path = found[-1]
        if step >= total_steps and (run_dir / "final").is_dir():
            return Plan("finished", path, step,
                        f"the run in {run_dir} finished at step {step}; to train further add "
                        f"trainer.total_steps=<more than {step}> (it resumes from {path.name})")
        return Plan("resume", path, step, f"resuming from {path} (step {step})")
    held = [n for n in RUN_OUTPUTS if (run_dir / n).exists() and n != "config.yaml"]
    if held and not overwrite:
        why = "no complete checkpoint to resume from" if resume == "auto" else "run.resume=never"
        raise ResumeError(f"run.dir: {run_dir} already holds a run ({', '.join(held)}) and {why}; "
                          f"pick another run.dir, or pass run.overwrite=true to replace it")
    if held:
        for n in RUN_OUTPUTS:
            p = run_dir / n
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return Plan("fresh", None, 0, f"run.overwrite=true: removed the previous run in {run_dir}; starting fresh")
    return Plan("fresh", None, 0, f"no checkpoint in {run_dir}: starting fresh")


# --- scored groups as JSON (the rewarder's carried groups) --------------------------------
def encode_group(g: ScoredGroup) -> dict:
    r = g.group
    return {"ticket": r.ticket, "version": r.version, "probe": r.probe, "rewards": list(g.rewards),
            "prompt": {"uid": r.prompt.uid, "token_ids": list(r.prompt.token_ids),
                       "ground_truth": r.prompt.ground_truth, "text": r.prompt.text},
            "samples": [{"token_ids": list(s.token_ids), "text": s.text, "logprobs": list(s.logprobs),
                         "finished": s.finished} for s in r.samples]}


def decode_group(d: dict) -> ScoredGroup:
    p = d["prompt"]
    prompt = Prompt(p["uid"], tuple(p["token_ids"]), p["ground_truth"], p["text"])
    samples = tuple(Sample(tuple(s["token_ids"]), s["text"], tuple(s["logprobs"]), s["finished"])
                    for s in d["samples"])
    return ScoredGroup(RolloutGroup(d["ticket"], prompt, samples, d["version"], d["probe"]), tuple(d["rewards"]))


def export_final(policy_dir: Path, final_dir: Path) -> None:
    """RUN_DIR/final: the last checkpoint's policy, hard-linked (no copy of the bytes) where the
    filesystem allows it; written aside and renamed so a half-written final/ never exists."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(policy_dir, tmp, copy_function=_link_or_copy)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"   # ray/train/v2/_internal/constants.py


def check_ray_train_snapshot(run_dir: Path) -> None:
    """Ray Train restores its checkpoint list from this file and refuses to start if a listed
    directory is gone (checkpoint_manager.py `_assert_checkpoints_exist`), e.g. one a user
    deleted: then the file is removed, and our manifest-checked choice is what resumes."""
    f = Path(run_dir) / CHECKPOINTS / RAY_TRAIN_SNAPSHOT
    if not f.is_file():
        return
    names = re.findall(r'"checkpoint_dir_name":\s*"([^"]+)"', f.read_text())
    missing = [n for n in names if not (f.parent / n).is_dir()]
    if missing:
        log.warning("Ray Train's checkpoint list names missing %s: removed it", ", ".join(sorted(set(missing))))
        f.unlink()
