"""Sampled vs top-k teacher targets: capture cost on one backend, and bytes per stored position.

    python benchmarks/sampled_targets.py [--rows 64] [--draws 32] [--small-k 12]

Teacher SmolLM2-135M-Instruct (offline, fp32, hf backend), the shipped jargon pairs. Part 1, the
teacher's scoring alone on the same sequences, each way in a fresh process (median of 3 after a warm-up;
peak resident memory above the level after the warm-up): (a) the earlier hf path, a full fp32
log_softmax over [positions x vocabulary] then top-k; (b) today's top-k path: the head applied a chunk
of positions at a time, top-k on raw logits, a chunked logsumexp; (c) the sampled kind (``--draws``
draws per position at temperature 1). Part 2, cache-teacher end to end (supervised positions, q64-delta)
for top-64, top-``--small-k`` and sampled: seconds, bytes per stored position, distinct ids per position.
Part 3, what the vLLM path leaves out: its draws come from the engine's top ``--sample-top`` renormalised,
so the teacher mass beyond them (mean and 99th percentile over positions) is never drawn.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakRSS, median_seconds, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = {"full": "(a) full fp32 log_softmax, then top-64", "chunked": "(b) top-64: chunked head + logsumexp",
         "sampled": "(c) sampled: chunked head + logsumexp + draws"}


def sequences(rows: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.generation import iter_examples
    from amid_pipeline.config import load_config
    from amid_pipeline.dataset.examples import load_rows, resolve_format
    from amid_pipeline.models import smollm2_teacher

    config = load_config(CaptureConfig, None, {"teacher": str(smollm2_teacher()), "dataset": str(ROOT / "data/jargon/train.jsonl"),
                                               "output": "unused", "limit": rows, "max_length": 256})
    table = load_rows(config)
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    fmt = resolve_format(config, list(table.column_names))
    return [e.input_ids for examples in iter_examples(table, list(range(len(table))), fmt, tokenizer, config, {}, None)
            for e in examples]


def full_log_softmax_topk(backend, batch: list[np.ndarray], k: int) -> None:
    """The hf scoring before the chunked path: the model's [B, T, V] logits, a full fp32 log_softmax per
    sequence, then top-k, target log p and rank (kept here as the baseline being measured)."""
    from amid_pipeline.capture.backends import right_padded

    ids, attention = right_padded(batch)
    logits = backend.model(input_ids=ids, attention_mask=attention).logits
    for i, seq in enumerate(batch):
        logprobs = torch.log_softmax(logits[i, : len(seq) - 1].float(), dim=-1)
        logprobs.topk(k, dim=-1)
        target = logprobs.gather(1, ids[i, 1 : len(seq)][:, None])
        (logprobs > target).sum(dim=-1)


def run_mode(mode: str, rows: int, draws: int) -> dict:
    from amid_pipeline.capture.backends import HFBackend, Sampling
    from amid_pipeline.models import smollm2_teacher

    data = sequences(rows)
    backend = HFBackend(str(smollm2_teacher()), k=64, dtype="float32", batch_tokens=8192)
    batches, batch, longest = [], [], 0
    for seq in data:  # the backend's own batching rule, for the baseline too
        if batch and (len(batch) + 1) * max(longest, len(seq)) > backend.batch_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(seq)
        longest = max(longest, len(seq))
    batches.append(batch)
    seeds = list(range(len(data)))

    @torch.no_grad()
    def score() -> None:
        if mode == "full":
            for b in batches:
                full_log_softmax_topk(backend, b, 64)
        elif mode == "chunked":
            backend.score(data)
        else:
            backend.score(data, sampling=Sampling(draws), seeds=seeds)

    score()  # warm-up
    with PeakRSS() as memory:
        seconds = median_seconds(score, repeats=3, warmup=0)
    tokens = sum(len(s) for s in data)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": memory.mib, "tokens": tokens}


def capture_bytes(work: Path, rows: int, kind: str, k: int, draws: int) -> dict:
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config
    from amid_pipeline.models import smollm2_teacher
    from amid_pipeline.shards.stats import collect_stats

    output = work / f"{kind}-{k if kind == 'topk' else draws}"
    started = time.perf_counter()
    run_capture(load_config(CaptureConfig, None, {
        "teacher": str(smollm2_teacher()), "dataset": str(ROOT / "data/jargon/train.jsonl"), "output": str(output),
        "limit": rows, "max_length": 256, "backend": "hf", "dtype": "float32", "progress": False,
        "target_kind": kind, "k": k, "draws": draws, "overwrite": True}))
    seconds = time.perf_counter() - started
    stats = collect_stats(output)
    summary = stats.summary()
    return {"seconds": seconds, "bytes_per_position": summary["bytes_per_position"],
            "distinct": summary.get("distinct_ids_per_position_mean", k), "mass": summary["topk_mass_mean"],
            "outside": summary["target_outside_topk"]}


def mass_outside_top(rows: int, top: int) -> tuple[float, float]:
    """(mean, 99th percentile) over every position of the teacher mass outside its ``top`` ids."""
    from amid_pipeline.capture.backends import HFBackend
    from amid_pipeline.models import smollm2_teacher

    backend = HFBackend(str(smollm2_teacher()), k=top, dtype="float32")
    outside = np.concatenate([1 - np.exp(s.topk_logprobs.astype(np.float64)).sum(axis=1)
                              for s in backend.score(sequences(rows))])
    return float(outside.mean()), float(np.quantile(outside, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--small-k", type=int, default=12)
    parser.add_argument("--sample-top", type=int, default=256)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.rows, args.draws)))
        return
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--rows", str(args.rows), "--draws", str(args.draws)]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    chunked = results["chunked"]
    print_table(f"Teacher scoring, SmolLM2-135M-Instruct fp32 on the CPU, {args.rows} jargon pairs "
                f"({chunked['tokens']} tokens), torch threads {torch.get_num_threads()}",
                ["scoring", "seconds", "tokens/s", "peak MiB", "throughput vs (b)", "memory vs (b)"],
                [[MODES[m], r["seconds"], round(r["tokens_per_s"]), round(r["peak_mib"]),
                  r["tokens_per_s"] / chunked["tokens_per_s"], r["peak_mib"] / max(chunked["peak_mib"], 1)]
                 for m, r in results.items()])
    work = Path(tempfile.mkdtemp())
    rows = []
    for kind, k, label in (("topk", 64, "top-64"), ("topk", args.small_k, f"top-{args.small_k}"),
                           ("sampled", args.draws, f"sampled, {args.draws} draws")):
        r = capture_bytes(work, args.rows, kind, k, args.draws)
        rows.append([label, r["seconds"], r["bytes_per_position"], r["distinct"], r["mass"], r["outside"]])
    print_table(f"cache-teacher end to end, {args.rows} jargon pairs, supervised positions, q64-delta",
                ["targets", "seconds", "bytes / position", "ids / position", "teacher mass on the ids",
                 "actual token outside the ids"], rows)
    mean, p99 = mass_outside_top(args.rows, args.sample_top)
    print_table(f"The vLLM path's truncation: teacher mass outside the top {args.sample_top} (never drawn)",
                ["mean", "99th percentile"], [[mean, p99]])


if __name__ == "__main__":
    main()
