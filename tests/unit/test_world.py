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
