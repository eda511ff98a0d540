"""Sampled targets on vLLM: draws from the engine's top ``--sample-top`` K against draws from the whole vocabulary.

    python benchmarks/vllm_draws.py [--rows 32] [--draws 24] [--tops 256 1024 4096 49152] [--dtype float32]

Every capture is ``cache-teacher -c stages/cache_teacher_jargon_sampled.toml`` on the first ``--rows`` training
pairs with SmolLM2-135M-Instruct, in a process of its own (one vLLM engine each): vLLM top-20 (the top-k kind:
what the engine costs without draws), vLLM sampled from the engine's top K for each of ``--tops`` (K = the
vocabulary, 49,152: every id, so the draws are exact), and hf sampled (exact: the reference). Each run gives
its wall time (the process, engine start included), its peak resident memory and its capture throughput (the
summary's tokens/s), also relative to vLLM top-20; a run that fails (e.g. killed out of memory) is reported as such.

The bias of a top-K run: its draws come from the top K renormalised, so in expectation p̂ moves the teacher mass
beyond the top K onto the top K; that mass (mean and 99th percentile over every position of the same rows,
from an hf float32 scoring) is the total-variation distance between E p̂ and p. And a coupling check: both
backends draw with the same uniforms (seeded by sample id), so where the engine's top holds the whole vocabulary
they draw the same ids except where float32 differences between the two engines move a CDF boundary past a
uniform; the share of positions with identical draws to the hf run, and the mean total-variation distance
between the two runs' p̂ = c / N, show that (with K below the vocabulary the renormalised CDF shifts every
boundary, so most positions draw other ids: a different, not necessarily a worse, sample).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402
from sampled_targets import mass_outside_top  # noqa: E402

from amid_pipeline.models import smollm2_teacher  # noqa: E402
from amid_pipeline.shards.reader import ShardReader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "cache_teacher_jargon_sampled.toml"
VOCABULARY = 49152  # SmolLM2's head


def capture(output: Path, args, *options: str) -> dict:
    """One cache-teacher process: its wall time, peak resident memory and the summary's tokens/s."""
    command = [sys.executable, "-m", "amid_pipeline", "cache-teacher", "-c", str(STAGE), "--teacher",
               str(smollm2_teacher()), "--dtype", args.dtype, "--limit", str(args.rows), "--draws", str(args.draws),
               "--output", str(output), "--no-progress", *options]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=os.environ)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory (ru_maxrss, KiB)
        log.seek(0)
        text = log.read()
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code:
        return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "failed": f"exit {code}" if code > 0 else
                f"killed by signal {-code}"}
    rate = re.search(r"tokens/s \(this run\)\s+(\d+)", text)
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "tokens_per_s": int(rate.group(1))}


def empirical(row) -> list[dict[int, float]]:
    """Per stored position, {id: p̂ = c / N} over the ids it drew."""
    total = row.sampled_counts.sum(axis=1, keepdims=True)
    return [dict(zip(ids[c > 0].tolist(), (c[c > 0] / n).tolist()))
            for ids, c, n in zip(row.topk_ids, row.sampled_counts, total[:, 0])]


def agreement(found: Path, reference: Path) -> tuple[float, float]:
    """(share of positions drawing the same ids the same number of times, mean total-variation distance of p̂)."""
    same, distance = [], []
    reference_rows = {row.sample_id: row for row in ShardReader(reference)}
    for row in ShardReader(found):
        for mine, theirs in zip(empirical(row), empirical(reference_rows[row.sample_id])):
            same.append(mine == theirs)
            distance.append(0.5 * sum(abs(mine.get(i, 0.0) - theirs.get(i, 0.0)) for i in set(mine) | set(theirs)))
    return float(np.mean(same)), float(np.mean(distance))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--tops", type=int, nargs="+", default=[256, 1024, 4096, 49152])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        baseline = capture(work / "vllm-top20", args, "--backend", "vllm", "--target-kind", "topk", "--k", "20")
        runs = {"vLLM top-20 (top-k kind)": (baseline, None, None)}
        for top in args.tops:
            runs[f"vLLM sampled, top {top:,}"] = (capture(work / f"vllm-{top}", args, "--backend", "vllm",
                                                          "--sample-top", str(top)), work / f"vllm-{top}", top)
        runs["hf sampled (full vocabulary)"] = (capture(work / "hf", args, "--backend", "hf"), work / "hf", None)
        rows = []
        for label, (result, directory, top) in runs.items():
            beyond = "" if directory is None else "0 (exact)" if top is None or top >= VOCABULARY else \
                "{:.3f} (p99 {:.3f})".format(*mass_outside_top(args.rows, top))
            if "failed" in result:
                rows.append([label, round(result["seconds"], 1), round(result["peak_mib"]), result["failed"], "",
                             beyond, "", ""])
                continue
            same, distance = agreement(directory, work / "hf") if directory else ("", "")
            rows.append([label, round(result["seconds"], 1), round(result["peak_mib"]), result["tokens_per_s"],
                         round(result["tokens_per_s"] / baseline["tokens_per_s"], 2), beyond, same, distance])
            print(rows[-1], flush=True)
    print_table(f"Sampled targets on vLLM: {args.rows} jargon pairs, {args.draws} draws, SmolLM2-135M-Instruct "
                f"{args.dtype}", ["capture", "process s", "peak MiB", "tokens/s", "throughput vs vLLM top-20",
                                  "mass beyond the top K (bias)", "positions with the hf draws", "mean TV(p̂, p̂ hf)"],
                rows)


if __name__ == "__main__":
    main()
