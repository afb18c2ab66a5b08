"""Config: merged conf files, and one-line errors naming the key for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import CONF_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "base"))
def test_every_shipped_conf_loads(name, monkeypatch):
    if name != "tiny":   # real configs point at ../shared data or hub names; validate the schema only
        monkeypatch.setattr("pipeline.config._check_data", lambda cfg: None)
    cfg = load_config([f"conf={name}"])
    assert cfg.conf == name and cfg.rollout.n >= 2


def test_overrides_merge_last_wins():
    cfg = load_config(["train.lr=0.5", "selector.name=none", "rollout.num_generators=2"])
    assert cfg.train.lr == 0.5 and cfg.selector.name == "none" and cfg.rollout.num_generators == 2


@pytest.mark.parametrize("arg,message", [
    ("some.unknown_key=1", "some.unknown_key: unknown key"),
    ("train.lrr=1", "train.lrr: unknown key (did you mean train.lr?)"),
    ("rollout.n=1", "rollout.n: group size must be >= 2"),
    ("rollout.n=abc", "rollout.n:"),
    ("selector.alpha=1.0", "selector.alpha: must lie in (0, 1)"),
    ("selector.alpha=0", "selector.alpha: must lie in (0, 1)"),
    ("selector.name=magic", "selector.name: must be one of"),
    ("selector.probe_fraction=1", "selector.probe_fraction: must lie in [0, 1)"),
    ("selector.mopps_decay=0", "selector.mopps_decay: must lie in (0, 1]"),
    ("selector.mopps_mode=top", "selector.mopps_mode: must be closest or band"),
    ("selector.mopps_pool=0.5", "selector.mopps_pool: must be >= 1"),
    ("selector.mopps_band_low=0.8", "selector.mopps_band_low: need 0 <= mopps_band_low < mopps_band_high <= 1"),
    ("train.num_workers=3", "train.batch_size: 32 groups do not divide over train.num_workers=3"),
    ("rollout.sampling_batch=8", "rollout.sampling_batch: must be >= train.batch_size"),
    ("pipeline.max_staleness=-1", "pipeline.max_staleness: must be >= 0"),
    ("train.tis_cap=0.5", "train.tis_cap: must be 0 (off) or >= 1"),
    ("conf=nope", "conf: no conf/nope.yaml"),
    # values the run uses that would fail late, inside an actor (issue 10)
    ("run.seed=-1", "run.seed: must lie in [0, 2**32)"),
    ("reward.num_threads=0", "reward.num_threads: must be >= 1, got 0"),
    ("data.limit=-5", "data.limit: must be >= 1 or null (all rows), got -5"),
    ("data.limit=0", "data.limit: must be >= 1 or null"),
    ("reward.max_chars=0", "reward.max_chars: must be >= 1"),
    ("data.tiny.num_eval=0", "data.tiny.num_eval: must be >= 1, got 0"),
    ("data.tiny.num_train=0", "data.tiny.num_train: must be >= 1, got 0"),
    ("data.tiny.warm_target=1.5", "data.tiny.warm_target: must lie in (0, 1)"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens: must be >= 1"),
    ("ray.num_cpus=0", "ray.num_cpus: must be > 0 or null"),
    ("rollout.num_cpus=-1", "rollout.num_cpus: must be >= 0"),
    ("rollout.num_gpus=-1", "rollout.num_gpus: must be >= 0"),
    ("reward.num_cpus=-0.5", "reward.num_cpus: must be >= 0"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker: must be > 0"),
    ("train.grad_clip=0", "train.grad_clip: must be > 0"),
    ("rollout.vllm.tensor_parallel_size=2", "rollout.vllm.tensor_parallel_size: > 1 spans GPUs"),
    ("rollout.vllm.gpu_memory_utilization=0", "rollout.vllm.gpu_memory_utilization: must lie in (0, 1]"),
])
def test_bad_values_fail_with_one_line_naming_the_key(arg, message):
    with pytest.raises(ConfigError) as e:
        load_config([arg])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match="data.train: file not found"):
        load_config(["model.path=Qwen/Qwen2.5-Math-1.5B", f"data.train={missing}", "reward.kind=math",
                     f"eval.sets.0.path={missing}"])


def sets(*items: str) -> str:
    """An `eval.sets=[...]` override from `{...}` items."""
    return f"eval.sets=[{', '.join(items)}]"


def test_eval_sets_default_fields_and_item_overrides():
    cfg = load_config([sets("{name: heldout, path: tiny}", "{name: again, path: tiny, avg_k: 4}"),
                       "eval.sets.0.limit=64"])
    first, second = cfg.eval.sets
    assert (first.name, first.limit, first.avg_k, first.reward, first.split) == ("heldout", 64, 1, "", "test")
    assert (second.name, second.limit, second.avg_k) == ("again", None, 4)
    assert [s.name for s in load_config([]).eval.sets] == ["heldout"]   # conf=tiny ships one set


@pytest.mark.parametrize("items,message", [
    (["{name: 'a b', path: tiny}"], "eval.sets.0.name: must be non-empty letters, digits"),
    (["{name: '', path: tiny}"], "eval.sets.0.name: must be non-empty"),
    (["{name: eval/acc, path: tiny}"], "eval.sets.0.name: must be non-empty"),
    (["{name: a, path: tiny}", "{name: a, path: tiny}"], "eval.sets.1.name: duplicate set name 'a'"),
    (["{name: a, path: tiny, avg_k: 0}"], "eval.sets.0.avg_k: must be >= 1"),
    (["{name: a, path: tiny, limit: 0}"], "eval.sets.0.limit: must be >= 1 or null"),
    (["{name: a, path: tiny, reward: exact}"], "eval.sets.0.reward: must be '' (= reward.kind), math or tiny"),
    (["{name: a}"], "eval.sets.0.path: set a jsonl/parquet path"),
    (["{name: a, path: ./nope/missing.jsonl}"], "eval.sets.0.path: file not found: ./nope/missing.jsonl"),
    (["{name: a, path: tiny, bogus: 1}"], "eval.sets: bogus: unknown key"),
    ([], "eval.sets: list at least one held-out set"),
])
def test_bad_eval_sets_fail_with_one_line_naming_the_item(items, message):
    with pytest.raises(ConfigError) as e:
        load_config([sets(*items)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eval_set_overrides_name_existing_items():
    with pytest.raises(ConfigError, match="eval.sets.3.limit: no item 3: eval.sets has 1"):
        load_config(["eval.sets.3.limit=8"])
    with pytest.raises(ConfigError, match=r"eval.sets.0.limitt: unknown key \(did you mean eval.sets.0.limit\?\)"):
        load_config(["eval.sets.0.limitt=8"])


@pytest.mark.parametrize("name", ["qwen7b", "qwen1.5b", "r1distill1.5b"])
def test_paper_configs_evaluate_on_the_authors_six_sets(name):
    cfg = load_config([f"conf={name}"])   # hub names only: nothing to find on disk
    assert [s.name for s in cfg.eval.sets] == ["math500", "amc", "aime2024", "gaokao2023en", "minerva",
                                               "olympiadbench"]
    olympiad = cfg.eval.sets[-1]
    assert (olympiad.path, olympiad.subset, olympiad.split) == ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")
    assert (olympiad.prompt_key, olympiad.answer_key) == ("question", "final_answer")
    assert (olympiad.avg_k, olympiad.top_p) == (4, 0.7)
    assert cfg.eval.sets[0].subset is None and cfg.eval.sets[0].answer_key is None   # the automatic lookup


def test_bad_key_in_an_olympiad_eval_set_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(["conf=qwen7b", "eval.sets.5.subsett=x"])
    assert str(e.value) == "eval.sets.5.subsett: unknown key (did you mean eval.sets.5.subset?)"
    with pytest.raises(ConfigError) as e:
        load_config([sets("{name: a, path: tiny, answer_keys: final_answer}")])
    assert "eval.sets: answer_keys: unknown key" in str(e.value) and "\n" not in str(e.value)


def test_tiny_eval_set_needs_the_tiny_world():
    with pytest.raises(ConfigError, match="eval.sets.0.path: tiny .* needs model.path=tiny"):
        load_config(["model.path=Qwen/Qwen2.5-Math-1.5B", "data.train=some/hub-set", "reward.kind=math"])


def test_cli_reports_unknown_key_in_one_line_and_exits_nonzero():
    out = subprocess.run([sys.executable, "run.py", "conf=tiny", "some.unknown_key=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: some.unknown_key: unknown key"]


def test_cli_cfg_prints_merged_config():
    out = subprocess.run([sys.executable, "run.py", "trainer.total_steps=7", "--cfg"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "total_steps: 7" in out.stdout
    out = subprocess.run([sys.executable, "run.py", "conf=qwen7b", "--cfg"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "subset: OE_TO_maths_en_COMP" in out.stdout
