"""CLI: distill and plot --help, a success and a failure."""

from __future__ import annotations

from typer.testing import CliRunner

from amid_pipeline.cli import app

runner = CliRunner()


def test_help_lists_loss_settings():
    result = runner.invoke(app, ["distill", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--shards", "--student", "--loss", "--loss-params", "--support", "--resume", "--packing"):
        assert option in result.output
    assert runner.invoke(app, ["plot", "--help"]).exit_code == 0


def test_success_with_loss_params_from_the_command_line(tiny_shards, tiny_models, tmp_path):
    result = runner.invoke(app, ["distill", "--shards", str(tiny_shards), "--student", str(tiny_models["student"]),
                                 "--output", str(tmp_path / "run"), "--max-steps", "2", "--loss", "amid",
                                 "--loss-params", "alpha=-5,lam=0.2,divergence=ab", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "eval top1_agreement" in result.output
    assert "alpha = -5" in (tmp_path / "run" / "distill_config.toml").read_text()


def test_bad_loss_parameter_and_missing_run_fail_in_one_line(tiny_shards, tiny_models, tmp_path):
    result = runner.invoke(app, ["distill", "--shards", str(tiny_shards), "--student", str(tiny_models["student"]),
                                 "--output", str(tmp_path / "run"), "--loss-params", "lam=3"])
    assert result.exit_code == 1 and "lam must lie in [0, 1]" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["plot", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "metrics.jsonl: no such file" in result.output


def test_init_student_keeps_every_nth_layer_and_the_tokenizer(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["init-student", str(tiny_models["teacher"]), str(tmp_path / "s"), "--keep-every", "2"])
    assert result.exit_code == 0, result.output
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "s" / "tokenizer.json").read_text() == (tiny_models["teacher"] / "tokenizer.json").read_text()
    again = runner.invoke(app, ["init-student", str(tiny_models["teacher"]), str(tmp_path / "s")])
    assert again.exit_code == 1 and "not empty" in again.output


def test_compat_accepts_the_padded_student_and_refuses_another_tokenizer(tiny_shards, tiny_models, tmp_path):
    result = runner.invoke(app, ["compat", str(tiny_shards), str(tiny_models["student"])])
    assert result.exit_code == 0, result.output
    assert "compatible:" in result.output and "padded head" in result.output
    from tests.conftest import _load_data_module

    tiny = _load_data_module("tiny_models")
    other = tiny.build_model(tmp_path / "other", tiny.build_tokenizer(tmp_path / "tok", vocab_size=300), layers=1, seed=2)
    result = runner.invoke(app, ["compat", str(tiny_shards), str(other)])
    assert result.exit_code == 1
    assert "incompatible: student tokenizer" in result.output and "300 tokens" in result.output and "512 tokens" in result.output
