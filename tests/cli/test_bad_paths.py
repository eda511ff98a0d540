"""A missing or wrong path, or a missing required setting: one line naming it, exit 1, no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from amid_pipeline.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args,message", [
    (["distill", "--student", "{student}", "--output", "{tmp}/run"], "shards: required"),
    (["distill", "--shards", "{shards}", "--student", "{tmp}/nope", "--output", "{tmp}/run"], "student {tmp}/nope: no such model folder"),
    (["cache-teacher", "--teacher", "{tmp}/nope", "--dataset", "{tmp}/d.jsonl", "--output", "{tmp}/o"], "teacher {tmp}/nope: no such model folder"),
    (["cache-teacher", "--teacher", "{tmp}", "--dataset", "{tmp}/d.jsonl", "--output", "{tmp}/o"], "not an HF model folder (no config.json)"),
    (["eval", "{tmp}/nope", "--shards", "{shards}"], "model {tmp}/nope: no such model folder"),
    (["compat", "{shards}", "{tmp}/nope"], "student {tmp}/nope: no such model folder"),
    (["init-student", "{tmp}/nope", "{tmp}/s"], "teacher {tmp}/nope: no such model folder"),
    # relative "folder/name" whose folder exists here: a mistyped local path, not a hub id (no network)
    (["distill", "--shards", "{shards}", "--student", "{rel}/nope", "--output", "{tmp}/run"], "student {rel}/nope: no such model folder"),
    # "folder/name" whose folder does not exist here either: a hub id, looked up once (no minute of retries)
    (["distill", "--shards", "{shards}", "--student", "no-such-folder/nope", "--output", "{tmp}/run"],
     "student no-such-folder/nope: no such model folder here, and not found on the Hugging Face hub"),
])
def test_bad_paths_fail_in_one_line(tiny_shards, tiny_models, tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub lookup would be tried (and fail slowly) were it not refused first
    fill = {"student": str(tiny_models["student"]), "shards": str(tiny_shards), "tmp": str(tmp_path), "rel": tmp_path.name}
    result = runner.invoke(app, [a.format(**fill) for a in args])
    assert result.exit_code == 1, result.output
    assert message.format(**fill) in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": 3, "response": "x"}'], "{data}, row 0: field 'prompt' holds int, not text"),
    (["not json"], "{data}, line 1: not valid JSON"),
    (['{"prompt": "a"}'], "field(s) ['response'] not found; available fields: ['prompt']"),
])
def test_eval_with_bad_data_fails_in_one_line(tiny_models, tmp_path, lines, message):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    result = runner.invoke(app, ["eval", str(tiny_models["student"]), "--data", str(data), "--generate", "1",
                                 "--no-progress"])
    assert result.exit_code == 1 and message.format(data=data) in result.output, result.output
    assert "Traceback" not in result.output


def test_a_negative_count_and_a_config_that_is_not_utf8_are_refused(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    result = runner.invoke(app, ["eval", str(tiny_models["student"]), "--data", str(data), "--generate", "-1"])
    assert result.exit_code == 2 and "--generate" in result.output
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff\xfe lr = 1\n")
    result = runner.invoke(app, ["distill", "--config", str(config)])
    assert result.exit_code == 1 and f"{config}: not UTF-8 text" in result.output and "Traceback" not in result.output
