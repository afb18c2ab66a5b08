#!/usr/bin/env bash
# GPU check for a machine with the full stack (this package with the vllm extra, Ray, one GPU):
#   bash scripts/gpu_check.sh [extra key=value overrides for the pipeline run]
# 1. the tiny pipeline on one GPU shared by one generator (vLLM, engine core in a subprocess as
#    vLLM runs it on GPU) and the learner (FSDP2 over a one-rank group, bf16): it learns, and
#    the run's rollout tokens/s and weight-sync seconds are printed;
# 2. weight sync at Qwen2.5-1.5B shape (random weights, bf16, 3.1 GB): seconds per GB through
#    the shared-memory slot against the object-store path and a memcpy floor (bench.weight_sync);
# 3. the learner alone at Qwen2.5-1.5B shape: step time, peak memory, gather, KL step
#    (scripts/gpu_check_learner.py; that one needs only torch + transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
python -c "import vllm" 2>/dev/null || { echo "vLLM missing: pip install -e '.[vllm]'"; exit 1; }
dir=${RUN_DIR:-runs/gpu_check}
echo "== 1. pipeline on one shared GPU"
# One GPU shared: the generator takes 0.4 of its memory (vLLM's share), the learner the rest.
python run.py run.dir="$dir" run.overwrite=true trainer.total_steps="${STEPS:-100}" eval.every=25 model.dtype=bfloat16 \
  rollout.engine=vllm rollout.num_gpus=0.5 rollout.vllm.gpu_memory_utilization=0.4 rollout.vllm.multiprocessing=true \
  rollout.vllm.enforce_eager=true train.use_gpu=true train.gpus_per_worker=0.5 train.strategy=fsdp train.cpus_per_worker=1 \
  "$@"
python - "$dir/metrics.jsonl" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "train/loss" in r][5:] or [r for r in rows if "train/loss" in r]
mean = lambda k: st.mean(r.get(k, 0.0) for r in steps)
print(f"steps measured:            {len(steps)}")
print(f"rollout tokens/s:          {mean('rollout/tokens_per_s'):.0f} (per generator-second)")
print(f"weight publish s/step:     {mean('time/weight_publish'):.4f} (learner: gather + slot write)")
print(f"weight sync s/step:        {mean('time/weight_sync'):.4f} (generator: load from the slot)")
print(f"learner s/step (train):    {mean('time/train'):.3f}")
print(f"wall s/step:               {mean('time/step'):.3f}")
evals = [(r['step'], round(r['eval/accuracy'], 3)) for r in rows if 'eval/accuracy' in r]
print(f"held-out accuracy by step: {evals}")
PY
echo "== 2. weight sync at Qwen2.5-1.5B shape"
python -m bench.weight_sync --shape qwen2.5-1.5b --dtype bfloat16 --engine vllm --multiprocessing --rounds 3
echo "== 3. the learner at Qwen2.5-1.5B shape"
python scripts/gpu_check_learner.py
