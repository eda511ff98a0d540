"""ShardWriter: rows -> zstd Parquet files, each committed by rename only when complete.

Files go to ``DIR/data/``. A file is written as ``data/.NAME.parquet.tmp``, flushed, fsynced, hashed and renamed
to ``NAME.parquet``; on remote storage (an fsspec URL) it is written to a local temporary file, hashed and then
uploaded in one piece (see :mod:`amid_pipeline.shards.storage`). The manifest (see
:mod:`amid_pipeline.shards.manifest`) is written by the caller after the last file. A crash leaves at most a
``.tmp`` file, which readers and ``verify`` never take for data.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amid_pipeline.shards.manifest import FileRecord, Header
from amid_pipeline.shards.schema import (
    COLUMN_ENCODINGS,
    DATA_DIR,
    DATA_SUFFIX,
    PARQUET_METADATA_KEY,
    TeacherRow,
    arrow_schema,
    encode_target_logprobs,
)
from amid_pipeline.shards.storage import open_store, sha256_of
from amid_pipeline.shards.targets import Sampling, encode_slots, stored_columns


class ShardWriter:
    """Write :class:`TeacherRow` objects into Parquet files named ``{stem}-{index:05d}.parquet``.

    Args (keyword-only after ``directory``):
        header: the directory's :class:`Header`; stored in every file's metadata.
        stem: file-name prefix, unique per writer (e.g. ``part-w00000``).
        rows_per_file: rows after which a file is committed and a new one started.
        rows_per_group: rows per Parquet row group (the reader's streaming unit).
        compression_level: zstd level.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        header: Header,
        stem: str = "part",
        rows_per_file: int = 4096,
        rows_per_group: int = 256,
        compression_level: int = 1,
    ) -> None:
        if rows_per_file < 1 or rows_per_group < 1:
            raise ValueError("rows_per_file and rows_per_group must be >= 1")
        self.store = open_store(directory)
        self.store.makedirs(DATA_DIR)
        self.header = header
        self.encoding = header.value_encoding
        self.vocab_size = header.model_vocab_size
        self.schema = arrow_schema(self.encoding, self.vocab_size, stored_columns(header.sampling)).with_metadata(
            {PARQUET_METADATA_KEY: json.dumps(header.to_json(), sort_keys=True).encode()}
        )
        self.stem = stem
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.compression_level = compression_level
        self.next_index = 0  # index of the next file; a resumed capture sets it to continue the numbering
        self.committed: list[FileRecord] = []
        self._pending: list[TeacherRow] = []
        self._file: pq.ParquetWriter | None = None
        self._file_rows = self._file_positions = self._file_supervised = 0

    def add(self, row: TeacherRow) -> FileRecord | None:
        """Buffer one row; returns the record of a file committed by this call, if any."""
        row.check(self.header.slots, self.vocab_size, self.header.draws, self.header.exact_top)
        self._pending.append(row)
        if len(self._pending) >= self.rows_per_group:
            self._flush_group()
        if self._file_rows + len(self._pending) >= self.rows_per_file:
            return self.commit_file()
        return None

    def commit_file(self) -> FileRecord | None:
        """Finish the current file (if it has rows): close, fsync, hash, rename. Returns its record."""
        self._flush_group()
        if self._file is None:
            return None
        self._file.close()
        self._file = None
        name = self._file_name(self.next_index)
        tmp = self._tmp_path(self.next_index)
        with open(tmp, "rb") as f:
            digest = sha256_of(f)
        record = FileRecord(
            name=name,
            rows=self._file_rows,
            positions=self._file_positions,
            supervised_tokens=self._file_supervised,
            bytes=os.path.getsize(tmp),
            sha256=digest,
        )
        self.store.commit(tmp, name)
        self.committed.append(record)
        self.next_index += 1
        self._file_rows = self._file_positions = self._file_supervised = 0
        return record

    def close(self) -> list[FileRecord]:
        """Commit what is buffered and return every file this writer committed."""
        self.commit_file()
        return list(self.committed)

    def abort(self) -> None:
        """Drop the unfinished file (its ``.tmp`` is removed); committed files stay."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending.clear()
        tmp = self._tmp_path(self.next_index)
        if os.path.exists(tmp):
            os.unlink(tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _file_name(self, index: int) -> str:
        return f"{DATA_DIR}/{self.stem}-{index:05d}{DATA_SUFFIX}"

    def _tmp_path(self, index: int) -> str:
        return self.store.staging_path(self._file_name(index))

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._file is None:
            tmp = self._tmp_path(self.next_index)
            self._file = pq.ParquetWriter(
                tmp,
                self.schema,
                compression="zstd",
                compression_level=self.compression_level,
                use_dictionary=False,
                column_encoding=COLUMN_ENCODINGS,
                write_statistics=["sample_id"],
                write_page_checksum=True,  # CRC32 per page, verified on every read (Store.parquet)
                store_schema=True,
            )
        rows = self._pending
        self._file.write_table(rows_to_table(rows, self.schema, self.encoding, self.header.sampling),
                               row_group_size=len(rows))
        self._file_rows += len(rows)
        self._file_positions += sum(len(r.positions) for r in rows)
        self._file_supervised += sum(int(np.count_nonzero(r.loss_mask)) for r in rows)
        self._pending = []


def rows_to_table(rows: list[TeacherRow], schema: pa.Schema, encoding: str, sampling: Sampling | None = None) -> pa.Table:
    """Columnar Arrow table of ``rows``: each list column built from one concatenated buffer + offsets; the
    slots stored as the target kind (``sampling``: None for top-k) and its layout store them (:func:`encode_slots`)."""

    def list_column(name: str, arrays: list[np.ndarray], dtype) -> pa.Array:
        flat = [np.asarray(a).reshape(-1) for a in arrays]
        lengths = np.fromiter((len(a) for a in flat), dtype=np.int32, count=len(flat))
        offsets = np.zeros(len(flat) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(flat).astype(dtype, copy=False) if flat else np.zeros(0, dtype)
        list_type = schema.field(name).type
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=list_type.value_type), type=list_type)

    slots = [encode_slots(r, sampling, encoding) for r in rows]
    columns = {
        "sample_id": pa.array([r.sample_id for r in rows], type=pa.string()),
        "input_ids": list_column("input_ids", [r.input_ids for r in rows], np.int32),
        "positions": list_column("positions", [r.positions for r in rows], np.int32),
        "loss_mask": list_column("loss_mask", [r.loss_mask for r in rows], np.bool_),
        "target_logprob": list_column("target_logprob", [encode_target_logprobs(r.target_logprob, encoding) for r in rows],
                                      schema.field("target_logprob").type.value_type.to_pandas_dtype()),
        "target_rank": list_column("target_rank", [r.target_rank for r in rows], np.int32),
    }
    for name in schema.names:  # the slots' columns: the top-k ones, and the counts or the compact draws
        if name not in columns:
            columns[name] = list_column(name, [c[name] for c in slots], schema.field(name).type.value_type.to_pandas_dtype())
    return pa.Table.from_pydict(columns, schema=schema)
