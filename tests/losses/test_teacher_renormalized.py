"""The teacher-renormalised support (p̃ over the stored ids, p = 0 outside; q over the full vocabulary):
every accepted loss equals its dense float64 definition on the k + 1 outcomes; exactly the losses that
are infinite there are refused."""

from __future__ import annotations

import pytest
import torch

from amid_pipeline.losses import KDLoss, TeacherTargets
from amid_pipeline.losses.registry import infinite_under_zero_teacher_mass, resolve_loss
from tests.losses.test_losses import CASES, dense_case, full_support_targets

K = 5
EXTRA = [
    ("reverse_kl", {}), ("akl", {}), ("jsd", {"beta": 1.0}), ("amid", {"alpha": -3.0, "lam": 0.1, "order": "rp"}),
    ("amid", {"alpha": 2.0, "lam": 0.3, "order": "qr"}), ("amid", {"alpha": -3.0, "lam": 0.1, "divergence": "ab"}),
    ("amid", {"alpha": 0.5, "lam": 0.3, "order": "qr", "divergence": "ab", "ab_a": 0.0, "ab_b": 1.0}),
]


def k_plus_one(log_p, logits, k):
    """Dense probability rows [N, k + 1] in float64: (p̃ on the top-k, 0), (q on the top-k, 1 − Σ)."""
    values, ids = log_p.sort(dim=-1, descending=True)
    p = torch.softmax(values[:, :k], -1)
    q = torch.softmax(logits, -1).gather(1, ids[:, :k])
    return (torch.cat([p, torch.zeros_like(p[:, :1])], 1), torch.cat([q, 1 - q.sum(-1, keepdim=True)], 1),
            TeacherTargets(ids[:, :k], values[:, :k], ids[:, 0], values[:, 0], torch.ones(len(p), dtype=torch.bool)))


@pytest.mark.parametrize("name,params,ref", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_accepted_losses_equal_the_dense_definition_on_k_plus_one_outcomes(name, params, ref):
    log_p, logits, targets = dense_case(seed=7)
    p, q, teacher = k_plus_one(log_p, logits, K)
    if infinite_under_zero_teacher_mass(*resolve_loss(name, params)):
        with pytest.raises(ValueError, match="teacher_renormalized"):
            KDLoss(name, support="teacher_renormalized", **params)
        return
    out = KDLoss(name, support="teacher_renormalized", **params)(logits, teacher, progress=(0, 10))
    expected = ref(p, q, targets)
    torch.testing.assert_close(out.per_position, expected, rtol=1e-7, atol=1e-9)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected.mean(), logits)
    if torch.isnan(expected_grad).any():  # the probability-space reference differentiates 0^λ (α >= 1): finite differences
        loss = KDLoss(name, support="teacher_renormalized", **params)
        assert torch.autograd.gradcheck(lambda z: loss(z, teacher, progress=(0, 10)).loss, (logits,))
    else:
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    # on the full vocabulary the rest outcome is empty: the dense definition itself
    full = KDLoss(name, support="teacher_renormalized", **params)(logits, full_support_targets(log_p, targets), progress=(0, 10))
    torch.testing.assert_close(full.per_position, ref(log_p.exp(), torch.softmax(logits, -1), targets), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name,params", [(c[0], c[1]) for c in CASES] + EXTRA, ids=lambda x: str(x))
def test_refused_exactly_where_the_value_blows_up(name, params):
    """Evaluated on the k + 1 outcomes without the guard, a refused loss is huge (log 0 is floored at
    −1e4) and an accepted one is of order one."""
    from amid_pipeline.losses.support import support_distributions

    log_p, logits, targets = dense_case(seed=8)
    _, _, teacher = k_plus_one(log_p, logits, K)
    log_p_s, log_q_s, _ = support_distributions(logits, teacher, "teacher_renormalized")
    base, merged = resolve_loss(name, params)
    function = KDLoss(name, **params).spec.function
    kwargs = {key: value for key, value in merged.items() if not key.startswith(("t_", "taid"))}
    values = function(log_p_s, log_q_s, t=0.4) if base == "taid" else function(log_p_s, log_q_s, **kwargs)
    refused = infinite_under_zero_teacher_mass(base, merged) is not None
    assert bool(values.max() > 100) == refused, (name, params, float(values.max()))
