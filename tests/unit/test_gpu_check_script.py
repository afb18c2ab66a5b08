"""scripts/gpu_check_learner.py runs end to end on CPU (--device cpu --small) and prints its table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_learner_smoke_on_cpu():
    out = subprocess.run([sys.executable, "scripts/gpu_check_learner.py", "--device", "cpu", "--small", "--steps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    table = {k: v.strip() for k, v in (line.split("  ", 1) for line in out.stdout.strip().splitlines())}
    assert float(table["step time (s)"].split()[0]) > 0 and float(table["KL step time (s)"].split()[0]) > 0
    assert float(table["full-state gather (s)"]) >= 0
    assert "FSDP2 x1 (gloo)" in table["setup"] and "bfloat16" in table["setup"]
