"""The default objective must train: from a healed student and an expert teacher's shards, a few steps leave
held-out perplexity no higher, the student's mass on the teacher's ids no lower and its KL to the teacher
lower. The settings that blew up (AMiD α = −3, λ = 0.1 on the tail or the both-renormalised support) fail
the same check, so the check can fail."""

from __future__ import annotations

import json

import pytest

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.capture.run import run_capture
from amid_pipeline.config import load_config
from amid_pipeline.evaluate import evaluate_on_shards, load_model
from amid_pipeline.train.config import DistillConfig, SFTConfig
from amid_pipeline.train.sft import sft
from amid_pipeline.train.loop import distill
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def expert_setting(tiny_models, tmp_path_factory):
    """(train shards, held-out shards, healed student): the tiny teacher fine-tuned on 160 jargon pairs
    (an expert, peaked distribution), its top-16 over those and 40 other pairs, the tiny student healed by
    30 CE steps."""
    base = tmp_path_factory.mktemp("expert")
    lines = (ROOT / "data" / "jargon" / "train.jsonl").read_text().splitlines(keepends=True)
    (base / "train.jsonl").write_text("".join(lines[:160]))
    (base / "heldout.jsonl").write_text("".join(lines[160:200]))
    common = {"dataset": str(base / "train.jsonl"), "max_length": 96, "batch_size": 8, "lr": 3e-3, "progress": False}
    sft(load_config(SFTConfig, None, {**common, "model": str(tiny_models["teacher"]), "output": str(base / "teacher"),
                                      "max_steps": 150, "eval_every": 50, "save_every": 150}))
    for split in ("train", "heldout"):
        run_capture(load_config(CaptureConfig, None, {
            "teacher": str(base / "teacher" / "model"), "dataset": str(base / f"{split}.jsonl"),
            "output": str(base / f"shards-{split}"), "backend": "hf", "k": 16, "max_length": 96, "progress": False}))
    sft(load_config(SFTConfig, None, {**common, "model": str(tiny_models["student"]), "output": str(base / "student"),
                                      "max_steps": 30, "eval_every": 10, "save_every": 30}))
    return base / "shards-train", base / "shards-heldout", base / "student" / "model"


def distilled(expert_setting, output, **objective) -> tuple[dict, dict]:
    """(held-out metrics before, after 20 steps of ``objective``)."""
    train, heldout, student = expert_setting
    distill(load_config(DistillConfig, None, {
        "shards": [str(train)], "student": str(student), "output": str(output), "max_steps": 20, "batch_size": 8,
        "lr": 1e-3, "heldout_fraction": 0.0, "eval_every": 0, "save_every": 0, "progress": False, **objective}))
    before = evaluate_on_shards(load_model(student)[0], heldout)
    return before, evaluate_on_shards(load_model(output / "model")[0], heldout)


def trains(before: dict, after: dict) -> bool:
    return (after["perplexity"] <= before["perplexity"] and after["support_mass"] >= before["support_mass"]
            and after["kl_to_teacher"] < before["kl_to_teacher"])


def test_the_default_objective_trains(expert_setting, tmp_path):
    before, after = distilled(expert_setting, tmp_path / "run")  # loss, support and parameters all defaults
    assert json.loads((tmp_path / "run" / "loss.json").read_text())["loss"] == "amid"
    assert trains(before, after), (before, after)


@pytest.mark.parametrize("support", ["tail", "renormalized"])
def test_the_settings_that_blew_up_fail_the_same_check(expert_setting, tmp_path, support):
    before, after = distilled(expert_setting, tmp_path / "run", loss="amid", support=support,
                              loss_params={"alpha": -3.0, "lam": 0.1})
    assert not trains(before, after), (before, after)
