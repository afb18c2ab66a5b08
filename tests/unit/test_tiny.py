"""The tiny world: task, tokenizer, model files, splits and the build cache (no Ray)."""
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import tiny
from pipeline.tiny import build_tiny_world, make_random_world, tiny_score

REPO = Path(__file__).resolve().parents[2]


def _quiet(*_):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """2 threads on 2 shared, busy cores ran 3-20x slower than 1 (OpenMP oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_random_world(tmp_path_factory.mktemp("worlds"), seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return AutoTokenizer.from_pretrained(world.tokenizer_dir)


def _cells(prompts):
    """The (digits of a, digits of b) pairs present, read back from the stable uids."""
    return {tuple(len(x) for x in p.uid.removeprefix("tiny:").split("+")) for p in prompts}


# ---- tokenizer and model files -------------------------------------------------------

def test_prompt_encodes_to_bos_then_one_id_per_character(tok):
    ids = tok("007+018=").input_ids
    # [PAD] [BOS] [EOS] [UNK] come first, then '0'..'9' = 4..13, '+' = 14, '=' = 15
    assert ids == [1, 4, 4, 11, 14, 4, 5, 12, 15] and len(ids) == tiny.PROMPT_LEN
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 0, 20)
    assert tok.decode(ids, skip_special_tokens=True) == "007+018="


def test_response_decode_skips_specials(tok):
    vocab = tok.get_vocab()
    response = [vocab[c] for c in "5200"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(response, skip_special_tokens=True) == "5200"
    assert tiny_score(tok.decode(response, skip_special_tokens=True), "25") == 1.0
    assert tiny_score(tok.decode(response), "25") == 1.0  # specials left in are ignored too


def test_world_prompts_carry_the_saved_tokenizers_ids(world, tok):
    for p in world.train[:20] + world.eval[:20]:
        assert p.token_ids == tuple(tok(p.text).input_ids)
        a, b = p.uid.removeprefix("tiny:").split("+")
        assert p.text == f"{int(a):03d}+{int(b):03d}=" and p.ground_truth == str(int(a) + int(b))


def test_model_dir_loads_as_a_small_qwen2(world, tok):
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.head_dim == 32 and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    assert model.dtype == torch.float32
    assert 400_000 < sum(p.numel() for p in model.parameters()) < 700_000
    assert not (world.model_dir / "tokenizer.json").exists()  # qwen2 dirs map to Qwen2Tokenizer
    assert json.loads((world.tokenizer_dir / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "PreTrainedTokenizerFast"


def test_greedy_accuracy_counts_a_model_that_answers_correctly(world, tok):
    """A fake model whose logits spell out each prompt's reversed sum must score 1.0."""
    answers = {p.token_ids: tok(p.ground_truth.zfill(4)[::-1]).input_ids[1:] + [tok.eos_token_id]
               for p in world.eval[:8]}

    class Oracle(torch.nn.Module):
        def forward(self, ids, past_key_values=None, use_cache=True):
            hist = ids if past_key_values is None else torch.cat([past_key_values, ids], 1)
            nxt = [answers[tuple(r[:tiny.PROMPT_LEN])][len(r) - tiny.PROMPT_LEN]
                   if len(r) - tiny.PROMPT_LEN < tiny.ANSWER_LEN else 0 for r in hist.tolist()]
            logits = torch.nn.functional.one_hot(torch.tensor(nxt), len(tok)).float()
            return type("Out", (), {"logits": logits[:, None], "past_key_values": hist})

    assert tiny.greedy_accuracy(Oracle(), tok, world.eval[:8], batch_size=3) == 1.0
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert tiny.greedy_accuracy(model, tok, world.eval) == pytest.approx(world.base_accuracy)


# ---- reward --------------------------------------------------------------------------

@pytest.mark.parametrize("response, truth, expected", [
    ("5200", "25", 1.0),         # 0025 reversed
    ("9991", "1999", 1.0),
    (" 5 2 0 0\n", "25", 1.0),   # whitespace ignored
    ("5200", "26", 0.0),         # wrong sum
    ("52", "25", 0.0),           # not 4 digits
    ("52000", "25", 0.0),
    ("520a", "25", 0.0),
    ("", "25", 0.0),
    ("\x00garbage+=", "25", 0.0),
    ("5200", "not a number", 0.0),
])
def test_tiny_score(response, truth, expected):
    assert tiny_score(response, truth) == expected


def test_tiny_score_never_raises_on_odd_types():
    assert tiny_score(None, "25") == 0.0
    assert tiny_score("5200", None) == 0.0


# ---- splits --------------------------------------------------------------------------

def test_splits_are_disjoint_sized_and_spread_over_all_digit_counts(world):
    train_uids = {p.uid for p in world.train}
    eval_uids = {p.uid for p in world.eval}
    assert len(train_uids) == len(world.train) == 1024
    assert len(eval_uids) == len(world.eval) == 512
    assert not train_uids & eval_uids
    every_cell = {(da, db) for da in (1, 2, 3) for db in (1, 2, 3)}
    assert _cells(world.train) == _cells(world.eval) == every_cell


def test_same_seed_same_uids_other_seed_other_uids(tmp_path, world):
    again = make_random_world(tmp_path, seed=0)  # a fresh build in another root
    assert again.root != world.root
    assert [p.uid for p in again.train] == [p.uid for p in world.train]
    assert [p.uid for p in again.eval] == [p.uid for p in world.eval]
    same_weights = load_file(again.model_dir / "model.safetensors")
    for name, tensor in load_file(world.model_dir / "model.safetensors").items():
        assert torch.equal(tensor, same_weights[name]), name
    other = make_random_world(tmp_path, seed=1)
    assert [p.uid for p in other.eval] != [p.uid for p in world.eval]


def test_warm_start_batches_never_contain_held_out_pairs(world, tok):
    held = {(int(a), int(b)) for a, b in
            (p.uid.removeprefix("tiny:").split("+") for p in world.eval)}
    ids, labels = tiny._train_batch(tok, random.Random(0), 2000, held)
    texts = tok.batch_decode(ids[:, :tiny.PROMPT_LEN], skip_special_tokens=True)
    pairs = {tuple(int(x) for x in t.rstrip("=").split("+")) for t in texts}
    assert not pairs & held
    assert (labels[:, :tiny.PROMPT_LEN] == -100).all()
    assert (labels[:, tiny.PROMPT_LEN:] == ids[:, tiny.PROMPT_LEN:]).all()


# ---- cache ---------------------------------------------------------------------------

def test_second_build_reuses_the_marked_directory(tmp_path, monkeypatch):
    first = make_random_world(tmp_path, seed=3)
    marker = first.root / "world.json"
    stamp = marker.stat().st_mtime_ns
    monkeypatch.setattr(tiny, "_build_into", lambda *a: pytest.fail("rebuilt a cached world"))
    second = make_random_world(tmp_path, seed=3)
    assert second == first and marker.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no temp debris


def test_spec_changes_the_cache_key(tmp_path):
    a = build_tiny_world(tmp_path, seed=0, num_train=64, num_eval=32, warm_start=False, log=_quiet)
    b = build_tiny_world(tmp_path, seed=0, num_train=65, num_eval=32, warm_start=False, log=_quiet)
    assert a.root != b.root and len(b.train) == 65
    assert {p.uid for p in a.eval} == {p.uid for p in b.eval}  # eval does not depend on num_train


def test_concurrent_builders_agree_and_leave_one_directory(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        worlds = list(pool.map(lambda _: make_random_world(tmp_path, seed=5), range(2)))
    assert worlds[0] == worlds[1]
    assert [p.name for p in tmp_path.iterdir()] == [worlds[0].root.name]


def test_directory_without_marker_is_rebuilt(tmp_path):
    world = make_random_world(tmp_path, seed=4)
    (world.root / "world.json").unlink()
    again = make_random_world(tmp_path, seed=4)
    assert again.root == world.root and (again.root / "world.json").exists()


# ---- no Ray --------------------------------------------------------------------------

def test_importing_tiny_does_not_import_ray():
    code = "import sys, pipeline.tiny; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- warm start (slow: ~25 s on 2 cores) ---------------------------------------------

@pytest.mark.slow
def test_warm_start_reaches_target_but_leaves_work_for_rl(tmp_path):
    world = build_tiny_world(tmp_path, seed=0, log=_quiet)
    assert 0.3 <= world.base_accuracy <= 0.5
    tok = AutoTokenizer.from_pretrained(world.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert tiny.greedy_accuracy(model, tok, world.eval) == pytest.approx(world.base_accuracy)
    # The trap in DESIGN.md: 3-digit operands must be learnable already, or RL stalls.
    for cell in [(1, 1), (3, 3)]:
        prompts = [p for p in world.eval if _cells([p]) == {cell}]
        assert tiny.greedy_accuracy(model, tok, prompts) > 0.05, cell
