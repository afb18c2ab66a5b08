"""GRPO maths: group advantages, the PPO-clip policy loss with DAPO clip-higher, k3 KL, TIS,
an entropy bonus and an optional dual clip.

Pure torch, no Ray: the learner calls `group_advantages` on the rewards of each batch of
groups, then `policy_loss` on each minibatch. Test: `pytest tests/unit/test_grpo.py -q`.

References:
  GRPO     Shao et al. 2024, DeepSeekMath (arXiv:2402.03300), group-normalised advantages.
  Dr.GRPO  Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783).
  DAPO     Yu et al. 2025 (arXiv:2503.14476): clip-higher and token-level loss aggregation.
  TIS      Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
           training" (truncated importance sampling for vLLM rollouts; verl's `tis`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NORMS = ("std", "mean")
AGGS = ("token", "seq")


def group_advantages(rewards: torch.Tensor, *, norm: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """rewards (G, n) -> advantages (G, n): GRPO (r - mean) / (std + eps), or Dr.GRPO r - mean."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # (G, n), ints -> float
    centered = r - r.mean(dim=1, keepdim=True)                         # (G, n)
    if norm == "std":
        # unbiased (Bessel-corrected) std, as torch.std in verl's compute_grpo_outcome_advantage;
        # a group of one has no spread, so it gets std 0 (and advantage 0 below) instead of NaN
        n = r.shape[1]
        std = r.std(dim=1, keepdim=True) if n > 1 else torch.zeros_like(r[:, :1])  # (G, 1)
        centered = centered / (std + eps)
    # a group whose samples all got the same reward carries no learning signal: force exact 0
    # (r - mean can be off by an ulp, e.g. eight 0.1s in float32, and std division would blow it up)
    const = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # (G, 1)
    return torch.where(const, torch.zeros_like(centered), centered)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(N, T, V) logits -> (N, T) entropy of softmax(logits): logsumexp(z) - sum(p * z)."""
    p = logits.softmax(-1)                                         # (N, T, V)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)      # (N, T)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) (Schulman 2020): exp(ref-logp) - (ref-logp) - 1, >= 0."""
    log_r = ref_logp - logp                   # (N, T), log(ref / pi) at tokens sampled from pi
    return torch.exp(log_r) - log_r - 1.0     # e^x - x - 1 >= 0 for all x, 0 iff x = 0


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """values, mask (N, T) -> scalar: DAPO token-level mean ("token") or GRPO mean of per-sequence means ("seq")."""
    m = mask.to(values.dtype)                            # (N, T), bool or float mask accepted
    v = torch.where(m > 0, values, torch.zeros_like(values))  # (N, T); inf/NaN on padding never leak
    if mode == "token":
        # DAPO: every response token weighs the same, so long responses are not down-weighted
        return (v * m).sum() / m.sum().clamp(min=1.0)
    if mode == "seq":
        # GRPO: mean over tokens of each sequence, then over sequences; empty rows are ignored
        n_tok = m.sum(dim=1)                                         # (N,)
        per_seq = (v * m).sum(dim=1) / n_tok.clamp(min=1.0)          # (N,)
        nonempty = (n_tok > 0).to(values.dtype)                      # (N,)
        return (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1.0)
    raise ValueError(f"mode must be one of {AGGS}, got {mode!r}")


@dataclass
class LossConfig:
    """Knobs of the PPO-clip GRPO loss; validated on construction."""

    clip_low: float = 0.2      # epsilon_low: ratio floor 1 - clip_low for A < 0
    clip_high: float = 0.28    # epsilon_high: ratio ceiling 1 + clip_high for A > 0 (DAPO clip-higher)
    agg: str = "token"         # "token" (DAPO) | "seq" (GRPO) loss aggregation
    kl_coef: float = 0.0       # weight of the k3 KL to the reference policy; 0 = no KL (as the paper)
    tis_cap: float | None = 2.0  # cap on pi_old / pi_behaviour importance weights; 0 or None disables
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * mean token entropy (the authors' 0.001)
    clip_ratio_c: float | None = None  # dual clip (Ye et al. 2020): for A < 0 the loss is at most -A * c; None = off

    def __post_init__(self):
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ValueError(f"LossConfig.{name} must be in (0, 1), got {v}")
        if self.agg not in AGGS:
            raise ValueError(f"LossConfig.agg must be one of {AGGS}, got {self.agg!r}")
        if self.kl_coef < 0:
            raise ValueError(f"LossConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.entropy_coef < 0:
            raise ValueError(f"LossConfig.entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"LossConfig.clip_ratio_c must be > 1 (or None: off), got {self.clip_ratio_c}")
        if self.tis_cap and self.tis_cap < 1.0:
            # a cap below 1 would down-weight even perfectly on-policy tokens
            raise ValueError(f"LossConfig.tis_cap must be >= 1, or 0/None to disable, got {self.tis_cap}")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    """Token-level mean of x over the mask, as a Python float (0.0 if the mask is empty)."""
    return aggregate(x.detach(), m, "token").item()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    behaviour_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip GRPO loss over (N, T) response tokens with (N,) sequence advantages -> (loss, metrics).

    entropy: (N, T) per-token entropy of the current policy, needed when cfg.entropy_coef > 0.
    """
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} > 0 needs the per-token entropy")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logp (reference-policy log-probs); "
                         "pass ref_logp or set kl_coef=0")
    m = mask.to(logp.dtype)                                   # (N, T)
    on = m > 0                                                # (N, T) bool; padding log-probs may be garbage
    A = advantages.to(logp.dtype)[:, None]                    # (N, 1), one advantage per sequence

    # 1) PPO-clip surrogate with asymmetric bounds (DAPO clip-higher: 1 - eps_low, 1 + eps_high)
    logratio = torch.where(on, logp - old_logp, 0.0)          # (N, T), 0 on padding: no exp overflow
    ratio = torch.exp(logratio)                               # (N, T), pi_theta / pi_old
    pg_loss1 = -A * ratio                                     # (N, T)
    pg_loss2 = -A * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)  # (N, T)
    pg = torch.maximum(pg_loss1, pg_loss2)                    # (N, T), pessimistic bound
    if cfg.clip_ratio_c is not None:
        # dual clip: a negative advantage with a huge ratio would otherwise push without limit
        pg_loss3 = -A * cfg.clip_ratio_c                      # (N, 1)
        dual = (A < 0) & (pg > pg_loss3)                      # (N, T), where the third bound binds
        pg = torch.where(A < 0, torch.minimum(pg, pg_loss3), pg)

    # 2) truncated importance sampling: the rollouts came from the generator's behaviour policy
    # (stale weights, or vLLM numerics != HF), so reweight by min(pi_old / pi_behaviour, cap)
    if behaviour_logp is not None and cfg.tis_cap:
        w_raw = torch.exp(torch.where(on, old_logp - behaviour_logp, 0.0)).detach()  # (N, T)
        w = w_raw.clamp(max=cfg.tis_cap)                        # (N, T)
        tis_clipped = (w_raw > cfg.tis_cap).to(m.dtype)
    else:
        w = torch.ones_like(pg)
        tis_clipped = torch.zeros_like(pg)
    pg = pg * w                                               # (N, T)

    # 3) optional KL to the reference policy, added per token (GRPO's k3 penalty)
    per_token = pg
    if cfg.kl_coef > 0:
        kl = kl_k3(logp, torch.where(on, ref_logp, logp))     # (N, T), 0 on padding
        per_token = pg + cfg.kl_coef * kl

    # 4) entropy bonus (verl: pg_loss - entropy_coeff * entropy), aggregated like the loss
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * torch.where(on, entropy, 0.0)

    # 5) aggregate over the mask (token: DAPO, seq: GRPO)
    loss = aggregate(per_token, m, cfg.agg)

    # diagnostics, CleanRL style: which side of the clip binds, how far pi moved from pi_old
    with torch.no_grad():
        clip_low = ((A < 0) & (ratio < 1.0 - cfg.clip_low)).to(m.dtype)
        clip_high = ((A > 0) & (ratio > 1.0 + cfg.clip_high)).to(m.dtype)
        metrics = {
            "pg_loss": aggregate(pg, m, cfg.agg).item(),
            "clip_frac_low": _masked_mean(clip_low, m),
            "clip_frac_high": _masked_mean(clip_high, m),
            "approx_kl": _masked_mean(0.5 * logratio ** 2, m),
            "ratio_mean": _masked_mean(ratio, m),
            "tis_mean": _masked_mean(w, m),
            "tis_clip_frac": _masked_mean(tis_clipped, m),
        }
        if cfg.kl_coef > 0:
            metrics["kl"] = aggregate(kl, m, cfg.agg).item()
        if entropy is not None:
            metrics["entropy"] = _masked_mean(torch.where(on, entropy, 0.0), m)
        if cfg.clip_ratio_c is not None:
            metrics["clip_frac_dual"] = _masked_mean(dual.to(m.dtype), m)
    return loss, metrics
