"""benchmarks/fused_head.py (the GPU benchmark of the fused head) runs every case at a tiny size on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_fused_head_benchmark_runs_every_case_and_records_each(tmp_path):
    out = tmp_path / "fused-head.jsonl"
    done = subprocess.run([sys.executable, "benchmarks/fused_head.py", "--device", "cpu", "--positions", "64",
                           "--vocab", "512", "--hidden", "32", "--k", "8", "--repeats", "1", "--step-positions", "32",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["case"]) for r in records] == [("head", "ce"), ("head", "tail"), ("head", "fused"),
                                                         ("head", "fused_ce"), ("step", "ce"), ("step", "tail"),
                                                         ("step", "fused")]  # Liger only on a GPU
    assert all(r["seconds"] > 0 and "peak_mib" in r for r in records)
    assert "| 64 | (c) KD tail, fused head |" in done.stdout
