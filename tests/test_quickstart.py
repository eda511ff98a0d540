"""A shortened quickstart on the real offline teacher (slow: converts SmolLM2, starts vLLM twice)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import in_fresh_process


@pytest.mark.slow
def test_shortened_quickstart_end_to_end_and_reuse(tmp_path):
    pytest.importorskip("gguf")
    from amid_pipeline.quickstart import run_quickstart

    first = in_fresh_process(run_quickstart, tmp_path / "qs", train_rows=24, heldout_rows=8, steps=3, rouge_prompts=2,
                             progress=False)
    assert set(first.table) == {"teacher", "student before", "student after", "student after, CE only"}
    assert [phase.split(" (")[0] for phase in first.seconds] == ["teacher and student folders", "cache-teacher",
                                                                "cache-teacher", "distill", "distill-ce", "evaluation"]
    teacher = first.table["teacher"]
    assert teacher["top1_agreement"] > 0.9 and teacher["kl_to_teacher"] < 0.05  # its own shards
    assert first.table["student before"]["perplexity"] > teacher["perplexity"]
    assert (tmp_path / "qs" / "distill" / "model" / "config.json").exists()
    assert json.loads((tmp_path / "qs" / "distill-ce" / "loss.json").read_text())["kd_ratio"] == 0.0
    shard_files = sorted((tmp_path / "qs").glob("shards-*/**/*.parquet"))
    written = [f.stat().st_mtime_ns for f in shard_files]
    second = in_fresh_process(run_quickstart, tmp_path / "qs", train_rows=24, heldout_rows=8, steps=3, rouge_prompts=0,
                              progress=False)
    assert [f.stat().st_mtime_ns for f in shard_files] == written and shard_files  # teacher shards reused as they were
    assert second.table["student after"]["perplexity"] == pytest.approx(first.table["student after"]["perplexity"])


def test_the_comparison_line_names_where_distillation_is_ahead_and_behind():
    """Lower is better for perplexity and both KLs, higher for agreement, mass and ROUGE-L."""
    from amid_pipeline.quickstart import QuickstartResult

    kd = {"perplexity": 5686, "kl_with_rest": 3.88, "kl_to_teacher": 3.44, "top1_agreement": 0.158,
          "support_mass": 0.273, "rouge_l": 7.5}
    ce = {"perplexity": 4432, "kl_with_rest": 4.27, "kl_to_teacher": 3.05, "top1_agreement": 0.096,
          "support_mass": 0.124, "rouge_l": 9.4}
    line = QuickstartResult(None, {"student after": kd, "student after, CE only": ce}, {}).comparison()
    assert line.endswith("ahead on kl_with_rest, top1_agreement, support_mass; behind on perplexity, kl_to_teacher, "
                         "rouge_l")


def test_a_folder_made_with_other_sizes_is_refused_in_one_line(tmp_path):
    """A second run reuses a folder made with the same sizes; one made with others, or by an earlier release
    (a student and shards but no record), is refused by name before anything runs."""
    from typer.testing import CliRunner

    from amid_pipeline.cli import app
    from amid_pipeline.quickstart import QuickstartMismatch, check_output

    sizes = {"keep_every": 6, "train_rows": 72, "heldout_rows": 32, "steps": 16}
    check_output(tmp_path / "qs", sizes)
    check_output(tmp_path / "qs", sizes)  # the same sizes: reused
    with pytest.raises(QuickstartMismatch, match=r"other sizes \(steps: 16 there, 30 now\)"):
        check_output(tmp_path / "qs", {**sizes, "steps": 30})
    (tmp_path / "old" / "student-init").mkdir(parents=True)
    result = CliRunner().invoke(app, ["quickstart", "--output", str(tmp_path / "old"), "--no-progress"])
    assert result.exit_code == 1 and "from an earlier release" in result.output and "Traceback" not in result.output
