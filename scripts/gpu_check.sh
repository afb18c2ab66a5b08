#!/usr/bin/env bash
# GPU smoke check for whoever has one GPU at hand: the tiny pipeline with the vLLM engine
# and the FSDP2 learner on CUDA, then the numbers that matter for the GPU path.
#   bash scripts/gpu_check.sh [extra key=value overrides]
# Needs: this package installed with the vllm extra (pip install -e '.[vllm]') and a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
python -c "import vllm" 2>/dev/null || { echo "vLLM missing: pip install -e '.[vllm]'"; exit 1; }
dir=${RUN_DIR:-runs/gpu_check}
# One GPU shared: the generator takes half (vLLM memory share 0.4), the learner the other half.
python run.py run.dir="$dir" trainer.total_steps="${STEPS:-100}" eval.every=25 \
  rollout.engine=vllm rollout.num_gpus=0.5 rollout.vllm.gpu_memory_utilization=0.4 \
  rollout.vllm.enforce_eager=true train.use_gpu=true train.gpus_per_worker=0.5 train.strategy=fsdp train.cpus_per_worker=1 \
  "$@"
python - "$dir/metrics.jsonl" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "train/loss" in r][5:] or [r for r in rows if "train/loss" in r]
mean = lambda k: st.mean(r.get(k, 0.0) for r in steps)
print(f"steps measured:            {len(steps)}")
print(f"rollout tokens/s:          {mean('rollout/tokens_per_s'):.0f} (per generator-second)")
print(f"weight sync s/step:        {mean('time/weight_sync'):.4f}")
print(f"learner s/step (train):    {mean('time/train'):.3f}")
print(f"wall s/step:               {mean('time/step'):.3f}")
evals = [(r['step'], round(r['eval/accuracy'], 3)) for r in rows if 'eval/accuracy' in r]
print(f"held-out accuracy by step: {evals}")
PY
