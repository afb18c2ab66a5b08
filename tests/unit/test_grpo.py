"""GRPO maths against hand computations and naive loops: advantages, aggregation, clip, TIS, KL."""
import math
import subprocess
import sys

import pytest
import torch

from pipeline.grpo import LossConfig, aggregate, group_advantages, kl_k3, policy_loss

D = torch.float64


def _naive_adv(row, norm, eps=1e-6):
    n = len(row)
    mu = sum(row) / n
    sd = math.sqrt(sum((r - mu) ** 2 for r in row) / (n - 1))  # unbiased, as verl
    return [(r - mu) / (sd + eps) if norm == "std" else r - mu for r in row]


def _naive_agg(values, mask, mode):
    if mode == "token":
        num = sum(v * m for vr, mr in zip(values, mask) for v, m in zip(vr, mr))
        return num / sum(sum(mr) for mr in mask)
    seqs = [sum(v * m for v, m in zip(vr, mr)) / sum(mr) for vr, mr in zip(values, mask) if sum(mr) > 0]
    return sum(seqs) / len(seqs)


# --- advantages ------------------------------------------------------------------------

def test_advantages_hand_computed_unbiased_std():
    # [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=D), eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)                                 # 0.8660
    torch.testing.assert_close(adv, torch.tensor([[s, -s, -s, s]], dtype=D))


def test_advantages_match_naive_loop_both_norms():
    rows = [[1.0, 0.0, 0.0, 0.0], [0.3, 0.9, 0.1, 0.5], [2.0, -1.0, 0.0, 1.0]]
    for norm in ("std", "mean"):
        adv = group_advantages(torch.tensor(rows, dtype=D), norm=norm)
        expect = torch.tensor([_naive_adv(r, norm) for r in rows], dtype=D)
        torch.testing.assert_close(adv, expect)


def test_mean_norm_is_reward_minus_group_mean():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(group_advantages(r, norm="mean"), r - r.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("norm", ["std", "mean"])
def test_zero_variance_groups_give_exact_zero(norm):
    # eight 0.1s: in float32, r - mean(r) is ~7e-9, not 0, and std division would amplify it
    r = torch.tensor([[1.0] * 8, [0.0] * 8, [0.1] * 8, [1.0, 0.0] * 4])
    adv = group_advantages(r, norm=norm)
    assert (adv[:3] == 0).all()                                # exactly, not approximately
    assert (adv[3] != 0).all()


def test_group_of_one_is_zero_not_nan():
    assert (group_advantages(torch.tensor([[1.0], [0.0]])) == 0).all()


def test_bad_norm_raises():
    with pytest.raises(ValueError, match="norm"):
        group_advantages(torch.zeros(2, 2), norm="max")


# --- aggregation -----------------------------------------------------------------------

VALS = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # ragged, one empty row


def test_aggregate_token_vs_seq_match_naive_and_differ():
    v, m = torch.tensor(VALS, dtype=D), torch.tensor(MASK, dtype=D)
    tok, seq = aggregate(v, m, "token"), aggregate(v, m, "seq")
    assert tok.item() == pytest.approx(_naive_agg(VALS, MASK, "token"))  # 45 / 7
    assert seq.item() == pytest.approx(_naive_agg(VALS, MASK, "seq"))    # (2.5 + 15 + 5) / 3
    assert tok.item() == pytest.approx(45 / 7) and seq.item() == pytest.approx(7.5)


def test_aggregate_empty_mask_is_zero_and_ignores_inf_padding():
    v = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]])
    m = torch.tensor([[True, False], [False, True]])
    for mode in ("token", "seq"):
        assert aggregate(v, m, mode).item() == pytest.approx(1.5)
        assert aggregate(v, torch.zeros_like(m), mode).item() == 0.0


# --- policy loss: clipping -------------------------------------------------------------

def _grad(logp, old_logp, adv, mask, cfg, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, cfg, **kw)
    loss.backward()
    return logp.grad, loss, metrics


def test_clip_high_zeroes_gradient_for_positive_advantage():
    ratios = torch.tensor([[3.0, 1.1, 1.0, 0.5]], dtype=D)     # 3.0 > 1.28: clipped
    old = torch.zeros(1, 4, dtype=D)
    g, _, met = _grad(ratios.log(), old, torch.tensor([1.0], dtype=D), torch.ones(1, 4), LossConfig())
    assert g[0, 0] == 0
    assert (g[0, 1:] != 0).all()                               # A>0 with ratio < 1: never clipped
    assert met["clip_frac_high"] == pytest.approx(0.25) and met["clip_frac_low"] == 0


def test_clip_low_zeroes_gradient_for_negative_advantage():
    ratios = torch.tensor([[0.1, 0.5, 0.9, 3.0]], dtype=D)     # < 0.8 clipped for A<0
    old = torch.zeros(1, 4, dtype=D)
    g, _, met = _grad(ratios.log(), old, torch.tensor([-1.0], dtype=D), torch.ones(1, 4), LossConfig())
    assert (g[0, :2] == 0).all()
    assert (g[0, 2:] != 0).all()                               # A<0 with ratio > 1: never clipped
    assert met["clip_frac_low"] == pytest.approx(0.5) and met["clip_frac_high"] == 0


def test_clip_higher_is_asymmetric():
    logp = torch.tensor([[math.log(1.25)]], dtype=D)
    args = (torch.zeros(1, 1, dtype=D), torch.tensor([1.0], dtype=D), torch.ones(1, 1))
    g_dapo, _, m_dapo = _grad(logp, *args, LossConfig(clip_low=0.2, clip_high=0.28))
    g_sym, _, m_sym = _grad(logp, *args, LossConfig(clip_low=0.2, clip_high=0.2))
    assert g_dapo[0, 0] != 0 and m_dapo["clip_frac_high"] == 0
    assert g_sym[0, 0] == 0 and m_sym["clip_frac_high"] == 1.0


def test_clip_frac_counts_only_masked_tokens_with_nonzero_advantage():
    # A = [+1, -1, 0]; rows' ratios [2, 2, 1], [0.5, 1, (0.1 padding)], [0.1, 5, (padding)]
    logp = torch.tensor([[2.0, 2.0, 1.0], [0.5, 1.0, 0.1], [0.1, 5.0, 9.0]]).log()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0, 0.0])                       # A = 0: nothing to clip
    _, met = policy_loss(logp, torch.zeros(3, 3), adv, mask, LossConfig())
    ratios = [2, 2, 1, 0.5, 1, 0.1, 5]
    clip_high = sum(a > 0 and r > 1.28 for a, r in zip([1, 1, 1, -1, -1, 0, 0], ratios))
    clip_low = sum(a < 0 and r < 0.8 for a, r in zip([1, 1, 1, -1, -1, 0, 0], ratios))
    assert (clip_high, clip_low) == (2, 1)
    assert met["clip_frac_high"] == pytest.approx(clip_high / 7)
    assert met["clip_frac_low"] == pytest.approx(clip_low / 7)
    assert met["ratio_mean"] == pytest.approx(sum(ratios) / 7)
    assert met["approx_kl"] == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratios) / 7)


def test_loss_matches_naive_loop_seq_and_token():
    torch.manual_seed(0)
    N, T = 4, 5
    logp, old = -torch.rand(N, T, dtype=D) * 2, -torch.rand(N, T, dtype=D) * 2
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=D)
    mask = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    per_tok = [[0.0] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            r, a = math.exp(logp[i, t] - old[i, t]), adv[i].item()
            per_tok[i][t] = max(-a * r, -a * min(max(r, 1 - 0.2), 1 + 0.28))
    for agg in ("token", "seq"):
        loss, met = policy_loss(logp, old, adv, torch.tensor(mask), LossConfig(agg=agg))
        expect = _naive_agg(per_tok, mask, agg)
        assert loss.item() == pytest.approx(expect) and met["pg_loss"] == pytest.approx(expect)


def test_ratio_one_gives_minus_token_weighted_mean_advantage():
    logp = -torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    adv = torch.tensor([0.5, -2.0, 1.0])
    loss, met = policy_loss(logp, logp.clone(), adv, mask, LossConfig())
    expect = -(0.5 * 4 - 2.0 * 1 + 1.0 * 2) / 7
    assert loss.item() == pytest.approx(expect)
    assert met["clip_frac_low"] == 0 and met["clip_frac_high"] == 0 and met["approx_kl"] == 0
    assert met["ratio_mean"] == pytest.approx(1.0)


def test_garbage_padding_logprobs_do_not_poison_loss_or_grad():
    logp = torch.tensor([[-1.0, 500.0]])                       # padding logp would overflow exp
    old = torch.tensor([[-1.0, -500.0]])
    g, loss, _ = _grad(logp, old, torch.tensor([1.0]), torch.tensor([[1, 0]]),
                       LossConfig(kl_coef=0.1), behaviour_logp=old * 3, ref_logp=-old)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g[0, 1] == 0


# --- truncated importance sampling ---------------------------------------------------

def test_tis_weights_are_capped():
    N, T = 1, 4
    old = torch.zeros(N, T)
    beh = torch.tensor([[0.0, -0.5, -3.0, 1.0]])               # w = 1, e^0.5, e^3 -> 2, e^-1
    logp = torch.zeros(N, T)
    adv, mask = torch.tensor([1.0]), torch.ones(N, T)
    loss, met = policy_loss(logp, old, adv, mask, LossConfig(tis_cap=2.0), behaviour_logp=beh)
    w = [1.0, math.exp(0.5), 2.0, math.exp(-1.0)]
    assert met["tis_mean"] == pytest.approx(sum(w) / 4)
    assert met["tis_clip_frac"] == pytest.approx(0.25)
    assert loss.item() == pytest.approx(-sum(w) / 4)           # ratio 1, A=1: loss = -mean(w)
    _, off = policy_loss(logp, old, adv, mask, LossConfig(tis_cap=0), behaviour_logp=beh)
    assert off["tis_mean"] == 1.0 and off["pg_loss"] == pytest.approx(-1.0)


def test_tis_with_behaviour_equal_old_is_identity():
    torch.manual_seed(1)
    logp, old = -torch.rand(3, 5), -torch.rand(3, 5)
    adv, mask = torch.randn(3), (torch.rand(3, 5) > 0.3)
    l_none, m_none = policy_loss(logp, old, adv, mask, LossConfig())
    l_same, m_same = policy_loss(logp, old, adv, mask, LossConfig(), behaviour_logp=old.clone())
    assert l_same.item() == l_none.item()
    assert m_same["tis_mean"] == 1.0 and m_same["tis_clip_frac"] == 0.0


def test_tis_weight_is_detached():
    old = torch.zeros(1, 2)
    beh = torch.full((1, 2), -0.3).requires_grad_(True)
    loss, _ = policy_loss(torch.zeros(1, 2, requires_grad=True), old, torch.tensor([1.0]),
                          torch.ones(1, 2), LossConfig(), behaviour_logp=beh)
    loss.backward()
    assert beh.grad is None


# --- KL ------------------------------------------------------------------------------

def test_kl_k3_formula_nonnegative_and_zero_when_equal():
    torch.manual_seed(2)
    logp, ref = -torch.rand(4, 6, dtype=D) * 5, -torch.rand(4, 6, dtype=D) * 5
    k = kl_k3(logp, ref)
    expect = [[math.exp(r - l) - (r - l) - 1 for l, r in zip(lr, rr)] for lr, rr in zip(logp.tolist(), ref.tolist())]
    torch.testing.assert_close(k, torch.tensor(expect, dtype=D))
    assert (k >= 0).all()
    assert (kl_k3(logp, logp) == 0).all()


def test_kl_term_added_to_loss_and_reported():
    torch.manual_seed(3)
    logp, ref = -torch.rand(2, 3), -torch.rand(2, 3)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    loss0, m0 = policy_loss(logp, logp, adv, mask, LossConfig())
    loss1, m1 = policy_loss(logp, logp, adv, mask, LossConfig(kl_coef=0.5), ref_logp=ref)
    assert "kl" not in m0
    assert m1["kl"] == pytest.approx(kl_k3(logp, ref).mean().item())
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * m1["kl"])


def test_kl_coef_without_ref_logp_raises():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.zeros(1), torch.ones(1, 2), LossConfig(kl_coef=0.1))


# --- config and imports ----------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    ({"clip_low": 0.0}, "clip_low"), ({"clip_low": 1.0}, "clip_low"), ({"clip_high": -0.1}, "clip_high"),
    ({"clip_high": 1.5}, "clip_high"), ({"agg": "sample"}, "agg"), ({"kl_coef": -1.0}, "kl_coef"),
    ({"tis_cap": 0.5}, "tis_cap"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kw)
    LossConfig(tis_cap=None), LossConfig(tis_cap=0)            # disabling is allowed


def test_import_does_not_pull_in_ray():
    code = "import sys, pipeline.grpo; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
