"""amid-pipeline sft on the tiny models: the same tokens as cache-teacher, dev selection, plateau, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from amid_pipeline.cli import app
from amid_pipeline.config import load_config
from amid_pipeline.dataset.examples import dataset_examples
from amid_pipeline.dataset.settings import DatasetSettings
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.config import SFTConfig
from amid_pipeline.train.sft import collate_examples, sft, supervised_ce_sum
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    with open(ROOT / "data" / "jargon" / "train.jsonl") as source:
        path.write_text("".join(line for line, _ in zip(source, range(40))))
    return path


def run(tiny_models, pairs, output, **settings):
    overrides = {"model": str(tiny_models["student"]), "dataset": str(pairs), "output": str(output), "max_length": 96,
                 "batch_size": 4, "lr": 3e-3, "max_steps": 8, "eval_every": 2, "save_every": 2, "progress": False,
                 **settings}
    return sft(load_config(SFTConfig, None, overrides))


def test_sft_trains_on_the_tokens_cache_teacher_stores(tiny_models, tiny_shards):
    """Rows of the tiny shards' dataset, tokenised by sft's path: the same ids and supervised targets."""
    header = ShardReader(tiny_shards).header
    settings = DatasetSettings(dataset=header.dataset["source"], max_length=header.max_length,
                               data_format="prompt_response")
    examples, _ = dataset_examples(settings, AutoTokenizer.from_pretrained(tiny_models["teacher"]))
    stored = {row.sample_id: row for row in ShardReader(tiny_shards)}
    assert sorted(stored) == sorted(e.sample_id for e in examples)
    for example in examples:
        row = stored[example.sample_id]
        np.testing.assert_array_equal(example.input_ids, row.input_ids)
        batch = collate_examples([example])
        np.testing.assert_array_equal(batch["column"].numpy(), row.positions[row.loss_mask])
        np.testing.assert_array_equal(batch["target_ids"].numpy(), row.input_ids[row.positions[row.loss_mask] + 1])


def test_supervised_ce_equals_a_full_forward(tiny_models, pairs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    examples, _ = dataset_examples(DatasetSettings(dataset=str(pairs), limit=3, max_length=96), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float64)
    batch = collate_examples(examples)
    loss, count = supervised_ce_sum(model, batch, "cpu")
    reference, positions = 0.0, 0
    for example in examples:  # one sequence at a time, full logits, float64
        with torch.no_grad():
            logits = model(torch.as_tensor(example.input_ids[None].astype(np.int64))).logits[0]
        log_q = torch.log_softmax(logits[:-1], -1)
        supervised = torch.as_tensor(example.target_mask[1:])
        targets = torch.as_tensor(example.input_ids[1:].astype(np.int64))
        reference -= float(log_q.gather(1, targets[:, None])[:, 0][supervised].sum())
        positions += int(supervised.sum())
    assert count == positions
    assert float(loss) == pytest.approx(reference, rel=1e-6)  # the CE itself runs in fp32, as in training


def test_dev_loss_falls_and_the_best_model_is_kept(tiny_models, pairs, tmp_path):
    summary = run(tiny_models, pairs, tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    losses = [e["eval"]["ce"] for e in evals]
    assert losses[-1] < losses[0] - 0.5
    assert summary.best_step == evals[int(np.argmin(losses))]["step"] and summary.best_dev_loss == min(losses)
    assert (tmp_path / "run" / "sft_config.toml").exists()
    # OUTPUT/model is the best checkpoint: its dev loss is the best one logged
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    from amid_pipeline.train.sft import split_examples

    config = load_config(SFTConfig, tmp_path / "run" / "sft_config.toml")
    _, dev = split_examples(dataset_examples(config, tokenizer)[0], config, None)
    loss, count = supervised_ce_sum(model, collate_examples(dev), "cpu")
    assert float(loss) / count == pytest.approx(min(losses), rel=1e-4)


def test_plateau_stops_and_a_finished_run_is_not_rerun(tiny_models, pairs, tmp_path):
    summary = run(tiny_models, pairs, tmp_path / "run", lr=0.0, patience=2, max_steps=20)  # lr 0: never improves
    assert summary.stopped_early and summary.steps == 4 and summary.best_step == 0
    again = run(tiny_models, pairs, tmp_path / "run", lr=0.0, patience=2, max_steps=20, resume=True)
    assert again.steps == 4
    with pytest.raises(TrainingError, match="--resume"):
        run(tiny_models, pairs, tmp_path / "run", lr=0.0, patience=2, max_steps=20)
    with pytest.raises(TrainingError, match="patience needs a dev split"):
        run(tiny_models, pairs, tmp_path / "nodev", patience=2, dev_fraction=0.0)


def test_killed_run_resumes_to_identical_weights(tiny_models, pairs, tmp_path, monkeypatch):
    run(tiny_models, pairs, tmp_path / "straight", max_steps=6, save_every=3, eval_every=0, dev_fraction=0.0)
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed in step 5, after the step-3 checkpoint
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_models, pairs, tmp_path / "killed", max_steps=6, save_every=3, eval_every=0, dev_fraction=0.0)
    with pytest.raises(TrainingError, match="already holds checkpoints: use --resume"):  # never over a run silently
        run(tiny_models, pairs, tmp_path / "killed", max_steps=6, save_every=3, eval_every=0, dev_fraction=0.0)
    run(tiny_models, pairs, tmp_path / "killed", max_steps=6, save_every=3, eval_every=0, dev_fraction=0.0, resume=True)
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "model").state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    lines = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_cli_sft_success_and_bad_input(tiny_models, pairs, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["sft", "--model", str(tiny_models["student"]), "--dataset", str(pairs), "--output",
                             str(tmp_path / "run"), "--max-steps", "2", "--max-length", "96", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "best dev loss" in ok.output and (tmp_path / "run" / "model" / "config.json").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "p", "response": "  "}\n')
    bad = runner.invoke(app, ["sft", "--model", str(tiny_models["student"]), "--dataset", str(empty), "--output",
                              str(tmp_path / "bad"), "--no-progress"])
    assert bad.exit_code == 1 and "no training examples" in bad.output and "empty or whitespace response" in bad.output
    missing = runner.invoke(app, ["sft", "--model", str(tmp_path / "nope"), "--dataset", str(pairs), "--output",
                                  str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no such model folder" in missing.output


def test_non_finite_sft_loss_stops_with_step_and_samples(tiny_models, pairs, tmp_path, monkeypatch):
    import amid_pipeline.train.sft as sft_module

    original = sft_module.supervised_ce_sum

    def diverged(model, batch, device):  # the model's loss became NaN
        loss, count = original(model, batch, device)
        return loss * float("nan"), count

    monkeypatch.setattr(sft_module, "supervised_ce_sum", diverged)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 \(samples \['row-"):
        run(tiny_models, pairs, tmp_path / "run")
