"""CLI: --help, a success and a failure for inspect and verify."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from amid_pipeline.cli import app

runner = CliRunner()


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("cache-teacher", "distill", "inspect", "verify"):
        assert command in result.output


def test_inspect_prints_summary_and_plot(shard_dir, tmp_path):
    plot = tmp_path / "stats.png"
    result = runner.invoke(app, ["inspect", str(shard_dir), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "bytes_per_entry" in result.output and "target_outside_topk" in result.output
    assert plot.stat().st_size > 1000
    as_json = json.loads(runner.invoke(app, ["inspect", str(shard_dir), "--json"]).output)
    assert as_json["rows"] == 20 and as_json["k"] == 8
    assert 0 < as_json["topk_mass_mean"] <= 1 and as_json["rows_read_for_statistics"] == 20
    sampled = json.loads(runner.invoke(app, ["inspect", str(shard_dir), "--json", "--max-rows", "3"]).output)
    assert sampled["rows"] == 20 and sampled["rows_read_for_statistics"] == 3


def test_inspect_of_a_non_shard_directory_fails_in_one_line(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest.json" in result.output and "Traceback" not in result.output


def test_verify_ok_and_corrupted(shard_dir):
    result = runner.invoke(app, ["verify", str(shard_dir)])
    assert result.exit_code == 0 and "OK 3 files" in result.output
    victim = sorted((shard_dir / "data").glob("*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:-10])
    result = runner.invoke(app, ["verify", str(shard_dir)])
    assert result.exit_code == 1
    assert f"FAIL data/{victim.name}" in result.output


@pytest.mark.parametrize("command,config_class", [("cache-teacher", "CaptureConfig"), ("distill", "DistillConfig"),
                                                  ("sft", "SFTConfig")])
def test_help_of_every_command_describes_every_option(command, config_class):
    """Each setting's flag, help, choices, default and 'required' show in --help (Rich markup once swallowed
    every '[choices: ...]', '[config default: ...]' and '[required, ...]')."""
    import dataclasses

    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.train.config import DistillConfig, SFTConfig

    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for field in dataclasses.fields({"CaptureConfig": CaptureConfig, "DistillConfig": DistillConfig,
                                     "SFTConfig": SFTConfig}[config_class]):
        meta = field.metadata
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(meta["help"].split()[:4]) in text, field.name
        if meta.get("choices"):
            assert f"[choices: {', '.join(map(str, meta['choices']))}]" in text, field.name
        if meta.get("required"):
            assert "[required, here or in --config]" in text, field.name
        elif field.default not in (None, dataclasses.MISSING):
            assert f"[config default: {field.default}]" in text, field.name
    for plain in ("inspect", "verify", "eval", "plot", "quickstart"):
        assert runner.invoke(app, [plain, "--help"]).exit_code == 0, plain


def test_help_and_argument_errors_do_not_import_torch():
    """`amid-pipeline --help` took 13-38 s on a busy machine because the CLI imported torch (measured
    in the README; here: that no command's help or argument error imports it)."""
    import subprocess
    import sys

    probe = ("import sys; from typer.testing import CliRunner; from amid_pipeline.cli import app; r = CliRunner(); "
             "[r.invoke(app, a) for a in (['--help'], ['distill', '--help'], ['cache-teacher', '--help'], "
             "['sft', '--help'], ['distill', '--max-steps', 'many'])]; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
