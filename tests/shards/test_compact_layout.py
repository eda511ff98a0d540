"""The compact layout of sampled shards (format 1.3) against the padded one (1.1/1.2) and plain Parquet reads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import PARQUET_METADATA_KEY, FormatError, TeacherRow
from amid_pipeline.shards.stats import collect_stats
from amid_pipeline.shards.storage import sha256_of
from amid_pipeline.shards.verify import verify_directory
from amid_pipeline.shards.views import combine_directories
from tests.helpers import ROW_ARRAYS, synthetic_header, write_shards

VOCAB = 300
QUANT_ERROR = 1 / 128 + 1e-6


def sampled_rows(n: int, exact_top: int, draws: int, seed: int = 0) -> list[TeacherRow]:
    """Rows drawn as the capture draws them, written out independently: per position a random teacher
    distribution p (peaked or flat, so some positions draw one id and some ``draws`` distinct ids), its
    ``exact_top`` most probable ids kept with count 0, then ``draws`` multinomial draws from p over the other
    ids, kept once each in descending p with their counts; unused slots repeat the position's first id with
    log p = −inf and count 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(3, 30))
        count = length - 1
        slots = exact_top + draws
        ids = np.zeros((count, slots), np.uint16)
        logprobs = np.full((count, slots), -np.inf, np.float32)
        counts = np.zeros((count, slots), np.uint16)
        input_ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
        target_lp, target_rank = np.zeros(count, np.float32), np.zeros(count, np.int32)
        for t in range(count):
            logits = rng.normal(size=VOCAB) * rng.choice([0.5, 3.0, 12.0])
            logp = logits - np.logaddexp.reduce(logits)
            order = np.argsort(-logp, kind="stable")
            top, rest = order[:exact_top], order[exact_top:]
            rest_p = np.exp(logp[rest]) / np.exp(logp[rest]).sum()
            drawn = rng.multinomial(draws, rest_p)
            kept = rest[drawn > 0]  # already in descending p
            chosen = np.concatenate([top, kept])
            ids[t, : len(chosen)] = chosen
            ids[t, len(chosen):] = chosen[0]
            logprobs[t, : len(chosen)] = logp[chosen]
            counts[t, exact_top : len(chosen)] = drawn[drawn > 0]
            target = input_ids[t + 1]
            target_lp[t], target_rank[t] = logp[target], 1 + int((logp > logp[target]).sum())
        rows.append(TeacherRow(sample_id=f"s{seed}-{i}", input_ids=input_ids, positions=np.arange(count, dtype=np.int32),
                               loss_mask=np.ones(count, bool), topk_ids=ids, topk_logprobs=logprobs,
                               target_logprob=target_lp, target_rank=target_rank, sampled_counts=counts))
    return rows


def sampled_header(exact_top: int, draws: int, layout: str, encoding: str = "q64-delta"):
    k = exact_top if layout == "compact" else exact_top + draws
    return dataclasses.replace(synthetic_header(vocab=VOCAB, encoding=encoding), k=k, target_kind="sampled",
                               sampling={"draws": draws, "exact_top": exact_top, "layout": layout, "temperature": 1.0})


def write_both(tmp_path, rows, exact_top, draws, encoding="q64-delta", **sizes):
    return {layout: write_shards(tmp_path / layout, rows, sampled_header(exact_top, draws, layout, encoding), **sizes)
            for layout in ("padded", "compact")}


@pytest.mark.parametrize("encoding,tolerance", [("q64-delta", QUANT_ERROR), ("float32", 0.0)])
@pytest.mark.parametrize("exact_top,draws", [(0, 12), (2, 6)])
def test_both_layouts_decode_to_the_same_rows(tmp_path, encoding, tolerance, exact_top, draws):
    rows = sampled_rows(17, exact_top, draws)
    found = {layout: {r.sample_id: r for r in ShardReader(d)} for layout, d in write_both(tmp_path, rows, exact_top,
                                                                                         draws, encoding).items()}
    for row in rows:
        compact, padded = found["compact"][row.sample_id], found["padded"][row.sample_id]
        for name in ROW_ARRAYS:
            np.testing.assert_array_equal(getattr(compact, name), getattr(padded, name), err_msg=name)
        np.testing.assert_array_equal(compact.topk_ids, row.topk_ids)
        np.testing.assert_array_equal(compact.sampled_counts, row.sampled_counts)
        assert np.array_equal(np.isneginf(compact.topk_logprobs), np.isneginf(row.topk_logprobs))
        finite = np.isfinite(row.topk_logprobs)
        assert np.abs(compact.topk_logprobs[finite] - row.topk_logprobs[finite]).max() <= tolerance


def test_compact_shards_hold_no_unused_slot_and_are_smaller(tmp_path):
    rows = sampled_rows(40, 0, 24, seed=1)
    # one file, one row group (in tiny ones the pages' fixed costs outweigh the slots): 0.87 here, with random ids
    directories = write_both(tmp_path, rows, 0, 24, rows_per_file=40, rows_per_group=40)
    stats = {layout: collect_stats(d) for layout, d in directories.items()}
    assert stats["compact"].bytes < 0.95 * stats["padded"].bytes
    np.testing.assert_array_equal(stats["compact"].distinct, stats["padded"].distinct)
    table = pq.read_table(directories["compact"] / "data")
    drawn = sum(int((r.sampled_counts > 0).sum()) for r in rows)
    assert sum(len(ids) for ids in table.column("draw_ids").to_pylist()) == drawn
    assert verify_directory(directories["compact"], deep=True).ok


def test_a_plain_parquet_read_decodes_the_compact_columns_as_documented(tmp_path):
    """With pyarrow and numpy alone (README, "Target kinds"): the top-k columns are a top-m shard, and the draws
    of each position are the next draw_distinct entries of draw_ids / draw_logprobs / draw_counts, their q64-delta
    codes running on from the position's last top code."""
    exact_top, draws = 2, 8
    rows = {r.sample_id: r for r in sampled_rows(9, exact_top, draws, seed=2)}
    directory = write_shards(tmp_path / "c", list(rows.values()), sampled_header(exact_top, draws, "compact"))
    table = pq.read_table(directory / "data")
    header = json.loads(table.schema.metadata[PARQUET_METADATA_KEY])
    assert header["k"] == exact_top and header["sampling"]["layout"] == "compact"
    for record in table.to_pylist():
        source = rows[record["sample_id"]]
        k = header["k"]
        np.testing.assert_array_equal(np.reshape(record["topk_ids"], (-1, k)), source.topk_ids[:, :k])
        top_codes = np.cumsum(np.reshape(record["topk_logprobs"], (-1, k)), axis=1)
        assert np.abs(-top_codes / 64 - source.topk_logprobs[:, :k]).max() <= QUANT_ERROR
        ends = np.cumsum(record["draw_distinct"])
        for t, (ids, codes, counts) in enumerate(zip(np.split(np.asarray(record["draw_ids"]), ends[:-1]),
                                                     np.split(np.asarray(record["draw_logprobs"]), ends[:-1]),
                                                     np.split(np.asarray(record["draw_counts"]), ends[:-1]))):
            used = source.sampled_counts[t, k:] > 0
            np.testing.assert_array_equal(ids, source.topk_ids[t, k:][used])
            np.testing.assert_array_equal(counts, source.sampled_counts[t, k:][used])
            assert np.abs(-(top_codes[t, -1] + np.cumsum(codes)) / 64 - source.topk_logprobs[t, k:][used]).max() <= QUANT_ERROR
            assert counts.sum() == draws


def rewrite_draw_distinct(directory, change) -> str:
    """Apply ``change`` to the first file's ``draw_distinct`` lists and re-hash it into the manifest (so that only
    the decoding can tell); the file's name."""
    path = next((directory / "data").glob("*.parquet"))
    table = pq.read_table(path)
    distinct = table.column("draw_distinct").to_pylist()
    change(distinct)
    table = table.set_column(table.column_names.index("draw_distinct"), "draw_distinct",
                             pa.array(distinct, type=table.schema.field("draw_distinct").type))
    pq.write_table(table, path)
    manifest = json.loads((directory / "manifest.json").read_text())
    for record in manifest["files"]:
        with open(directory / record["name"], "rb") as f:
            record["sha256"] = sha256_of(f)
        record["bytes"] = (directory / record["name"]).stat().st_size
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return path.name


def test_a_compact_file_whose_draw_columns_disagree_is_refused_by_name(tmp_path):
    def one_more(distinct):  # one more id than draw_ids holds, at a position that drew fewer than 6
        row = next(r for r in distinct if min(r) < 6)
        row[row.index(min(row))] += 1

    def none(distinct):
        distinct[1][2] = 0

    for change, message in ((one_more, r"draw_ids holds \d+ values but draw_distinct adds up to \d+"),
                            (none, r"sample 's3-1': draw_distinct at stored position 2 is 0, outside \[1, 6\]")):
        directory = write_shards(tmp_path / change.__name__, sampled_rows(5, 0, 6, seed=3),
                                 sampled_header(0, 6, "compact"), rows_per_file=10)
        name = rewrite_draw_distinct(directory, change)
        with pytest.raises(FormatError, match=f"{name}: {message}"):
            list(ShardReader(directory))
        assert not verify_directory(directory, deep=True).ok


def test_layouts_are_not_mixed_in_one_view(tmp_path):
    rows = sampled_rows(4, 0, 6, seed=4)
    directories = write_both(tmp_path, rows, 0, 6)
    with pytest.raises(FormatError, match="sampling layout differs \\(compact vs padded\\)"):
        combine_directories([str(directories["compact"]), str(directories["padded"])], str(tmp_path / "view"))
    other = write_shards(tmp_path / "other-draws", sampled_rows(4, 0, 8, seed=5), sampled_header(0, 8, "compact"))
    with pytest.raises(FormatError, match="sampling draws differs \\(6 vs 8\\)"):
        combine_directories([str(directories["compact"]), str(other)], str(tmp_path / "view2"))
    assert load_manifest(directories["compact"]).header.slots == 6
