"""Shard size and reader throughput on real teacher output (SmolLM2-135M-Instruct, data/jargon).

    python benchmarks/shard_format.py [--rows 120] [--max-length 256]

For k = 16 and 64 it prints bytes per stored position and per (id, value) entry, and the largest
log-probability error, for the v1 layouts (value encodings q64-delta, q64, float32) next to the naive
layout (int32 ids + float32 values, plain, zstd); then the reader's decode rate at k = 64 on one core and
the share of it spent on the integrity checks every read makes (page CRC32, decoded values).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_seconds, print_table  # noqa: E402

from amid_pipeline.models import smollm2_teacher, tokenizer_fingerprint  # noqa: E402
from amid_pipeline.shards.manifest import Header, write_manifest  # noqa: E402
from amid_pipeline.shards.reader import ShardReader  # noqa: E402
from amid_pipeline.shards.schema import TeacherRow, first_impossible_value  # noqa: E402
from amid_pipeline.shards.writer import ShardWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def teacher_rows(rows: int, max_length: int, k_max: int) -> tuple[list[TeacherRow], dict, int]:
    """Teacher-force SmolLM2 over jargon pairs; every position stored, top-``k_max`` in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_teacher()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with open(ROOT / "data" / "jargon" / "train.jsonl") as f:
        pairs = [json.loads(line) for line, _ in zip(f, range(rows))]
    with torch.no_grad():
        for pair in pairs:
            ids = tokenizer(pair["prompt"] + "\n" + pair["response"]).input_ids[:max_length]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
            values, top = logprobs.topk(k_max, dim=-1)
            targets = torch.tensor(ids[1:])
            target_lp = logprobs.gather(1, targets[:, None])[:, 0]
            out.append(
                TeacherRow(
                    sample_id=pair["id"],
                    input_ids=np.asarray(ids, dtype=np.int32),
                    positions=np.arange(len(ids) - 1, dtype=np.int32),
                    loss_mask=np.ones(len(ids) - 1, dtype=bool),
                    topk_ids=top.numpy().astype(np.int32),
                    topk_logprobs=values.numpy(),
                    target_logprob=target_lp.numpy(),
                    target_rank=(1 + (logprobs > target_lp[:, None]).sum(-1)).numpy().astype(np.int32),
                )
            )
    return out, tokenizer_fingerprint(tokenizer), model.config.vocab_size


def truncate(row: TeacherRow, k: int) -> TeacherRow:
    return TeacherRow(row.sample_id, row.input_ids, row.positions, row.loss_mask, row.topk_ids[:, :k],
                      row.topk_logprobs[:, :k], row.target_logprob, row.target_rank)


def write_v1(directory: Path, rows: list[TeacherRow], k: int, encoding: str, tokenizer: dict, vocab: int) -> int:
    header = Header(teacher={"name_or_path": "SmolLM2-135M-Instruct"}, tokenizer=tokenizer,
                         model_vocab_size=vocab, k=k, value_encoding=encoding, backend={"name": "hf"})
    with ShardWriter(directory, header=header, rows_per_file=10**6) as writer:
        for row in rows:
            writer.add(truncate(row, k))
    write_manifest(directory, header, writer.committed)
    return sum(r.bytes for r in writer.committed)


def write_naive(path: Path, rows: list[TeacherRow], k: int) -> int:
    """The layout most hand-rolled scripts use: int32 ids + float32 values, default encodings, zstd."""
    table = pa.table({
        "input_ids": [r.input_ids for r in rows],
        "topk_ids": [r.topk_ids[:, :k].reshape(-1) for r in rows],
        "topk_logprobs": [r.topk_logprobs[:, :k].reshape(-1) for r in rows],
    })
    pq.write_table(table, path, compression="zstd")
    return path.stat().st_size


def max_error(directory: Path, rows: list[TeacherRow], k: int) -> float:
    worst = 0.0
    for source, found in zip(rows, ShardReader(directory)):
        assert np.array_equal(found.topk_ids, source.topk_ids[:, :k])
        worst = max(worst, float(np.max(np.abs(found.topk_logprobs - source.topk_logprobs[:, :k]), initial=0)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--replicate", type=int, default=20, help="copies of the data for the throughput run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, tokenizer, vocab = teacher_rows(args.rows, args.max_length, 64)
    positions = sum(len(r.positions) for r in rows)
    print(f"SmolLM2-135M-Instruct teacher, {len(rows)} sequences, {positions} stored positions, vocab {vocab}")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in (16, 64):
            entries = positions * k
            naive = write_naive(tmp / f"naive{k}.parquet", rows, k)
            table.append(["naive int32 + float32 + zstd", k, naive / positions, naive / entries, 0.0, 1.0])
            for encoding in ("q64-delta", "q64", "float32"):
                directory = tmp / f"{encoding}-{k}"
                size = write_v1(directory, rows, k, encoding, tokenizer, vocab)
                table.append([f"v1 {encoding}", k, size / positions, size / entries, max_error(directory, rows, k),
                              size / naive])
        print_table("Shard size on real teacher output", ["layout", "k", "bytes/position", "bytes/entry",
                                                           "max |logprob error|", "size vs naive"], table)

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        torch.set_num_threads(1)
        big = tmp / "throughput"
        write_v1(big, [r for _ in range(args.replicate) for r in rows], 64, "q64-delta", tokenizer, vocab)
        total = positions * args.replicate

        def read_all() -> int:
            count = 0
            for row in ShardReader(big):
                count += row.topk_logprobs.shape[0]
            return count

        seconds = median_seconds(read_all, repeats=3)
        print_table("Reader decode throughput, k = 64, one core", ["positions", "seconds", "positions/s"],
                    [[total, seconds, f"{total / seconds:,.0f}"]])

        # What the integrity checks of every read cost (measured apart, in the same run): page CRC32
        # verification (Parquet reads with and without it) and the decoded-value check.
        files = sorted((big / "data").glob("*.parquet"))

        def read_pages(verify: bool) -> int:
            for path in files:
                parquet = pq.ParquetFile(path, memory_map=True, page_checksum_verification=verify)
                for group in range(parquet.num_row_groups):
                    parquet.read_row_group(group, use_threads=False)
            return len(files)

        decoded = list(ShardReader(big))
        topk = np.concatenate([row.topk_logprobs.reshape(-1) for row in decoded])
        target = np.concatenate([row.target_logprob for row in decoded])
        crc_on, crc_off = median_seconds(lambda: read_pages(True), repeats=21), median_seconds(lambda: read_pages(False), repeats=21)
        values = median_seconds(lambda: first_impossible_value(topk, 64, target, "q64-delta"), repeats=5)
        share = (max(crc_on - crc_off, 0.0) + values) / seconds
        print_table("Integrity checks on every read, k = 64, one core", ["check", "seconds", "share of decode time"], [
            ["page CRC32 (Parquet read with - without)", f"{crc_on:.4f} - {crc_off:.4f}", f"{(crc_on - crc_off) / seconds:.1%}"],
            ["decoded values (NaN, > 0, top-1 -inf)", f"{values:.4f}", f"{values / seconds:.1%}"],
            ["both", "", f"{share:.1%}"],
        ])


if __name__ == "__main__":
    main()
