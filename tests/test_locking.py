"""One writer per output: a second `cache-teacher` (same worker) or `distill` on the same folder is refused at
once, naming the first; the lock dies with its process (kill -9 included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from amid_pipeline.cli import app
from amid_pipeline.shards.storage import OutputInUse, exclusive

runner = CliRunner()
HOLD = "import sys, time; from amid_pipeline.shards.storage import exclusive\nwith exclusive(sys.argv[1], sys.argv[2]):\n" \
       "    print('held', flush=True); time.sleep(60)"


def hold_in_another_process(directory, role=""):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), role], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_by_pid_until_the_first_is_killed(tmp_path):
    first = hold_in_another_process(tmp_path / "out")
    try:
        with pytest.raises(OutputInUse, match=rf"out is being written by pid {first.pid} "):
            with exclusive(tmp_path / "out"):
                pass
        with exclusive(tmp_path / "out", ".other-role"):  # another role (a capture worker) is not blocked
            pass
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    with exclusive(tmp_path / "out"):  # released by the kernel with its process
        pass


def test_two_distill_runs_on_one_output(tiny_shards, tiny_models, tmp_path):
    first = hold_in_another_process(tmp_path / "run")
    try:
        result = runner.invoke(app, ["distill", "--shards", str(tiny_shards), "--student", str(tiny_models["student"]),
                                     "--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert result.exit_code == 1 and f"is being written by pid {first.pid}" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_captures_of_one_worker_share(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a small line of text"}) + "\n")
    args = ["cache-teacher", "--teacher", str(tiny_models["teacher"]), "--dataset", str(data), "--output",
            str(tmp_path / "out"), "--backend", "hf", "--k", "4", "--no-progress"]
    first = hold_in_another_process(tmp_path / "out", ".w00000-of-00001")
    try:
        result = runner.invoke(app, args)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert result.exit_code == 1 and f"is being written by pid {first.pid}" in result.output
    assert runner.invoke(app, args).exit_code == 0  # the directory holding only a lock file counts as empty
