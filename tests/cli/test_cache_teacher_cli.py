"""CLI: cache-teacher --help, a success and failures (one line, non-zero exit)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from amid_pipeline.cli import app

runner = CliRunner()


def test_help_names_every_setting():
    result = runner.invoke(app, ["cache-teacher", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--teacher", "--dataset", "--output", "--k", "--backend", "--num-workers", "--overwrite", "--config"):
        assert option in result.output


def test_success_then_a_refused_rerun(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a small line of text"}) + "\n")
    args = ["cache-teacher", "--teacher", str(tiny_models["teacher"]), "--dataset", str(data),
            "--output", str(tmp_path / "out"), "--backend", "hf", "--k", "4", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sequences written" in result.output
    result = runner.invoke(app, [*args[:-2], "8", "--no-progress"])
    assert result.exit_code == 1
    assert "other settings (k: 4 there, 8 now)" in result.output and "Traceback" not in result.output


def test_invalid_config_is_one_clear_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('teacher = "t"\nbogus = 1\n')
    result = runner.invoke(app, ["cache-teacher", "-c", str(path)])
    assert result.exit_code == 1
    assert "unknown key 'bogus'" in result.output and "dataset: required" in result.output
