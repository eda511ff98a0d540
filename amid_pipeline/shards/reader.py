"""ShardReader: stream decoded teacher rows from a shard directory, one row group at a time.

Nothing loads a whole file: each Parquet row group is read, its list columns are decoded in one
vectorised pass (flat values + offsets), and rows are yielded as numpy views into those buffers.

    reader = ShardReader("shards/")
    for row in reader:            # TeacherRow, see amid_pipeline.shards.schema
        row.topk_ids              # [P, k] uint16 or int32
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amid_pipeline.shards.manifest import FileRecord, Manifest, load_manifest
from amid_pipeline.shards.schema import (
    COLUMNS,
    PARQUET_METADATA_KEY,
    FormatError,
    TeacherRow,
    check_version,
    decode_target_logprobs,
    decode_topk_logprobs,
)


def read_file_header(path: str | os.PathLike) -> dict:
    """The header stored in one Parquet file's key-value metadata (refuses unknown versions)."""
    metadata = pq.read_schema(path).metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise FormatError(f"{path}: no amid-pipeline header in the Parquet metadata")
    header = json.loads(metadata[PARQUET_METADATA_KEY])
    check_version(header.get("format_version", "?"), str(path))
    return header


def iter_file_rows(path: str | os.PathLike, k: int, encoding: str) -> Iterator[TeacherRow]:
    """Yield the rows of one file, decoding a row group at a time."""
    parquet = pq.ParquetFile(path, memory_map=True)
    missing = [name for name in COLUMNS if name not in parquet.schema_arrow.names]
    if missing:
        raise FormatError(f"{path}: missing columns {missing}")
    for group in range(parquet.num_row_groups):
        yield from decode_batch(parquet.read_row_group(group, columns=list(COLUMNS), use_threads=False), k, encoding)


def decode_batch(table: pa.Table | pa.RecordBatch, k: int, encoding: str) -> Iterator[TeacherRow]:
    """Rows of an Arrow table/batch with the v1 columns, as :class:`TeacherRow` views."""
    flat: dict[str, np.ndarray] = {}
    offsets: dict[str, np.ndarray] = {}
    for name in COLUMNS[1:]:
        column = table.column(name)
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets[name] = array.offsets.to_numpy()  # indexes into .values (zero-copy, unlike flatten())
        flat[name] = array.values.to_numpy(zero_copy_only=False)
    topk_logprobs = decode_topk_logprobs(flat["topk_logprobs"], k, encoding)
    target_logprob = decode_target_logprobs(flat["target_logprob"], encoding)
    ids = table.column("sample_id").to_pylist()
    tokens, pos = offsets["input_ids"], offsets["positions"]
    for i, sample_id in enumerate(ids):
        a, b = pos[i], pos[i + 1]
        yield TeacherRow(
            sample_id=sample_id,
            input_ids=flat["input_ids"][tokens[i] : tokens[i + 1]],
            positions=flat["positions"][a:b],
            loss_mask=flat["loss_mask"][a:b],
            topk_ids=flat["topk_ids"][a * k : b * k].reshape(b - a, k),
            topk_logprobs=topk_logprobs[a * k : b * k].reshape(b - a, k),
            target_logprob=target_logprob[a:b],
            target_rank=flat["target_rank"][a:b],
        )


class ShardReader:
    """Iterate the rows of one shard directory (or a subset of its files), in file order.

    Args:
        directory: a directory with a ``manifest.json`` (or a complete set of worker manifests).
        files: optional subset/order of file names (e.g. a rank's partition); default all, sorted.
    """

    def __init__(self, directory: str | os.PathLike, files: Iterable[str] | None = None) -> None:
        self.manifest: Manifest = load_manifest(directory)
        self.directory = Path(directory)
        known = {record.name: record for record in self.manifest.files}
        names = list(files) if files is not None else list(known)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise FormatError(f"{self.directory}: files not in the manifest: {unknown}")
        self.files: list[FileRecord] = [known[name] for name in names]

    @property
    def header(self) -> dict:
        return self.manifest.header

    def __len__(self) -> int:
        return sum(record.rows for record in self.files)

    def __iter__(self) -> Iterator[TeacherRow]:
        for record in self.files:
            yield from self.iter_file(record.name)

    def iter_file(self, name: str) -> Iterator[TeacherRow]:
        path = self.directory / name
        if not path.exists():
            raise FormatError(f"{path}: listed in the manifest but missing")
        try:
            yield from iter_file_rows(path, self.manifest.k, self.manifest.value_encoding)
        except (OSError, pa.ArrowException) as exc:
            raise FormatError(f"{path}: unreadable Parquet data ({exc}); run `amid-pipeline verify`") from exc
