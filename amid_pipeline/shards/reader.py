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
import pyarrow.parquet as pq

from amid_pipeline.shards.manifest import FileRecord, Header, Manifest, header_differences, load_manifest
from amid_pipeline.shards.schema import (
    PARQUET_METADATA_KEY,
    FormatError,
    PositionError,
    TeacherRow,
    check_version,
    decode_target_logprobs,
    first_impossible_value,
    first_inconsistent_slot,
)
from amid_pipeline.shards.storage import StorageError, Store, retry
from amid_pipeline.shards.targets import Sampling, decode_slots, stored_columns, with_proposal


def read_file_header(store: Store, name: str, parquet: pq.ParquetFile | None = None) -> dict:
    """The header stored in one Parquet file's key-value metadata (refuses unknown versions)."""
    metadata = (parquet or store.parquet(name)).schema_arrow.metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise FormatError(f"{store.where(name)}: no amid-pipeline header in the Parquet metadata")
    header = json.loads(metadata[PARQUET_METADATA_KEY])
    check_version(header.get("format_version", "?"), store.where(name))
    return header


def iter_file_rows(manifest: Manifest, record: FileRecord, *, columns: tuple[str, ...] | None = None) -> Iterator:
    """Yield the rows of one file of ``manifest``, decoding a row group at a time (remote reads retried per
    row group); only the selected rows of a view.

    Before any row: the file's own header must agree with the manifest (an edited ``k`` would mis-decode
    every row). Every page is checked against its CRC32 as it is read, and every decoded row group for
    values no teacher produces (:func:`first_impossible_value`); each failure names the file (and sample).
    With ``columns`` (a selection) the raw Arrow tables of the row groups are yielded; by default every
    column of the shard's target kind, decoded.
    """
    store, name, k, encoding = manifest.store, record.name, manifest.k, manifest.value_encoding
    header = manifest.part_header(record)
    every = stored_columns(manifest.header.sampling)
    decode, columns = columns is None, columns or every
    keep = None if manifest.selection is None else manifest.selection.get(name, np.zeros(0, np.int64))
    parquet = store.parquet(name, record.sha256, record.bytes)
    differing = header_differences(read_file_header(store, name, parquet), manifest, record)
    if differing:
        raise FormatError(f"{store.where(name)}: its own header differs from the manifest in {differing} "
                          f"(manifest edited, or listing another capture's file); run `amid-pipeline verify`")
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
        check_row_group_size(parquet.metadata.row_group(group), header, f"{store.where(name)} (row group {group})")
        table = retry(lambda: parquet.read_row_group(group, columns=list(columns), use_threads=False),
                      f"{store.where(name)} (row group {group})")
        if chosen is not None:
            table = table.take(chosen)
        if decode:
            try:
                rows = decode_batch(table, k, encoding, header.sampling, header.model_vocab_size)
                yield from (with_proposal(row, header.sampling) for row in rows)
            except ValueError as exc:
                raise FormatError(f"{store.where(name)}: {exc}") from exc
        else:
            yield table


MAX_DECODED_BYTES = 4 << 30  # one row group's decoded targets; a header or file asking for more is refused
DECODED_BYTES_PER_SLOT = 10  # int32 id, float32 log-probability, uint16 count


def check_row_group_size(group: pq.RowGroupMetaData, header: Header, where: str) -> None:
    """Refuse, before reading it, a row group whose values (as its metadata counts them) exceed what the header
    allows: longer sequences than its ``max_length``, or decoded targets over :data:`MAX_DECODED_BYTES`
    (positions × the header's slots: an edited ``k`` or ``sampling.draws``, or a small file of huge lists)."""
    values = {}
    for j in range(group.num_columns):
        column = group.column(j)
        values[column.path_in_schema.split(".")[0]] = column.num_values
    rows, positions = group.num_rows, values.get("positions", 0)
    if header.max_length:
        for name in ("input_ids", "positions"):
            if values.get(name, 0) > rows * header.max_length:
                raise FormatError(f"{where}: {values[name]} {name} for {rows} rows, more than the header's max_length "
                                  f"{header.max_length} each (a damaged or crafted file)")
    decoded = positions * header.slots * DECODED_BYTES_PER_SLOT
    if decoded > MAX_DECODED_BYTES or group.total_byte_size > MAX_DECODED_BYTES:
        raise FormatError(f"{where}: would take {max(decoded, group.total_byte_size) / 2**30:.1f} GiB to decode "
                          f"({positions} positions x {header.slots} slots; limit {MAX_DECODED_BYTES / 2**30:.0f} GiB): "
                          f"the header's k or sampling.draws, or the file, is not what a capture writes")


def decode_batch(table: pa.Table | pa.RecordBatch, k: int, encoding: str, sampling: Sampling | None = None,
                 vocab_size: int | None = None) -> Iterator[TeacherRow]:
    """Rows of an Arrow table/batch with the columns of the header's target kind (``sampling``: None for
    top-k), as :class:`TeacherRow` views (a compact sampled table decodes to ``k + draws`` slots, see
    :func:`decode_slots`). Every row group is checked for what training must not see
    (:func:`first_impossible_value`, :func:`first_inconsistent_slot`; ids at or above ``vocab_size``, the
    teacher's head, when given)."""
    flat: dict[str, np.ndarray] = {}
    offsets: dict[str, np.ndarray] = {}
    for name in stored_columns(sampling)[1:]:
        column = table.column(name)
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets[name] = array.offsets.to_numpy()  # indexes into .values (zero-copy, unlike flatten())
        flat[name] = array.values.to_numpy(zero_copy_only=False)
    target_logprob = decode_target_logprobs(flat["target_logprob"], encoding)
    count = len(flat["target_logprob"])  # stored positions in the table
    ids = table.column("sample_id").to_pylist()
    tokens, pos = offsets["input_ids"], offsets["positions"]

    def named(error: PositionError) -> ValueError:
        """``error`` naming the sample that holds the table's stored position, and the position within it."""
        i = int(np.searchsorted(pos, error.position, side="right")) - 1
        return ValueError(f"sample {ids[i]!r}: {error.field} at stored position {error.position - pos[i]} {error.problem}")

    try:
        slot_ids, slot_logprobs, slot_counts = decode_slots(flat, count, k, sampling, encoding)
    except PositionError as error:
        raise named(error) from error
    impossible = first_impossible_value(slot_logprobs.reshape(-1), slot_logprobs.shape[1], target_logprob, encoding)
    if impossible:
        column, position = impossible
        raise named(PositionError(column, position, "is not a log-probability (NaN, positive, or a top-1 of -inf)"))
    draws, exact_top = (sampling.draws, sampling.exact_top) if sampling else (0, 0)
    inconsistent = first_inconsistent_slot(slot_ids, slot_logprobs, slot_counts, draws, exact_top, vocab_size)
    if inconsistent:
        raise named(inconsistent)
    if vocab_size is not None and len(flat["input_ids"]) and not 0 <= flat["input_ids"].min() <= flat["input_ids"].max() < vocab_size:
        raise ValueError(f"input_ids outside [0, {vocab_size}) (the teacher's head)")
    for i, sample_id in enumerate(ids):
        a, b = pos[i], pos[i + 1]
        yield TeacherRow(
            sample_id=sample_id,
            input_ids=flat["input_ids"][tokens[i] : tokens[i + 1]],
            positions=flat["positions"][a:b],
            loss_mask=flat["loss_mask"][a:b],
            topk_ids=slot_ids[a:b],
            topk_logprobs=slot_logprobs[a:b],
            target_logprob=target_logprob[a:b],
            target_rank=flat["target_rank"][a:b],
            sampled_counts=None if slot_counts is None else slot_counts[a:b],
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
    def header(self) -> Header:
        return self.manifest.header

    def __len__(self) -> int:
        return sum(record.rows for record in self.files)

    def __iter__(self) -> Iterator[TeacherRow]:
        for record in self.files:
            yield from self.iter_file(record)

    def iter_file(self, record: FileRecord, columns: tuple[str, ...] | None = None) -> Iterator:
        """The rows of one listed file (only the selected ones in a view); see :func:`iter_file_rows`."""
        where = self.store.where(record.name)
        try:
            yield from iter_file_rows(self.manifest, record, columns=columns)
        except FileNotFoundError as exc:
            raise FormatError(f"{where}: listed in the manifest but missing") from exc
        except MemoryError as exc:
            raise FormatError(f"{where}: out of memory decoding it (a damaged or crafted file?); "
                              f"run `amid-pipeline verify`") from exc
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, StorageError):
                raise
            raise FormatError(f"{where}: unreadable Parquet data ({exc}); run `amid-pipeline verify`") from exc
