"""What a run trains on: model and tokenizer locations plus tokenised train/eval prompts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.types import Prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    model_dir: str            # local dir or hub name, loaded by generators and learners
    tokenizer_dir: str
    train: list[Prompt]
    eval: list[Prompt]
    pad_id: int


def load_world(cfg) -> World:
    """conf=tiny builds (once, cached) the tiny world; real configs load data + tokenizer."""
    if cfg.model.path == "tiny":
        return _tiny_world(cfg)
    from transformers import AutoTokenizer
    from pipeline.data import load_rows, tokenize_rows
    tok_dir = cfg.model.tokenizer or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_rows, _ = load_rows(cfg.data.train, limit=cfg.data.limit)
    eval_rows, _ = load_rows(cfg.data.eval, split="test", limit=cfg.data.eval_limit)
    train, _ = tokenize_rows(train_rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens)
    evals, _ = tokenize_rows(eval_rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return World(cfg.model.path, tok_dir, train, evals, pad)


def _tiny_world(cfg) -> World:
    from pipeline.tiny import build_tiny_world
    t = cfg.data.tiny
    w = build_tiny_world(Path(t.cache_dir).expanduser(), seed=cfg.run.seed, num_train=t.num_train,
                         num_eval=t.num_eval, warm_target=t.warm_target, log=log.info)
    evals = w.eval[:cfg.data.eval_limit] if cfg.data.eval_limit else w.eval
    train = w.train[:cfg.data.limit] if cfg.data.limit else w.train
    from transformers import AutoTokenizer
    pad = AutoTokenizer.from_pretrained(str(w.tokenizer_dir)).pad_token_id
    return World(str(w.model_dir), str(w.tokenizer_dir), train, evals, pad)
