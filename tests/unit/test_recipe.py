"""The authors' training recipe: mini-batches, entropy bonus, dual clip, format score, data lists."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.grpo import LossConfig, entropy_from_logits, policy_loss
from pipeline.policy import collate, grpo_update
from tests.unit.test_policy import random_groups, tiny_qwen

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class CountingSGD(torch.optim.SGD):
    """SGD that counts its optimiser steps."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def update(num_mini: int, lr: float = 20.0, **kw) -> tuple[dict, int]:
    batch = collate(random_groups(8, 4, seed=5), pad_id=0)    # 8 groups x 4 samples, mixed rewards
    model = tiny_qwen()
    opt = CountingSGD(model.parameters(), lr=lr)
    m = grpo_update(model, opt, batch, LossConfig(clip_low=0.2, clip_high=0.2, tis_cap=None, **kw),
                    micro_batch_size=8, num_mini=num_mini, grad_clip=1e9)
    return m, opt.steps


def test_mini_batches_take_one_optimiser_step_each():
    for num_mini in (1, 2, 4):
        m, steps = update(num_mini)
        assert steps == num_mini == m["optimizer_steps"]


def test_ppo_clip_binds_only_from_the_second_mini_batch():
    one, _ = update(1)
    assert one["ratio_mean"] == pytest.approx(1.0) and one["clip_frac_low"] + one["clip_frac_high"] == 0.0
    four, _ = update(4)       # steps 2-4 see a policy moved by the earlier steps: ratios leave [0.8, 1.2]
    assert four["clip_frac_low"] + four["clip_frac_high"] > 0.0
    assert four["approx_kl"] > 0.0


def test_entropy_bonus_pushes_toward_higher_entropy():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    logp = torch.gather(logits.log_softmax(-1), 2, torch.zeros(2, 3, 1, dtype=torch.long)).squeeze(2)
    ent = entropy_from_logits(logits)
    naive = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(ent, naive)
    mask, adv = torch.ones(2, 3), torch.zeros(2)              # no advantage: the loss is -coef * entropy
    loss, m = policy_loss(logp, logp.detach(), adv, mask, LossConfig(entropy_coef=0.5), entropy=ent)
    assert loss.item() == pytest.approx(-0.5 * ent.mean().item(), rel=1e-5)
    loss.backward()
    with torch.no_grad():                                     # one gradient step raises the entropy
        assert entropy_from_logits(logits - 0.1 * logits.grad).mean() > ent.mean()
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, adv, mask, LossConfig(entropy_coef=0.5))


def test_dual_clip_caps_the_loss_of_negative_advantages():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[2.0, 0.0]])                          # ratio e^2 ~ 7.4 on token 0
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 2)
    plain, _ = policy_loss(logp, old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.2, tis_cap=None))
    dual, m = policy_loss(logp, old, adv, mask, LossConfig(clip_low=0.2, clip_high=0.2, tis_cap=None,
                                                           clip_ratio_c=3.0))
    assert plain.item() == pytest.approx((torch.e ** 2 + 1) / 2, rel=1e-5)
    assert dual.item() == pytest.approx((3.0 + 1) / 2, rel=1e-5) and m["clip_frac_dual"] == 0.5
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossConfig(clip_ratio_c=1.0)


@pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason="needs ../shared/data/math500.jsonl")
def test_format_score_on_real_math500_solutions():
    from pipeline.rewards import Grader
    rows = [json.loads(line) for line in (DATA / "math500.jsonl").open()][:6]
    grader = Grader(timeout_s=20.0, format_score=0.1, n_workers=1)
    try:
        for row, other in zip(rows, rows[1:] + rows[:1]):
            solution = row["solution"]
            assert grader.score(solution, row["answer"]) == 1.0                  # its own boxed answer
            wrong = solution[:solution.rfind("\\boxed")] + "\\boxed{" + other["answer"] + "}"
            assert grader.score(wrong, row["answer"]) == 0.1                     # boxed, wrong
            assert grader.score("I am not sure.", row["answer"]) == 0.0          # nothing extracted
    finally:
        grader.close()


def test_config_recipe_keys_validate():
    cfg = load_config(["conf=tiny", "train.mini_batch_size=8"])
    assert cfg.train.batch_size // cfg.train.mini_batch_size == 4
    with pytest.raises(ConfigError, match="train.mini_batch_size"):
        load_config(["conf=tiny", "train.mini_batch_size=5"])
    with pytest.raises(ConfigError, match="reward.format_score"):
        load_config(["conf=tiny", "reward.format_score=1.5"])
    with pytest.raises(ConfigError, match="selector.sizing"):
        load_config(["conf=tiny", "selector.sizing=fast"])


def test_config_loads_a_list_of_training_sources(tmp_path):
    a, b = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for i, path in enumerate((a, b)):
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"problem": f"{i} + {k} = ?", "answer": str(i + k)}) + "\n"
                                for k in range(3)))
    cfg = load_config(["conf=qwen1.5b", f"data.train=[{a},{b}]"])
    assert list(cfg.data.train) == [str(a), str(b)]
    assert list(load_config(["conf=qwen1.5b"]).data.train) == ["BytedTsinghua-SIA/DAPO-Math-17k",
                                                               "DigitalLearningGmbH/MATH-lighteval"]
    with pytest.raises(ConfigError, match="data.train.1"):
        load_config(["conf=qwen1.5b", f"data.train=[{a},{tmp_path}/missing.jsonl]"])
    from pipeline.data import load_sources
    rows, stats = load_sources([str(a), str(b)])
    assert [r.uid for r in rows] == ["train:0", "train:1", "train:2", "b/train:0", "b/train:1", "b/train:2"]
    assert stats["kept"] == 6 and rows[3].ground_truth == "1"
    assert len(load_sources([str(a), str(b)], limit=4)[0]) == 4
