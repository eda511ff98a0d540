"""CLI: cache-teacher --help, a success and failures (one line, non-zero exit)."""

from __future__ import annotations

import json

import pytest
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


BAD_INPUTS = {  # file content -> what the one line must say
    "utf8": (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "c"}\n', "d.jsonl, line 2: not valid UTF-8"),
    "cut": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp', "d.jsonl, line 2: not valid JSON (Unterminated string"),
    "empty": (b"", "d.jsonl: empty file (no rows)"),
    "int_response": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 7}\n',
                     "d.jsonl, row 1: field 'response' holds int, not text"),
    "list_text": (b'{"text": [1, 2]}\n', "d.jsonl, row 0: field 'text' holds list, not text"),
    "references": (b'{"prompt": "a", "response": ["b", "c"]}\n',
                   "(skipped: 1 a list of responses (several references), not one)"),
    "all_skipped": (b'{"prompt": "a", "response": " "}\n{"prompt": "b", "response": null}\n',
                    "none of the 2 rows read gave a sequence to store (skipped: 2 empty or whitespace response)"),
    "id_too_large": (b'{"input_ids": [1, 2, 99999]}\n',
                     "d.jsonl, row 0: field 'input_ids' holds token id 99999, outside the tokenizer's vocabulary"),
    "id_negative": (b'{"input_ids": [1, -3, 2]}\n', "d.jsonl, row 0: field 'input_ids' holds token id -3"),
}


def run_capture_cli(tiny_models, data, output, *extra):
    return runner.invoke(app, ["cache-teacher", "--teacher", str(tiny_models["teacher"]), "--dataset", str(data),
                               "--output", str(output), "--backend", "hf", "--k", "4", "--no-progress", *extra])


def assert_one_line_error(result, expected):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_line_or_row_and_field(tiny_models, tmp_path, case):
    content, expected = BAD_INPUTS[case]
    data = tmp_path / "d.jsonl"
    data.write_bytes(content)
    result = run_capture_cli(tiny_models, data, tmp_path / "out")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_start_past_the_end_and_an_output_that_is_a_file(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a small line of text"}) + "\n")
    assert_one_line_error(run_capture_cli(tiny_models, data, tmp_path / "out", "--start", "5"),
                          "--start 5 is past the end of dataset")
    assert_one_line_error(run_capture_cli(tiny_models, data, data), f"--output {data} is a file")


def test_disk_full_is_one_line_and_the_rerun_resumes(tiny_models, tmp_path, monkeypatch):
    import errno

    from amid_pipeline.shards.writer import ShardWriter

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(6)))
    commit = ShardWriter.commit_file
    calls = []

    def full_after_one_file(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", "data/.part-w00000-00001.parquet.tmp")
        return commit(self)

    monkeypatch.setattr(ShardWriter, "commit_file", full_after_one_file)
    result = run_capture_cli(tiny_models, data, tmp_path / "out", "--rows-per-file", "3")
    assert_one_line_error(result, "no space left on the device while writing")
    assert "run the same command again to resume" in result.output
    monkeypatch.setattr(ShardWriter, "commit_file", commit)
    result = run_capture_cli(tiny_models, data, tmp_path / "out", "--rows-per-file", "3")
    assert result.exit_code == 0 and "chunks kept from an earlier run" in result.output
    assert [line for line in result.output.splitlines() if "chunks kept" in line][0].split()[-1] == "1"

