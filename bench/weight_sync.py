"""Weight sync: seconds per GB from the learner's publish to a generator's engine loaded.

    python -m bench.weight_sync                    # ~0.7 GB fp32 Qwen2-shaped model, HF engine
    python -m bench.weight_sync --layers 6 --rounds 3 --engine vllm --multiprocessing
    python -m bench.weight_sync --shape qwen2.5-1.5b --engine vllm --multiprocessing --dtype bfloat16   # on a GPU

Side by side in one run, with real Ray actors (a WeightStore and a Generator) and the
learner's own `Publisher`:
- object_store: the old path, the state pickled into the object store (the call argument,
  then the store's re-put), unpickled by the generator, copied into the engine;
- shm: the version written once into a shared-memory slot (pipeline/transport.py), the
  generator handed its path, the engine copying from the mapped pages;
- memcpy: one copy of the same bytes between two tensors already in memory, the floor.
Each transport's first round is a warm-up (it allocates and maps the slot files once for
the run); the median of the other rounds is reported. Every copy uses one thread, as the
generator actor does (rollout.num_cpus=1).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


SHAPES = {  # Qwen2.5-1.5B's published config (hidden, layers, heads, kv heads, intermediate, vocab)
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936),
}


def build_model(root: Path, layers: int, hidden: int, vocab: int, heads: int = 0, kv_heads: int = 0,
                intermediate: int = 0) -> tuple[Path, Path, dict]:
    """A random Qwen2-shaped model saved for the generator to load, and its state dict."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from pipeline.tiny import make_random_world
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate or hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads or hidden // 64,
                         num_key_value_heads=kv_heads or max(1, hidden // 256),
                         vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer = make_random_world(root / "world").tokenizer_dir   # any tokenizer: nothing is generated
    return root / "model", tokenizer, {k: v.detach().clone() for k, v in model.state_dict().items()}


def memcpy_seconds(state: dict) -> float:
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k in state:        # fault the destination in: the floor is the copy, not the allocation
        dst[k].copy_(state[k])
    t0 = time.perf_counter()
    for k in state:
        dst[k].copy_(state[k])
    return time.perf_counter() - t0


def transport_seconds(cfg, transport: str, state: dict, model_dir: Path, tokenizer: Path, run_dir: Path,
                      rounds: int) -> list[float]:
    """Publish `rounds` versions through `transport`; seconds from publish to engine loaded."""
    import ray
    from omegaconf import OmegaConf
    from actors.generator import Generator
    from actors.weights import Publisher, WeightStore
    cfg = OmegaConf.merge(cfg, {"rollout": {"weight_sync": transport}})
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    gen = ray.remote(Generator).options(num_cpus=0).remote(cfg, str(model_dir), str(tokenizer), store)
    ray.get(gen.sync_weights.remote())     # engine built before the clock starts
    publisher, out = Publisher(cfg, store, str(run_dir)), []
    for version in range(1, rounds + 2):
        for t in state.values():           # new values each version, outside the clock
            t.add_(1e-4)
        t0 = time.perf_counter()
        publisher.publish(version, state)
        assert ray.get(gen.sync_weights.remote()) == version
        out.append(time.perf_counter() - t0)
    ray.kill(gen)
    ray.kill(store)
    if publisher.writer is not None:
        import shutil
        publisher.writer.close()
        shutil.rmtree(publisher.writer.directory, ignore_errors=True)
    return out[1:]                         # the first round allocates the run's slots once


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shape (overrides the sizes above)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the engine's dtype")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--multiprocessing", action="store_true", help="vLLM engine core in a subprocess (as on GPU)")
    args = ap.parse_args(argv)
    import ray
    from omegaconf import OmegaConf
    from pipeline.config import Config
    from pipeline.transport import state_bytes
    torch.set_num_threads(1)
    cfg = OmegaConf.structured(Config)
    cfg.rollout.engine, cfg.rollout.num_cpus = args.engine, 1
    cfg.rollout.vllm.enforce_eager, cfg.rollout.vllm.max_model_len = True, 256
    cfg.rollout.vllm.multiprocessing = args.multiprocessing or None
    cfg.model.dtype = args.dtype
    shape = SHAPES[args.shape] if args.shape else dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, tokenizer, state = build_model(root, **shape)
        # bytes as they travel: the slot holds model.dtype; the floor copies the same number of bytes
        gb = state_bytes(state, getattr(torch, args.dtype)) / 1e9
        if args.dtype != "float32":
            state = {k: v.to(getattr(torch, args.dtype)) for k, v in state.items()}
        print(f"model: {shape['layers']} layers x {shape['hidden']}, {gb:.2f} GB of {args.dtype} weights; "
              f"engine {args.engine}"
              f"{' (engine core in a subprocess)' if args.multiprocessing else ''}; {args.rounds} rounds each")
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        try:
            seconds = {t: statistics.median(transport_seconds(cfg, t, state, model_dir, tokenizer, root / t,
                                                              args.rounds))
                       for t in ("object_store", "shm")}
        finally:
            ray.shutdown()
        seconds["memcpy"] = statistics.median(memcpy_seconds(state) for _ in range(args.rounds))
    print("\n| transport | s per GB | GB/s |\n| --- | --- | --- |")
    for name, s in seconds.items():
        print(f"| {name} | {s / gb:.3f} | {gb / s:.2f} |")
    print(f"transport vs object store: x{seconds['object_store'] / seconds['shm']:.2f} faster, "
          f"vs memcpy floor: x{seconds['shm'] / seconds['memcpy']:.2f} slower")


if __name__ == "__main__":
    main()
