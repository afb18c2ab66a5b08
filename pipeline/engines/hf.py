"""Hugging Face engine: a KV-cached sampling loop over a transformers causal LM (CPU path).

Prompts are left-padded so every row's next token sits in the last column; position
ids skip the padding so a padded prompt sees the same positions as an unpadded one.
Behaviour log-probs are log-softmax(logits / T) at the sampled token, the distribution
that actually drew it (top-p truncation aside), which is what importance weights need.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.engines.base import SamplingConfig
from pipeline.types import Sample


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask tokens outside the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    mass = sorted_logits.softmax(-1).cumsum(-1)
    drop = mass - sorted_logits.softmax(-1) >= top_p       # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


class HFEngine:
    def __init__(self, model_path: str, tokenizer_path: str, *, dtype=torch.float32):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.reader = None        # slot files stay mapped between syncs

    def update_weights(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)   # copies (and casts) into our parameters

    def load_slot(self, slot) -> None:
        """Load a published slot file: its mapped pages copied straight into the parameters."""
        if self.reader is None:
            from pipeline.transport import SlotReader
            self.reader = SlotReader()
        self.reader.load(slot, self.update_weights)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        rows = [list(p) for p in prompts for _ in range(sampling.n)]
        tokens, logps = self._sample(rows, sampling)
        samples = [self._sample_of(t, lp) for t, lp in zip(tokens, logps)]
        return [samples[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

    def _sample(self, rows: list[list[int]], s: SamplingConfig):
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])        # (R, P)
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])        # (R, P)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)                                         # (R, P)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        alive = torch.ones(len(rows), dtype=torch.bool)
        tokens, logps = [], []
        for _ in range(s.max_new_tokens):
            logits = out.logits[:, -1].float()                                           # (R, V)
            if s.temperature > 0:
                logp_all = (logits / s.temperature).log_softmax(-1)
                probs = top_p_filter(logits / s.temperature, s.top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)              # (R,)
            else:
                logp_all = logits.log_softmax(-1)
                nxt = logits.argmax(-1)
            nxt = torch.where(alive, nxt, torch.full_like(nxt, self.pad_id))
            tokens.append(nxt)
            logps.append(logp_all.gather(1, nxt[:, None]).squeeze(1))
            alive &= ~torch.isin(nxt, torch.tensor(sorted(self.eos_ids)))
            if not alive.any():
                break
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)
        return torch.stack(tokens, 1), torch.stack(logps, 1)                             # (R, T)

    def _sample_of(self, tokens: torch.Tensor, logps: torch.Tensor) -> Sample:
        """Cut a row at its first EOS (kept) and decode it."""
        ids = tokens.tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
        ids = ids[:end] if end else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Sample(tuple(ids), text, tuple(logps[:len(ids)].tolist()), finished=end is not None)
