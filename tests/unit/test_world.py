"""pipeline.world: eval.sets become named, ordered EvalSets with their own limit, avg_k and reward (no Ray)."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.world import load_eval_sets

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_eval_sets_load_in_order_with_limits_and_rewards(random_world):
    if not all((DATA / f).exists() for f in ("math500.jsonl", "aime2024.jsonl", "gaokao2023en.jsonl")):
        pytest.skip(f"{DATA} lacks the eval sets")
    cfg = load_config(["data.max_prompt_tokens=100000", "eval.sets=["
                       "{name: heldout, path: tiny, limit: 64},"
                       f"{{name: math500, path: {DATA}/math500.jsonl, limit: 8, reward: math}},"
                       f"{{name: aime, path: {DATA}/aime2024.jsonl, avg_k: 4, reward: math}},"
                       f"{{name: gaokao, path: {DATA}/gaokao2023en.jsonl}}]"])
    tokenizer = AutoTokenizer.from_pretrained(str(random_world.tokenizer_dir))
    sets = load_eval_sets(cfg, tokenizer, tiny_heldout=random_world.eval)
    assert [(s.name, len(s.prompts), s.avg_k, s.reward) for s in sets] == [
        ("heldout", 64, 1, "tiny"), ("math500", 8, 1, "math"), ("aime", 30, 4, "math"),
        ("gaokao", 383, 1, "tiny")]   # "" = reward.kind; two gaokao rows have no answer
    assert sets[0].prompts == random_world.eval[:64]
    assert [p.uid for p in sets[1].prompts] == [f"math500:{i}" for i in range(8)]
    assert sets[3].prompts[0].ground_truth == "\\{x|-2\\leq x < 1\\}"    # `$...$` stripped
    assert all(p.token_ids[0] == tokenizer.bos_token_id for s in sets[1:] for p in s.prompts)


def test_a_set_with_no_usable_prompt_is_an_error(random_world, tmp_path):
    rows = tmp_path / "long.jsonl"
    rows.write_text('{"problem": "' + "x" * 50 + '", "answer": "1"}\n')
    cfg = load_config(["data.max_prompt_tokens=10", f"eval.sets=[{{name: long, path: {rows}}}]"])
    tokenizer = AutoTokenizer.from_pretrained(str(random_world.tokenizer_dir))
    with pytest.raises(DataError, match=r"^eval.sets.0.path: no usable prompt in .*long.jsonl: all 1 prompts are "
                       r"longer than data.max_prompt_tokens=10 \(longest \d+ tokens\); raise data.max_prompt_tokens$"):
        load_eval_sets(cfg, tokenizer, tiny_heldout=random_world.eval)


# --- bad input (issue 10) --------------------------------------------------------------

def real_cfg(model_dir, data_file, *more):
    return load_config([f"model.path={model_dir}", f"data.train={data_file}", "reward.kind=math",
                        f"eval.sets=[{{name: own, path: {data_file}}}]", *more])


def test_skipped_rows_are_counted_on_the_world(random_world, tmp_path):
    from pipeline.world import load_world
    data = tmp_path / "mix.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "no answer"}\n'
                    '{"problem": "list", "answer": []}\n{"problem": "bad \\ud800", "answer": "3"}\n')
    world = load_world(real_cfg(random_world.model_dir, data))
    assert [p.uid for p in world.train] == ["mix:0"]
    assert {k: v for k, v in world.skipped.items() if v} == {
        "data/skipped_no_answer": 1, "data/skipped_bad_answer": 1, "data/skipped_bad_text": 1,
        "data/own/skipped_no_answer": 1, "data/own/skipped_bad_answer": 1, "data/own/skipped_bad_text": 1}


def test_training_data_with_only_empty_answers_fails_before_any_actor(random_world, tmp_path):
    from pipeline.world import load_world
    data = tmp_path / "blank.jsonl"
    data.write_text('{"problem": "a", "answer": ""}\n')
    with pytest.raises(DataError, match=r"^data.train: .*blank.jsonl: no usable row: of 1 rows, 1 had no answer"):
        load_world(real_cfg(random_world.model_dir, data))


def test_model_paths_are_checked_in_seconds(random_world, tmp_path, monkeypatch):
    import huggingface_hub
    from pipeline.config import ConfigError
    from pipeline.world import check_model_paths
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "a", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"^model.path: no such directory: /nonexistent \(a local model"):
        check_model_paths(real_cfg("/nonexistent", data))
    with pytest.raises(ConfigError, match=rf"^model.path: {tmp_path} has no config.json: not a Hugging Face model"):
        check_model_paths(real_cfg(tmp_path, data))
    with pytest.raises(ConfigError, match=r"^model.tokenizer: no such directory: ./nope"):
        check_model_paths(real_cfg(random_world.model_dir, data, "model.tokenizer=./nope"))
    check_model_paths(real_cfg(random_world.model_dir, data))                      # a real model dir passes
    with pytest.raises(ConfigError, match="is neither a local directory nor a hub name"):
        check_model_paths(real_cfg("bad name!", data))
    # HF_HUB_OFFLINE is read once, at import (huggingface_hub/constants.py): set the parsed value
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"^model.path: nobody-xyz/no-model is not in the local Hugging Face cache "
                                          r"and HF_HUB_OFFLINE is set; download it"):
        check_model_paths(real_cfg("nobody-xyz/no-model", data))


def test_an_unknown_hub_name_fails_after_one_lookup(random_world, tmp_path):
    """Online: the hub says no such model; offline (as here, no network): it cannot be reached.
    Either way one line, after a single request (HfApi.model_info, 10 s timeout), not ~55 s of retries."""
    from pipeline.config import ConfigError
    from pipeline.world import check_model_paths
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "a", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"^model.path: (the hub has no model 'nobody-xyz/no-model'|nobody-xyz/no-model "
                                          r"is not in the local Hugging Face cache and the hub cannot be reached)"):
        check_model_paths(real_cfg("nobody-xyz/no-model", data))
