"""What a run trains on: model and tokenizer locations plus tokenised train/eval prompts."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data import SKIPS, DataError
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
    skipped: dict = field(default_factory=dict)   # data/skipped_<reason> (train), data/<set>/skipped_<reason>


def load_world(cfg) -> World:
    """conf=tiny builds (once, cached) the tiny world; real configs load data + tokenizer."""
    if cfg.model.path == "tiny":
        return _tiny_world(cfg)
    from pipeline.data import load_prompts
    tok_dir = cfg.model.tokenizer or cfg.model.path
    tokenizer = load_tokenizer(tok_dir, "model.tokenizer" if cfg.model.tokenizer else "model.path")
    skipped: dict = {}
    sources = cfg.data.train if isinstance(cfg.data.train, str) else list(cfg.data.train)
    train = load_prompts(sources, tokenizer, key="data.train", limit=cfg.data.limit,
                         max_prompt_tokens=cfg.data.max_prompt_tokens, skipped=skipped, prefix="data/")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return World(cfg.model.path, tok_dir, train, load_eval_sets(cfg, tokenizer, skipped=skipped), pad, skipped)


def _tiny_world(cfg) -> World:
    from pipeline.tiny import build_tiny_world
    t = cfg.data.tiny
    w = build_tiny_world(Path(t.cache_dir).expanduser(), seed=cfg.run.seed, num_train=t.num_train,
                         num_eval=t.num_eval, warm_target=t.warm_target, log=log.info)
    train = w.train[:cfg.data.limit] if cfg.data.limit else w.train
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(w.tokenizer_dir))
    skipped = {f"data/{k}": 0 for k in SKIPS}   # the tiny world is ours: nothing to skip, zeros for the record
    evals = load_eval_sets(cfg, tokenizer, tiny_heldout=w.eval, skipped=skipped)
    return World(str(w.model_dir), str(w.tokenizer_dir), train, evals, tokenizer.pad_token_id, skipped)


def load_eval_sets(cfg, tokenizer, tiny_heldout: list[Prompt] | None = None,
                   skipped: dict | None = None) -> list[EvalSet]:
    """Load every eval.sets item; path "tiny" is the tiny world's held-out split. Rows skipped
    are added to `skipped` as data/<set name>/skipped_<reason>."""
    from pipeline.data import load_prompts
    sets = []
    for i, s in enumerate(cfg.eval.sets):
        if s.path == "tiny":
            prompts = tiny_heldout[:s.limit] if s.limit else tiny_heldout
        else:   # an empty set would log accuracy 0.0 forever: load_prompts refuses it
            prompts = load_prompts(s.path, tokenizer, key=f"eval.sets.{i}.path", split=s.split, subset=s.subset,
                                   prompt_key=s.prompt_key, answer_key=s.answer_key, limit=s.limit,
                                   max_prompt_tokens=cfg.data.max_prompt_tokens,
                                   skipped={} if skipped is None else skipped, prefix=f"data/{s.name}/")
        top_p = cfg.rollout.top_p if s.get("top_p") is None else s.top_p
        sets.append(EvalSet(s.name, list(prompts), s.avg_k, s.reward or cfg.reward.kind, top_p))
        log.info("eval set %s: %d prompts from %s", s.name, len(prompts), s.path)
    return sets


def load_tokenizer(name: str, key: str):
    """AutoTokenizer.from_pretrained, its failure as one line naming the key."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:   # noqa: BLE001  (OSError, ValueError, HFValidationError, a bad tokenizer.json ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{key}: cannot load a tokenizer from {name!r}: {reason}") from None


def check_model_paths(cfg) -> None:
    """model.path and model.tokenizer name a local directory or a hub model, checked in seconds.

    A hub name missing from the local cache is looked up once with a 10 s timeout: transformers
    would retry an unreachable hub for ~55 s (measured here) before failing deep inside an actor.
    With HF_HUB_OFFLINE set, a name missing from the cache fails at once.
    """
    if cfg.model.path == "tiny":
        return
    check_model_source(cfg.model.path, "model.path", "config.json")
    if cfg.model.tokenizer:
        check_model_source(cfg.model.tokenizer, "model.tokenizer", "tokenizer_config.json")


def check_model_source(name: str, key: str, marker: str) -> None:
    """One local dir or hub name; `marker` is the file that proves a dir (or cached repo) is one."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise ConfigError(f"{key}: no such directory: {name} (a local model directory or a hub name owner/model)")
        if not (path / marker).exists():
            raise ConfigError(f"{key}: {name} has no {marker}: not a Hugging Face model directory")
        return
    import huggingface_hub as hub
    try:
        hub.utils.validate_repo_id(name)
    except Exception as e:   # noqa: BLE001  (HFValidationError)
        raise ConfigError(f"{key}: {name!r} is neither a local directory nor a hub name ({e})") from None
    if isinstance(hub.try_to_load_from_cache(name, marker), str):
        return   # cached: transformers loads it without the network
    if hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{key}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                          f"download it (hf download {name}) or use a local directory")
    _check_on_hub(hub, name, key)


def _check_on_hub(hub, name: str, key: str) -> None:
    """One lookup on the hub, no retries (HfApi.model_info makes a single request)."""
    try:
        hub.HfApi().model_info(name, timeout=10)
    except (hub.errors.RepositoryNotFoundError, hub.errors.GatedRepoError) as e:
        raise ConfigError(f"{key}: the hub has no model {name!r} you can read ({type(e).__name__}); "
                          "check the name, or log in (hf auth login)") from None
    except Exception as e:   # noqa: BLE001  (connection errors, timeouts, HTTP 5xx)
        raise ConfigError(f"{key}: {name} is not in the local Hugging Face cache and the hub cannot be reached "
                          f"({type(e).__name__}); download it where there is a network, or use a local directory") from None
