"""The learner's maths on tensors: collate scored groups, score tokens, one GRPO update.

Pure torch (no Ray): the Ray Train loop in actors/learner.py calls `grpo_update` on each
worker's shard. Losses are normalised by *global* token (or sequence) counts so that
DDP's (or FSDP's) gradient averaging over W workers gives exactly the single-process loss.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.grpo import LossConfig, entropy_from_logits, group_advantages, policy_loss
from pipeline.parallel import no_sync, unwrap
from pipeline.types import ScoredGroup

LOGIT_CHUNK = 2048   # token positions per lm_head call: (2048, 152k) fp32 logits are 1.2 GB


@dataclass
class Batch:
    """Flattened samples of a shard: one row per response."""

    input_ids: torch.Tensor     # (N, L) prompt + response, right-padded
    attn: torch.Tensor          # (N, L)
    mask: torch.Tensor          # (N, L-1) 1 where the target token is a response token
    behaviour: torch.Tensor     # (N, L-1) generator log-probs aligned with targets
    advantages: torch.Tensor    # (N,)
    response_len: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: slice | list[int]) -> "Batch":
        return Batch(*(getattr(self, f.name)[idx] for f in fields(self)))

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def seq_lens(self) -> list[int]:
        """Prompt + response tokens of each row (the unpadded length)."""
        return self.attn.sum(1).tolist()

    def trimmed(self) -> "Batch":
        """Cut the right padding down to this batch's longest row."""
        L = min(self.input_ids.shape[1], max(self.seq_lens(), default=0))
        L = max(L, 2)  # one input and one target at least
        return Batch(self.input_ids[:, :L], self.attn[:, :L], self.mask[:, :L - 1], self.behaviour[:, :L - 1],
                     self.advantages, self.response_len)


def micro_batches(lengths: list[int], *, max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Row indices of each micro-batch: at most max_rows rows and, if max_tokens > 0, at most
    max_tokens padded tokens (rows x longest row); a row longer than max_tokens goes alone.

    max_tokens == 0 keeps the rows in order, max_rows at a time. Otherwise rows are packed
    longest first, so each micro-batch holds rows of similar length and little padding.
    """
    n = len(lengths)
    if max_tokens <= 0:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    parts: list[list[int]] = []
    for i in sorted(range(n), key=lambda j: -lengths[j]):
        cur = parts[-1] if parts else None
        # descending order: the micro-batch's first row is its longest, so padded = rows x that length
        if cur and len(cur) < max_rows and (len(cur) + 1) * lengths[cur[0]] <= max_tokens:
            cur.append(i)
        else:
            parts.append([i])
    return parts


def collate(groups: list[ScoredGroup], pad_id: int, adv_norm: str = "std") -> Batch:
    """Groups -> padded tensors; advantages are computed per group (GRPO)."""
    rows, beh, adv = [], [], []
    for g in groups:
        a = group_advantages(torch.tensor([g.rewards], dtype=torch.float32), norm=adv_norm)[0]
        for s, a_i in zip(g.group.samples, a.tolist()):
            rows.append((list(g.group.prompt.token_ids), list(s.token_ids)))
            beh.append(list(s.logprobs))
            adv.append(a_i)
    L = max((len(p) + len(r) for p, r in rows), default=1)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    mask = torch.zeros((len(rows), L - 1))
    behaviour = torch.zeros((len(rows), L - 1))
    for i, ((p, r), b) in enumerate(zip(rows, beh)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        # target position t predicts token t+1: response token j sits at len(p)+j, target index len(p)+j-1
        mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1
        behaviour[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(b)
    lens = torch.tensor([len(r) for _, r in rows], dtype=torch.float32)
    return Batch(ids, attn, mask, behaviour, torch.tensor(adv), lens)


def token_logprobs(model, input_ids: torch.Tensor, attn: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_<=t) for every position: (N, L) -> (N, L-1).

    The policy is the sampling distribution softmax(logits / T), as the engines' behaviour
    log-probs are: without the same T the importance ratio is off even fully on-policy.
    """
    return _logprobs_entropy(model, input_ids, attn, temperature, entropy=False)[0]


def mini_batch_slices(n_rows: int, num_mini: int) -> list[slice]:
    """Rows of each of num_mini equal mini-batches (one optimiser step each), in order.

    Rows are group-major, and the learner checks that a shard's groups divide evenly, so
    every mini-batch holds whole groups.
    """
    size = -(-n_rows // num_mini)   # ceil: an uneven last shard still takes num_mini steps
    return [slice(k * size, min((k + 1) * size, n_rows)) for k in range(num_mini)]


def grpo_update(model, optimizer, batch: Batch, cfg: LossConfig, *, micro_batch_size: int,
                micro_batch_tokens: int = 0, ppo_epochs: int = 1, num_mini: int = 1, grad_clip: float = 1.0,
                num_micro=None, global_norm=None, world_size: int = 1,
                ref_model=None, temperature: float = 1.0) -> dict[str, float]:
    """ppo_epochs x num_mini optimiser steps over one batch, gradient-accumulated in micro-batches.

    The batch splits into num_mini mini-batches, one optimiser step each (verl's
    ppo_mini_batch_size); pi_old is the policy before the batch's first step, so from the
    second step on the ratio moves and the PPO clip can bind. Micro-batches come from
    `micro_batches`. num_micro / global_norm (one per mini-batch, or one number when
    num_mini = 1) come from an all-reduce across workers so every worker runs the same
    number of forward/backward passes and each step's loss is normalised as if one
    process saw the whole mini-batch.
    """
    batch = batch.to(next(model.parameters()).device)
    minis = [batch.rows(s) for s in mini_batch_slices(len(batch), num_mini)]
    denom_of = (lambda b: b.mask.sum()) if cfg.agg == "token" else (lambda b: torch.tensor(float(len(b))))
    num_micro, global_norm = _per_mini(num_micro, num_mini), _per_mini(global_norm, num_mini)
    plans = [_plan(mb, micro_batch_size, micro_batch_tokens, num_micro[k], global_norm[k], denom_of)
             for k, mb in enumerate(minis)]
    old = None
    if ppo_epochs > 1 or num_mini > 1:  # with one step logp == old; else pi_old before the first step
        with torch.no_grad():  # one forward per micro-batch on every rank: FSDP all-gathers in each
            old = [[token_logprobs(model, *_inputs(mb), temperature) for mb in mbs] for mbs, _ in plans]
    metrics: dict[str, float] = {}
    steps, grad_norms = 0, []
    for _ in range(ppo_epochs):
        for k, (mbs, norm) in enumerate(plans):
            optimizer.zero_grad(set_to_none=True)
            for j, mb in enumerate(mbs):
                with no_sync(model, last=j == len(mbs) - 1):
                    m = _micro_step(model, mb, cfg, old[k][j] if old else None, norm, world_size, denom_of,
                                    ref_model, temperature)
                steps += bool(m)
                for key, v in m.items():
                    metrics[key] = metrics.get(key, 0.0) + v
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
            optimizer.step()
    metrics = {k: v / max(steps, 1) for k, v in metrics.items()}
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["optimizer_steps"] = len(grad_norms)
    return metrics


def _per_mini(value, num_mini: int) -> list:
    """A per-mini-batch list from a list, one number (num_mini = 1) or None (local values)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * num_mini if num_mini == 1 else [None] * num_mini


def _plan(mb: Batch, micro_batch_size: int, micro_batch_tokens: int, num_micro, global_norm, denom_of):
    """(micro-batches, loss denominator) of one mini-batch; ranks with fewer rows run empty ones."""
    parts = micro_batches(mb.seq_lens(), max_rows=micro_batch_size, max_tokens=micro_batch_tokens)
    num_micro = num_micro or max(1, len(parts))
    mbs = [mb.rows(parts[k]).trimmed() if k < len(parts) else mb.rows(slice(0, 0)) for k in range(num_micro)]
    return mbs, global_norm or float(denom_of(mb)) or 1.0


def _inputs(mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attn) of a micro-batch; an empty one gets a 2-token dummy row to run the model on."""
    if len(mb):
        return mb.input_ids, mb.attn
    ids = torch.zeros((1, 2), dtype=torch.long, device=mb.input_ids.device)
    return ids, torch.ones_like(ids)


def _logprobs_entropy(model, input_ids, attn, temperature: float, entropy: bool = True):
    """log-probs of the targets and (if asked) per-token entropy from one forward: (N, L-1) each.

    The full-vocabulary fp32 logits of a micro-batch, (N, L, V), would be 10 GB at 16k tokens
    of Qwen's 152k vocabulary (and as much again for the log-softmax autograd keeps), so
    lm_head runs on LOGIT_CHUNK positions at a time, each chunk under activation checkpointing:
    autograd keeps a chunk's hidden rows (C, H) instead of its (C, V) fp32 log-softmax, and
    backward rebuilds one chunk's logits at a time. The peak extra is a few (C, V) fp32 tensors.
    """
    N, T = input_ids.shape[0], input_ids.shape[1] - 1
    hidden = _final_hidden(model, input_ids, attn)[:, :-1].reshape(N * T, -1)   # (N(L-1), H)
    targets = input_ids[:, 1:].reshape(N * T)                                    # (N(L-1),)
    score = partial(_chunk_scores, unwrap(model).lm_head, temperature, entropy)
    keep = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(score, hidden[i:i + LOGIT_CHUNK], targets[i:i + LOGIT_CHUNK], use_reentrant=False)
             if keep else score(hidden[i:i + LOGIT_CHUNK], targets[i:i + LOGIT_CHUNK])
             for i in range(0, N * T, LOGIT_CHUNK)]
    logp = torch.cat([lp for lp, _ in parts]).view(N, T)
    return logp, torch.cat([e for _, e in parts]).view(N, T) if entropy else None


def _chunk_scores(head, temperature: float, entropy: bool, hidden: torch.Tensor, targets: torch.Tensor):
    """(C, H) final hidden states -> log-prob of each target and entropy (or None), (C,) each."""
    logits = head(hidden).float() / temperature                        # (C, V)
    logp = torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)
    return logp, entropy_from_logits(logits) if entropy else None


def _final_hidden(model, input_ids, attn) -> torch.Tensor:
    """(N, L, H) final (normed) hidden states, from a forward of the whole model that skips lm_head.

    It must be the root's forward: FSDP2 all-gathers the root group (embeddings, norm, lm_head)
    in the root's pre-forward hook and keeps the root unsharded after it (torch/distributed/fsdp/
    _fully_shard/_fsdp_state.py, _lazy_init), so lm_head can run on the chunks afterwards; the
    root's gradients are reduce-scattered in the post-backward final callback. A slice as
    logits_to_keep is used as is, so slice(0, 0) gives (N, 0, V) logits (transformers
    models/qwen2/modeling_qwen2.py, Qwen2ForCausalLM.forward).
    """
    box = []
    hook = unwrap(model).model.register_forward_hook(lambda _m, _args, out: box.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attn, logits_to_keep=slice(0, 0))
    finally:
        hook.remove()
    return box[0]


def _micro_step(model, mb: Batch, cfg: LossConfig, old, global_norm, world_size, denom_of, ref_model,
                temperature: float = 1.0) -> dict:
    ids, attn = _inputs(mb)
    logp, entropy = _logprobs_entropy(model, ids, attn, temperature, entropy=cfg.entropy_coef > 0)
    ref_logp = None
    if ref_model is not None:   # before the empty-batch return: under FSDP2 the reference all-gathers too
        with torch.no_grad():
            ref_logp = token_logprobs(ref_model, ids, attn, temperature)
    if len(mb) == 0:
        # this worker ran out of rows: a zero loss through a real forward still joins DDP's
        # all-reduce and FSDP's all-gathers / reduce-scatters, which every rank must call alike
        (logp.sum() * 0.0).backward()
        return {}
    old_logp = old if old is not None else logp.detach()
    loss, m = policy_loss(logp, old_logp, mb.advantages, mb.mask, cfg, behaviour_logp=mb.behaviour,
                          ref_logp=ref_logp, entropy=entropy)
    # the loss is a mean over this micro-batch; rescale to sum / global count, times W for DDP's mean
    (loss * float(denom_of(mb)) / global_norm * world_size).backward()
    return {"loss": float(loss.detach()), **m}
