"""Bytes per position of a sampled shard directory as written, and re-encoded in layouts not (yet) built.

    python benchmarks/sampled_layouts.py runs/jargon-smollm2-sampled24

Each file's rows are rewritten in memory with the writer's Parquet settings (zstd level 1, the same column
encodings, page checksums) and the bytes divided by the stored positions:

- ``padded`` (format 1.1 as built): ``k = N`` slots per position; unused slots repeat the first id, with
  log-probability −inf (q64-delta: one large delta, then zeros) and count 0.
- ``constant pads``: the same shape, unused slots hold the last used id and a constant delta (65535, then 0),
  which every 1.1 reader already decodes as −inf.
- ``compact``: only the used slots in ``topk_ids`` / ``topk_logprobs`` / ``sampled_counts``, plus
  ``sampled_distinct`` [P] uint8, the number of distinct ids per position. Its top-k columns are no longer
  ``P · k`` long, so a 1.x reader could not read them as top-k: it would be a major format change.
- ``compact, counts only``: ``compact`` without the log-probabilities (enough for ``--support sampled``'s
  forward KL, not for the supports that need the teacher's probabilities).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amid_pipeline.shards.schema import Q64_NEG_INF
from amid_pipeline.shards.writer import COLUMN_ENCODINGS


def parquet_bytes(table: pa.Table) -> int:
    """Size of ``table`` written as one row group with the shard writer's settings."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=1, use_dictionary=False,
                   column_encoding={path: encoding for path, encoding in COLUMN_ENCODINGS.items()
                                    if path.split(".")[0] in table.column_names},
                   write_page_checksum=True, store_schema=True, row_group_size=len(table))
    return buffer.getbuffer().nbytes


def list_column(values: np.ndarray, offsets: np.ndarray, kind: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, kind))


def layouts(table: pa.Table) -> dict[str, pa.Table]:
    """The file's rows in each layout of the module docstring."""
    per_row = np.array([len(p) for p in table.column("positions").to_pylist()])
    ids, logprobs, counts = (table.column(n).combine_chunks() for n in ("topk_ids", "topk_logprobs", "sampled_counts"))
    k = len(ids.values) // int(per_row.sum())
    id_values = ids.values.to_numpy().reshape(-1, k)
    deltas = logprobs.values.to_numpy().reshape(-1, k)
    count_values = counts.values.to_numpy().reshape(-1, k)
    used = count_values > 0
    slot_offsets = ids.offsets.to_numpy()

    first_unused = ~used & np.concatenate([np.ones((len(used), 1), bool), used[:, :-1]], axis=1)
    last_used = np.maximum.accumulate(np.where(used, np.arange(k), 0), axis=1)
    constant = table.set_column(table.column_names.index("topk_ids"), "topk_ids", list_column(
        np.take_along_axis(id_values, last_used, 1).reshape(-1), slot_offsets, ids.values.type))
    constant = constant.set_column(constant.column_names.index("topk_logprobs"), "topk_logprobs", list_column(
        np.where(first_unused, Q64_NEG_INF, np.where(used, deltas, 0)).astype(deltas.dtype).reshape(-1), slot_offsets,
        logprobs.values.type))

    position_offsets = np.concatenate([[0], np.cumsum(per_row)])
    used_offsets = np.concatenate([[0], np.cumsum(used.sum(axis=1))])[position_offsets]
    compact = table
    for name, values, kind in (("topk_ids", id_values, ids.values.type), ("topk_logprobs", deltas, logprobs.values.type),
                               ("sampled_counts", count_values, counts.values.type)):
        compact = compact.set_column(compact.column_names.index(name), name, list_column(values[used], used_offsets, kind))
    compact = compact.append_column("sampled_distinct", list_column(used.sum(axis=1).astype(np.uint8), position_offsets,
                                                                     pa.uint8()))
    return {"padded (1.1 as built)": table, "constant pads": constant, "compact": compact,
            "compact, counts only": compact.drop(["topk_logprobs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="a shard directory of the sampled kind")
    args = parser.parse_args()
    totals: dict[str, int] = {}
    positions = distinct = 0
    for path in sorted((args.shards / "data").glob("*.parquet")):
        table = pq.read_table(path)
        positions += sum(len(p) for p in table.column("positions").to_pylist())
        distinct += int((table.column("sampled_counts").combine_chunks().values.to_numpy() > 0).sum())
        for name, rewritten in layouts(table).items():
            totals[name] = totals.get(name, 0) + parquet_bytes(rewritten)
    print(f"{args.shards}: {positions:,} positions, {distinct / positions:.2f} distinct ids per position")
    for name, size in totals.items():
        print(f"  {name:24s} {size / positions:6.1f} bytes/position")


if __name__ == "__main__":
    main()
