"""Evaluate a model on the eval sets: the code behind training's eval/* metrics, and its CLI.

    python -m pipeline.evaluate runs/tiny/final                  # a run's saved model
    python -m pipeline.evaluate RUN_DIR/checkpoints/step_40/policy eval.sets.0.limit=100
    python -m pipeline.evaluate PATH/TO/MODEL conf=qwen7b         # any Hugging Face model dir

MODEL_DIR is a Hugging Face model directory (config.json + safetensors weights). The
config is the one of the run that holds MODEL_DIR (its config.yaml, found up to three
directories up), else conf=tiny; `conf=NAME` picks a conf instead, and `key=value`
overrides either, as in run.py. The same generator actors, engine, prompts and grading
as training's evaluation produce one table and MODEL_DIR/eval.json; greedy accuracy
equals what the run logged for the same weights.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray

USAGE = "usage: python -m pipeline.evaluate MODEL_DIR [conf=NAME] [key=value ...]"


def evaluate_sets(generators: list, rewarder, eval_sets: list, cfg, weights=None) -> dict:
    """Held-out accuracy of the policy that produced `weights` (None = what the generators hold)
    on every eval set: greedy `eval/<name>/accuracy`, plus `eval/<name>/avg@k` (mean reward of
    k samples per prompt) when avg_k > 1. `eval/accuracy` repeats the first set's greedy
    accuracy: the progress bar and the benchmarks read that one key."""
    max_new = cfg.rollout.max_new_tokens
    # 1) queue every generation at once, so no generator idles between sets
    jobs = []   # (metric key, reward kind, (response refs, truths))
    for s in eval_sets:
        jobs.append((f"eval/{s.name}/accuracy", s.reward, _generate(generators, s.prompts, weights, 0, max_new)))
        if s.avg_k > 1:
            jobs.append((f"eval/{s.name}/avg@{s.avg_k}", s.reward,
                         _generate(generators, s.prompts, weights, s.avg_k, max_new, s.top_p)))
    # 2) grade each job as its responses arrive, with its set's own scorer
    graded = {key: rewarder.accuracy.remote([t for _, ts in ray.get(refs) for t in ts], truths, reward)
              for key, reward, (refs, truths) in jobs}
    row = {key: ray.get(ref) for key, ref in graded.items()}
    row.update({f"eval/{s.name}/prompts": len(s.prompts) for s in eval_sets})
    row["eval/accuracy"] = row[f"eval/{eval_sets[0].name}/accuracy"]
    return row


def _generate(generators: list, prompts: list, weights, k: int, max_new_tokens: int,
              top_p: float | None = None) -> tuple[list, list[str]]:
    """Shard prompts over the generators (k = 0 greedy, else k samples each); returns the
    response refs and the ground truth of every response, in the same order."""
    shards = [prompts[i::len(generators)] for i in range(len(generators))]
    refs = [g.evaluate.remote(s, max_new_tokens, weights, k, top_p) for g, s in zip(generators, shards) if s]
    return refs, [p.ground_truth for s in shards for p in s for _ in range(max(k, 1))]


# ---- the CLI -------------------------------------------------------------------------

class EvalError(ValueError):
    """A model directory or input that cannot be evaluated; the message is one line."""


def check_model_dir(path: Path) -> None:
    """A Hugging Face model directory: config.json (a JSON object) and safetensors weights."""
    if not path.is_dir():
        raise EvalError(f"{path}: no such directory (expected a Hugging Face model directory, e.g. RUN_DIR/final)")
    try:
        ok = isinstance(json.loads((path / "config.json").read_text()), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise EvalError(f"{path}: not a Hugging Face model directory (no readable config.json)")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise EvalError(f"{path}: no safetensors weights (model.safetensors or model.safetensors.index.json)")


def find_run_dir(model_dir: Path) -> Path | None:
    """The run directory holding model_dir (RUN_DIR/final, RUN_DIR/checkpoints/step_N/policy)."""
    for parent in list(model_dir.resolve().parents)[:3]:
        if (parent / "config.yaml").is_file() and (parent / "metrics.jsonl").is_file():
            return parent
    return None


def load_eval_config(args: list[str], model_dir: Path):
    """conf=NAME + overrides as run.py; without conf=, the holding run's config.yaml + overrides."""
    from pipeline.config import load_config
    run_dir = None if any(a.startswith("conf=") for a in args) else find_run_dir(model_dir)
    if run_dir is None:
        cfg = load_config(args)
        return cfg, f"conf={cfg.conf}"
    return _load_saved(run_dir / "config.yaml", args), str(run_dir / "config.yaml")


def _load_saved(path: Path, overrides: list[str]):
    """A run's resolved config.yaml, typed and validated as load_config does, then the overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from pipeline.config import Config, ConfigError, _check_key, _one_line, validate
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value")
        _check_key(cfg, arg.split("=", 1)[0])
        try:
            cfg.merge_with_dotlist([arg])
        except OmegaConfBaseException as e:
            raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def load_inputs(cfg, model_dir: Path) -> tuple[str, list]:
    """(tokenizer dir, eval sets) without the training data: MODEL_DIR's tokenizer if it has one."""
    from transformers import AutoTokenizer
    from pipeline.world import load_eval_sets
    own = (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()
    heldout = None
    if cfg.model.path == "tiny":   # the tiny world (cached): its held-out split and tokenizer
        from pipeline.tiny import build_tiny_world
        t = cfg.data.tiny
        world = build_tiny_world(Path(t.cache_dir).expanduser(), seed=cfg.run.seed, num_train=t.num_train,
                                 num_eval=t.num_eval, warm_target=t.warm_target, log=lambda *_: None)
        heldout, fallback = world.eval, str(world.tokenizer_dir)
    else:
        fallback = cfg.model.tokenizer or cfg.model.path
    tok_dir = str(model_dir) if own else fallback
    return tok_dir, load_eval_sets(cfg, AutoTokenizer.from_pretrained(tok_dir), tiny_heldout=heldout)


def evaluate_model(cfg, model_dir: Path, tok_dir: str, eval_sets: list) -> dict:
    """Start generator actors and a rewarder on model_dir, as training does, evaluate, then remove them."""
    from actors.generator import Generator
    from actors.rewarder import Rewarder
    from pipeline.driver import generator_placement
    generators = [ray.remote(Generator).options(**generator_placement(cfg), max_concurrency=4)
                  .remote(cfg, str(model_dir), tok_dir, None, index=i) for i in range(cfg.rollout.num_generators)]
    rewarder = ray.remote(Rewarder).options(num_cpus=cfg.reward.num_cpus, max_concurrency=4).remote(cfg)
    try:
        return evaluate_sets(generators, rewarder, eval_sets, cfg)
    finally:
        for actor in [*generators, rewarder]:
            ray.kill(actor)


def table(row: dict, eval_sets: list) -> str:
    """One line per set: set, prompts, greedy accuracy, avg@k (k > 1 only)."""
    lines = [f"{'set':<16} {'prompts':>8} {'accuracy':>9} {'avg@k':>12}"]
    for s in eval_sets:
        avg = f"{row[f'eval/{s.name}/avg@{s.avg_k}']:.4f} (k={s.avg_k})" if s.avg_k > 1 else "-"
        lines.append(f"{s.name:<16} {len(s.prompts):>8} {row[f'eval/{s.name}/accuracy']:>9.4f} {avg:>12}")
    return "\n".join(lines)


def write_report(model_dir: Path, source: str, row: dict, eval_sets: list) -> Path:
    """MODEL_DIR/eval.json, written beside the model and renamed into place whole."""
    report = {"model_dir": str(model_dir.resolve()), "config": source, "metrics": row,
              "sets": [{"name": s.name, "prompts": len(s.prompts), "accuracy": row[f"eval/{s.name}/accuracy"],
                        **({f"avg@{s.avg_k}": row[f"eval/{s.name}/avg@{s.avg_k}"]} if s.avg_k > 1 else {})}
                       for s in eval_sets]}
    path, tmp = model_dir / "eval.json", model_dir / f".eval.json.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise EvalError(f"{path}: cannot write the report ({e.strerror})") from None
    return path


def main(argv: list[str]) -> int:
    from pipeline.config import ConfigError
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    dirs = [a for a in argv if "=" not in a and not a.startswith("-")]
    if len(dirs) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    model_dir, args = Path(dirs[0]).expanduser(), [a for a in argv if "=" in a]
    try:
        check_model_dir(model_dir)
        cfg, source = load_eval_config(args, model_dir)
        tok_dir, eval_sets = load_inputs(cfg, model_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (EvalError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"evaluating {model_dir} with {source}")
    from pipeline.driver import init_ray
    started = init_ray(cfg)
    try:
        row = evaluate_model(cfg, model_dir, tok_dir, eval_sets)
    finally:
        if started:
            ray.shutdown()
    print(table(row, eval_sets))
    try:
        print(f"wrote {write_report(model_dir, source, row, eval_sets)}")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
