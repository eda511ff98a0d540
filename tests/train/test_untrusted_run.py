"""Run folders from someone else: nothing in them runs code or points outside them, and a resume refuses,
by name, every input or setting that differs from the ones the run was started with."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.views import subset_directory
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.loop import distill
from tests.train.test_distill import make_config
from tests.train.test_sft import pairs  # noqa: F401 (a fixture)
from tests.train.test_sft import run as sft_run

RESUMABLE = {"max_steps": 4, "save_every": 2, "eval_every": 2}


class Payload:
    """Unpickling this object creates ``marker``: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def started_run(tiny_shards, tiny_models, run, **overrides):
    distill(make_config(tiny_shards, tiny_models["student"], run, **{**RESUMABLE, **overrides}))
    return run


def test_a_crafted_trainer_state_is_refused_without_running(tiny_shards, tiny_models, tmp_path):
    run = started_run(tiny_shards, tiny_models, tmp_path / "run")
    marker = tmp_path / "ran"
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    torch.save({"step": 4, "payload": Payload(marker)}, state)
    with pytest.raises(TrainingError, match=r"trainer_state\.pt: refused"):
        distill(make_config(tiny_shards, tiny_models["student"], run, resume=True, **RESUMABLE))
    assert not marker.exists()


def test_a_checkpoint_pointer_out_of_the_run_folder_is_refused(tiny_shards, tiny_models, tmp_path):
    elsewhere = started_run(tiny_shards, tiny_models, tmp_path / "elsewhere")
    run = started_run(tiny_shards, tiny_models, tmp_path / "run")
    for target in ("../../elsewhere/checkpoints/step-000004", str(elsewhere / "checkpoints" / "step-000004")):
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "path": target}))
        with pytest.raises(TrainingError, match="not a step-NNNNNN checkpoint inside"):
            distill(make_config(tiny_shards, tiny_models["student"], run, resume=True, **RESUMABLE))


@pytest.mark.parametrize("change, named", [({"lr": 3e-3}, "lr: 0.001 there, 0.003 now"),
                                           ({"batch_size": 2}, "batch_size: 4 there, 2 now"),
                                           ({"loss": "reverse_kl"}, "loss: 'amid' there, 'reverse_kl' now")])
def test_resume_refuses_other_settings_by_name(tiny_shards, tiny_models, tmp_path, change, named):
    run = started_run(tiny_shards, tiny_models, tmp_path / "run")
    saved = (run / "distill_config.toml").read_text()
    with pytest.raises(TrainingError, match=named):
        distill(make_config(tiny_shards, tiny_models["student"], run, resume=True, **{**RESUMABLE, **change}))
    assert (run / "distill_config.toml").read_text() == saved
    longer = distill(make_config(tiny_shards, tiny_models["student"], run, resume=True, **{**RESUMABLE, "max_steps": 6}))
    assert longer.steps == 6 and (run / "distill_config.toml").read_text() == saved  # the config it was started with


def test_resume_refuses_changed_inputs_and_accepts_the_same_ones_by_another_path(tiny_shards, tiny_models, tmp_path,
                                                                                 monkeypatch):
    run = started_run(tiny_shards, tiny_models, tmp_path / "run", max_steps=6)
    other_student = tmp_path / "other-student"
    shutil.copytree(tiny_models["student"], other_student)
    weights = other_student / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # another student in the same place
    weights.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=r"\(student: \w+… there"):
        distill(make_config(tiny_shards, other_student, run, resume=True, **{**RESUMABLE, "max_steps": 6}))
    fewer = tmp_path / "fewer-rows"  # other shards: a subset of the same capture
    subset_directory(str(tiny_shards), str(fewer), sample_ids=[row.sample_id for row in ShardReader(tiny_shards)][:30])
    with pytest.raises(TrainingError, match=r"shards: "):
        distill(make_config(fewer, tiny_models["student"], run, resume=True, **{**RESUMABLE, "max_steps": 6}))
    monkeypatch.chdir(tiny_shards.parent)  # the same shards and student, named relative to another folder
    resumed = distill(make_config(os.path.relpath(tiny_shards), os.path.relpath(tiny_models["student"]), run, resume=True,
                                  **{**RESUMABLE, "max_steps": 6}))
    assert resumed.steps == 6


def test_resume_refuses_an_online_teacher_replaced_in_place(tiny_shards, tiny_models, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    settings = {**RESUMABLE, "online_teacher": str(teacher), "loss": "forward_kl"}
    run = started_run(tiny_shards, tiny_models, tmp_path / "run", **settings)
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="online_teacher: "):
        distill(make_config(tiny_shards, tiny_models["student"], run, resume=True, **settings))


def test_sft_resume_refuses_another_dataset_or_model(tiny_models, pairs, tmp_path):
    output, settings = tmp_path / "sft", {"max_steps": 4, "save_every": 2, "eval_every": 2}
    sft_run(tiny_models, pairs, output, **settings)
    saved = (output / "sft_config.toml").read_text()
    edited = tmp_path / "pairs.jsonl"  # the same file name and rows, one response changed
    lines = pairs.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    edited.write_text("".join([json.dumps({**row, "response": "Edited. " + row["response"]}) + "\n", *lines[1:]]))
    with pytest.raises(TrainingError, match=r"dataset: "):
        sft_run(tiny_models, edited, output, resume=True, **settings)
    with pytest.raises(TrainingError, match=r"model: "):
        sft_run({"student": tiny_models["teacher"]}, pairs, output, resume=True, **settings)
    assert (output / "sft_config.toml").read_text() == saved
    assert sft_run(tiny_models, pairs, output, resume=True, **settings).steps == 4
