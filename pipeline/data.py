"""Math data sets -> `Row`s -> tokenised `Prompt`s. Pure: no Ray.

Three sources, one row parser:
- `*.parquet` in verl's RL layout (`prompt` = chat messages, `reward_model.ground_truth`,
  `extra_info.index`), e.g. DAPO-Math-17k;
- `*.jsonl` / `*.json` with a problem field (`problem` or `question`) and an `answer`
  (or a `solution` ending in \\boxed{...}), e.g. MATH-500, AIME 2024, Gaokao;
- anything else is a Hugging Face dataset name, loaded with `datasets` if installed.

Every problem gets a stable uid "<source-stem>:<index>" (verl's `extra_info.index`, else
the row number), because GRESO keys its per-prompt reward history on it. Rows without a
prompt or an answer are skipped and counted, never silently lost.

    rows, stats = load_rows("../shared/data/math500.jsonl")
    prompts, tstats = tokenize_rows(rows, tokenizer, max_prompt_tokens=1024)
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.rewards import extract_boxed
from pipeline.types import Prompt

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
PROMPT_KEYS = ("prompt", "problem", "question")    # tried in order when prompt_key is None


class DataError(ValueError):
    """A data source that cannot be read, or rows that cannot be used."""


@dataclass
class Row:
    """One problem before tokenisation."""

    uid: str                  # "<source-stem>:<index>", stable across runs and processes
    messages: list[dict]      # chat messages [{"role": ..., "content": ...}]
    ground_truth: str         # reference answer, `$...$` stripped


# ---------------------------------------------------------------------------- loading

def load_rows(source: str, *, prompt_key: str | None = None, answer_key: str | None = None,
              split: str = "train", instruction: str = DEFAULT_INSTRUCTION,
              limit: int | None = None) -> tuple[list[Row], dict]:
    """Read problems from a parquet/jsonl/json path or a HF dataset name.

    `limit` caps the number of rows kept. The instruction is appended to plain-text
    problems only; verl-layout chat prompts already carry their own.
    """
    stem, records = _open_source(source, split)
    rows: list[Row] = []
    stats = {"rows": 0, "kept": 0, "skipped_no_answer": 0, "skipped_no_prompt": 0}
    seen: set[str] = set()
    for i, record in enumerate(records):
        if limit is not None and len(rows) >= limit:
            break
        stats["rows"] += 1
        row_or_reason = _parse_record(record, i, stem, prompt_key, answer_key, instruction)
        if isinstance(row_or_reason, str):
            stats[row_or_reason] += 1
            continue
        if row_or_reason.uid in seen:
            raise DataError(f"{source}: duplicate uid {row_or_reason.uid!r} (row {i}); "
                            "extra_info.index must be unique")
        seen.add(row_or_reason.uid)
        rows.append(row_or_reason)
    stats["kept"] = len(rows)
    _warn_skips(source, stats)
    return rows, stats


def load_sources(sources, *, limit: int | None = None, **kw) -> tuple[list[Row], dict]:
    """load_rows over one source or a list of them (e.g. DAPO-Math-17k + MATH train), in order.

    `limit` caps the rows of all sources together. Uids must stay unique across sources:
    a source whose uids collide with an earlier one's (two files called train.parquet,
    as in the authors' data layout) gets its uids prefixed with its folder name, else its
    position in the list ("src1/...").
    """
    if isinstance(sources, str):
        return load_rows(sources, limit=limit, **kw)
    rows: list[Row] = []
    stats: dict = {}
    seen: set[str] = set()
    for k, source in enumerate(sources):
        left = None if limit is None else limit - len(rows)
        if left is not None and left <= 0:
            break
        part, part_stats = load_rows(source, limit=left, **kw)
        if any(r.uid in seen for r in part):
            part = _namespaced(part, source, k, seen)
        seen.update(r.uid for r in part)
        rows += part
        for key, v in part_stats.items():
            stats[key] = stats.get(key, 0) + v
    return rows, stats


def _namespaced(rows: list[Row], source: str, k: int, seen: set[str]) -> list[Row]:
    """Prefix a source's uids with its folder name, or its list position if that collides too."""
    for prefix in (Path(source).expanduser().parent.name, f"src{k}"):
        renamed = [Row(f"{prefix}/{r.uid}", r.messages, r.ground_truth) for r in rows]
        if prefix and not any(r.uid in seen for r in renamed):
            return renamed
    raise DataError(f"{source}: uids collide with an earlier data.train source even when namespaced")


def _looks_like_path(source: str) -> bool:
    """A data-file suffix, an explicit relative/absolute path, or deeper than "owner/name"."""
    return (source.endswith(FILE_SUFFIXES) or source.startswith(("/", ".", "~"))
            or source.count("/") > 1 or (os.sep != "/" and os.sep in source))


def _open_source(source: str, split: str) -> tuple[str, Iterator[dict]]:
    """Return (uid stem, iterator of raw records) for a path or a hub name."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return path.stem, _read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            return path.stem, _read_json(path)
        raise DataError(f"unsupported data file {source!r}: expected one of {FILE_SUFFIXES}")
    if not path.exists() and _looks_like_path(source):
        raise DataError(f"data file not found: {source}")
    # A hub name ("owner/name") or a local dataset directory: let `datasets` read it.
    return source.rstrip("/").split("/")[-1], _read_hf(source, split)


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq   # lazy: only parquet users need pyarrow
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _read_json(path: Path) -> Iterator[dict]:
    """JSON lines, or one JSON array of objects (a `.json` file may be either)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def _read_hf(source: str, split: str) -> Iterator[dict]:
    # Resolved eagerly (not inside the generator) so a bad name fails at load_rows().
    try:
        import datasets
        dataset = datasets.load_dataset(source, split=split)
    except Exception as e:   # ImportError, hub unreachable, unknown name, bad split ...
        reason = ("the `datasets` package is not installed (pip install datasets)"
                  if isinstance(e, ImportError) else f"{type(e).__name__}: {e}")
        raise DataError(f"{source!r} is not an existing path, and loading it as a Hugging "
                        f"Face dataset (split={split!r}) failed: {reason}") from e
    return iter(dataset)


# ---------------------------------------------------------------------------- parsing

def _parse_record(record: dict, i: int, stem: str, prompt_key: str | None,
                  answer_key: str | None, instruction: str) -> Row | str:
    """One raw record -> Row, or the stats key of the reason it was skipped."""
    if not isinstance(record, dict):
        raise DataError(f"{stem}: row {i} is a {type(record).__name__}, expected an object")
    messages = _messages(record, prompt_key, instruction)
    if not messages:
        return "skipped_no_prompt"
    answer = clean_answer(_answer(record, answer_key))
    if not answer:
        return "skipped_no_answer"
    extra = record.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    return Row(uid=f"{stem}:{i if index is None else index}", messages=messages,
               ground_truth=answer)


def _messages(record: dict, prompt_key: str | None, instruction: str) -> list[dict]:
    """Chat messages from a verl message list or a plain problem string ([] if none)."""
    keys = (prompt_key,) if prompt_key else PROMPT_KEYS
    value = next((record[k] for k in keys if record.get(k) is not None), None)
    if isinstance(value, (list, tuple)):   # verl layout: already chat messages
        messages = [{"role": str(m.get("role") or "user"), "content": str(m.get("content") or "")}
                    for m in value if isinstance(m, dict)]
        return messages if any(m["content"].strip() for m in messages) else []
    if isinstance(value, str) and value.strip():
        content = f"{value.strip()} {instruction}" if instruction else value.strip()
        return [{"role": "user", "content": content}]
    return []


def _answer(record: dict, answer_key: str | None) -> Any:
    """The reference answer: answer_key, verl's reward_model, `answer`, else boxed solution."""
    if answer_key:
        return record.get(answer_key)
    reward_model = record.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return reward_model["ground_truth"]
    answer = record.get("answer")
    if (answer is None or str(answer).strip() == "") and isinstance(record.get("solution"), str):
        return extract_boxed(record["solution"])
    return answer


def clean_answer(answer: Any) -> str:
    """Strip whitespace and one surrounding `$...$` / `$$...$$` (not "$a$ or $b$")."""
    if answer is None:
        return ""
    text = str(answer).strip()
    inner = text.strip("$").strip()
    if text.startswith("$") and text.endswith("$") and "$" not in inner:
        return inner
    return text


# ---------------------------------------------------------------------------- tokenising

def tokenize_rows(rows: Iterable[Row], tokenizer: Any, *,
                  max_prompt_tokens: int | None = None) -> tuple[list[Prompt], dict]:
    """Render each row with the tokenizer's chat template and encode it.

    The template already writes any BOS it wants, so the rendered text is encoded with
    add_special_tokens=False (else BOS doubles). Without a template the message contents
    are joined and encoded with the tokenizer's default special tokens.
    """
    rows = list(rows)
    texts = [render(row.messages, tokenizer) for row in rows]
    use_template = bool(getattr(tokenizer, "chat_template", None))
    ids_list = tokenizer(texts, add_special_tokens=not use_template)["input_ids"] if texts else []
    prompts, lengths = [], []
    for row, text, ids in zip(rows, texts, ids_list):
        lengths.append(len(ids))
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            continue
        prompts.append(Prompt(uid=row.uid, token_ids=tuple(int(t) for t in ids),
                              ground_truth=row.ground_truth, text=text))
    stats = {"rows": len(rows), "kept": len(prompts), "skipped_too_long": len(rows) - len(prompts),
             "prompt_tokens_max": max(lengths, default=0),
             "prompt_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0}
    _warn_skips("tokenize_rows", stats)
    return prompts, stats


def render(messages: list[dict], tokenizer: Any) -> str:
    """Prompt text: the chat template with a generation prompt, or the joined contents."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(m["content"] for m in messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise DataError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def _warn_skips(what: str, stats: dict) -> None:
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped_") and v}
    if skipped:
        logger.warning("%s: kept %d of %d rows; skipped %s", what, stats["kept"],
                       stats["rows"], skipped)
