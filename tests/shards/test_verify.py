"""verify catches each corruption by file name; a clean directory passes."""

from __future__ import annotations

import json
import shutil

import pytest

from amid_pipeline.shards.verify import verify_directory
from tests.helpers import random_rows, synthetic_header, write_shards


def first_file(shard_dir):
    return sorted((shard_dir / "data").glob("*.parquet"))[0]


def test_clean_directory_passes(shard_dir):
    report = verify_directory(shard_dir)
    assert report.ok, report.problems
    assert len(report.checked) == 3


def test_truncated_file(shard_dir):
    path = first_file(shard_dir)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = verify_directory(shard_dir)
    assert [p.split(":")[0] for p in report.problems] == [f"data/{path.name}"]
    assert "truncated" in report.problems[0]


def test_flipped_byte(shard_dir):
    path = first_file(shard_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_directory(shard_dir)
    assert len(report.problems) == 1 and "sha256" in report.problems[0] and path.name in report.problems[0]


def test_missing_file(shard_dir):
    path = first_file(shard_dir)
    path.unlink()
    report = verify_directory(shard_dir)
    assert report.problems == [f"data/{path.name}: missing"]


def test_unlisted_file(shard_dir):
    shutil.copy(first_file(shard_dir), shard_dir / "data" / "stray.parquet")
    report = verify_directory(shard_dir)
    assert report.problems == ["data/stray.parquet: not listed in the manifest"]


def test_manifest_counts_that_disagree_with_the_data(shard_dir):
    path = shard_dir / "manifest.json"
    payload = json.loads(path.read_text())
    payload["files"][1]["rows"] += 1
    path.write_text(json.dumps(payload))
    report = verify_directory(shard_dir)
    assert len(report.problems) == 1 and "manifest says" in report.problems[0]


def test_out_of_range_ids_are_reported(tmp_path):
    """A file written for a larger vocabulary than its manifest claims: ids >= vocab are caught."""
    rows = random_rows(5, k=8, vocab=100)
    directory = write_shards(tmp_path / "s", rows, synthetic_header(vocab=100), rows_per_file=100)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["model_vocab_size"] = 10
    (directory / "manifest.json").write_text(json.dumps(manifest))
    report = verify_directory(directory)
    assert len(report.problems) == 1 and "model_vocab_size" in report.problems[0]


def test_unfinished_tmp_file_is_a_note_not_a_problem(shard_dir):
    (shard_dir / "data" / ".part-00009.parquet.tmp").write_bytes(b"partial")
    report = verify_directory(shard_dir)
    assert report.ok and any("unfinished" in n for n in report.notes)


@pytest.mark.parametrize("deep", [True, False])
def test_no_manifest(tmp_path, deep):
    (tmp_path / "data").mkdir()
    report = verify_directory(tmp_path, deep=deep)
    assert not report.ok and "no manifest.json" in report.problems[0]
