"""Config loading: one pass reporting every error, overrides, and every shipped stage config."""

from __future__ import annotations

from pathlib import Path

import pytest

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.train.config import DistillConfig, SFTConfig
from amid_pipeline.config import ConfigError, load_config, to_toml

STAGES = Path(__file__).resolve().parents[1] / "stages"
CONFIG_CLASSES = {"cache_teacher": CaptureConfig, "distill": DistillConfig, "sft_": SFTConfig, "heal_": SFTConfig}


def test_every_error_is_reported_at_once(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('teacher = "t"\ndataset = "d"\nouptut = "o"\nk = "many"\nbackend = "tpu"\nmax_length = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(CaptureConfig, path)
    errors = info.value.errors
    assert any("unknown key 'ouptut' (did you mean 'output'?)" in e for e in errors)
    assert any("k: expected int, got str 'many'" in e for e in errors)
    assert any("backend: 'tpu' is not one of auto, vllm, hf" in e for e in errors)
    assert any("max_length: 1 is below the minimum 2" in e for e in errors)
    assert any(e.startswith("output: required") for e in errors)
    assert len(errors) == 5


def test_overrides_win_and_cross_field_rules(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('teacher = "t"\ndataset = "d"\noutput = "o"\nk = 16\n')
    assert load_config(CaptureConfig, path, {"k": 32, "split": None}).k == 32
    with pytest.raises(ConfigError, match=r"worker_index: 2 must be < num_workers \(2\)"):
        load_config(CaptureConfig, path, {"num_workers": 2, "worker_index": 2})


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config(CaptureConfig, None, {"teacher": "t", "dataset": "d", "output": "o"})
    path = tmp_path / "saved.toml"
    path.write_text(to_toml(config))
    assert load_config(CaptureConfig, path) == config


@pytest.mark.parametrize("path", sorted(STAGES.glob("*.toml")), ids=lambda p: p.name)
def test_every_stage_config_loads(path):
    cls = next(cls for stage, cls in CONFIG_CLASSES.items() if stage in path.name)
    load_config(cls, path)


def test_loss_parameters_are_validated_with_the_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(DistillConfig, None, {"shards": ["s"], "student": "x", "output": "o", "loss": "amid",
                                          "loss_params": {"lam": 2.0, "gama": 1}})
    assert any("lam must lie in [0, 1]" in e for e in info.value.errors)
    assert any("has no parameter 'gama'" in e for e in info.value.errors)


@pytest.mark.parametrize("support,loss,refused", [("teacher_renormalized", "reverse_kl", True), ("sampled", "akl", True),
                                                  ("tail", "reverse_kl", False), ("teacher_renormalized", "forward_kl", False)])
def test_a_support_that_zeroes_the_teachers_rest_refuses_losses_infinite_there(support, loss, refused):
    """The config refuses what the loss would, with the loss's own message (one rule, one message)."""
    from amid_pipeline.losses import KDLoss

    settings = {"shards": ["s"], "student": "x", "output": "o", "loss": loss, "support": support}
    if not refused:
        assert load_config(DistillConfig, None, settings).support == support
        return
    with pytest.raises(ValueError) as direct:
        KDLoss(loss, support=support)
    with pytest.raises(ConfigError) as info:
        load_config(DistillConfig, None, settings)
    assert info.value.errors == [f"support: {direct.value}"] and "infinite there" in str(direct.value)


@pytest.mark.parametrize("support,kd_ratio,noted", [("renormalized", 1.0, True), ("renormalized", 0.5, False),
                                                    ("tail", 1.0, False)])
def test_the_renormalised_support_alone_is_noted_at_the_start(support, kd_ratio, noted):
    from amid_pipeline.train.checks import objective_and_data_notes

    config = load_config(DistillConfig, None, {"shards": ["s"], "student": "x", "output": "o", "support": support,
                                               "kd_ratio": kd_ratio})
    notes = objective_and_data_notes(config, [])
    assert notes == (["the renormalised support never sees the student's mass outside the teacher's top-k, which can "
                      "leak there (docs/benchmarks.md, Evidence); --support tail or --kd-ratio < 1 keeps it in check"]
                     if noted else [])
