"""distill --best-metric / --patience: RUN_DIR/model is the best evaluated model, a plateau stops the run,
and a killed run resumes to the same choice. References: the metrics.jsonl curve, and checkpoints of every step."""

from __future__ import annotations

import json

import pytest

from amid_pipeline.train import loop
from amid_pipeline.train.best import KEPT, BestModel
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.loop import distill
from tests.helpers import stop_distill_at_step
from tests.train.test_distill import make_config, weights

# lr high enough that the held-out curve turns up again within a few steps: the best is not the last step
SETTINGS = {"loss": "forward_kl", "eval_every": 1, "save_every": 1, "keep_checkpoints": 20, "lr": 0.02,
            "max_steps": 8, "warmup_steps": 0, "schedule": "constant"}


def eval_curve(run, metric):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["eval"][metric] for line in lines if "eval" in line}


def assert_same_weights(a, b):
    import torch

    first, second = weights(a), weights(b)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("metric, pick", [("kl_to_teacher", min), ("top1_agreement", max)])
def test_model_is_the_best_evaluated_step(tiny_shards, tiny_models, tmp_path, metric, pick):
    run = tmp_path / "run"
    summary = distill(make_config(tiny_shards, tiny_models["student"], run, best_metric=metric, **SETTINGS))
    curve = eval_curve(run, metric)
    assert sorted(curve) == list(range(9))  # step 0 (the student as it came) to 8
    best_step = next(step for step in sorted(curve) if curve[step] == pick(curve.values()))  # the first best
    chosen = json.loads((run / "best.json").read_text())
    assert chosen["step"] == summary.best.step == best_step and chosen["value"] == curve[best_step]
    assert chosen["metric"] == metric and not chosen["stopped_early"] and summary.steps == 8
    assert 0 < best_step < 8, curve  # the settings make the choice matter (neither the start nor the end)
    assert_same_weights(run / "model", run / "checkpoints" / f"step-{best_step:06d}")
    assert json.loads((run / "model" / KEPT).read_text())["step"] == best_step and "warning" not in chosen


def test_a_plateau_stops_the_run_and_a_resume_does_nothing_more(tiny_shards, tiny_models, tmp_path):
    run = tmp_path / "run"
    settings = {**SETTINGS, "lr": 0.0, "max_steps": 20, "save_every": 0}  # lr 0: no evaluation beats step 0
    summary = distill(make_config(tiny_shards, tiny_models["student"], run, best_metric="kd", patience=3, **settings))
    assert summary.steps == 3 and summary.best.stopped and summary.best.step == 0
    chosen = json.loads((run / "best.json").read_text())
    assert chosen["stopped_early"] and chosen["last_step"] == 3 and "patience 3" in chosen["why"]
    assert_same_weights(run / "model", tiny_models["student"])
    lines = (run / "metrics.jsonl").read_text()
    again = distill(make_config(tiny_shards, tiny_models["student"], run, best_metric="kd", patience=3, resume=True,
                                **settings))
    assert again.steps == 3 and (run / "metrics.jsonl").read_text() == lines


def test_killed_run_resumes_to_the_same_best_model(tiny_shards, tiny_models, tmp_path, monkeypatch):
    settings = {**SETTINGS, "save_every": 3, "best_metric": "kl_to_teacher", "patience": 3}
    reference = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "ref", **settings))
    release = stop_distill_at_step(monkeypatch, 7)  # after the checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", **settings))
    release()
    resumed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", resume=True, **settings))
    assert (resumed.steps, resumed.best.step, resumed.best.stopped) == (reference.steps, reference.best.step,
                                                                         reference.best.stopped)
    assert reference.best.step < 6  # chosen before the checkpoint the resume starts from: its state must travel
    assert json.loads((tmp_path / "run" / "best.json").read_text()) == json.loads((tmp_path / "ref" / "best.json").read_text())
    assert_same_weights(tmp_path / "run" / "model", tmp_path / "ref" / "model")
    with pytest.raises(TrainingError, match="best_metric: 'kl_to_teacher' there, 'ce' now"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", resume=True,
                            **{**settings, "best_metric": "ce"}))


def test_a_resume_whose_replay_keeps_another_step_says_which_step_the_model_holds(tiny_shards, tiny_models, tmp_path,
                                                                                monkeypatch):
    """Killed after keeping a new best (step 3) but before the next checkpoint (step 4): the resume replays
    from step 2. On a GPU the replayed evaluations can differ (here: made worse by hand), so step 3 no
    longer wins, the best stays the one the checkpoint knew, and RUN_DIR/model holds a step the resumed run
    did not choose; best.json names both."""
    settings = {**SETTINGS, "save_every": 2, "best_metric": "kl_to_teacher", "max_steps": 6}
    release = stop_distill_at_step(monkeypatch, 4)  # before step 4's evaluation and checkpoint
    with pytest.raises(KeyboardInterrupt):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", **settings))
    release()
    held = json.loads((tmp_path / "run" / "model" / KEPT).read_text())
    assert held["step"] == 3  # the best so far, kept after the last checkpoint (step 2)
    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *args: {**(m := evaluate(*args)), "kl_to_teacher": m["kl_to_teacher"] + 10})
    resumed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", resume=True, **settings))
    chosen = json.loads((tmp_path / "run" / "best.json").read_text())
    assert resumed.best.step == chosen["step"] < 3 and chosen["model_step"] == 3 and chosen["model_value"] == held["value"]
    assert "holds the weights of step 3" in chosen["warning"]


def test_patience_needs_a_metric_and_a_non_finite_value_is_never_best(tiny_shards, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="patience: stopping at a plateau needs a --best-metric"):
        make_config(tiny_shards, tiny_models["student"], tmp_path / "run", patience=2)
    best = BestModel("kd", patience=2)
    assert not best.update(0, {"kd": float("nan")}) and best.update(1, {"kd": 2.0})  # a diverged start is no best
    assert not best.update(2, {"kd": float("inf")}) and not best.update(3, {"kd": 2.0})  # ties are no better
    assert best.stopped and best.step == 1
