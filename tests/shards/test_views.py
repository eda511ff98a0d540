"""combine and subset: views over shard directories, checked row by row against the directories themselves."""

from __future__ import annotations

import dataclasses
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from amid_pipeline.cli import app
from amid_pipeline.shards.manifest import Header, load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import FormatError
from amid_pipeline.shards.verify import verify_directory
from amid_pipeline.shards.views import combine_directories, subset_directory
from tests.helpers import assert_same_rows, random_rows, rows_by_id, synthetic_header, write_shards

runner = CliRunner()


def header_for(source: str, **changes) -> Header:
    return dataclasses.replace(synthetic_header(), dataset={"source": source}, **changes)


@pytest.fixture
def two_runs(tmp_path):
    """Two capture directories of the same teacher over different data (ids disjoint)."""
    a = write_shards(tmp_path / "run-a", random_rows(11, k=8, vocab=100, seed=1), header_for("data/a.jsonl"))
    b = write_shards(tmp_path / "run-b", random_rows(9, k=8, vocab=100, seed=2), header_for("data/b.jsonl"))
    return a, b


def test_combined_view_reads_as_both_directories_and_verifies(two_runs, tmp_path):
    a, b = two_runs
    summary = combine_directories([str(a), str(b)], str(tmp_path / "both"))
    assert (summary.files, summary.rows, summary.parts) == (4, 20, 2)
    assert_same_rows(rows_by_id(tmp_path / "both"), {**rows_by_id(a), **rows_by_id(b)})
    manifest = load_manifest(tmp_path / "both")
    assert manifest.totals["positions"] == load_manifest(a).totals["positions"] + load_manifest(b).totals["positions"]
    assert manifest.header.dataset == {"source": "combined", "sources": ["data/a.jsonl", "data/b.jsonl"]}
    assert all(record.name.startswith("../run-") for record in manifest.files)  # no data copied
    assert not (tmp_path / "both" / "data").exists()
    report = verify_directory(tmp_path / "both")
    assert report.ok and len(report.checked) == 4, report.problems
    # relative names: the tree can move as a whole
    moved = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")
    assert_same_rows(rows_by_id(moved / "both"), {**rows_by_id(a), **rows_by_id(b)})


def test_duplicate_ids_are_reported_refused_kept_or_dropped(tmp_path):
    rows = random_rows(12, k=8, vocab=100, seed=3)
    a = write_shards(tmp_path / "a", rows, header_for("x"))
    b = write_shards(tmp_path / "b", rows[6:] + random_rows(4, k=8, vocab=100, seed=4), header_for("y"), rows_per_file=4)
    with pytest.raises(FormatError, match=r"6 sample ids occur more than once .*'sample-3-6' in .*a/data/.*b/data/"):
        combine_directories([str(a), str(b)], str(tmp_path / "view"))
    assert not (tmp_path / "view").exists()
    kept = combine_directories([str(a), str(b)], str(tmp_path / "kept"), duplicates="keep")
    assert (kept.rows, kept.duplicates, kept.dropped) == (22, 6, 0)
    dropped = combine_directories([str(a), str(b)], str(tmp_path / "dropped"), duplicates="drop")
    assert (dropped.rows, dropped.duplicates, dropped.dropped) == (16, 6, 6)
    found = list(ShardReader(tmp_path / "dropped"))
    assert len(found) == 16 and len({row.sample_id for row in found}) == 16
    assert_same_rows({row.sample_id: row for row in found}, {**rows_by_id(b), **rows_by_id(a)})
    assert verify_directory(tmp_path / "dropped").ok
    (selection_file,) = (tmp_path / "dropped").glob("selection-*.parquet")
    selection = pq.read_table(selection_file)  # any Parquet client reads it
    assert selection.num_rows == 16 and set(selection.column_names) == {"file", "row"}


def test_directories_of_another_teacher_tokenizer_or_k_are_refused(two_runs, tmp_path):
    a, _ = two_runs
    rows = random_rows(3, k=8, vocab=100, seed=9)
    other_tokenizer = header_for("z", tokenizer={"fingerprint": "1" * 64, "vocab_size": 100})
    other_teacher = header_for("z", teacher={"name_or_path": "another-teacher", "dtype": "float32"})
    cases = {"tokenizer differs": other_tokenizer, "teacher differs": other_teacher}
    for reason, header in cases.items():
        c = write_shards(tmp_path / reason.split()[0], rows, header)
        with pytest.raises(FormatError, match=rf"cannot be combined with .*run-a: {reason}"):
            combine_directories([str(a), str(c)], str(tmp_path / "view"))
    k4 = write_shards(tmp_path / "k4", random_rows(3, k=4, vocab=100, seed=9), header_for("z", k=4))
    result = runner.invoke(app, ["combine", str(tmp_path / "view"), str(a), str(k4)])
    assert result.exit_code == 1 and "k differs (8 vs 4)" in result.output
    from amid_pipeline.train.checks import TrainingError, check_shard_dirs
    from amid_pipeline.train.data import ShardSet

    with pytest.raises(TrainingError, match=r"k4 cannot be trained on together with .*run-a: k differs \(8 vs 4\)"):
        check_shard_dirs(ShardSet.open([str(a), str(k4)]))  # the same refusal when the directories are listed in --shards


def test_subset_by_ids_and_by_dataset_then_a_view_of_a_view(two_runs, tmp_path):
    a, b = two_runs
    combine_directories([str(a), str(b)], str(tmp_path / "both"))
    everything = rows_by_id(tmp_path / "both")
    wanted = ["sample-1-0", "sample-1-7", "sample-2-8", "sample-2-3"]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([*wanted, "not-there"]) + "\n")
    result = runner.invoke(app, ["subset", str(tmp_path / "both"), str(tmp_path / "some"), "--ids", str(ids)])
    assert result.exit_code == 0, result.output
    assert "1 requested sample ids are not in" in result.output
    assert_same_rows(rows_by_id(tmp_path / "some"), {i: everything[i] for i in wanted})
    assert verify_directory(tmp_path / "some").ok
    names = [record.name for record in load_manifest(tmp_path / "some").files]
    assert all(name.startswith("../run-") for name in names)  # flattened: points at the data, not at the view

    subset_directory(str(tmp_path / "both"), str(tmp_path / "only-b"), datasets=["b.jsonl"])
    assert_same_rows(rows_by_id(tmp_path / "only-b"), rows_by_id(b))
    with pytest.raises(FormatError, match=r"no files from datasets \['c.jsonl'\]; it holds \['data/a.jsonl', 'data/b.jsonl'\]"):
        subset_directory(str(tmp_path / "both"), str(tmp_path / "none"), datasets=["c.jsonl"])
    with pytest.raises(FormatError, match="none of the 1 requested sample ids"):
        subset_directory(str(a), str(tmp_path / "none"), sample_ids=["sample-2-0"])


def test_views_are_not_written_over_data_rewrite_cleanly_and_refuse_a_damaged_selection(two_runs, tmp_path):
    a, b = two_runs
    with pytest.raises(FormatError, match="is not empty and is not a view"):
        combine_directories([str(a)], str(b))
    subset_directory(str(a), str(tmp_path / "some"), sample_ids=["sample-1-2", "sample-1-3"])
    first = sorted(p.name for p in (tmp_path / "some").iterdir())
    subset_directory(str(a), str(tmp_path / "some"), sample_ids=["sample-1-4"])  # a second run replaces the view
    (selection,) = (tmp_path / "some").glob("selection-*.parquet")
    assert selection.name not in first and list(rows_by_id(tmp_path / "some")) == ["sample-1-4"]
    ids = tmp_path / "ids.txt"
    ids.write_text("\n\n")
    result = runner.invoke(app, ["subset", str(a), str(tmp_path / "none"), "--ids", str(ids)])
    assert result.exit_code == 1 and "ids.txt: no sample ids in it" in result.output
    table = pq.read_table(selection)
    pq.write_table(table.slice(0, 0), selection)
    with pytest.raises(FormatError, match=r"some/selection-[0-9a-f]+.parquet: sha256 differs from the manifest's"):
        load_manifest(tmp_path / "some")


def test_distill_reports_duplicates_across_shards_and_trains_from_a_view(tiny_shards, tiny_models, tmp_path, capsys):
    from amid_pipeline.config import load_config
    from amid_pipeline.train.config import DistillConfig
    from amid_pipeline.train.loop import distill

    first = [row.sample_id for row in ShardReader(tiny_shards)][:20]
    subset_directory(str(tiny_shards), str(tmp_path / "first"), sample_ids=first)

    def run(shards: list[str], output: str):
        config = load_config(DistillConfig, None, {"shards": shards, "student": str(tiny_models["student"]),
                                                   "output": str(tmp_path / output), "max_steps": 1, "progress": False})
        return distill(config)

    run([str(tiny_shards), str(tmp_path / "first")], "listed")
    assert "note: 20 sample ids occur more than once across --shards" in capsys.readouterr().out
    summary = run([str(tmp_path / "first")], "view")
    assert summary.steps == 1 and "more than once" not in capsys.readouterr().out


def test_views_refuse_what_they_cannot_hold_by_name(two_runs, tmp_path):
    """Each remaining view, writer and reader guard in turn: an unknown duplicates policy, no sources, a
    subset of ids that are not there, a directory given twice, a writer with no rows per file, unknown files."""
    from amid_pipeline.shards.writer import ShardWriter

    a, b = two_runs
    with pytest.raises(ValueError, match="duplicates must be one of"):
        combine_directories([str(a)], str(tmp_path / "x"), duplicates="merge")
    with pytest.raises(FormatError, match="combine: no source directories given"):
        combine_directories([], str(tmp_path / "y"))
    with pytest.raises(FormatError, match="none of the 1 requested sample ids is there"):
        subset_directory(str(a), str(tmp_path / "z"), sample_ids=["no-such-id"])
    with pytest.raises(FormatError, match="is included twice"):
        combine_directories([str(a), str(a)], str(tmp_path / "w"), duplicates="keep")
    with pytest.raises(ValueError, match="rows_per_file and rows_per_group must be >= 1"):
        ShardWriter(tmp_path / "v", header=synthetic_header(), rows_per_file=0)
    with pytest.raises(FormatError, match=r"files not in the manifest: \['data/nope.parquet'\]"):
        ShardReader(a, files=["data/nope.parquet"])
