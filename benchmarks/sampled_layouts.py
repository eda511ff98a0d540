"""Bytes per position of a sampled shard directory in each layout, as the shard writer writes them.

    python benchmarks/sampled_layouts.py runs/jargon-smollm2-sampled24

Reads the directory's rows (either layout) and writes them again into temporary folders with the shard writer,
file by file (the same rows per file, its default row groups): ``padded`` (format 1.2: exact_top + draws slots per
position in the top-k columns, unused ones repeating the first id with −inf and count 0) and ``compact`` (1.3: the
exact top in the top-k columns, the distinct draws in columns of their own). Both decode to the same rows; the
table gives bytes per stored position: whole files (footers included) and each column group's compressed pages,
and how fast the reader decodes each (thousand stored positions per second, one pass after another, the better).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.shards.manifest import Header, load_manifest, write_manifest  # noqa: E402
from amid_pipeline.shards.reader import ShardReader  # noqa: E402
from amid_pipeline.shards.writer import ShardWriter  # noqa: E402

GROUPS = {"ids": ("topk_ids", "draw_ids"), "log-probabilities": ("topk_logprobs", "draw_logprobs"),
          "counts": ("sampled_counts", "draw_counts", "draw_distinct")}


def in_layout(header: Header, layout: str) -> Header:
    """``header`` with its draws stored in ``layout``."""
    k = header.exact_top if layout == "compact" else header.exact_top + header.draws
    return dataclasses.replace(header, k=k, sampling=dataclasses.replace(header.sampling, layout=layout))


def rewrite(source: ShardReader, header: Header, directory: Path) -> dict[str, int]:
    """Write ``source``'s rows file by file under ``header`` (with a manifest); bytes in all and per column group."""
    sizes = dict.fromkeys(("all", *GROUPS, "other columns"), 0)
    with ShardWriter(directory, header=header, rows_per_file=1 << 62) as writer:
        for record in source.files:
            for row in source.iter_file(record):
                writer.add(row)
            writer.commit_file()
    write_manifest(directory, header, writer.committed)
    for record in writer.committed:
        metadata = pq.ParquetFile(directory / record.name).metadata
        sizes["all"] += record.bytes
        for group in range(metadata.num_row_groups):
            for i in range(metadata.num_columns):
                column = metadata.row_group(group).column(i)
                name = column.path_in_schema.split(".")[0]
                kind = next((g for g, names in GROUPS.items() if name in names), "other columns")
                sizes[kind] += column.total_compressed_size
    return sizes


def read_rate(directory: Path) -> float:
    """Stored positions the reader decodes per second (checks included), the better of two passes."""
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        positions = sum(len(row.positions) for row in ShardReader(directory))
        best = max(best, positions / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="a shard directory of the sampled kind")
    args = parser.parse_args()
    manifest = load_manifest(args.shards)
    if manifest.header.target_kind != "sampled":
        raise SystemExit(f"{args.shards} holds {manifest.header.target_kind} targets, not sampled ones")
    positions = manifest.totals["positions"]
    reader, rows = ShardReader(manifest), []
    with tempfile.TemporaryDirectory() as work:
        for layout in ("padded", "compact"):
            sizes = rewrite(reader, in_layout(manifest.header, layout), Path(work) / layout)
            rows.append([layout, *(round(size / positions, 1) for size in sizes.values()),
                         round(read_rate(Path(work) / layout) / 1e3)])
    rows.append(["compact / padded", *(round(c / p, 3) if p else "" for p, c in zip(rows[0][1:], rows[1][1:]))])
    print_table(f"{args.shards}: {positions:,} stored positions, exact top {manifest.header.exact_top}, "
                f"{manifest.header.draws} draws (bytes per position)",
                ["layout", "files (all)", *GROUPS, "other columns", "read, k positions/s"], rows)


if __name__ == "__main__":
    main()
