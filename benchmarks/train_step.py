"""Training-step cost of KD vs plain CE, and the data pipeline's own throughput.

    python benchmarks/train_step.py [--rows 64] [--batch-size 4] [--max-length 256] [--k 64]

Teacher SmolLM2-135M-Instruct (offline) cached over the shipped jargon pairs with the hf backend; student:
the teacher with every third layer (63.7 M parameters, vocabulary 49,152). One run prints, per mode,
the median step time (forward, backward, AdamW), tokens/s and peak memory (each mode in a fresh
process; peak resident memory above the level after a warm-up step): (a) plain CE on the ground truth with full logits (B x T x V), (b) KD (AMiD) on full logits at
the stored positions, (c) KD with the tail bucket (chunked full normaliser), (d) KD through the sparse
head (logits only at the k stored ids), (e) and (f) as (d) with sequences packed into rows of --max-length,
kept apart by a block-diagonal [B, 1, T, T] mask or by restarting position ids alone (transformers builds
the mask itself on CPU/SDPA; flash-attention varlen needs none on GPU). Then the data pipeline's batches/s and its ratio to the
fastest step's token consumption.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakRSS, median_seconds, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {"ce": "(a) CE, full logits", "dense": "(b) KD, full logits at stored positions",
         "tail": "(c) KD, tail bucket (chunked normaliser)", "sparse": "(d) KD, sparse head",
         "packed-mask": "(e) = (d), rows packed, block-diagonal mask",
         "packed-positions": "(f) = (d), rows packed, position ids only (no mask)"}


def prepare(work: Path, rows: int, k: int, max_length: int) -> tuple[Path, Path]:
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config
    from amid_pipeline.models import init_student, smollm2_teacher

    teacher = smollm2_teacher()
    student, shards = work / "student", work / "shards"
    if not student.exists():
        init_student(teacher, student, keep_every=3)
    if not shards.exists():
        run_capture(load_config(CaptureConfig, None, {
            "teacher": str(teacher), "dataset": str(ROOT / "data" / "jargon" / "train.jsonl"), "output": str(shards),
            "limit": rows, "k": k, "max_length": max_length, "backend": "hf", "dtype": "float32", "progress": False}))
    return student, shards


def batches(shards: Path, batch_size: int, max_length: int, count: int | None = None, packed_attention: str = "") -> list:
    """The first ``count`` training batches; packed (by ``packed_attention``) when it is given."""
    from amid_pipeline.train.data import DataSettings, ShardBatches, list_files

    settings = DataSettings(batch_size=batch_size, max_length=max_length, heldout_fraction=0.0,
                            packing=bool(packed_attention), packed_attention=packed_attention or "mask")
    data = ShardBatches(list_files([str(shards)]), settings, seed=0)
    out = []
    for batch in data:
        out.append(batch)
        if count is not None and len(out) >= count:
            break
    return out


def run_mode(mode: str, student_dir: Path, shards: Path, batch_size: int, max_length: int) -> dict:
    from transformers import AutoModelForCausalLM

    from amid_pipeline.losses import KDLoss
    from amid_pipeline.train.step import DistillModule

    torch.manual_seed(0)
    packed_attention = {"packed-mask": "mask", "packed-positions": "position_ids"}.get(mode, "")
    data = batches(shards, batch_size, max_length, count=6, packed_attention=packed_attention)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = KDLoss("amid", support="tail" if mode == "tail" else "renormalized")
    module = DistillModule(model, loss_fn, sparse=mode != "dense")
    cursor = {"i": 0}

    def step() -> None:
        batch = data[cursor["i"] % len(data)]
        cursor["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        if mode == "ce":
            inputs = batch.inputs
            logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False).logits  # [B, T, V]
            picked = logits[inputs.row, inputs.column]
            loss = torch.nn.functional.cross_entropy(picked.float(), batch.teacher.target_ids)
        else:
            loss = module(batch.inputs, batch.teacher).loss
        loss.backward()
        optimizer.step()

    step()  # warm-up: optimizer state allocated, kernels chosen
    with PeakRSS() as memory:
        seconds = median_seconds(step, repeats=5, warmup=0)
    tokens = sum(b.tokens for b in data) / len(data)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": memory.mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--work", default=None, help="folder for the student and shards (default: a temp dir)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp())
    if args.mode:
        result = run_mode(args.mode, work / "student", work / "shards", args.batch_size, args.max_length)
        print(json.dumps(result))
        return
    student, shards = prepare(work, args.rows, args.k, args.max_length)
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--work", str(work), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    ce = results["ce"]
    rows = [[MODES[m], r["seconds"], round(r["tokens_per_s"]), round(r["peak_mib"]), r["seconds"] / ce["seconds"],
             r["peak_mib"] / max(ce["peak_mib"], 1)] for m, r in results.items()]
    print_table(f"Training step, SmolLM2 student with every third layer, batch {args.batch_size} x <= "
                f"{args.max_length} tokens, k = {args.k}, torch threads {torch.get_num_threads()}",
                ["step", "seconds", "tokens/s", "peak MiB", "time vs (a)", "memory vs (a)"], rows)

    started = time.perf_counter()
    produced = batches(shards, args.batch_size, args.max_length)
    seconds = time.perf_counter() - started
    tokens = sum(b.tokens for b in produced)
    fastest = max(r["tokens_per_s"] for r in results.values())
    print_table("Data pipeline (one process, decode + shuffle + bucket + collate)",
                ["batches", "tokens", "seconds", "tokens/s", "vs fastest step"],
                [[len(produced), tokens, seconds, round(tokens / seconds), tokens / seconds / fastest]])


if __name__ == "__main__":
    main()
