"""Losses on a sampled support against the dense float64 definitions, by Monte Carlo over the draws.

A sampled position stores the distinct ids of N draws v ~ r (r = p at temperature 1) with counts c and
exact log p. Forward KL's estimator Σ p̂ (log p − log q), p̂ = c / N, must be unbiased in value and
gradient; with a tempered proposal the self-normalised weights must make it consistent; every other loss
is a plug-in estimate that must converge to the dense value as N grows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amid_pipeline.losses import KDLoss, StudentHead, TeacherTargets
from amid_pipeline.shards.targets import sample_weights
from tests.losses import reference as R

V = 12


def teacher_and_student(seed=0):
    generator = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(V, generator=generator, dtype=torch.float64) * 1.5, -1)
    logits = torch.randn(V, generator=generator, dtype=torch.float64).requires_grad_(True)
    return log_p, logits


def sampled_targets(log_p: torch.Tensor, replicates: int, draws: int, temperature: float = 1.0, seed: int = 0):
    """TeacherTargets of ``replicates`` positions with the same teacher ``log_p`` [V], each holding the
    distinct ids of ``draws`` draws from softmax(log_p / temperature) (numpy's generator, not the
    capture's), padded to ``draws`` slots as the shards store them; weights written out independently of
    the library: c / N, or c · p^(1 − 1/τ) normalised."""
    rng = np.random.default_rng(seed)
    p = log_p.numpy()
    proposal = np.exp(p / temperature - np.logaddexp.reduce(p / temperature))
    drawn = rng.choice(V, size=(replicates, draws), p=proposal)
    counts = np.zeros((replicates, V), dtype=np.int64)
    np.add.at(counts, (np.arange(replicates)[:, None], drawn), 1)
    by_probability = np.argsort(-p, kind="stable")
    counts = counts[:, by_probability]
    compact = np.argsort(counts == 0, axis=1, kind="stable")[:, :draws]  # drawn ids first, in descending p
    ids = by_probability[compact]
    kept = np.take_along_axis(counts, compact, axis=1)
    ids = np.where(kept > 0, ids, ids[:, :1])
    log_values = np.where(kept > 0, p[ids], -np.inf)
    weights = kept * np.exp((1 - 1 / temperature) * np.where(kept > 0, p[ids], 0.0))
    weights = weights / weights.sum(axis=1, keepdims=True)
    targets = torch.as_tensor(ids[:, 0])
    return TeacherTargets(torch.as_tensor(ids), torch.as_tensor(log_values), targets, log_p[targets],
                          torch.ones(replicates, dtype=torch.bool), torch.as_tensor(weights)), kept


def exact_top_targets(log_p: torch.Tensor, replicates: int, draws: int, exact_top: int, temperature: float = 1.0,
                      seed: int = 0):
    """TeacherTargets whose first ``exact_top`` slots are the teacher's top ids (count 0), then the distinct
    ids of ``draws`` draws from softmax(log_p / temperature) over the other ids (numpy's generator); weights
    written out independently of the library: p on the top, and R = 1 − Σ_top p times the weights of
    :func:`sampled_targets` over the draws. Returns (targets, counts [replicates, exact_top + draws])."""
    rng = np.random.default_rng(seed)
    p = log_p.numpy()
    order = np.argsort(-p, kind="stable")
    head, rest = order[:exact_top], order[exact_top:]
    proposal = np.exp(p[rest] / temperature - np.logaddexp.reduce(p[rest] / temperature))
    drawn = rng.choice(len(rest), size=(replicates, draws), p=proposal)  # indices into rest, in descending p
    counts = np.zeros((replicates, len(rest)), dtype=np.int64)
    np.add.at(counts, (np.arange(replicates)[:, None], drawn), 1)
    compact = np.argsort(counts == 0, axis=1, kind="stable")[:, :draws]
    kept = np.take_along_axis(counts, compact, axis=1)
    ids = np.concatenate([np.broadcast_to(head, (replicates, exact_top)), np.where(kept > 0, rest[compact], head[0])], 1)
    log_values = np.concatenate([np.broadcast_to(p[head], (replicates, exact_top)),
                                 np.where(kept > 0, p[rest[compact]], -np.inf)], axis=1)
    tail = kept * np.exp((1 - 1 / temperature) * np.where(kept > 0, p[rest[compact]], 0.0))
    tail = tail / tail.sum(axis=1, keepdims=True) * (1 - np.exp(p[head]).sum())
    weights = np.concatenate([np.broadcast_to(np.exp(p[head]), (replicates, exact_top)), tail], axis=1)
    targets = torch.as_tensor(ids[:, 0])
    counts = np.concatenate([np.zeros((replicates, exact_top), dtype=np.int64), kept], axis=1)
    return TeacherTargets(torch.as_tensor(ids), torch.as_tensor(log_values), targets, log_p[targets],
                          torch.ones(replicates, dtype=torch.bool), torch.as_tensor(weights)), counts


def test_forward_kl_on_draws_is_unbiased_in_value_and_gradient():
    log_p, logits = teacher_and_student()
    replicates, draws = 40_000, 6
    teacher, _ = sampled_targets(log_p, replicates, draws)
    out = KDLoss("forward_kl", support="sampled")(logits[None].expand(replicates, V), teacher)
    values = out.per_position.detach()
    dense = float(R.kl(log_p.exp()[None], torch.softmax(logits.detach(), -1)[None])[0])
    standard_error = float(values.std()) / replicates**0.5
    assert abs(float(values.mean()) - dense) < 4 * standard_error, (float(values.mean()), dense, standard_error)
    out.loss.backward()  # the mean over replicates: the expected gradient is q − p
    q, p = torch.softmax(logits.detach(), -1), log_p.exp()
    tolerance = 5 * torch.sqrt(p * (1 - p) / (draws * replicates)) + 1e-9
    assert torch.all((logits.grad - (q - p)).abs() < tolerance), (logits.grad - (q - p), tolerance)


def test_an_exact_top_keeps_forward_kl_unbiased_and_cuts_its_variance_at_the_same_slots():
    """2 exact ids + 4 draws from the rest against 6 draws: both unbiased in value (4 standard errors of the
    dense float64 KL) and gradient; the exact top's estimate has under half the standard deviation."""
    log_p, logits = teacher_and_student()
    replicates = 40_000
    dense = float(R.kl(log_p.exp()[None], torch.softmax(logits.detach(), -1)[None])[0])
    spread = {}
    for top, draws in ((0, 6), (2, 4)):
        teacher = exact_top_targets(log_p, replicates, draws, top, seed=top)[0] if top else sampled_targets(log_p, replicates, draws)[0]
        student = logits.detach().clone().requires_grad_(True)
        out = KDLoss("forward_kl", support="sampled")(student[None].expand(replicates, V), teacher)
        values = out.per_position.detach()
        spread[top] = float(values.std())
        assert abs(float(values.mean()) - dense) < 4 * spread[top] / replicates**0.5, (top, float(values.mean()), dense)
        out.loss.backward()
        q, p = torch.softmax(logits.detach(), -1), log_p.exp()
        tolerance = 5 * torch.sqrt(p * (1 - p) / (draws * replicates)) + 1e-9
        assert torch.all((student.grad - (q - p)).abs() < tolerance), (top, student.grad - (q - p), tolerance)
    assert spread[2] < 0.5 * spread[0], spread


def test_unweighted_draws_of_a_tempered_proposal_are_biased_and_the_weights_remove_it():
    log_p, logits = teacher_and_student(seed=1)
    dense = float(R.kl(log_p.exp()[None], torch.softmax(logits.detach(), -1)[None])[0])
    teacher, kept = sampled_targets(log_p, 20, 20_000, temperature=2.0)
    weighted = KDLoss("forward_kl", support="sampled")(logits[None].expand(20, V), teacher).kd
    assert abs(float(weighted) - dense) < 0.02  # self-normalised importance weights: consistent
    naive = TeacherTargets(*(getattr(teacher, name) for name in ("topk_ids", "topk_logprobs", "target_ids",
                                                                   "target_logprob", "mask")),
                           torch.as_tensor(kept / kept.sum(axis=1, keepdims=True)))
    unweighted = KDLoss("forward_kl", support="sampled")(logits[None].expand(20, V), naive).kd
    assert abs(float(unweighted) - dense) > 0.1  # the counts of a flattened proposal are not p


def test_the_library_weights_equal_the_written_out_formula():
    log_p, _ = teacher_and_student(seed=2)
    for temperature in (1.0, 0.7, 3.0):
        teacher, kept = sampled_targets(log_p, 50, 16, temperature=temperature, seed=4)
        weights = sample_weights(kept.astype(np.uint16), teacher.topk_logprobs.float().numpy(), temperature)
        np.testing.assert_allclose(weights, teacher.sample_weights.numpy(), rtol=2e-6, atol=1e-7)
        teacher, counts = exact_top_targets(log_p, 50, 16, 3, temperature=temperature, seed=4)
        weights = sample_weights(counts.astype(np.uint16), teacher.topk_logprobs.float().numpy(), temperature, 3)
        np.testing.assert_allclose(weights, teacher.sample_weights.numpy(), rtol=2e-6, atol=1e-7)


def test_an_exact_top_that_rounds_to_all_the_mass_leaves_the_draws_their_least_possible_share():
    """q64 can store a confident top-1 as log p = 0: the rest then keeps the largest drawn probability
    (it holds at least that id), the top the remainder, so the draws stay in the loss and Σ p̂ = 1."""
    logprobs = np.array([[0.0, -5.0, -7.0, -np.inf]], dtype=np.float32)
    weights = sample_weights(np.array([[0, 3, 1, 0]], dtype=np.uint16), logprobs, 1.0, exact_top=1)
    rest = np.exp(-5.0)
    np.testing.assert_allclose(weights, [[1 - rest, 0.75 * rest, 0.25 * rest, 0.0]], rtol=1e-5)


@pytest.mark.parametrize("name,params,dense", [
    ("amid", {}, lambda p, q: R.amid(p, q, 0.5, 0.1)),  # the default objective: α = 0.5, λ = 0.1, KL(p‖r)
    ("skl", {"skew": 0.1}, lambda p, q: R.skl(p, q, 0.1)),
])
def test_other_losses_are_plug_in_estimates_that_converge(name, params, dense):
    log_p, logits = teacher_and_student(seed=3)
    exact = float(dense(log_p.exp()[None], torch.softmax(logits.detach(), -1)[None])[0])
    loss = KDLoss(name, support="sampled", **params)
    many, _ = sampled_targets(log_p, 4, 50_000, seed=5)
    assert abs(float(loss(logits.detach()[None].expand(4, V), many).kd) - exact) < 0.01
    few, _ = sampled_targets(log_p, 20_000, 4, seed=6)
    assert abs(float(loss(logits.detach()[None].expand(20_000, V), few).kd) - exact) > 0.01  # biased at N = 4


def full_support(log_p: torch.Tensor) -> TeacherTargets:
    values, ids = log_p[None].sort(dim=-1, descending=True)
    return TeacherTargets(ids, values, ids[:, 0], values[:, 0], torch.ones(1, dtype=torch.bool))


def test_unused_slots_carry_no_mass_and_the_sparse_head_gives_the_same_values():
    """tail and renormalized on padded sampled targets equal the same supports on each position's
    distinct ids alone; the StudentHead form equals full logits under every support."""
    log_p, _ = teacher_and_student(seed=7)
    teacher, kept = sampled_targets(log_p, 6, 8, seed=8)
    generator = torch.Generator().manual_seed(9)
    hidden, weight = (torch.randn(6, 5, generator=generator, dtype=torch.float64),
                      torch.randn(V, 5, generator=generator, dtype=torch.float64))
    logits = hidden @ weight.T
    for support in ("tail", "renormalized", "sampled"):
        loss = KDLoss("forward_kl", support=support)
        padded = loss(logits, teacher).per_position
        head = loss(StudentHead(hidden, weight), teacher).per_position  # its logits blocks are float32, by design
        torch.testing.assert_close(head, padded, rtol=1e-5, atol=1e-6)
        if support == "sampled":
            continue
        for row in range(6):
            used = int((kept[row] > 0).sum())
            alone = TeacherTargets(teacher.topk_ids[row : row + 1, :used], teacher.topk_logprobs[row : row + 1, :used],
                                   teacher.target_ids[row : row + 1], teacher.target_logprob[row : row + 1],
                                   teacher.mask[row : row + 1])
            torch.testing.assert_close(loss(logits[row : row + 1], alone).per_position, padded[row : row + 1])


def test_the_sampled_support_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="support 'sampled' gives the teacher probability 0 .* KL\\(q‖p\\) is infinite"):
        KDLoss("reverse_kl", support="sampled")
    log_p, logits = teacher_and_student()
    with pytest.raises(ValueError, match="support 'sampled' needs shards of the sampled target kind"):
        KDLoss("forward_kl", support="sampled")(logits.detach()[None], full_support(log_p))
