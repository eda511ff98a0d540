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

import numpy as np
import pyarrow as pa

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
from amid_pipeline.shards.storage import Store, StorageError, retry


def read_file_header(store: Store, name: str) -> dict:
    """The header stored in one Parquet file's key-value metadata (refuses unknown versions)."""
    metadata = store.parquet(name).schema_arrow.metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise FormatError(f"{store.where(name)}: no amid-pipeline header in the Parquet metadata")
    header = json.loads(metadata[PARQUET_METADATA_KEY])
    check_version(header.get("format_version", "?"), store.where(name))
    return header


def iter_file_rows(store: Store, name: str, k: int, encoding: str, *, sha256: str | None = None,
                   keep: np.ndarray | None = None, columns: tuple[str, ...] = COLUMNS) -> Iterator:
    """Yield the rows of one file, decoding a row group at a time (remote reads retried per row group).

    ``keep``: ascending row indices to yield (a view's selection); default all. With ``columns`` other
    than all of :data:`COLUMNS` the raw Arrow tables of the row groups are yielded instead of rows.
    """
    parquet = store.parquet(name, sha256)
    missing = [column for column in columns if column not in parquet.schema_arrow.names]
    if missing:
        raise FormatError(f"{store.where(name)}: missing columns {missing}")
    group_start = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        chosen = None if keep is None else keep[(keep >= group_start) & (keep < group_start + group_rows)] - group_start
        group_start += group_rows
        if chosen is not None and not len(chosen):
            continue
        table = retry(lambda: parquet.read_row_group(group, columns=list(columns), use_threads=False),
                      f"{store.where(name)} (row group {group})")
        if chosen is not None:
            table = table.take(chosen)
        if columns == COLUMNS:
            yield from decode_batch(table, k, encoding)
        else:
            yield table


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
        directory: a local path or fsspec URL of a directory with a ``manifest.json`` (or a complete set of
            worker manifests, or a combined/subset view), or its already loaded :class:`Manifest`.
        files: optional subset/order of file names (e.g. a rank's partition); default all, sorted.
    """

    def __init__(self, directory: str | os.PathLike | Manifest, files: Iterable[str] | None = None) -> None:
        self.manifest: Manifest = directory if isinstance(directory, Manifest) else load_manifest(directory)
        self.store = self.manifest.store
        known = {record.name: record for record in self.manifest.files}
        names = list(files) if files is not None else list(known)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise FormatError(f"{self.store.url}: files not in the manifest: {unknown}")
        self.files: list[FileRecord] = [known[name] for name in names]

    @property
    def header(self) -> dict:
        return self.manifest.header

    def __len__(self) -> int:
        return sum(record.rows for record in self.files)

    def __iter__(self) -> Iterator[TeacherRow]:
        for record in self.files:
            yield from self.iter_file(record)

    def iter_file(self, record: FileRecord, columns: tuple[str, ...] = COLUMNS) -> Iterator:
        """The rows of one listed file (only the selected ones in a view); see :func:`iter_file_rows`."""
        where = self.store.where(record.name)
        keep = None if self.manifest.selection is None else self.manifest.selection.get(record.name, np.zeros(0, int))
        try:
            yield from iter_file_rows(self.store, record.name, self.manifest.k, self.manifest.value_encoding,
                                      sha256=record.sha256, keep=keep, columns=columns)
        except FileNotFoundError as exc:
            raise FormatError(f"{where}: listed in the manifest but missing") from exc
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, StorageError):
                raise
            raise FormatError(f"{where}: unreadable Parquet data ({exc}); run `amid-pipeline verify`") from exc
