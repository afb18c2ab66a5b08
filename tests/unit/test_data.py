"""pipeline.data: real data sets load with stable uids; bad rows are counted; templates apply.

    PYTHONPATH=. python -m pytest tests/unit/test_data.py -q
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import DEFAULT_INSTRUCTION, DataError, Row, clean_answer, load_rows, tokenize_rows
from pipeline.types import Prompt

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


def data_file(name: str) -> str:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return str(path)


# ---------------------------------------------------------------------------- real data

def test_dapo_parquet_loads_all_rows_with_stable_unique_uids():
    source = data_file("dapo_math_17k.parquet")
    rows, stats = load_rows(source)
    assert stats == {"rows": 17917, "kept": 17917, "skipped_no_answer": 0, "skipped_no_prompt": 0,
                     "skipped_bad_answer": 0, "skipped_bad_prompt": 0}
    uids = [r.uid for r in rows]
    assert len(set(uids)) == len(uids)
    assert uids[0] == "dapo_math_17k:0"   # extra_info.index of the first row
    assert all(r.ground_truth.strip() for r in rows)
    assert all(r.messages and r.messages[0]["role"] == "user" for r in rows)
    # verl prompts carry their own instruction: nothing appended
    assert DEFAULT_INSTRUCTION not in rows[0].messages[-1]["content"]
    again, _ = load_rows(source)
    assert [r.uid for r in again] == uids
    assert [r.ground_truth for r in again] == [r.ground_truth for r in rows]


def test_limit_caps_kept_rows_and_keeps_the_same_uids():
    source = data_file("dapo_math_17k.parquet")
    rows, stats = load_rows(source, limit=5)
    assert len(rows) == 5 and stats["kept"] == 5 and stats["rows"] == 5
    full, _ = load_rows(data_file("math500.jsonl"))
    part, _ = load_rows(data_file("math500.jsonl"), limit=3)
    assert [r.uid for r in part] == [r.uid for r in full[:3]]


@pytest.mark.parametrize("name, n_rows, n_kept", [
    ("math500.jsonl", 500, 500),
    ("aime2024.jsonl", 30, 30),
    ("gaokao2023en.jsonl", 385, 383),   # two gaokao rows have an empty answer
])
def test_jsonl_sets_load_with_instruction_and_counts(name, n_rows, n_kept):
    rows, stats = load_rows(data_file(name))
    assert stats["rows"] == n_rows and stats["kept"] == n_kept == len(rows)
    assert stats["skipped_no_answer"] == n_rows - n_kept and stats["skipped_no_prompt"] == 0
    assert len({r.uid for r in rows}) == n_kept
    stem = Path(name).stem
    assert all(r.uid.startswith(stem + ":") for r in rows)
    assert all(len(r.messages) == 1 and r.messages[0]["role"] == "user" for r in rows)
    assert all(r.messages[0]["content"].endswith(" " + DEFAULT_INSTRUCTION) for r in rows)
    assert all(r.ground_truth and r.ground_truth == r.ground_truth.strip() for r in rows)


def test_gaokao_answers_have_surrounding_dollars_stripped():
    rows, _ = load_rows(data_file("gaokao2023en.jsonl"))
    raw = [json.loads(line) for line in open(data_file("gaokao2023en.jsonl"))]
    assert raw[0]["answer"] == "$\\{x|-2\\leq x < 1\\}$"
    assert rows[0].ground_truth == "\\{x|-2\\leq x < 1\\}"
    for r in rows:
        assert not (r.ground_truth.startswith("$") and r.ground_truth.endswith("$")
                    and r.ground_truth.count("$") == 2)


def test_math500_answers_match_the_answer_field():
    rows, _ = load_rows(data_file("math500.jsonl"))
    raw = [json.loads(line) for line in open(data_file("math500.jsonl"))]
    assert [r.ground_truth for r in rows] == [d["answer"].strip() for d in raw]
    assert rows[7].uid == "math500:7"


# ---------------------------------------------------------------------------- bad rows

def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


def test_rows_without_answer_or_prompt_are_skipped_and_counted(tmp_path, caplog):
    source = write_jsonl(tmp_path / "mini.jsonl", [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "no answer field"},
        {"problem": "empty answer", "answer": "  "},
        {"problem": "null answer", "answer": None},
        {"answer": "3"},                                   # no problem at all
        {"problem": "   ", "answer": "4"},                 # blank problem
        {"question": "from solution", "solution": "so \\boxed{\\frac{1}{2}}."},
        {"question": "dollars", "answer": " $x^2$ "},
        {"question": "two answers", "answer": "$1$ or $2$"},
        {"problem": "numeric answer", "answer": 7},
    ])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        rows, stats = load_rows(source)
    assert stats == {"rows": 10, "kept": 5, "skipped_no_answer": 3, "skipped_no_prompt": 2,
                     "skipped_bad_answer": 0, "skipped_bad_prompt": 0}
    assert [r.uid for r in rows] == ["mini:0", "mini:6", "mini:7", "mini:8", "mini:9"]
    assert [r.ground_truth for r in rows] == ["2", "\\frac{1}{2}", "x^2", "$1$ or $2$", "7"]
    assert "skipped_no_answer" in caplog.text and "kept 5 of 10" in caplog.text


def test_custom_keys_and_instruction(tmp_path):
    source = write_jsonl(tmp_path / "custom.jsonl", [{"q": "What is 2+3?", "gold": "5"}])
    rows, _ = load_rows(source, prompt_key="q", answer_key="gold", instruction="Box it.")
    assert rows == [Row("custom:0", [{"role": "user", "content": "What is 2+3? Box it."}], "5")]


def test_json_array_and_verl_records_with_index(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([
        {"prompt": [{"role": "user", "content": "hi"}], "reward_model": {"ground_truth": "$9$"},
         "extra_info": {"index": 41}},
        {"prompt": [], "reward_model": {"ground_truth": "1"}, "extra_info": {"index": 42}},
    ]))
    rows, stats = load_rows(str(path))
    assert rows == [Row("arr:41", [{"role": "user", "content": "hi"}], "9")]
    assert stats["skipped_no_prompt"] == 1


def test_clean_answer():
    assert clean_answer(None) == ""
    assert clean_answer(" $$ 3 $$ ") == "3"
    assert clean_answer("$48$, $384$") == "$48$, $384$"


# ---------------------------------------------------------------------------- errors

def test_missing_path_is_a_data_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="data file not found: .*nope.parquet"):
        load_rows(missing)
    with pytest.raises(DataError, match="not found"):
        load_rows("./some/dir/train.jsonl")
    assert issubclass(DataError, ValueError)


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_rows(str(path))


def test_hub_name_without_hub_is_a_clear_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="not an existing path.*Hugging Face") as err:
        load_rows("no-such-org/no-such-dataset-greso-test")
    assert "no-such-org/no-such-dataset-greso-test" in str(err.value)


# ---------------------------------------------------------------------------- tokenising

def tiny_tokenizer(chat_template: str | None = None):
    """A character-level tokenizer built locally (no hub), optionally with a template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<|user|>": 3, "<|assistant|>": 4}
    for c in map(chr, range(32, 127)):
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")   # one token per char
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = chat_template
    return tok


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROWS = [Row("t:0", [{"role": "user", "content": "1+1?"}], "2"),
        Row("t:1", [{"role": "user", "content": "a much longer problem text"}], "x")]


def test_tokenize_applies_chat_template_once_with_single_bos():
    tok = tiny_tokenizer(TEMPLATE)
    prompts, stats = tokenize_rows(ROWS, tok)
    assert stats["kept"] == 2 and stats["skipped_too_long"] == 0
    p = prompts[0]
    assert isinstance(p, Prompt) and (p.uid, p.ground_truth) == ("t:0", "2")
    assert p.text == "<bos><|user|>1+1?<|assistant|>"
    assert isinstance(p.token_ids, tuple) and all(type(t) is int for t in p.token_ids)
    assert p.token_ids == (1, 3) + tuple(tok.convert_tokens_to_ids(list("1+1?"))) + (4,)
    assert p.token_ids.count(1) == 1   # template's BOS only, not doubled by encode


def test_tokenize_skips_and_counts_too_long_prompts(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        prompts, stats = tokenize_rows(ROWS, tiny_tokenizer(TEMPLATE), max_prompt_tokens=10)
    assert [p.uid for p in prompts] == ["t:0"]
    assert stats["skipped_too_long"] == 1 and stats["rows"] == 2
    assert stats["prompt_tokens_max"] == 3 + len("a much longer problem text")
    assert "skipped_too_long" in caplog.text


def test_tokenize_without_template_joins_contents():
    rows = [Row("t:2", [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}], "1")]
    prompts, _ = tokenize_rows(rows, tiny_tokenizer(None))
    assert prompts[0].text == "ab\ncd"
    assert "<|user|>" not in prompts[0].text and len(prompts[0].token_ids) == 5
    assert tokenize_rows([], tiny_tokenizer(None))[0] == []


def test_tokenize_real_rows_end_to_end():
    rows, _ = load_rows(data_file("aime2024.jsonl"), limit=4)
    prompts, stats = tokenize_rows(rows, tiny_tokenizer(TEMPLATE), max_prompt_tokens=100_000)
    assert [p.uid for p in prompts] == [r.uid for r in rows] and stats["kept"] == 4
    assert all(p.text.endswith("\\boxed{}.<|assistant|>") for p in prompts)


# ---------------------------------------------------------------------------- purity

def test_importing_data_does_not_import_ray():
    code = "import sys, pipeline.data; print('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------- bad input (issue 10)

def test_missing_columns_name_the_columns_looked_for_and_found(tmp_path):
    source = write_jsonl(tmp_path / "cols.jsonl", [{"text": "1+1?", "label": "2"}] * 2)
    with pytest.raises(DataError) as e:
        load_rows(source)
    assert str(e.value) == (f"{source}: no usable row: of 2 rows, 2 had no prompt (looked for prompt / problem / "
                            "question); columns found: label, text")


def test_only_empty_answers_is_one_line_not_an_actor_traceback(tmp_path):
    source = write_jsonl(tmp_path / "empty_answers.jsonl", [{"problem": "a", "answer": " "}, {"problem": "b"}])
    with pytest.raises(DataError, match=r"of 2 rows, 2 had no answer \(looked for reward_model.ground_truth"):
        load_rows(source)


def test_dicts_booleans_and_odd_lists_are_not_answers(tmp_path):
    source = write_jsonl(tmp_path / "types.jsonl", [
        {"problem": "empty list", "answer": []}, {"problem": "dict", "answer": {"x": 1}},
        {"problem": "bool", "answer": False}, {"problem": "int", "answer": 204},
        {"problem": "float", "answer": 0.5}, {"problem": "verl list", "reward_model": {"ground_truth": ["1"]}},
        {"problem": "list of a dict", "answer": ["1", {"x": 2}]}, {"problem": "list of a bool", "answer": [True]},
        {"problem": "blank item", "answer": ["3", " $ $ "]},
    ])
    rows, stats = load_rows(source)
    assert [(r.uid, r.ground_truth) for r in rows] == [("types:3", "204"), ("types:4", "0.5"), ("types:5", "1")]
    assert stats["skipped_bad_answer"] == 6
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": True}])
    with pytest.raises(DataError, match="1 had an answer that is not a string, a number or a list of them"):
        load_rows(only_bad)


def test_olympiadbench_list_answers_load(tmp_path):
    """Its `final_answer` is a list: one item is the answer, several are joined for math-verify."""
    source = write_jsonl(tmp_path / "olympiad.jsonl", [
        {"id": 1, "question": "Half of one?", "final_answer": ["$\\frac{1}{2}$"]},
        {"id": 2, "question": "Both roots?", "final_answer": ["$3$", "$5$"]},
        {"id": 3, "question": "No answer given", "final_answer": []},
        {"id": 4, "question": "A number", "final_answer": [12]},
    ])
    rows, stats = load_rows(source, prompt_key="question", answer_key="final_answer")
    assert [(r.uid, r.ground_truth) for r in rows] == [
        ("olympiad:0", "\\frac{1}{2}"), ("olympiad:1", "3, 5"), ("olympiad:3", "12")]
    assert stats["skipped_bad_answer"] == 1 and stats["kept"] == 3
    assert rows[0].messages[0]["content"] == "Half of one? " + DEFAULT_INSTRUCTION


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """The hub is unreachable here: record what `datasets.load_dataset` is asked for, serve two rows."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        return [{"question": "1+1?", "final_answer": ["$2$"]}, {"question": "2+2?", "final_answer": ["4"]}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_subset_and_split_reach_datasets_load_dataset(hub_calls):
    rows, _ = load_rows("Hothan/OlympiadBench", subset="OE_TO_maths_en_COMP", split="train",
                        prompt_key="question", answer_key="final_answer")
    assert hub_calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", {"split": "train"})]
    assert [(r.uid, r.ground_truth) for r in rows] == [("OlympiadBench:0", "2"), ("OlympiadBench:1", "4")]
    load_rows("some/set", split="test", answer_key="final_answer")   # no subset: the dataset's default config
    assert hub_calls[1] == ("some/set", None, {"split": "test"})


def test_eval_set_subset_and_keys_pass_from_config_to_datasets(hub_calls):
    from pipeline.config import load_config
    from pipeline.world import load_eval_sets
    item = ("{name: olympiadbench, path: Hothan/OlympiadBench, subset: OE_TO_maths_en_COMP, split: train, "
            "prompt_key: question, answer_key: final_answer}")
    cfg = load_config(["model.path=Qwen/Qwen2.5-Math-1.5B", "data.train=some/hub-set", "reward.kind=math",
                       f"eval.sets=[{item}]"])
    (olympiad,) = load_eval_sets(cfg, tiny_tokenizer(TEMPLATE))
    assert hub_calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", {"split": "train"})]
    assert [p.ground_truth for p in olympiad.prompts] == ["2", "4"]



def test_prompts_that_are_not_text_are_skipped_and_counted(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", [
        {"problem": 5, "answer": "1"}, {"prompt": [{"role": "user", "content": ["image"]}], "answer": "1"},
        {"problem": "ok", "answer": "1"}])
    rows, stats = load_rows(source)
    assert [r.uid for r in rows] == ["prompts:2"] and stats["skipped_bad_prompt"] == 2


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value) == f"{path}:2: not UTF-8 (byte 0xe9); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def test_corrupt_parquet_is_one_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable parquet file \(ArrowInvalid: .*\); re-export"):
        load_rows(str(path))


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"just text"', "str"), ("7", "int"), ("null", "NoneType")])
def test_json_lines_that_are_not_objects_name_the_line(tmp_path, line, kind):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"mixed.jsonl:2: a JSON {kind}, expected an object like"):
        load_rows(str(path))


def test_json_array_items_that_are_not_objects_are_named(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[{"problem": "a", "answer": "1"}, [1]]')
    with pytest.raises(DataError, match="arr.json: item 1 of the JSON array: a JSON list"):
        load_rows(str(path))


def test_duplicate_ids_name_both_rows(tmp_path):
    rec = {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "1"}, "extra_info": {"index": 3}}
    source = write_jsonl(tmp_path / "dup.jsonl", [rec, {"problem": "x", "answer": "2"}, rec])
    with pytest.raises(DataError, match=r"dup.jsonl: rows 0 and 2 share the uid 'dup:3'; extra_info.index must be unique"):
        load_rows(source)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_files_are_one_line(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty.jsonl: no rows \(the file or split is empty\)$"):
        load_rows(str(path))


def test_text_the_tokenizer_rejects_is_skipped_and_counted(random_world, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(random_world.tokenizer_dir))
    path = tmp_path / "surrogate.jsonl"   # a JSON escape that decodes to a lone surrogate
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "bad \\ud800 text", "answer": "3"}\n')
    rows, _ = load_rows(str(path), instruction="")
    prompts, stats = tokenize_rows(rows, tok)
    assert [p.uid for p in prompts] == ["surrogate:0"] and stats["skipped_bad_text"] == 1


def test_load_prompts_counts_skips_and_refuses_an_all_too_long_source(random_world, tmp_path):
    from transformers import AutoTokenizer
    from pipeline.data import load_prompts
    tok = AutoTokenizer.from_pretrained(str(random_world.tokenizer_dir))
    source = write_jsonl(tmp_path / "mix.jsonl", [{"problem": "1+1", "answer": "2"}, {"problem": "x"},
                                                  {"problem": "2+2" * 40, "answer": "4"}])
    skipped: dict = {}
    prompts = load_prompts(source, tok, key="data.train", max_prompt_tokens=100, skipped=skipped)
    assert [p.uid for p in prompts] == ["mix:0"]
    assert skipped["data/skipped_no_answer"] == 1 and skipped["data/skipped_too_long"] == 1
    with pytest.raises(DataError, match=r"^data.train: no usable prompt in .*mix.jsonl: all 2 prompts are longer than "
                                        r"data.max_prompt_tokens=2 \(longest \d+ tokens\); raise data.max_prompt_tokens$"):
        load_prompts(source, tok, key="data.train", max_prompt_tokens=2)
