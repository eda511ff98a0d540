"""`amid-pipeline eval --shards` against an independent reference: one plain float64 forward per row."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from amid_pipeline.cli import app
from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader


def reference_metrics(model_dir, shards) -> dict[str, float]:
    """Mean over every supervised position of every row: CE of the actual next token, top-1 agreement with
    the teacher, the student's mass on the teacher's ids, KL(p̃‖q̃) on those ids renormalised, the KL of
    both distributions coarse-grained to (those ids, one bucket for the rest); and the
    expected calibration error of the student's top-1 prediction of the actual token over 15 equal-width
    confidence bins, Σ_b (|b|/n)·|accuracy(b) − mean confidence(b)|."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    sums = {"ce": 0.0, "top1_agreement": 0.0, "support_mass": 0.0, "kl_to_teacher": 0.0, "kl_with_rest": 0.0}
    positions, confidences, correct = 0, [], []
    for row in ShardReader(load_manifest(shards)):
        ids = torch.from_numpy(row.input_ids.astype("int64"))
        with torch.no_grad():
            log_q = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)  # [L, V]
        for t, supervised, top, log_p in zip(row.positions, row.loss_mask, row.topk_ids, row.topk_logprobs):
            if not supervised:
                continue
            top = torch.from_numpy(top.astype("int64"))
            q_top = log_q[t, top]
            p = torch.softmax(torch.from_numpy(log_p).double(), -1)
            sums["ce"] -= float(log_q[t, ids[t + 1]])
            sums["top1_agreement"] += float(log_q[t].argmax() == top[0])
            sums["support_mass"] += float(q_top.exp().sum())
            sums["kl_to_teacher"] += float((p * (p.log() - torch.log_softmax(q_top, -1))).sum())
            p_ids = torch.from_numpy(log_p).double().exp()  # the stored probabilities, not renormalised
            p_rest, q_rest = max(0.0, 1 - float(p_ids.sum())), 1 - float(q_top.exp().sum())
            sums["kl_with_rest"] += float((p_ids * (p_ids.log() - q_top)).sum()) + (
                p_rest * (math.log(p_rest) - math.log(q_rest)) if p_rest > 0 else 0.0)
            confidences.append(float(log_q[t].exp().max()))
            correct.append(float(log_q[t].argmax() == ids[t + 1]))
            positions += 1
    bins = [[] for _ in range(15)]
    for confidence, hit in zip(confidences, correct):
        bins[min(int(confidence * 15), 14)].append((confidence, hit))
    ece = sum(len(b) / positions * abs(sum(h for _, h in b) / len(b) - sum(c for c, _ in b) / len(b)) for b in bins if b)
    return {**{key: value / positions for key, value in sums.items()}, "ece": ece, "positions": positions}


def test_eval_on_shards_equals_a_plain_forward_over_every_row(tiny_models, tiny_shards):
    result = CliRunner().invoke(app, ["eval", str(tiny_models["student"]), "--shards", str(tiny_shards), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    expected = reference_metrics(tiny_models["student"], tiny_shards)
    assert metrics["positions"] == expected["positions"] > 0  # every row, every supervised position
    for key in ("ce", "support_mass", "kl_to_teacher", "kl_with_rest", "ece"):
        assert math.isclose(metrics[key], expected[key], rel_tol=1e-4), (key, metrics[key], expected[key])
    assert expected["ece"] > 0.01  # a random student is not calibrated
    assert abs(expected["kl_with_rest"] - expected["kl_to_teacher"]) > 0.01  # the two measures differ here
    assert math.isclose(metrics["perplexity"], math.exp(expected["ce"]), rel_tol=1e-4)
    assert abs(metrics["top1_agreement"] - expected["top1_agreement"]) <= 1 / expected["positions"]  # one near-tie


def test_heldout_sums_count_only_supervised_positions():
    """Positions whose mask is False (prompt tokens stored with positions = "all") add nothing to any sum."""
    from amid_pipeline.losses import KDLoss, TeacherTargets
    from amid_pipeline.train.step import heldout_sums

    torch.manual_seed(0)
    n, k, vocab, width = 12, 4, 50, 8
    hidden, head = torch.randn(n, width), torch.nn.Linear(width, vocab, bias=False)
    log_p = torch.log_softmax(torch.randn(n, vocab), -1).topk(k, -1)
    teacher = TeacherTargets(log_p.indices, log_p.values, torch.randint(0, vocab, (n,)), torch.zeros(n),
                             torch.arange(n) % 3 != 0)
    kept = teacher.mask
    alone = TeacherTargets(teacher.topk_ids[kept], teacher.topk_logprobs[kept], teacher.target_ids[kept],
                           teacher.target_logprob[kept], torch.ones(int(kept.sum()), dtype=torch.bool))
    with torch.no_grad():
        masked = heldout_sums(hidden, head, teacher, KDLoss("forward_kl"))
        subset = heldout_sums(hidden[kept], head, alone, KDLoss("forward_kl"))
    assert masked["positions"] == subset["positions"] == 8
    for key, value in subset.items():
        assert math.isclose(masked[key], value, rel_tol=1e-5, abs_tol=1e-6), key


def test_heldout_sums_of_sampled_targets_ignore_their_unused_slots():
    """Sampled positions padded with unused slots (a repeated drawn id, log p = -inf, weight 0) give the
    sums of the same positions holding only their distinct ids."""
    from amid_pipeline.losses import KDLoss, TeacherTargets
    from amid_pipeline.train.step import heldout_sums

    torch.manual_seed(1)
    n, k, vocab, width = 6, 5, 40, 8
    hidden, head = torch.randn(n, width), torch.nn.Linear(width, vocab, bias=False)
    top = torch.log_softmax(torch.randn(n, vocab), -1).topk(3, -1)  # 3 distinct ids per position
    ids = torch.cat([top.indices, top.indices[:, :1].expand(n, k - 3)], dim=1)
    values = torch.cat([top.values, torch.full((n, k - 3), float("-inf"))], dim=1)
    weights = torch.cat([torch.full((n, 3), 1 / 3), torch.zeros(n, k - 3)], dim=1)
    targets, mask = torch.randint(0, vocab, (n,)), torch.ones(n, dtype=torch.bool)
    padded = TeacherTargets(ids, values, targets, torch.zeros(n), mask, weights)
    alone = TeacherTargets(top.indices, top.values, targets, torch.zeros(n), mask, weights[:, :3])
    with torch.no_grad():
        found = heldout_sums(hidden, head, padded, KDLoss("forward_kl", support="sampled"))
        expected = heldout_sums(hidden, head, alone, KDLoss("forward_kl", support="sampled"))
    for key, value in expected.items():
        assert math.isclose(found[key], value, rel_tol=1e-5, abs_tol=1e-6), key


def test_the_teacher_read_from_its_shards_equals_running_it(tiny_models, tmp_path):
    """The quickstart's teacher row: perplexity and mass read from the stored values equal a forward pass of
    the teacher over the same supervised positions (to the storage encoding's rounding; the shards also hold
    the prompts' positions, unsupervised); KL 0 and agreement 1 by definition."""
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config
    from amid_pipeline.evaluate import evaluate_on_shards, load_model, teacher_on_its_shards
    from tests.helpers import ROOT

    shards = tmp_path / "shards"
    run_capture(load_config(CaptureConfig, None, {
        "teacher": str(tiny_models["teacher"]), "dataset": str(ROOT / "data" / "jargon" / "heldout.jsonl"),
        "output": str(shards), "limit": 12, "backend": "hf", "k": 16, "max_length": 96, "positions": "all",
        "progress": False}))
    read = teacher_on_its_shards(shards)
    run = evaluate_on_shards(load_model(tiny_models["teacher"])[0], shards)
    assert ShardReader(str(shards)).manifest.totals["positions"] > read["positions"]  # prompts stored, not scored
    assert read["positions"] == run["positions"] > 0
    assert math.isclose(read["perplexity"], run["perplexity"], rel_tol=2e-3), (read, run)
    assert math.isclose(read["support_mass"], run["support_mass"], rel_tol=2e-3), (read, run)
    assert run["kl_with_rest"] < 1e-3 and run["top1_agreement"] > 0.99 and read["top1_agreement"] == 1.0


def test_held_out_batches_are_read_one_at_a_time(tiny_models, tiny_shards):
    """`eval --shards` over a whole directory: each batch is read just before its forward, never all first."""
    from contextlib import nullcontext

    from amid_pipeline.evaluate import load_model
    from amid_pipeline.losses import KDLoss
    from amid_pipeline.train.data import DataSettings, ShardBatches, list_files
    from amid_pipeline.train.distributed import Processes
    from amid_pipeline.train.metrics import evaluate
    from amid_pipeline.train.step import DistillModule

    model = load_model(tiny_models["student"])[0]
    events = []

    class Module(DistillModule):
        def forward(self, *args, **kwargs):
            events.append("forward")
            return super().forward(*args, **kwargs)

    def batches():
        settings = DataSettings(batch_size=8, max_length=96, heldout_fraction=0.0, student_vocab=528)
        for batch in ShardBatches(list_files([str(tiny_shards)]), settings, seed=0, shuffle=False):
            events.append("read")
            yield batch

    metrics = evaluate(Module(model, KDLoss("forward_kl"), sparse=True), batches(), Processes(1, 0, model.device), nullcontext())
    assert metrics["positions"] > 0 and len(events) >= 4
    assert events == ["read", "forward"] * (len(events) // 2)
