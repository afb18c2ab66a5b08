"""Learner maths on a tiny Qwen2: collate alignment, token-budget micro-batches, equal updates."""
from __future__ import annotations

import random

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline import policy
from pipeline.grpo import LossConfig
from pipeline.policy import collate, grpo_update, micro_batches, token_logprobs
from pipeline.types import Prompt, RolloutGroup, Sample, ScoredGroup

VOCAB = 20


def tiny_qwen(seed: int = 0, tie: bool = True) -> Qwen2ForCausalLM:
    """A random one-layer Qwen2 (hidden 64, 2 heads of 32), in float32."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      intermediate_size=128, num_hidden_layers=1, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg)


def random_groups(num_groups: int = 3, n: int = 2, seed: int = 0) -> list[ScoredGroup]:
    """Groups with long-tailed response lengths, mixed rewards and off-policy behaviour log-probs."""
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = Prompt(f"p{g}", tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 5))), "0")
        samples = []
        for _ in range(n):
            r = rng.choice([1, 2, 3, 12])
            samples.append(Sample(tuple(rng.randrange(1, VOCAB) for _ in range(r)), "",
                                  tuple(-rng.uniform(2.0, 4.0) for _ in range(r)), True))
        rewards = tuple(float(i % 2) for i in range(n))
        groups.append(ScoredGroup(RolloutGroup(g, prompt, tuple(samples), 0), rewards))
    return groups


def sgd_step(model, batch, **kw) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return grpo_update(model, opt, batch, LossConfig(), **kw)


def assert_same_params(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


# --- micro_batches ---------------------------------------------------------------------

def test_micro_batches_respect_both_limits_and_cover_every_row_once():
    rng = random.Random(1)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(0, 30))]
        max_rows, max_tokens = rng.randint(1, 6), rng.randint(1, 120)
        parts = micro_batches(lengths, max_rows=max_rows, max_tokens=max_tokens)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        for p in parts:
            assert 1 <= len(p) <= max_rows
            padded = len(p) * max(lengths[i] for i in p)
            assert padded <= max_tokens or len(p) == 1     # only a lone row may exceed the budget


def test_micro_batches_single_long_row_goes_alone():
    # longest first: 50 alone (over budget), then 4 + 3 (2 x 4 = 8 tokens), then 2 (3 x 4 = 12 > 10)
    assert micro_batches([3, 50, 4, 2], max_rows=8, max_tokens=10) == [[1], [2, 0], [3]]


def test_micro_batches_without_token_budget_keep_rows_in_order():
    assert micro_batches([5, 1, 9, 2, 7], max_rows=2) == [[0, 1], [2, 3], [4]]
    assert micro_batches([], max_rows=2) == []


# --- collate ---------------------------------------------------------------------------

def test_collate_aligns_mask_and_behaviour_with_targets():
    prompt = Prompt("p", (1, 2, 3), "0")
    long, short = Sample((4, 5), "", (-0.1, -0.2), True), Sample((6,), "", (-0.3,), True)
    b = collate([ScoredGroup(RolloutGroup(0, prompt, (long, short), 0), (1.0, 0.0))], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0]]
    assert b.attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # target position t predicts input_ids[t + 1]: the response tokens sit at targets 2, 3 (row 0) and 2 (row 1)
    assert b.mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert b.input_ids[:, 1:][b.mask > 0].tolist() == [4, 5, 6]
    torch.testing.assert_close(b.behaviour[b.mask > 0], torch.tensor([-0.1, -0.2, -0.3]))
    assert b.behaviour[b.mask == 0].abs().sum() == 0
    assert b.advantages[0] > 0 > b.advantages[1] and b.response_len.tolist() == [2.0, 1.0]
    assert b.seq_lens() == [5, 4] and b.rows([1]).trimmed().input_ids.tolist() == [[1, 2, 3, 6]]


# --- grpo_update -----------------------------------------------------------------------

def test_token_budget_update_equals_one_full_batch():
    batch = collate(random_groups(4, 3), pad_id=0)
    lens = batch.seq_lens()
    assert max(lens) > 2 * min(lens)                        # long-tailed, so trimming matters
    full, budget = tiny_qwen(), tiny_qwen()
    m_full = sgd_step(full, batch, micro_batch_size=len(batch))
    m_budget = sgd_step(budget, batch, micro_batch_size=4, micro_batch_tokens=2 * max(lens))
    assert m_full["grad_norm"] > 0
    torch.testing.assert_close(m_budget["grad_norm"], m_full["grad_norm"], rtol=1e-5, atol=0)
    assert_same_params(budget, full)


def test_two_ppo_epochs_pair_each_micro_batch_with_its_own_old_logprobs():
    # the second epoch's ratio pi/pi_old needs pi_old of the *same* rows; a mix-up would change the update
    batch = collate(random_groups(3, 4, seed=2), pad_id=0)
    full, budget = tiny_qwen(), tiny_qwen()
    kw = dict(ppo_epochs=2, grad_clip=0.5)
    sgd_step(full, batch, micro_batch_size=len(batch), **kw)
    sgd_step(budget, batch, micro_batch_size=3, micro_batch_tokens=max(batch.seq_lens()) + 1, **kw)
    assert_same_params(budget, full)


def test_row_micro_batches_and_padding_micro_steps_leave_the_update_unchanged():
    # micro_batch_tokens=0 cuts by rows as before; extra empty micro-batches (a rank with fewer
    # rows than its peers) run the model but add zero gradient
    batch = collate(random_groups(3, 2, seed=3), pad_id=0)
    full, rows, padded = tiny_qwen(), tiny_qwen(), tiny_qwen()
    sgd_step(full, batch, micro_batch_size=len(batch))
    sgd_step(rows, batch, micro_batch_size=2)
    m = sgd_step(padded, batch, micro_batch_size=2, num_micro=5)
    assert "loss" in m
    assert_same_params(rows, full)
    assert_same_params(padded, full)



def test_token_logprobs_use_the_sampling_temperature():
    """Behaviour log-probs are log-softmax(logits / T): the learner's must match at T != 1."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=20, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, head_dim=32, intermediate_size=64)).eval()
    ids = torch.randint(0, 20, (2, 6))
    attn = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    expected = torch.gather((logits / 0.7).log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    assert torch.allclose(token_logprobs(model, ids, attn, 0.7), expected, atol=1e-6)
    assert not torch.allclose(token_logprobs(model, ids, attn), expected, atol=1e-3)


def test_chunked_logprobs_and_entropy_equal_full_logits(monkeypatch):
    """lm_head over a few positions at a time (checkpointed) gives the full-logits values and gradients."""
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[2, 5:] = 0

    def run(naive: bool, tie: bool):
        model = tiny_qwen(tie=tie)
        if naive:   # the whole (N, L-1, V) fp32 logits at once
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.7
            logp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        else:       # 18 positions in chunks of 5: the last chunk is short
            logp, ent = policy._logprobs_entropy(model, ids, attn, 0.7)
        (logp.sin().sum() + ent.cos().sum()).backward()
        return logp, ent, {n: p.grad for n, p in model.named_parameters()}

    monkeypatch.setattr(policy, "LOGIT_CHUNK", 5)
    for tie in (True, False):
        (lp, ent, grads), (lp0, ent0, grads0) = run(False, tie), run(True, tie)
        torch.testing.assert_close(lp, lp0, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ent0, atol=1e-5, rtol=0)
        assert grads.keys() == grads0.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], grads0[n], atol=1e-5, rtol=0, msg=n)
        torch.testing.assert_close(policy.token_logprobs(tiny_qwen(tie=tie), ids, attn, 0.7), lp0.detach(),
                                   atol=1e-5, rtol=0)
