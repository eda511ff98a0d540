"""Shard folders from someone else: a manifest names only its own files, header values bound what a reader
allocates, and what training reads is checked as ``verify`` checks it (crafted files, re-hashed into the
manifest so that only these checks can tell)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import FormatError
from amid_pipeline.shards.storage import IntegrityError
from amid_pipeline.shards.verify import verify_directory
from tests.helpers import random_rows, synthetic_header, write_shards
from tests.shards.test_compact_layout import VOCAB, sampled_header, sampled_rows
from tests.shards.test_integrity import rewrite_values


def edit_manifest(directory, change) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../elsewhere/data/part-00000.parquet", "/etc/data/part-00000.parquet",
                                  "http://127.0.0.1:9/data/part-00000.parquet?from=manifest", "data/../../x.parquet",
                                  "manifest.json"])
def test_a_capture_manifest_names_only_its_own_data_files(shard_dir, name):
    def point_elsewhere(manifest):
        manifest["files"][0]["name"] = name

    edit_manifest(shard_dir, point_elsewhere)
    with pytest.raises(FormatError, match="not a file of its own data/ folder"):
        load_manifest(shard_dir)
    assert not verify_directory(shard_dir).ok


@pytest.mark.parametrize("field, value, message", [
    (("sampling", "draws"), 4_194_304, r"sampling.draws must be <= 65535"),
    (("max_length",), -100, r"max_length must be an integer >= 2"),
    (("k",), 5000, r"k \(5000, without draws\) exceeds model_vocab_size"),
])
def test_header_values_that_no_capture_writes_are_refused_before_any_read(tmp_path, field, value, message):
    header = sampled_header(2, 6, "compact") if field[0] == "sampling" else synthetic_header(vocab=VOCAB)
    rows = sampled_rows(4, 2, 6) if field[0] == "sampling" else random_rows(4, k=8, vocab=VOCAB)
    directory = write_shards(tmp_path / "shards", rows, header)

    def edit(manifest):
        target = manifest
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = value

    edit_manifest(directory, edit)
    with pytest.raises(FormatError, match=message):
        load_manifest(directory)


def test_a_small_file_of_huge_lists_is_refused_before_it_is_decoded(tmp_path):
    directory = write_shards(tmp_path / "shards", random_rows(4, k=8, vocab=VOCAB), synthetic_header(vocab=VOCAB),
                             rows_per_file=4)
    path = next((directory / "data").glob("*.parquet"))
    rewrite_values(path, "input_ids", 0, [0] * 2_000_000)  # zstd keeps this to a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(FormatError, match=r"2000\d+ input_ids for \d+ rows, more than the header's max_length 64"):
        list(ShardReader(directory))


def test_a_file_of_another_size_than_the_manifest_says_is_not_read(shard_dir):
    path = next((shard_dir / "data").glob("*.parquet"))
    with open(path, "ab") as f:
        f.write(b"\0" * 16)  # replaced or appended to after the manifest was written
    with pytest.raises(IntegrityError, match=rf"{path.name}: {path.stat().st_size} bytes, \d+ expected"):
        list(ShardReader(shard_dir))


def crafted_compact(tmp_path, column, change):
    """A compact sampled directory whose first file's ``column`` (row 0) is changed by ``change`` (a list ->
    list), re-hashed into the manifest."""
    rows = sampled_rows(6, 2, 8, seed=11)
    directory = write_shards(tmp_path / "shards", rows, sampled_header(2, 8, "compact"), rows_per_file=6)
    path = next((directory / "data").glob("*.parquet"))
    stored = pq.read_table(path).column(column).to_pylist()[0]
    rewrite_values(path, column, 0, change(list(stored), rows[0]))
    return directory


def first_with_several_draws(row):
    """Index into the draw columns of the first drawn id of row 0's first position with 2 or more distinct draws,
    and that position."""
    distinct = (row.sampled_counts[:, 2:] > 0).sum(axis=1)
    position = int(np.argmax(distinct >= 2))
    return int(distinct[:position].sum()), position


def counts_off_by_one(counts, row):
    start, _ = first_with_several_draws(row)
    counts[start] += 1
    return counts


def a_count_of_65535(counts, row):
    start, _ = first_with_several_draws(row)
    counts[start] = 65535
    return counts


def an_id_twice(ids, row):
    start, _ = first_with_several_draws(row)
    ids[start + 1] = ids[start]
    return ids


def an_id_past_the_vocabulary(ids, row):
    start, _ = first_with_several_draws(row)
    ids[start] = VOCAB + 3  # below a padded student head, above the teacher's vocabulary
    return ids


@pytest.mark.parametrize("column, change, message", [
    ("draw_counts", counts_off_by_one, "sampled_counts at stored position {p} does not add up to the 8 draws"),
    ("draw_counts", a_count_of_65535, "sampled_counts at stored position {p} does not add up to the 8 draws"),
    ("draw_ids", an_id_twice, "topk_ids at stored position {p} holds one drawn id twice"),
    ("draw_ids", an_id_past_the_vocabulary, rf"topk_ids at stored position {{p}} holds an id outside \[0, {VOCAB}\)"),
])
def test_training_reads_refuse_inconsistent_draws_by_file_sample_and_position(tmp_path, column, change, message):
    directory = crafted_compact(tmp_path, column, change)
    _, position = first_with_several_draws(sampled_rows(6, 2, 8, seed=11)[0])
    expected = f"sample 's11-0': {message.format(p=position)}"
    with pytest.raises(FormatError, match=expected):
        list(ShardReader(directory))
    report = verify_directory(directory, deep=True)
    assert not report.ok and "s11-0" in report.problems[0]


def test_the_most_draws_a_capture_writes_are_still_read(tmp_path):
    """The bounds above do not refuse the honest extreme (65,535 draws per position)."""
    header = dataclasses.replace(sampled_header(0, 65535, "compact"), max_length=64)
    rows = sampled_rows(3, 0, 65535, seed=2)
    directory = write_shards(tmp_path / "shards", rows, header)
    assert len(list(ShardReader(directory))) == 3


def test_input_ids_past_the_teacher_vocabulary_are_refused(tmp_path):
    directory = write_shards(tmp_path / "shards", random_rows(4, k=8, vocab=VOCAB), synthetic_header(vocab=VOCAB),
                             rows_per_file=4)
    path = next((directory / "data").glob("*.parquet"))
    ids = pq.read_table(path).column("input_ids").to_pylist()[0]
    rewrite_values(path, "input_ids", 0, [VOCAB + 1, *ids[1:]])
    with pytest.raises(FormatError, match=rf"{path.name}: input_ids outside \[0, {VOCAB}\)"):
        list(ShardReader(directory))


def test_running_out_of_memory_while_decoding_is_one_line_naming_the_file(shard_dir, monkeypatch):
    import amid_pipeline.shards.reader as reader

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(reader, "decode_batch", exhausted)
    with pytest.raises(FormatError, match=r"part-\S+\.parquet: out of memory decoding it"):
        list(ShardReader(shard_dir))


def test_the_dataset_card_escapes_what_a_header_embeds(tmp_path):
    from amid_pipeline.shards.card import dataset_card

    header = dataclasses.replace(synthetic_header(vocab=VOCAB), dataset={
        "license": "mit\n---\nowner: me <script>alert(1)</script>", "source": "x | <img src=x onerror=alert(1)>\n# Heading"})
    directory = write_shards(tmp_path / "shards", random_rows(4, k=8, vocab=VOCAB), header)
    edit_manifest(directory, lambda manifest: manifest.update(
        stats={"command": "amid-pipeline cache-teacher\n```\n<b>out of the block</b>"}))
    card = dataset_card(directory)
    front = card.split("---\n")[1]
    assert "license: other\n" in front and "owner" not in front  # one identifier, no injected keys
    assert "<script" not in card and "<img" not in card and "\n# Heading" not in card
    assert card.count("```") == 2 * card.count("```bash") + 2 * card.count("```python")  # every code block still closes
    assert "x \\| &lt;img" in card  # shown, escaped, inside its table cell
