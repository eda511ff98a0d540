"""Writer -> reader and writer -> plain Parquet clients round trips, and format refusals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import PARQUET_METADATA_KEY, FormatError, encode_topk_logprobs
from tests.helpers import random_rows, synthetic_header, write_shards

QUANT_ERROR = 1 / 128 + 1e-6


def assert_rows_equal(expected, found, tolerance):
    assert [r.sample_id for r in found] == [r.sample_id for r in expected]
    for a, b in zip(expected, found):
        for name in ("input_ids", "positions", "loss_mask", "topk_ids", "target_rank"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        for name in ("topk_logprobs", "target_logprob"):
            x, y = getattr(a, name), getattr(b, name)
            np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
            finite = np.isfinite(x)
            assert np.all(np.abs(x[finite] - y[finite]) <= tolerance), name


@pytest.mark.parametrize("encoding,tolerance", [("q64-delta", QUANT_ERROR), ("q64", QUANT_ERROR), ("float32", 0.0)])
@pytest.mark.parametrize("neg_inf", [False, True])
def test_reader_roundtrip(tmp_path, encoding, tolerance, neg_inf):
    rows = random_rows(23, k=8, vocab=50, neg_inf=neg_inf)
    directory = write_shards(tmp_path / "s", rows, synthetic_header(k=8, vocab=50, encoding=encoding))
    assert pq.read_schema(next((directory / "data").glob("*.parquet"))).field("topk_ids").type.value_type == "uint16"
    reader = ShardReader(directory)
    assert len(reader) == 23
    assert [f.name for f in reader.files] == [f"data/part-0000{i}.parquet" for i in range(4)]
    assert_rows_equal(rows, list(reader), tolerance)


def test_plain_pyarrow_read_matches_documented_decoding(shard_dir):
    """Decode with nothing but pyarrow + numpy, as the README documents, and compare to the source."""
    rows = random_rows(20, k=8, vocab=100)
    table = pq.read_table(shard_dir / "data")  # the data folder as one dataset
    assert table.num_rows == 20
    header = json.loads(pq.read_schema(next(shard_dir.glob("data/*.parquet"))).metadata[PARQUET_METADATA_KEY])
    k = header["k"]
    by_id = {r.sample_id: r for r in rows}
    for record in table.to_pylist():
        source = by_id[record["sample_id"]]
        codes = np.cumsum(np.asarray(record["topk_logprobs"], dtype=np.int64).reshape(-1, k), axis=1)
        logprobs = np.where(codes >= 65535, -np.inf, -codes / 64)
        assert np.all(np.abs(logprobs - source.topk_logprobs) <= QUANT_ERROR)
        np.testing.assert_array_equal(np.reshape(record["topk_ids"], (-1, k)), source.topk_ids)
        np.testing.assert_array_equal(record["input_ids"], source.input_ids)
        target = np.asarray(record["target_logprob"]) / -64
        assert np.all(np.abs(target - source.target_logprob) <= QUANT_ERROR)


def test_other_parquet_clients_read_the_shards(shard_dir):
    pandas = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    polars = pytest.importorskip("polars")
    rows = random_rows(20, k=8, vocab=100)
    frame = pandas.read_parquet(shard_dir / "data")
    assert sorted(frame["sample_id"]) == sorted(r.sample_id for r in rows)
    first = rows[0]
    ids = duckdb.sql(f"select topk_ids from '{shard_dir}/data/*.parquet' where sample_id = '{first.sample_id}'").fetchall()[0][0]
    np.testing.assert_array_equal(np.reshape(ids, (-1, 8)), first.topk_ids)
    lengths = polars.read_parquet(f"{shard_dir}/data/*.parquet").select(polars.col("input_ids").list.len()).to_series()
    assert sorted(lengths.to_list()) == sorted(len(r.input_ids) for r in rows)


def test_every_file_carries_the_header(shard_dir):
    manifest = load_manifest(shard_dir)
    for record in manifest.files:
        meta = pq.read_schema(shard_dir / record.name).metadata
        header = json.loads(meta[PARQUET_METADATA_KEY])
        assert header["format_version"] == manifest.header.format_version == "1.4"
        assert header["k"] == 8 and header["value_encoding"] == "q64-delta"


def test_reader_refuses_a_newer_major_version(shard_dir):
    path = shard_dir / "manifest.json"
    payload = json.loads(path.read_text())
    payload["format_version"] = "2.0"
    path.write_text(json.dumps(payload))
    with pytest.raises(FormatError, match=r"format version '2.0'.*reads 1.x"):
        ShardReader(shard_dir)


def test_directory_without_manifest_is_refused(tmp_path, shard_dir):
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(FormatError, match="no manifest.json"):
        ShardReader(shard_dir)


def test_writer_rejects_inconsistent_rows(tmp_path):
    from amid_pipeline.shards.writer import ShardWriter

    row = random_rows(1, k=8, vocab=100, max_len=10)[0]
    row.topk_ids = row.topk_ids[:, :4]
    with pytest.raises(ValueError, match=r"sample 'sample-0-0': topk_ids has shape"):
        ShardWriter(tmp_path, header=synthetic_header()).add(row)
    unsorted = next(r for r in random_rows(10, k=8, vocab=100, max_len=10, seed=3) if len(r.positions) >= 2)
    unsorted.topk_logprobs = unsorted.topk_logprobs[:, ::-1].copy()  # every position ascending: refused
    for encoding in ("q64-delta", "float32"):  # the row check, whatever the encoding
        with pytest.raises(ValueError, match="sample 'sample-3-.*': topk_logprobs must be in descending order"):
            ShardWriter(tmp_path / encoding, header=synthetic_header(encoding=encoding)).add(unsorted)
    with pytest.raises(ValueError, match="descending"):  # and the delta encoding's own guard
        encode_topk_logprobs(unsorted.topk_logprobs, "q64-delta")


def test_every_row_check_names_the_sample_and_field():
    """TeacherRow.check, guard by guard: each inconsistency is refused with its own message."""
    base = next(r for r in random_rows(10, k=4, vocab=100, max_len=12, seed=5) if len(r.positions) >= 3)

    def broken(**fields):
        import dataclasses

        return dataclasses.replace(base, **fields)

    positions = base.positions
    cases = [
        (broken(input_ids=base.input_ids[:1]), "positions stored for a sequence of length 1"),
        (broken(loss_mask=base.loss_mask[:-1]), "loss_mask has shape"),
        (broken(positions=np.where(np.arange(len(positions)) == len(positions) - 1, len(base.input_ids) - 1, positions)
                .astype(np.int32)), r"positions must lie in \[0, "),
        (broken(positions=(positions - positions[0] - 1).astype(np.int32)), r"positions must lie in \[0, "),
        (broken(positions=positions[::-1].copy()), "positions must be strictly ascending"),
        (broken(topk_logprobs=np.abs(base.topk_logprobs)), r"topk_logprobs must be <= 0"),
        (broken(topk_logprobs=np.full_like(base.topk_logprobs, np.nan)), r"topk_logprobs must be <= 0"),
        (broken(topk_logprobs=np.full_like(base.topk_logprobs, -np.inf)), "topk_logprobs has a position whose top-1 is -inf"),
        (broken(topk_ids=base.topk_ids + 100), r"topk_ids must lie in \[0, 100\)"),
        (broken(topk_ids=base.topk_ids - 100), r"topk_ids must lie in \[0, 100\)"),
    ]
    base.check(4, 100)
    for row, message in cases:
        with pytest.raises(ValueError, match=f"sample '{base.sample_id}': {message}"):
            row.check(4, 100)


def sampled_row(seed=0):
    """A row of the sampled kind (4 slots): 3 distinct ids drawn 2 + 1 + 1 times, one unused slot."""
    row = next(r for r in random_rows(10, k=4, vocab=100, max_len=10, seed=seed) if len(r.positions) >= 2)
    row.topk_logprobs = row.topk_logprobs.copy()
    row.topk_logprobs[:, 3] = -np.inf
    row.topk_ids = row.topk_ids.copy()
    row.topk_ids[:, 3] = row.topk_ids[:, 0]
    row.sampled_counts = np.tile(np.array([2, 1, 1, 0], dtype=np.uint16), (len(row.positions), 1))
    return row


def test_sampled_rows_round_trip_and_inconsistent_counts_are_refused(tmp_path):
    import dataclasses

    from amid_pipeline.shards.writer import ShardWriter

    header = dataclasses.replace(synthetic_header(k=4), target_kind="sampled", sampling={"draws": 4, "temperature": 1.0})
    row = sampled_row()
    write_shards(tmp_path / "ok", [row], header)
    read = next(iter(ShardReader(tmp_path / "ok")))
    np.testing.assert_array_equal(read.sampled_counts, row.sampled_counts)
    np.testing.assert_array_equal(read.topk_ids, row.topk_ids)
    plain = pq.read_table(tmp_path / "ok" / "data").column("sampled_counts").to_pylist()[0]
    assert plain == row.sampled_counts.reshape(-1).tolist()  # any Parquet client reads the counts
    for change, message in ((lambda r: setattr(r, "sampled_counts", r.sampled_counts * 2), "sum to 8, not the 4 draws"),
                            (lambda r: setattr(r, "sampled_counts", r.sampled_counts[:, :3]), "sampled_counts has shape"),
                            (lambda r: setattr(r, "sampled_counts", None), "sampled_counts missing"),
                            (lambda r: r.sampled_counts.__setitem__((0, 3), 1) or r.sampled_counts.__setitem__((0, 0), 1),
                             "sampled_counts must be 0 exactly where topk_logprobs is -inf")):
        bad = sampled_row()
        change(bad)
        with pytest.raises(ValueError, match=message):
            ShardWriter(tmp_path / "bad", header=header).add(bad)
    with pytest.raises(ValueError, match="sampled_counts in a shard of the topk kind"):
        ShardWriter(tmp_path / "topk", header=synthetic_header(k=4)).add(sampled_row())


def test_an_exact_top_row_round_trips_and_a_drawn_top_slot_is_refused(tmp_path):
    """exact_top 1 and 3 draws over 4 slots: slot 0 holds the top (count 0, finite log p), then ids drawn
    2 + 1 times and one unused slot. A count in the top slot is refused."""
    import dataclasses

    from amid_pipeline.shards.writer import ShardWriter

    header = dataclasses.replace(synthetic_header(k=4), target_kind="sampled",
                                 sampling={"draws": 3, "exact_top": 1, "temperature": 1.0})
    row = sampled_row()
    row.sampled_counts[:, :3] = [0, 2, 1]
    write_shards(tmp_path / "ok", [row], header)
    assert load_manifest(tmp_path / "ok").header.exact_top == 1
    np.testing.assert_array_equal(next(iter(ShardReader(tmp_path / "ok"))).sampled_counts, row.sampled_counts)
    bad = sampled_row()
    bad.sampled_counts[:, :3] = [0, 2, 1]
    bad.sampled_counts[0, :2] = [1, 1]
    with pytest.raises(ValueError, match="the first 1 slots \\(the exact top\\) must have sampled_counts 0"):
        ShardWriter(tmp_path / "bad", header=header).add(bad)


def test_crash_before_commit_leaves_no_data_file(tmp_path):
    from amid_pipeline.shards.writer import ShardWriter

    rows = random_rows(5, k=8, vocab=100)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, header=synthetic_header(), rows_per_file=100, rows_per_group=2) as writer:
            for row in rows:
                writer.add(row)
            raise RuntimeError("killed")
    assert list((tmp_path / "data").iterdir()) == []


def test_worker_manifests_merge_and_incomplete_sets_are_refused(tmp_path):
    from amid_pipeline.shards.manifest import worker_manifest_name, write_manifest
    from amid_pipeline.shards.writer import ShardWriter

    header = synthetic_header()
    for worker in range(2):
        rows = random_rows(4, k=8, vocab=100, seed=worker)
        with ShardWriter(tmp_path, header=header, stem=f"part-w{worker:05d}") as writer:
            for row in rows:
                writer.add(row)
        if worker == 0:
            with pytest.raises(FormatError, match=r"workers \[1\] of 2 have not finished"):
                write_manifest(tmp_path, header, writer.committed, name=worker_manifest_name(0, 2))
                ShardReader(tmp_path)
        else:
            write_manifest(tmp_path, header, writer.committed, name=worker_manifest_name(1, 2))
    assert len(list(ShardReader(tmp_path))) == 8


def test_inconsistent_manifest_sets_and_foreign_files_are_refused_by_name(tmp_path):
    """Each manifest and file guard in turn: not a directory, worker manifests that disagree on the
    worker count or the header, a file listed by two workers, a view part out of range, a Parquet file
    without the header, a file that lacks a column."""
    import shutil

    from amid_pipeline.shards.manifest import load_manifest, worker_manifest_name, write_manifest
    from amid_pipeline.shards.writer import ShardWriter

    header = synthetic_header()
    committed = []
    for worker in range(2):
        with ShardWriter(tmp_path / "w", header=header, stem=f"part-w{worker:05d}") as writer:
            for row in random_rows(3, k=8, vocab=100, seed=worker):
                writer.add(row)
        committed.append(writer.committed)
        write_manifest(tmp_path / "w", header, writer.committed, name=worker_manifest_name(worker, 2))
    assert len(load_manifest(tmp_path / "w").files) == len(committed[0]) + len(committed[1])

    def variant(name, change):
        directory = shutil.copytree(tmp_path / "w", tmp_path / name)
        change(directory)
        return directory

    with pytest.raises(FormatError, match=r"not a directory \(does not exist\)"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FormatError, match="not a directory$"):
        load_manifest(next((tmp_path / "w" / "data").glob("*.parquet")))
    three = variant("three", lambda d: (d / worker_manifest_name(1, 2)).rename(d / worker_manifest_name(1, 3)))
    with pytest.raises(FormatError, match=r"worker manifests disagree on the number of workers: \[2, 3\]"):
        load_manifest(three)

    def edit(directory, name, change):
        payload = json.loads((directory / name).read_text())
        change(payload)
        (directory / name).write_text(json.dumps(payload))

    other_header = variant("header", lambda d: edit(d, worker_manifest_name(1, 2), lambda m: m.update(max_length=99)))
    with pytest.raises(FormatError, match=r"header differs from manifest.w00000-of-00002.json in \['max_length'\]"):
        load_manifest(other_header)
    twice = variant("twice", lambda d: edit(d, worker_manifest_name(1, 2), lambda m: m["files"].append(m["files"][0])))
    with pytest.raises(FormatError, match="files listed twice across manifests"):
        load_manifest(twice)

    foreign = tmp_path / "foreign"
    write_shards(foreign, random_rows(2, k=8, vocab=100), header)
    name = next((foreign / "data").glob("*.parquet"))
    table = pq.read_table(name)
    pq.write_table(table.replace_schema_metadata({}), name)  # no amid-pipeline header
    with pytest.raises(FormatError, match="no amid-pipeline header in the Parquet metadata"):
        list(_read_ignoring_digests(foreign))
    pq.write_table(table.drop(["target_rank"]), name)  # the header kept, a column gone
    with pytest.raises(FormatError, match=r"missing columns \['target_rank'\]"):
        list(_read_ignoring_digests(foreign))


def _read_ignoring_digests(directory):
    """The rows of ``directory`` after its manifest is told the files' new digests and sizes (so that the
    checks behind the digest are reached)."""
    from amid_pipeline.shards.storage import sha256_of

    manifest = json.loads((directory / "manifest.json").read_text())
    for record in manifest["files"]:
        path = directory / record["name"]
        with open(path, "rb") as f:
            record["sha256"] = sha256_of(f)
        record["bytes"] = path.stat().st_size
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return ShardReader(directory)


def test_large_vocabulary_ids_are_int32_and_exact(tmp_path):
    rows = random_rows(4, k=4, vocab=70_000, max_len=8)
    for row in rows:  # ids above 65,535 must survive
        row.topk_ids[:, 0] = 69_999 - np.arange(len(row.positions))
    directory = write_shards(tmp_path / "s", rows, synthetic_header(k=4, vocab=70_000))
    assert pq.read_schema(next((directory / "data").glob("*.parquet"))).field("topk_ids").type.value_type == "int32"
    assert_rows_equal(rows, list(ShardReader(directory)), QUANT_ERROR)


def test_header_round_trips_keeps_a_newer_minor_versions_keys_and_names_bad_fields():
    from amid_pipeline.shards.manifest import Header
    from amid_pipeline.shards.schema import FormatError

    header = synthetic_header()
    assert Header.from_json(header.to_json(), "x") == header
    newer = {**header.to_json(), "format_version": "1.4", "tail_mass": {"stored": True}}  # a later 1.x writer's key
    read = Header.from_json(newer, "m.json")
    assert read.k == 8 and read.extra == {"tail_mass": {"stored": True}} and read.to_json()["tail_mass"] == {"stored": True}
    for bad, message in (({"k": 0}, "m.json: k must be >= 1"), ({"value_encoding": "zip"}, "m.json: unknown value_encoding"),
                         ({"target_kind": "dense"}, "m.json: unknown target_kind 'dense'"),
                         ({"target_kind": "sampled", "sampling": {"draws": 12}},
                          "m.json: a sampled header \\(padded layout\\) needs sampling.draws"),
                         ({"target_kind": "sampled", "sampling": {"draws": 6, "exact_top": 3}},
                          "m.json: a sampled header .* adding up to k \\(8\\), got draws 6 and exact_top 3"),
                         ({"target_kind": "sampled", "sampling": {"draws": 6, "exact_top": 3, "layout": "compact"}},
                          "m.json: a sampled header \\(compact layout\\) needs .* exact_top equal to k \\(8\\)"),
                         ({"target_kind": "sampled", "k": 0, "sampling": {"draws": 6}}, "m.json: k must be >= 1"),
                         ({"target_kind": "sampled", "sampling": {"draws": 8, "layout": "sparse"}},
                          "m.json: unknown sampling layout 'sparse'"),
                         ({"format": "other"}, "m.json: not an amid-pipeline shard header"),
                         ({"format_version": "2.0"}, "m.json")):
        with pytest.raises(FormatError, match=message):
            Header.from_json({**header.to_json(), **bad}, "m.json")
    without_k = {key: value for key, value in header.to_json().items() if key != "k"}
    with pytest.raises(FormatError, match="m.json: header lacks k"):
        Header.from_json(without_k, "m.json")
