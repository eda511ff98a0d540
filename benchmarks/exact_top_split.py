"""How to split a sampled shard's slots between an exact top and draws: bytes against estimator variance.

    python benchmarks/exact_top_split.py [--teacher runs/sft-teacher-jargon/model] [--rows 64] \\
        [--splits 0+24 0+16 2+12 4+8 ...] [--dtype float32]

For each split m+N (``--exact-top m --draws N``), cache-teacher writes the first ``--rows`` training pairs
with the recipe's sampled stage settings (``stages/cache_teacher_jargon_sampled.toml``: hf backend, bf16
unless ``--dtype`` says otherwise, q64-delta, the compact layout) and the table gives its bytes per stored
position (and those of the same rows written in the padded layout), ids per position and wall time, beside
top-``--top-k`` of the same rows on the same backend (bytes and capture throughput of the top-k kind). A top-4096
capture of the same rows (float32 values) gives the exact variance of what training gets from each split:
with p̂ the weights training uses, forward KL's gradient w.r.t. the student's logits is q − p̂, so its
variance per position is E‖p̂ − p‖² = Σ_{j ∉ top} p_j (R − p_j) / N with R = 1 − Σ_top p (m = 0: R = 1),
the teacher mass beyond the 4096 ids counted at its bound ρ·R / N; and the expected number of distinct
ids is m + Σ_{j ∉ top} (1 − (1 − p_j / R)^N). Means over positions; variance also relative to the first split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402
from sampled_layouts import in_layout, rewrite  # noqa: E402

from amid_pipeline.capture.config import CaptureConfig  # noqa: E402
from amid_pipeline.capture.run import run_capture  # noqa: E402
from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.shards.reader import ShardReader  # noqa: E402
from amid_pipeline.shards.stats import collect_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "cache_teacher_jargon_sampled.toml"
TOP = 4096


def capture(args, output: Path, **settings):
    config = load_config(CaptureConfig, str(STAGE), {"teacher": args.teacher, "output": str(output),
                                                     "limit": args.rows, "progress": False, "dtype": args.dtype,
                                                     **settings})
    return run_capture(config)


def sorted_probabilities(args, work: Path) -> np.ndarray:
    """[positions, TOP] float64 teacher probabilities in descending order (supervised positions)."""
    capture(args, work / "top", target_kind="topk", k=TOP, value_encoding="float32")
    return np.concatenate([np.exp(row.topk_logprobs.astype(np.float64)) for row in ShardReader(work / "top")])


def variance_and_ids(p: np.ndarray, exact_top: int, draws: int) -> tuple[float, float]:
    """(mean E‖p̂ − p‖², mean expected distinct ids) over positions, for p [positions, TOP] descending."""
    beyond = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    rest = 1.0 - p[:, :exact_top].sum(axis=1)
    tail = p[:, exact_top:]
    variance = ((tail * (rest[:, None] - tail)).sum(axis=1) + beyond * rest) / draws
    ids = exact_top + (1.0 - (1.0 - tail / rest[:, None]) ** draws).sum(axis=1)
    return float(variance.mean()), float(ids.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/sft-teacher-jargon/model")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="the teacher's compute dtype (float32 on a CPU that "
                        "emulates bfloat16)")
    parser.add_argument("--top-k", type=int, default=20, help="the top-k capture to compare bytes and throughput with")
    parser.add_argument("--splits", nargs="+", default=["0+24", "0+16", "0+12", "1+12", "2+12", "2+16", "4+8", "4+12", "8+8"],
                        help="exact_top+draws")
    args = parser.parse_args()
    rows, baseline = [], None
    with tempfile.TemporaryDirectory() as work:
        p = sorted_probabilities(args, Path(work))
        top_k = capture(args, Path(work) / "top-k", target_kind="topk", k=args.top_k)
        rows.append([f"top-{args.top_k} (top-k kind)", args.top_k, round(top_k.bytes / top_k.positions, 1), "", args.top_k,
                     "", "", "", round(top_k.seconds, 1)])
        for split in args.splits:
            exact_top, draws = (int(x) for x in split.split("+"))
            summary = capture(args, Path(work) / split, draws=draws, exact_top=exact_top)
            stats = collect_stats(Path(work) / split).summary()
            shards = ShardReader(Path(work) / split)
            padded = rewrite(shards, in_layout(shards.header, "padded"), Path(work) / f"{split}-padded")["all"]
            variance, expected_ids = variance_and_ids(p, exact_top, draws)
            baseline = baseline or variance
            rows.append([split, exact_top + draws, round(summary.bytes / summary.positions, 1),
                         round(padded / summary.positions, 1),
                         stats["distinct_ids_per_position_mean"], round(expected_ids, 2), f"{variance:.4f}",
                         round(variance / baseline, 3), round(summary.seconds, 1)])
            print(rows[-1], flush=True)
    print_table(f"Exact top + draws: {args.rows} training rows, {len(p):,} supervised positions, teacher {args.teacher}",
                ["exact top + draws", "slots", "bytes / position", "bytes / position, padded", "ids / position",
                 "expected ids",
                 "E‖p̂ − p‖²", f"vs {args.splits[0]}", "capture s"], rows)


if __name__ == "__main__":
    main()
