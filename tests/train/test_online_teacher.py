"""distill with an online teacher: its full-vocabulary distribution replaces the stored targets.

The reference is the dense float64 KL between the two models' own logits (their full forward passes,
not the training code's path through the base model and the head)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amid_pipeline.config import ConfigError, load_config
from amid_pipeline.losses import KDLoss
from amid_pipeline.losses import functional as F
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.data import DataSettings, ShardBatches, list_files
from amid_pipeline.train.loop import distill
from amid_pipeline.train.step import online_teacher_targets

from tests.train.test_distill import make_config


def dense_log_probs(model, batch, vocabulary=528) -> torch.Tensor:
    """log softmax of the model's own logits at the batch's stored positions, in float64 [N, 528]: the
    tiny teacher's head has 512 outputs, the student's 528 (padded); the teacher's extra ones are −inf."""
    inputs = batch.inputs
    logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids).logits
    log_p = torch.log_softmax(logits[inputs.row, inputs.column].double(), dim=-1)
    return torch.nn.functional.pad(log_p, (0, vocabulary - log_p.shape[1]), value=float("-inf"))


def dense_kl(log_p, log_q, mask) -> torch.Tensor:
    """Σ_v p (log p − log q) averaged over the supervised positions (0·log 0 = 0)."""
    terms = torch.where(torch.isfinite(log_p), log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    return (terms.sum(-1) * mask).sum() / mask.sum()


def first_batch(shards, heldout_fraction=0.0, seed=0):
    settings = DataSettings(batch_size=4, max_length=1024, heldout_fraction=heldout_fraction, student_vocab=528)
    return next(iter(ShardBatches(list_files([str(shards)]), settings, seed=seed)))


@pytest.mark.parametrize("support", ["tail", "renormalized", "teacher_renormalized"])
def test_online_targets_give_the_dense_full_vocabulary_loss(tiny_shards, tiny_models, support):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    batch = first_batch(tiny_shards)
    with torch.no_grad():
        targets = online_teacher_targets(teacher, batch.inputs, batch.teacher, 528)
        log_p, log_q = dense_log_probs(teacher, batch), dense_log_probs(student, batch)
        logits = student(input_ids=batch.inputs.input_ids, attention_mask=batch.inputs.attention_mask,
                         position_ids=batch.inputs.position_ids).logits[batch.inputs.row, batch.inputs.column]
    mask = batch.teacher.mask
    torch.testing.assert_close(targets.target_logprob.double(), log_p.gather(1, batch.teacher.target_ids[:, None].long())[:, 0],
                               atol=1e-5, rtol=0)
    reference = dense_kl(log_p, log_q, mask)
    found = KDLoss("forward_kl", support=support)(logits, targets).kd
    torch.testing.assert_close(found.double(), reference, atol=1e-5, rtol=1e-5)
    if support != "teacher_renormalized":  # AMiD's default is infinite under a support that gives p = 0
        dense_amid = (F.amid(log_p, log_q) * mask).sum() / mask.sum()
        torch.testing.assert_close(KDLoss("amid", support=support)(logits, targets).kd.double(), dense_amid,
                                   atol=1e-5, rtol=1e-5)
    stored = KDLoss("forward_kl", support=support)(logits, batch.teacher).kd  # the top-16 shards: another loss
    assert abs(float(stored) - float(reference)) > 1e-3


def test_distill_trains_on_the_online_teachers_distribution(tiny_shards, tiny_models, tmp_path):
    """The first step's KD is the dense KL(teacher ‖ student) on the first training batch; loss.json records
    the teacher; resuming under another one is refused."""
    run = tmp_path / "run"
    summary = distill(make_config(tiny_shards, tiny_models["student"], run, loss="forward_kl", max_steps=2,
                                  online_teacher=str(tiny_models["teacher"]), seed=3))
    assert summary.steps == 2 and not summary.sparse_head
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    batch = first_batch(tiny_shards, heldout_fraction=0.2, seed=3)
    with torch.no_grad():
        log_p, log_q = dense_log_probs(teacher, batch), dense_log_probs(student, batch)
    mask = batch.teacher.mask
    first = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m][0]
    assert first["step"] == 1 and first["kd"] == pytest.approx(float(dense_kl(log_p, log_q, mask)), rel=1e-4)
    assert json.loads((run / "loss.json").read_text())["online_teacher"] == str(tiny_models["teacher"])
    with pytest.raises(TrainingError, match=r"online_teacher: \w+… there, None now"):
        distill(make_config(tiny_shards, tiny_models["student"], run, loss="forward_kl", max_steps=4, resume=True))


def test_an_online_teacher_that_cannot_replace_the_targets_is_refused(tiny_shards, tiny_models, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    wider = tmp_path / "wider-head"
    teacher.resize_token_embeddings(600)  # more outputs than the student's 528
    teacher.save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    with pytest.raises(TrainingError, match="online_teacher: .*wider-head has 600 outputs, the student 528"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "a", online_teacher=str(wider)))
    other_tokens = tmp_path / "other-tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).save_pretrained(other_tokens)
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(other_tokens)
    with pytest.raises(TrainingError, match="other-tokenizer's tokenizer .* is not the one that tokenised the shards"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "b", online_teacher=str(other_tokens)))
    with pytest.raises(ConfigError, match="online_teacher: the full-vocabulary targets need"):
        load_config(DistillConfig, None, {"shards": [str(tiny_shards)], "student": "s", "output": "o",
                                          "online_teacher": str(tiny_models["teacher"]), "support": "sampled"})
