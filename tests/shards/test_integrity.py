"""Every read path (not only `verify`) names a file whose bytes, header or values cannot be right."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import FormatError
from amid_pipeline.shards.verify import verify_directory
from tests.helpers import random_rows, synthetic_header, write_shards


def first_file(directory):
    return sorted((directory / "data").glob("*.parquet"))[0]


def flip_a_byte_that_still_decodes(path, column="topk_ids"):
    """Flip one byte inside ``column``'s data pages such that the file still decodes (zstd and Parquet
    accept it) to different values when page checksums are not checked; return the changed file's bytes."""
    original = pq.read_table(path, columns=[column]).column(column)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(pq.ParquetFile(path).schema_arrow.get_field_index(column))
    start, size = chunk.data_page_offset, chunk.total_compressed_size
    clean = path.read_bytes()
    for offset in range(start + size - 1, start + size // 2, -1):  # the page body, after its header
        damaged = bytearray(clean)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            found = pq.ParquetFile(path, page_checksum_verification=False).read(columns=[column]).column(column)
        except (OSError, pa.ArrowException):
            continue
        if not found.equals(original):
            return
    raise AssertionError("no single-byte flip that still decodes was found")


def test_a_flipped_byte_that_zstd_decodes_is_named_on_every_read_path(tmp_path):
    directory = write_shards(tmp_path / "s", random_rows(20, k=8, vocab=100, max_len=60), synthetic_header(), rows_per_file=20,
                             rows_per_group=20)
    path = first_file(directory)
    flip_a_byte_that_still_decodes(path)
    with pytest.raises(FormatError, match=rf"data/{path.name}: unreadable Parquet data .*CRC"):
        list(ShardReader(directory))
    report = verify_directory(directory, deep=False)
    assert len(report.problems) == 1 and path.name in report.problems[0]


def test_an_edited_k_in_the_manifest_is_refused_by_name(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["k"] = 4
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"part-00000.parquet: its own header differs from the manifest in \['k'\]"):
        next(iter(ShardReader(shard_dir)))


def rewrite_values(path, column, row, values):
    """Replace one row's list in ``column`` of a Parquet file (keeping its schema and header), and record the
    new file's size and sha256 in the manifest, as a writer with a bug would have."""
    table = pq.read_table(path)
    cells = table.column(column).to_pylist()
    cells[row] = values
    table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                             pa.array(cells, type=table.schema.field(column).type))
    pq.write_table(table, path)
    manifest_path = path.parent.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for record in manifest["files"]:
        if record["name"] == f"data/{path.name}":
            record.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("column,value", [("topk_logprobs", np.nan), ("topk_logprobs", np.inf),
                                          ("target_logprob", np.nan), ("target_logprob", 0.5)])
def test_impossible_float_values_are_named_by_file_and_sample(tmp_path, column, value):
    rows = random_rows(6, k=8, vocab=100, seed=3)
    directory = write_shards(tmp_path / "s", rows, synthetic_header(encoding="float32"), rows_per_file=6)
    path = first_file(directory)
    index = next(i for i, r in enumerate(rows) if len(r.positions) >= 2)
    stored = np.asarray(getattr(rows[index], column), dtype=np.float32).reshape(-1).copy()
    stored[-1] = value
    rewrite_values(path, column, index, stored.tolist())
    with pytest.raises(FormatError, match=rf"{path.name}: sample '{rows[index].sample_id}': {column} at stored position "
                                          rf"{len(rows[index].positions) - 1} is not a log-probability"):
        list(ShardReader(directory))
    (problem,) = verify_directory(directory).problems
    assert path.name in problem and rows[index].sample_id in problem


def test_a_position_with_no_stored_probability_is_named_and_verify_stays_quiet(tmp_path, recwarn):
    rows = random_rows(6, k=8, vocab=100, seed=4)
    directory = write_shards(tmp_path / "s", rows, synthetic_header(), rows_per_file=6)
    path = first_file(directory)
    index = next(i for i, r in enumerate(rows) if len(r.positions))
    codes = [65535] + [0] * 7 + list(np.asarray(pq.read_table(path).column("topk_logprobs")[index].as_py()[8:]))
    rewrite_values(path, "topk_logprobs", index, codes)  # q64-delta: every rank of position 0 is -inf
    with pytest.raises(FormatError, match=f"sample '{rows[index].sample_id}': topk_logprobs at stored position 0"):
        list(ShardReader(directory))
    report = verify_directory(directory)
    assert len(report.problems) == 1 and rows[index].sample_id in report.problems[0]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_the_card_of_a_directory_without_rows_is_written(tmp_path):
    """Workers whose rows were all skipped finish a directory of zero rows: its card said TypeError."""
    from amid_pipeline.shards.card import dataset_card

    directory = write_shards(tmp_path / "s", [], synthetic_header())
    assert "| teacher mass on the stored top-8 | (no stored positions) |" in dataset_card(directory)
