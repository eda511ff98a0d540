"""The fused head in the recipe: what each student's forward does to its head's output (scale, soft-cap),
the fused path against full logits through the module the trainer wraps, and `distill` choosing it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from amid_pipeline.losses import KDLoss
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.data import DataSettings, ShardBatches, list_files
from amid_pipeline.train.loop import distill, fused_head_choice
from amid_pipeline.train.step import DistillModule, HeadLogits
from tests.train.test_distill import make_config, weights

VOCAB = 528  # the tiny tokenizer's ids, as the tiny shards hold them


def tiny(kind: str, **extra):
    """A random 2-layer model of ``kind`` (transformers' own class) on the tiny shards' vocabulary."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False)
    config = AutoConfig.for_model(kind, **shape, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


HEADS = [("llama", {}, HeadLogits()), ("granite", {"logits_scaling": 4.0}, HeadLogits(scale=0.25)),
         ("cohere", {"logit_scale": 0.0625}, HeadLogits(scale=0.0625)),
         ("gemma2", {"final_logit_softcapping": 2.0}, HeadLogits(softcap=2.0))]


@pytest.mark.parametrize("kind,extra,expected", HEADS, ids=[h[0] for h in HEADS])
def test_head_logits_are_what_the_models_own_forward_computes(kind, extra, expected):
    model = tiny(kind, **extra)
    assert HeadLogits.of(model) == expected
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(expected.apply(model.get_output_embeddings()(hidden)), model(input_ids=ids).logits)


def a_batch(tiny_shards):
    settings = DataSettings(batch_size=4, max_length=96, heldout_fraction=0.0, student_vocab=VOCAB)
    return next(iter(ShardBatches(list_files([str(tiny_shards)]), settings, seed=0)))


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("granite", {"logits_scaling": 4.0})])
@pytest.mark.parametrize("support,kd_ratio", [("tail", 1.0), ("tail", 0.5), ("renormalized", 0.5)])
def test_the_fused_module_equals_full_logits(tiny_shards, kind, extra, support, kd_ratio):
    """One forward and backward of the module DDP and FSDP wrap: loss, every parameter's gradient and the
    held-out sums equal between the fused head and full logits (a logit scale folded into the hidden states)."""
    batch = a_batch(tiny_shards)
    loss_fn = KDLoss("amid", support=support, kd_ratio=kd_ratio)
    results = []
    for sparse in (True, False):
        model = tiny(kind, **extra).train()
        module = DistillModule(model, loss_fn, sparse)
        module(batch.inputs, batch.teacher).loss.backward()
        with torch.no_grad():
            sums = module(batch.inputs, batch.teacher, metrics=True)
        results.append(({n: p.grad for n, p in model.named_parameters()}, sums))
    (fused_grads, fused_sums), (full_grads, full_sums) = results
    for name, grad in full_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in full_sums.items():
        assert fused_sums[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    with torch.no_grad():  # the held-out CE is the model's own: its forward's logits at the stored positions
        inputs, teacher = batch.inputs, batch.teacher
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits[inputs.row, inputs.column]
        ce = torch.nn.functional.cross_entropy(logits, teacher.target_ids.long(), reduction="none")
    assert full_sums["ce"] == pytest.approx(float((ce * teacher.mask).sum()), rel=1e-5)


def test_a_soft_capped_head_takes_full_logits_or_is_refused_by_name(tiny_shards, tiny_models, tmp_path):
    capped = tiny("gemma2", final_logit_softcapping=30.0)
    config = make_config(tiny_shards, tiny_models["student"], tmp_path / "run")
    notes = []
    assert fused_head_choice(config, capped, False, notes) is False
    assert notes == ["full logits: the head soft-caps its logits (final_logit_softcapping = 30), which the fused "
                     "head does not compute"]
    with pytest.raises(TrainingError, match="sparse_head: 'on', but the head soft-caps its logits"):
        fused_head_choice(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", sparse_head="on"),
                          capped, False, [])
    with pytest.raises(ValueError, match="soft-caps"):
        DistillModule(capped, KDLoss(), sparse=True)
    assert "scales its logits by 0.5 after a bias" in HeadLogits(scale=0.5).fused_refusal(torch.nn.Linear(4, 6))
    assert HeadLogits(scale=0.5).fused_refusal(torch.nn.Linear(4, 6, bias=False)) is None  # folded into h
    assert "not a linear layer" in HeadLogits().fused_refusal(torch.nn.Sequential(torch.nn.Linear(4, 6)))
    plain = tiny("llama")
    assert fused_head_choice(config, plain, False, []) is True
    assert fused_head_choice(config, plain, True, []) is False  # an online teacher's targets: full logits
    off = make_config(tiny_shards, tiny_models["student"], tmp_path / "run", sparse_head="off")
    assert fused_head_choice(off, plain, False, []) is False


def test_the_default_objective_trains_through_the_fused_head(tiny_shards, tiny_models, tmp_path, capsys):
    """AMiD on the tail support with a CE term: `distill` says "fused head" and ends where full logits end."""
    runs = {}
    for mode in ("auto", "off"):
        summary = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / mode, kd_ratio=0.7,
                                      sparse_head=mode, max_steps=3, eval_every=0, save_every=0))
        runs[mode] = weights(tmp_path / mode / "model")
        assert summary.sparse_head == (mode == "auto")
        assert ("fused head" if mode == "auto" else "full logits") in capsys.readouterr().out
    for name, tensor in runs["off"].items():
        torch.testing.assert_close(runs["auto"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
