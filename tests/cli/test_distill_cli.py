"""CLI: distill and plot --help, a success and a failure."""

from __future__ import annotations

import pytest
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


def test_compat_accepts_the_padded_student_and_measures_another_tokenizer(tiny_shards, tiny_models, tmp_path):
    result = runner.invoke(app, ["compat", str(tiny_shards), str(tiny_models["student"])])
    assert result.exit_code == 0, result.output
    assert "compatible:" in result.output and "padded head" in result.output
    from tests.helpers import load_data_module

    tiny = load_data_module("tiny_models")
    other = tiny.build_model(tmp_path / "other", tiny.build_tokenizer(tmp_path / "tok", vocab_size=300), layers=1, seed=2)
    result = runner.invoke(app, ["compat", str(tiny_shards), str(other), "--sample-rows", "8"])
    assert result.exit_code == 0, result.output
    assert "compatible with --cross-tokenizer" in result.output and "on 8 rows" in result.output
    aligned = float(result.output.split("supervised positions aligned")[1].split("%")[0].strip(" |"))
    assert 30 < aligned <= 100 and "300 tokens" in result.output and "512 tokens" in result.output
    import shutil

    bare = shutil.copytree(tiny_shards, tmp_path / "bare")
    shutil.rmtree(bare / "tokenizer")  # a copy whose tokenizer folder went missing
    result = runner.invoke(app, ["compat", str(bare), str(other)])
    assert result.exit_code == 1 and "incompatible: " in result.output and "tokenizer/tokenizer.json: missing" in result.output
    result = runner.invoke(app, ["compat", str(bare), str(other), "--teacher-tokenizer", str(tmp_path / "tok")])
    assert result.exit_code == 1 and "is not the shards'" in result.output


def test_init_student_by_importance_keeps_the_layers_that_change_the_hidden_state_most(tiny_models, tiny_shards, tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amid_pipeline.models import block_influence
    from amid_pipeline.shards.reader import ShardReader
    from tests.helpers import load_data_module

    tiny = load_data_module("tiny_models")
    deep = tiny.build_model(tmp_path / "deep", AutoTokenizer.from_pretrained(tiny_models["teacher"]), layers=5, seed=3)
    model = AutoModelForCausalLM.from_pretrained(deep, dtype=torch.float32).eval()
    sequences = [row.input_ids.tolist() for row, _ in zip(ShardReader(tiny_shards), range(6))]
    influence = block_influence(model, sequences, batch_size=4)
    for i in range(4):  # reference: the model's own hidden states, one unpadded sequence at a time
        cosines = []
        for seq in sequences:
            with torch.no_grad():
                states = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            cosines.append(torch.nn.functional.cosine_similarity(states[i][0], states[i + 1][0], dim=-1))
        assert influence[i] == pytest.approx(1 - float(torch.cat(cosines).mean()), abs=1e-5)

    result = runner.invoke(app, ["init-student", str(deep), str(tmp_path / "s"), "--by", "importance", "--layers", "2",
                                 "--calibration", str(tiny_shards), "--calibration-rows", "6"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s" / "amid_pipeline_init.json").read_text())
    expected = sorted(sorted(range(5), key=lambda i: -record["block_influence"][i])[:2])
    assert record["layers_kept"] == expected and record["block_influence"] == pytest.approx(influence, abs=1e-5)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    for new, old in enumerate(expected):
        torch.testing.assert_close(student.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)
    missing = runner.invoke(app, ["init-student", str(deep), str(tmp_path / "t"), "--by", "importance"])
    assert missing.exit_code == 1 and "--calibration" in missing.output
    too_many = runner.invoke(app, ["init-student", str(deep), str(tmp_path / "t"), "--by", "importance", "--layers", "6",
                                   "--calibration", str(tiny_shards)])
    assert too_many.exit_code == 1 and "--layers must lie in [1, 5]" in too_many.output
    other = tiny.build_model(tmp_path / "other-tokens", AutoTokenizer.from_pretrained(tiny_models["teacher"]), layers=5, seed=3)
    retokenised = AutoTokenizer.from_pretrained(other)
    retokenised.add_tokens(["<another-token>"])  # ids that mean other tokens to this teacher
    retokenised.save_pretrained(other)
    foreign = runner.invoke(app, ["init-student", str(other), str(tmp_path / "u"), "--by", "importance", "--layers", "2",
                                  "--calibration", str(tiny_shards)])
    assert foreign.exit_code == 1 and "was tokenised by another tokenizer" in foreign.output, foreign.output


def test_eval_reports_perplexity_and_rouge_on_a_dataset(tiny_models, tiny_shards, tmp_path):
    import json

    data = tmp_path / "heldout.jsonl"
    data.write_text('{"prompt": "What is a kludge?", "response": "A clumsy but working solution."}\n'
                    '{"prompt": "Define foo.", "response": ["A metasyntactic variable.", "foo bar"]}\n')
    result = runner.invoke(app, ["eval", str(tiny_models["teacher"]), "--shards", str(tiny_shards), "--data", str(data),
                                 "--generate", "2", "--sample-seeds", "2", "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["generated"] == 2 and metrics["data_positions"] > 0 and metrics["perplexity"] > 1
    assert metrics["data_skipped_rows"] == 1  # the row with two references is scored by ROUGE-L only
    assert {"rouge_l", "rouge_l_sampled", "rouge_l_sampled_sd", "kl_to_teacher"} <= set(metrics)
    assert metrics["reference_words"] == (5 + 3) / 2  # the first reference of each prompt
    assert 0 <= metrics["greedy_words"] <= 8  # at most one word per new token here
    for label in ("eval shards", "generate: greedy", "generate: sampled, seed 1"):  # progress on stderr
        assert label in result.stderr
    quiet = runner.invoke(app, ["eval", str(tiny_models["teacher"]), "--shards", str(tiny_shards), "--data", str(data),
                                "--generate", "2", "--max-new-tokens", "8", "--json", "--no-progress"])
    assert quiet.exit_code == 0 and "generate" not in quiet.stderr and json.loads(quiet.stdout)["generated"] == 2
    nothing = runner.invoke(app, ["eval", str(tiny_models["teacher"])])
    assert nothing.exit_code == 1 and "nothing to evaluate" in nothing.output
