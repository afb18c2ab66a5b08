"""Math data sets -> `Row`s -> tokenised `Prompt`s. Pure: no Ray.

Three sources, one row parser:
- `*.parquet` in verl's RL layout (`prompt` = chat messages, `reward_model.ground_truth`,
  `extra_info.index`), e.g. DAPO-Math-17k;
- `*.jsonl` / `*.json` with a problem field (`problem` or `question`) and an `answer`
  (or a `solution` ending in \\boxed{...}), e.g. MATH-500, AIME 2024, Gaokao;
- anything else is a Hugging Face dataset name (and optional config/subset), loaded with
  `datasets` if installed.

An answer may be a list (OlympiadBench's `final_answer`): one item is the answer, several
are joined with ", ", which math-verify compares as a tuple/set.

Every problem gets a stable uid "<source-stem>:<index>" (verl's `extra_info.index`, else
the row number), because GRESO keys its per-prompt reward history on it. Rows without a
prompt or an answer are skipped and counted, never silently lost.

    rows, stats = load_rows("../shared/data/math500.jsonl")
    prompts, tstats = tokenize_rows(rows, tokenizer, max_prompt_tokens=1024)
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.errors import UserError
from pipeline.rewards import extract_boxed
from pipeline.types import Prompt

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")
PROMPT_KEYS = ("prompt", "problem", "question")    # tried in order when prompt_key is None


class DataError(UserError):
    """A data source that cannot be read, or rows that cannot be used."""


@dataclass
class Row:
    """One problem before tokenisation."""

    uid: str                  # "<source-stem>:<index>", stable across runs and processes
    messages: list[dict]      # chat messages [{"role": ..., "content": ...}]
    ground_truth: str         # reference answer, `$...$` stripped


# ---------------------------------------------------------------------------- loading

def load_rows(source: str, *, prompt_key: str | None = None, answer_key: str | None = None,
              split: str = "train", subset: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
              limit: int | None = None) -> tuple[list[Row], dict]:
    """Read problems from a parquet/jsonl/json path or a HF dataset name.

    `split` and `subset` (the HF config name) apply to hub datasets only; files have neither.
    `limit` caps the number of rows kept. The instruction is appended to plain-text
    problems only; verl-layout chat prompts already carry their own. A source that
    cannot be read, or that yields no usable row, raises DataError (one line).
    """
    stem, records = _open_source(source, split, subset)
    rows: list[Row] = []
    stats = {"rows": 0, "kept": 0, **{k: 0 for k in ROW_SKIPS}}
    seen: dict[str, int] = {}
    columns: set[str] = set()
    for i, record in enumerate(records):
        if limit is not None and len(rows) >= limit:
            break
        stats["rows"] += 1
        row_or_reason = _parse_record(record, i, stem, prompt_key, answer_key, instruction)
        columns.update(record)
        if isinstance(row_or_reason, str):
            stats[row_or_reason] += 1
            continue
        if row_or_reason.uid in seen:
            raise DataError(f"{source}: rows {seen[row_or_reason.uid]} and {i} share the uid "
                            f"{row_or_reason.uid!r}; extra_info.index must be unique")
        seen[row_or_reason.uid] = i
        rows.append(row_or_reason)
    stats["kept"] = len(rows)
    _warn_skips(source, stats)
    if not rows:
        raise DataError(f"{source}: {_why_no_rows(stats, columns, prompt_key, answer_key)}")
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


ROW_SKIPS = ("skipped_no_answer", "skipped_no_prompt", "skipped_bad_answer", "skipped_bad_prompt")
SKIPS = ROW_SKIPS + ("skipped_too_long", "skipped_bad_text")   # every reason a row may be skipped


def _why_no_rows(stats: dict, columns: set[str], prompt_key: str | None, answer_key: str | None) -> str:
    """Why a source gave no usable row, naming the columns it looked for and the ones it found."""
    if not stats["rows"]:
        return "no rows (the file or split is empty)"
    found = ", ".join(sorted(columns)[:12]) or "none"
    wants = {"skipped_no_prompt": f"no prompt (looked for {prompt_key or ' / '.join(PROMPT_KEYS)})",
             "skipped_bad_prompt": "a prompt that is not text or chat messages with text content",
             "skipped_no_answer": f"no answer (looked for {answer_key or 'reward_model.ground_truth / answer / solution'})",
             "skipped_bad_answer": "an answer that is not a string, a number or a list of them (a dict, boolean, [])"}
    parts = [f"{stats[k]} had {why}" for k, why in wants.items() if stats[k]]
    return f"no usable row: of {stats['rows']} rows, {', '.join(parts)}; columns found: {found}"


def _looks_like_path(source: str) -> bool:
    """A data-file suffix, an explicit relative/absolute path, or deeper than "owner/name"."""
    return (source.endswith(FILE_SUFFIXES) or source.startswith(("/", ".", "~"))
            or source.count("/") > 1 or (os.sep != "/" and os.sep in source))


def _open_source(source: str, split: str, subset: str | None) -> tuple[str, Iterator[dict]]:
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
    return source.rstrip("/").split("/")[-1], _read_hf(source, split, subset)


def _read_parquet(path: Path) -> Iterator[dict]:
    """Opened eagerly, so a file that is not parquet fails here in one line, not mid-iteration."""
    import pyarrow as pa
    import pyarrow.parquet as pq   # lazy: only parquet users need pyarrow
    try:
        batches = list(pq.ParquetFile(path).iter_batches(batch_size=1024))
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {reason}); "
                        "re-export it (e.g. DataFrame.to_parquet)") from None
    return (record for batch in batches for record in batch.to_pylist())


def _read_json(path: Path) -> Iterator[dict]:
    """JSON lines, or one JSON array of objects (a `.json` file may be either)."""
    text = _read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for k, item in enumerate(items):
            _need_object(item, f"{path}: item {k} of the JSON array")
        return iter(items)
    return _json_lines(path, text)


def _json_lines(path: Path, text: str) -> Iterator[dict]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "; a .json file must be JSON lines or one array" if n == 1 and line.strip() == "{" else ""
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}){hint}") from None
        records.append(_need_object(record, f"{path}:{n}"))
    return iter(records)


def _need_object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, expected an object like "
                        '{"problem": ..., "answer": ...}')
    return record


def _read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 fail naming the line (a file in another
    encoding would otherwise feed mojibake to the tokenizer)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_hf(source: str, split: str, subset: str | None) -> Iterator[dict]:
    # Resolved eagerly (not inside the generator) so a bad name fails at load_rows().
    try:
        import datasets
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as e:   # ImportError, hub unreachable, unknown name, bad split ...
        reason = ("the `datasets` package is not installed (pip install datasets)"
                  if isinstance(e, ImportError) else f"{type(e).__name__}: {_first_line(e)}")
        where = f"split={split!r}" + (f", subset={subset!r}" if subset else "")
        raise DataError(f"{source!r} is not an existing path, and loading it as a Hugging "
                        f"Face dataset ({where}) failed: {reason}") from e
    return iter(dataset)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------- parsing

def _parse_record(record: dict, i: int, stem: str, prompt_key: str | None,
                  answer_key: str | None, instruction: str) -> Row | str:
    """One raw record -> Row, or the stats key of the reason it was skipped."""
    if not isinstance(record, dict):   # a HF dataset row is always a dict; files are checked on read
        raise DataError(f"{stem}: row {i} is a {type(record).__name__}, expected an object")
    messages = _messages(record, prompt_key, instruction)
    if isinstance(messages, str):
        return messages
    raw = _answer(record, answer_key)
    if raw is None or isinstance(raw, str) and not raw.strip():
        return "skipped_no_answer"
    if isinstance(raw, (list, tuple)):   # OlympiadBench: ["$3$", "$5$"] -> "3, 5"
        items = [clean_answer(x) for x in raw if _is_scalar(x)]
        if not items or len(items) < len(raw) or not all(items):   # a blank item would leave "3, "
            return "skipped_bad_answer"
        answer = ", ".join(items)
    elif _is_scalar(raw):
        answer = clean_answer(raw)
    else:
        return "skipped_bad_answer"   # str() would make {'x': 1} / False a "reference answer"
    if not answer:
        return "skipped_no_answer"
    extra = record.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    return Row(uid=f"{stem}:{i if index is None else index}", messages=messages,
               ground_truth=answer)


def _is_scalar(value: Any) -> bool:
    """A string or a finite number; bool is an int to Python but never an answer."""
    return not isinstance(value, bool) and isinstance(value, (str, numbers.Real)) and \
        not (isinstance(value, float) and not math.isfinite(value))


def _messages(record: dict, prompt_key: str | None, instruction: str) -> list[dict] | str:
    """Chat messages from a verl message list or a plain problem string, else the skip reason."""
    keys = (prompt_key,) if prompt_key else PROMPT_KEYS
    value = next((record[k] for k in keys if record.get(k) is not None), None)
    if value is None:
        return "skipped_no_prompt"
    if isinstance(value, (list, tuple)):   # verl layout: already chat messages
        if not all(isinstance(m, dict) and isinstance(m.get("content", ""), str) and
                   isinstance(m.get("role", ""), (str, type(None))) for m in value):
            return "skipped_bad_prompt"
        messages = [{"role": m.get("role") or "user", "content": m.get("content") or ""} for m in value]
        return messages if any(m["content"].strip() for m in messages) else "skipped_no_prompt"
    if not isinstance(value, str):
        return "skipped_bad_prompt"
    if not value.strip():
        return "skipped_no_prompt"
    content = f"{value.strip()} {instruction}" if instruction else value.strip()
    return [{"role": "user", "content": content}]


def _answer(record: dict, answer_key: str | None) -> Any:
    """The reference answer: answer_key, verl's reward_model, `answer`, else boxed solution."""
    if answer_key:
        return record.get(answer_key)
    reward_model = record.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return reward_model["ground_truth"]
    answer = record.get("answer")
    if (answer is None or isinstance(answer, str) and answer.strip() == "") and \
            isinstance(record.get("solution"), str):
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
    are joined and encoded with the tokenizer's default special tokens. A row the template
    or the tokenizer rejects (e.g. a lone surrogate from a JSON "\\ud800" escape) is skipped
    and counted as skipped_bad_text.
    """
    rows = list(rows)
    use_template = bool(getattr(tokenizer, "chat_template", None))
    encoded = _encode(rows, tokenizer, add_special_tokens=not use_template)
    prompts, lengths, bad = [], [], 0
    for row, item in zip(rows, encoded):
        if item is None:
            bad += 1
            continue
        text, ids = item
        lengths.append(len(ids))
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            continue
        prompts.append(Prompt(uid=row.uid, token_ids=tuple(int(t) for t in ids),
                              ground_truth=row.ground_truth, text=text))
    stats = {"rows": len(rows), "kept": len(prompts), "skipped_too_long": len(lengths) - len(prompts),
             "skipped_bad_text": bad, "prompt_tokens_max": max(lengths, default=0),
             "prompt_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0}
    _warn_skips("tokenize_rows", stats)
    return prompts, stats


def _encode(rows: list[Row], tokenizer: Any, add_special_tokens: bool) -> list[tuple[str, list] | None]:
    """(text, token ids) per row, None where rendering or encoding fails. One batched call
    when every row encodes; row by row, to find the culprits, when the batch fails."""
    texts = []
    for row in rows:
        try:
            texts.append(render(row.messages, tokenizer))
        except Exception as e:   # noqa: BLE001  (jinja errors, odd roles ...)
            logger.debug("row %s: the chat template failed: %s", row.uid, e)
            texts.append(None)
    good = [t for t in texts if t is not None]
    try:
        batch = iter(tokenizer(good, add_special_tokens=add_special_tokens)["input_ids"] if good else [])
        return [None if t is None else (t, next(batch)) for t in texts]
    except Exception:   # noqa: BLE001  (TypeError "TextEncodeInput must be ...", UnicodeEncodeError)
        return [None if t is None else _encode_one(t, tokenizer, add_special_tokens) for t in texts]


def _encode_one(text: str, tokenizer: Any, add_special_tokens: bool) -> tuple[str, list] | None:
    try:
        return text, tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    except Exception:   # noqa: BLE001
        return None


def load_prompts(source, tokenizer: Any, *, key: str, split: str = "train", subset: str | None = None,
                 prompt_key: str | None = None, answer_key: str | None = None, limit: int | None = None,
                 max_prompt_tokens: int | None = None, skipped: dict | None = None,
                 prefix: str = "data/") -> list[Prompt]:
    """load_rows + tokenize_rows for the config key `key`; adds every skip count to `skipped` as
    <prefix>skipped_<reason>; a source that leaves no prompt is a DataError naming the key."""
    try:   # one source, or a list of them (data.train: DAPO-Math-17k + MATH train)
        rows, stats = load_sources(source, split=split, subset=subset, prompt_key=prompt_key,
                                   answer_key=answer_key, limit=limit)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    prompts, tstats = tokenize_rows(rows, tokenizer, max_prompt_tokens=max_prompt_tokens)
    if skipped is not None:
        skipped.update({f"{prefix}{k}": v for k, v in {**stats, **tstats}.items() if k.startswith("skipped_")})
    if not prompts:
        why = (f"all {tstats['rows']} prompts are longer than data.max_prompt_tokens={max_prompt_tokens} "
               f"(longest {tstats['prompt_tokens_max']} tokens); raise data.max_prompt_tokens")
        if tstats["skipped_bad_text"]:
            why = f"{tstats['skipped_bad_text']} of {tstats['rows']} prompts the tokenizer rejects, the rest too long"
        raise DataError(f"{key}: no usable prompt in {source}: {why}")
    return prompts


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
