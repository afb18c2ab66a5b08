"""One learner on one GPU at Qwen2.5-1.5B size: step time, peak memory, weight gather, KL step.

Needs torch and transformers only (no vLLM, no Ray, no download): random weights from a
hand-written Qwen2Config, random token batches, FSDP2 over a one-rank process group (NCCL;
gloo on CPU) with bf16 compute, gradient checkpointing and chunked log-probs, exactly as
actors/learner.py trains. Prints one table. Under 5 minutes on one H200.

    python scripts/gpu_check_learner.py                        # 1.5B shape, 2 x 16k-token micro-batches
    python scripts/gpu_check_learner.py --layers 8 --tokens 32768
    python scripts/gpu_check_learner.py --device cpu --small   # smoke run (tests/unit/test_gpu_check_script.py)
"""
from __future__ import annotations

import argparse
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, installed or not
from pipeline import policy  # noqa: E402
from pipeline.grpo import LossConfig  # noqa: E402
from pipeline.parallel import build_reference, full_state_dict, wrap_model  # noqa: E402
from pipeline.policy import Batch, grpo_update  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="a tiny model and few tokens (CPU smoke run)")
    p.add_argument("--layers", type=int, help="decoder layers (default 28; --small: 2)")
    p.add_argument("--tokens", type=int, help="tokens per micro-batch (default 16384; --small: 256)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 2048; --small: 64)")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per optimiser step")
    p.add_argument("--steps", type=int, default=2, help="updates timed; the last one is reported")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--logit-chunk", type=int, default=policy.LOGIT_CHUNK, help="positions per lm_head call")
    a = p.parse_args(argv)
    a.layers = a.layers or (2 if a.small else 28)
    a.tokens = a.tokens or (256 if a.small else 16384)
    a.seq_len = min(a.seq_len or (64 if a.small else 2048), a.tokens)
    return a


def qwen_config(a: argparse.Namespace) -> Qwen2Config:
    """Qwen2.5-1.5B's shape (its config.json), or a tiny one with --small."""
    if a.small:
        return Qwen2Config(vocab_size=512, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                           head_dim=32, intermediate_size=128, num_hidden_layers=a.layers, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, num_hidden_layers=a.layers, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def random_batch(a: argparse.Namespace, vocab: int) -> Batch:
    """micro-batches x (tokens // seq_len) rows of random tokens: a quarter prompt, the rest response."""
    n, L = a.micro_batches * (a.tokens // a.seq_len), a.seq_len
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, L - 1)
    mask[:, L // 4:] = 1
    return Batch(input_ids=torch.randint(0, vocab, (n, L), generator=g), attn=torch.ones(n, L, dtype=torch.long),
                 mask=mask, behaviour=-3 * torch.rand(n, L - 1, generator=g) * mask,
                 advantages=torch.randn(n, generator=g), response_len=mask.sum(1))


def timed(device: torch.device, fn):
    """(seconds, peak GiB, result) of fn(): device memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    return time.perf_counter() - t0, peak, out


def init_group(device: torch.device) -> None:
    """A one-rank process group, as Ray Train makes for one worker: FSDP2 needs one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device.type == "cuda":
        torch.cuda.set_device(device)   # before the group: NCCL binds the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def measure(a: argparse.Namespace, device: torch.device, model, batch: Batch) -> dict:
    """Time the updates (the last one counts), the full-state gather, the reference build and a KL step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = a.tokens // a.seq_len

    def update(cfg: LossConfig, ref=None) -> dict:
        return grpo_update(model, opt, batch, cfg, micro_batch_size=rows, ref_model=ref)

    r = {}
    for _ in range(a.steps):
        r["step_s"], r["step_gib"], r["m"] = timed(device, lambda: update(LossConfig()))
    r["gather_s"], _, _ = timed(device, lambda: full_state_dict(model))
    r["ref_s"], _, ref = timed(device, lambda: build_reference(model, dtype=a.dtype))
    r["kl_s"], r["kl_gib"], r["m_kl"] = timed(device, lambda: update(LossConfig(kl_coef=1e-3), ref))
    return r


def main(argv=None) -> None:
    a = parse_args(argv)
    device = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    policy.LOGIT_CHUNK = a.logit_chunk
    torch.manual_seed(0)
    init_group(device)
    config = qwen_config(a)
    with torch.device(device):   # random init on the device: seconds, not minutes on the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = wrap_model(model, strategy="fsdp", device=device, dtype=a.dtype, gradient_checkpointing=True)
    r = measure(a, device, model, random_batch(a, config.vocab_size))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mem = "GiB, torch.cuda.max_memory_allocated" if device.type == "cuda" else "GiB, process peak RSS"
    tok_s = a.micro_batches * a.tokens / r["step_s"]
    table = [
        ("model", f"Qwen2 {params:.1f}M params, {a.layers} layers, vocab {config.vocab_size}, tied"),
        ("setup", f"FSDP2 x1 ({dist.get_backend()}) on {where}, {a.dtype} compute, fp32 master, grad ckpt"),
        ("tokens / update", f"{a.micro_batches} micro-batches x {a.tokens} ({a.tokens // a.seq_len} rows x {a.seq_len})"),
        ("step time (s)", f"{r['step_s']:.2f}  (step {a.steps} of {a.steps}; {tok_s:.0f} tok/s)"),
        (f"peak memory, step ({mem})", f"{r['step_gib']:.2f}"),
        ("full-state gather (s)", f"{r['gather_s']:.2f}"),
        ("KL reference build (s)", f"{r['ref_s']:.2f}"),
        ("KL step time (s)", f"{r['kl_s']:.2f}  (kl {r['m_kl']['kl']:.1e}: the reference is the policy as it is now)"),
        (f"peak memory, KL step ({mem})", f"{r['kl_gib']:.2f}"),
        ("loss, grad norm", f"{r['m']['loss']:.4f}, {r['m']['grad_norm']:.4f}"),
    ]
    width = max(len(k) for k, _ in table)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
