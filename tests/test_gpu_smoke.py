"""The GPU smoke script (benchmarks/gpu_smoke.py) at its CPU size: every stage runs and passes here, so
the script a GPU session runs is known to work end to end before any device time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_script_passes_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--size", "cpu", "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = {line["stage"]: line for line in map(json.loads, (tmp_path / "smoke.jsonl").read_text().splitlines())}
    assert list(stages) == ["models", "capture (hf)", "distill (default objective)", "kill and resume",
                            "distill (full logits)", "distill (fused head, bf16)", "eval and generation"]
    assert stages["kill and resume"]["max_weight_difference"] == 0.0  # bit-identical resume on a CPU
    assert stages["distill (default objective)"]["sparse_head"] is True  # the fused head, by default
    assert stages["distill (full logits)"]["sparse_head"] is False
    assert stages["distill (fused head, bf16)"]["sparse_head"] is True
    assert stages["eval and generation"]["responses"] == 8
    assert "all 7 stages passed" in done.stdout
