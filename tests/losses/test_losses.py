"""Every loss against the dense float64 references, on a support that covers the whole vocabulary."""

from __future__ import annotations

import pytest
import torch

from amid_pipeline.losses import KDLoss, TeacherTargets, functional as F
from tests.losses import reference as R

N, V = 7, 11


def dense_case(seed=0, n=N, v=V, dtype=torch.float64, sharp=2.0):
    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(n, v, generator=generator, dtype=torch.float64) * sharp
    student_logits = torch.randn(n, v, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(True)
    log_p = torch.log_softmax(teacher_logits, -1)
    targets = torch.randint(0, v, (n,), generator=generator)
    return log_p, student_logits, targets


def full_support_targets(log_p, targets, mask=None):
    """Teacher targets whose 'top-k' is the whole vocabulary (k = V), in descending order."""
    values, ids = log_p.sort(dim=-1, descending=True)
    mask = torch.ones(log_p.shape[0], dtype=torch.bool) if mask is None else mask
    return TeacherTargets(ids, values, targets, log_p.gather(1, targets[:, None])[:, 0], mask)


CASES = [
    ("forward_kl", {}, lambda p, q, t: R.kl(p, q)),
    ("reverse_kl", {}, lambda p, q, t: R.kl(q, p)),
    ("tvd", {}, lambda p, q, t: R.tvd(p, q)),
    ("skl", {"skew": 0.1}, lambda p, q, t: R.skl(p, q, 0.1)),
    ("srkl", {"skew": 0.3}, lambda p, q, t: R.srkl(p, q, 0.3)),
    ("jsd", {"beta": 0.3}, lambda p, q, t: R.jsd(p, q, 0.3)),
    ("jsd", {"beta": 0.0}, lambda p, q, t: R.kl(p, q)),
    ("jsd", {"beta": 1.0}, lambda p, q, t: R.kl(q, p)),
    ("akl", {"mu": 0.5}, lambda p, q, t: R.akl(p, q, 0.5)),
    ("taid", {"t_start": 0.4, "taid_schedule": "linear"}, lambda p, q, t: R.taid(p, q, 0.4)),
]
for alpha in (-5.0, -1.0, 0.0, 0.5, 1.0, 3.0):
    for order in ("pr", "qr", "rp", "rq"):
        CASES.append(("amid", {"alpha": alpha, "lam": 0.3, "order": order},
                      lambda p, q, t, a=alpha, o=order: R.amid(p, q, a, 0.3, "kl", o)))
for divergence in ("ab", "tvd"):
    CASES.append(("amid", {"alpha": -2.0, "lam": 0.1, "divergence": divergence},
                  lambda p, q, t, d=divergence: R.amid(p, q, -2.0, 0.1, d, "pr")))
CASES.append(("amid-paper", {}, lambda p, q, t: R.amid(p, q, 0.5, 0.1, "ab", "pr", 0.2, 0.7)))  # the paper's preset
CASES.append(("amid-paper", {"lam": 0.3}, lambda p, q, t: R.amid(p, q, 0.5, 0.3, "ab", "pr", 0.2, 0.7)))  # overridden


@pytest.mark.parametrize("support", ["renormalized", "tail"])
@pytest.mark.parametrize("name,params,ref", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_loss_equals_dense_reference_on_full_support(name, params, ref, support):
    log_p, logits, targets = dense_case()
    out = KDLoss(name, support=support, **params)(logits, full_support_targets(log_p, targets), progress=(0, 10))
    expected = ref(log_p.exp(), torch.softmax(logits, -1), targets)
    torch.testing.assert_close(out.per_position, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-7, atol=1e-9)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected.mean(), logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_atkd_equals_reference_and_decomposes_kl():
    log_p, logits, targets = dense_case(seed=3, n=9)
    teacher = full_support_targets(log_p, targets)
    out = KDLoss("atkd", lam=0.2)(logits, teacher)
    p, q = log_p.exp(), torch.softmax(logits, -1)
    expected, tkd, dkd, unc = R.atkd(p, q, targets, 0.2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-10)
    f_tkd, f_dkd, f_unc = F.atkd_parts(log_p, torch.log_softmax(logits, -1), targets)
    torch.testing.assert_close(f_tkd + f_unc * f_dkd, R.kl(p, q))  # KL = TKD + UNC * DKD
    torch.testing.assert_close(f_tkd, tkd)
    torch.testing.assert_close(f_dkd, dkd)


def test_atkd_uses_the_stored_target_logprob_outside_the_top_k():
    log_p, logits, _ = dense_case(seed=4, n=5, v=30)
    values, ids = log_p.sort(dim=-1, descending=True)
    targets = ids[:, -1]  # the least likely token: never in a top-8
    teacher = TeacherTargets(ids[:, :8], values[:, :8], targets, values[:, -1], torch.ones(5, dtype=torch.bool))
    out = KDLoss("atkd", support="renormalized")(logits, teacher)
    # dense reference on the support top-8 ∪ {target}, renormalised there
    keep = torch.cat([ids[:, :8], targets[:, None]], dim=1)
    p = torch.softmax(log_p.gather(1, keep), -1)
    q = torch.softmax(logits.gather(1, keep), -1)
    expected, *_ = R.atkd(p, q, torch.full((5,), 8), 0.2)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("skew", [0.1, 0.4])
def test_distillm_and_gkd_are_amid_instances(skew):
    log_p, logits, _ = dense_case(seed=5)
    log_q = torch.log_softmax(logits, -1)
    torch.testing.assert_close(F.skew_kl(log_p, log_q, skew), F.amid(log_p, log_q, alpha=-1, lam=skew, order="pr"))
    torch.testing.assert_close(F.skew_reverse_kl(log_p, log_q, skew), F.amid(log_p, log_q, alpha=-1, lam=1 - skew, order="qr"))
    beta = skew
    jsd = beta * F.amid(log_p, log_q, alpha=-1, lam=beta, order="pr") + (1 - beta) * F.amid(log_p, log_q, alpha=-1, lam=beta, order="qr")
    torch.testing.assert_close(F.generalized_jsd(log_p, log_q, beta), jsd)
    taid = F.amid(log_p, log_q.detach(), alpha=1.0, lam=beta, order="rq")
    torch.testing.assert_close(F.taid(log_p, log_q, beta).detach(), taid)


@pytest.mark.parametrize("alpha", [-5.0, -1.0, 0.0, 0.5, 2.0])
def test_amid_gradient_matches_the_analytic_formula(alpha):
    """∂KL(p‖r)/∂z_k = −w_k (p_k − r_k) + q_k Σ_y w_y (p_y − r_y), w = (1−λ)q^s / (λp^s + (1−λ)q^s)."""
    lam, s = 0.3, (1 - alpha) / 2
    log_p, logits, _ = dense_case(seed=6)
    loss = F.amid(log_p, torch.log_softmax(logits, -1), alpha=alpha, lam=lam).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    p, q = log_p.exp(), torch.softmax(logits.detach(), -1)
    r = R.assistant(p, q, alpha, lam)
    w = (1 - lam) * q**s / (lam * p**s + (1 - lam) * q**s)
    expected = -w * (p - r) + q * (w * (p - r)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name,params", [
    ("amid", {"alpha": -3.0}), ("amid", {"alpha": 2.0, "order": "rq"}), ("amid", {"divergence": "ab"}),
    ("forward_kl", {}), ("reverse_kl", {}), ("skl", {}), ("srkl", {}), ("jsd", {}), ("atkd", {}),
])  # AKL and TAID stop gradients on purpose (finite differences disagree); see the reference test
@pytest.mark.parametrize("support", ["renormalized", "tail"])
def test_gradcheck_float64(name, params, support):
    log_p, logits, targets = dense_case(seed=7, n=4, v=9)
    values, ids = log_p.sort(dim=-1, descending=True)
    teacher = TeacherTargets(ids[:, :6], values[:, :6], targets, log_p.gather(1, targets[:, None])[:, 0],
                             torch.tensor([True, True, False, True]))
    loss = KDLoss(name, support=support, **params)
    assert torch.autograd.gradcheck(lambda z: loss(z, teacher, progress=(1, 5)).loss, (logits,))


@pytest.mark.parametrize("alpha", [-5.0, -1.0, 0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("order", ["pr", "qr", "rp", "rq"])
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_amid_optimum_is_zero_with_zero_gradient(alpha, order, divergence):
    log_p, _, targets = dense_case(seed=8)
    logits = log_p.clone().requires_grad_(True)  # student equals teacher
    out = KDLoss("amid", alpha=alpha, lam=0.4, order=order, divergence=divergence)(logits, full_support_targets(log_p, targets))
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert abs(float(out.loss)) < 1e-12
    assert grad.abs().max() < 1e-10


def test_functional_and_module_defaults_agree():
    import inspect

    from amid_pipeline.losses.registry import LOSSES, loss_defaults

    for name, spec in LOSSES.items():
        signature = inspect.signature(spec.function).parameters
        for key, value in loss_defaults(name).items():
            if key in signature:
                assert signature[key].default == value == KDLoss(name).params[key], (name, key)
    assert KDLoss().name == "amid" and KDLoss().params["alpha"] == inspect.signature(F.amid).parameters["alpha"].default


@pytest.mark.parametrize("bad,match", [
    ({"name": "klx"}, "unknown loss 'klx'"),
    ({"name": "amid-paper", "gamma": 1.0}, "has no parameter 'gamma'"),
    ({"name": "amid", "lam": 1.5}, r"lam must lie in \[0, 1\]"),
    ({"name": "amid", "order": "pq"}, "order must be one of"),
    ({"name": "amid", "gamma": 1.0}, "has no parameter 'gamma'"),
    ({"name": "jsd", "beta": -0.1}, "beta must lie"),
    ({"name": "amid", "support": "dense"}, "support must be one of"),
    ({"name": "amid", "kd_ratio": 2.0}, "kd_ratio must lie"),
    ({"name": "taid", "t_start": 0.9, "t_end": 0.5}, "t_start <= t_end"),
])
def test_invalid_names_and_parameters_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        KDLoss(**bad)


def test_empty_support_is_rejected():
    with pytest.raises(ValueError, match="k >= 1"):
        KDLoss()(torch.zeros(2, 5), TeacherTargets(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0),
                                                   torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.ones(2, dtype=torch.bool)))
