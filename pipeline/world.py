"""What a run trains on: model and tokenizer locations plus tokenised train/eval prompts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.types import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """One named held-out set, ready to evaluate (eval.sets item with its prompts loaded)."""

    name: str                 # metric prefix: eval/<name>/accuracy
    prompts: list[Prompt]
    avg_k: int                # 1 = greedy only; k > 1 also samples k responses per prompt
    reward: str               # scorer kind (math | tiny), "" in the config resolved to reward.kind
    top_p: float = 1.0        # nucleus mass of the avg@k samples


@dataclass(frozen=True)
class World:
    model_dir: str            # local dir or hub name, loaded by generators and learners
    tokenizer_dir: str
    train: list[Prompt]
    eval: list[EvalSet]       # in config order; the first set's greedy accuracy is eval/accuracy
    pad_id: int


def load_world(cfg) -> World:
    """conf=tiny builds (once, cached) the tiny world; real configs load data + tokenizer."""
    if cfg.model.path == "tiny":
        return _tiny_world(cfg)
    from transformers import AutoTokenizer
    from pipeline.data import load_sources, tokenize_rows
    tok_dir = cfg.model.tokenizer or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train = cfg.data.train if isinstance(cfg.data.train, str) else list(cfg.data.train)
    train_rows, _ = load_sources(train, limit=cfg.data.limit)
    train, _ = tokenize_rows(train_rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return World(cfg.model.path, tok_dir, train, load_eval_sets(cfg, tokenizer), pad)


def _tiny_world(cfg) -> World:
    from pipeline.tiny import build_tiny_world
    t = cfg.data.tiny
    w = build_tiny_world(Path(t.cache_dir).expanduser(), seed=cfg.run.seed, num_train=t.num_train,
                         num_eval=t.num_eval, warm_target=t.warm_target, log=log.info)
    train = w.train[:cfg.data.limit] if cfg.data.limit else w.train
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(w.tokenizer_dir))
    evals = load_eval_sets(cfg, tokenizer, tiny_heldout=w.eval)
    return World(str(w.model_dir), str(w.tokenizer_dir), train, evals, tokenizer.pad_token_id)


def load_eval_sets(cfg, tokenizer, tiny_heldout: list[Prompt] | None = None) -> list[EvalSet]:
    """Load every eval.sets item; path "tiny" is the tiny world's held-out split."""
    from pipeline.data import load_rows, tokenize_rows
    sets = []
    for s in cfg.eval.sets:
        if s.path == "tiny":
            prompts = tiny_heldout[:s.limit] if s.limit else tiny_heldout
        else:
            rows, _ = load_rows(s.path, split=s.split, limit=s.limit)
            prompts, _ = tokenize_rows(rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens)
        if not prompts:   # an empty set would log accuracy 0.0 forever
            raise ValueError(f"eval set {s.name!r}: no usable prompts in {s.path} (all too long or unanswered?)")
        top_p = cfg.rollout.top_p if s.get("top_p") is None else s.top_p
        sets.append(EvalSet(s.name, list(prompts), s.avg_k, s.reward or cfg.reward.kind, top_p))
        log.info("eval set %s: %d prompts from %s", s.name, len(prompts), s.path)
    return sets
