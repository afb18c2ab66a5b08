"""The one generation interface every engine (HF on CPU, vLLM on GPU) implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from pipeline.types import Sample


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1                      # samples per prompt
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None


class Engine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """For each prompt (token ids), `sampling.n` samples with behaviour log-probs."""

    def update_weights(self, state: dict) -> None:
        """Load a full state dict (name -> tensor) in place; no disk round trip."""

    def load_slot(self, slot) -> None:
        """Load a published version from its shared-memory file (pipeline/transport.py); raises
        TornRead when the file was rewritten meanwhile."""


def make_engine(kind: str, model_path: str, tokenizer_path: str, *, cfg=None) -> Engine:
    """kind: hf | vllm | auto (vLLM when importable)."""
    if kind == "auto":
        import importlib.util
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if kind == "vllm":
        from pipeline.engines.vllm import VLLMEngine
        return VLLMEngine(model_path, tokenizer_path, cfg=cfg)
    from pipeline.engines.hf import HFEngine
    return HFEngine(model_path, tokenizer_path)
