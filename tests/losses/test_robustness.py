"""No NaN or inf in value or gradient on awkward inputs; reduction independent of batch shape."""

from __future__ import annotations

import math

import pytest
import torch

from amid_pipeline.losses import KDLoss, StudentHead, TeacherTargets, masked_mean
from amid_pipeline.losses.catalog import LOSS_FUNCTIONS, SUPPORT_MODES
from amid_pipeline.losses.registry import LOSSES

ALL = [(name, {}) for name in LOSSES if name != "amid"] + [
    ("amid", {"alpha": a, "lam": lam}) for a in (-50.0, -3.0, 1.0 - 1e-7, 1.0 + 1e-7, 50.0) for lam in (0.0, 0.1, 1.0)
] + [("amid", {"alpha": 3.0, "official_geometric": True}), ("amid", {"divergence": "ab", "alpha": 50.0})]


def awkward_batch(n=16, v=64, k=8, dtype=torch.float32, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(n, v, generator=generator) * 3
    teacher_logits[:3, 10:] = float("-inf")  # teacher puts no mass on most tokens at a few positions
    log_p = torch.log_softmax(teacher_logits, -1)
    values, ids = log_p.topk(k, dim=-1)  # contains -inf entries in rows 0..2
    targets = torch.randint(0, v, (n,), generator=generator)
    teacher = TeacherTargets(ids, values, targets, log_p.gather(1, targets[:, None])[:, 0],
                             torch.rand(n, generator=generator) < 0.7)
    logits = (torch.randn(n, v, generator=generator) * scale).to(dtype).requires_grad_(True)
    return logits, teacher


@pytest.mark.parametrize("name,params", ALL, ids=[f"{n}-{p}" for n, p in ALL])
@pytest.mark.parametrize("support", ["renormalized", "tail", "teacher_renormalized"])
@pytest.mark.parametrize("case", ["neg_inf_teacher", "extreme_logits", "bf16", "all_masked", "all_mass_on_ids",
                                  "confident_target"])
def test_finite_value_and_gradient(name, params, support, case):
    """all_mass_on_ids: the student puts all its mass on one stored id, so its mass outside the ids is
    exactly 0; under teacher_renormalized the teacher has 0 there too. confident_target: the student's
    log-probability of the actual token lies within float32 rounding of 0 (1 − q_g cancels; ATKD's
    gradient was NaN there and stopped real training runs)."""
    logits, teacher = awkward_batch(scale=1e4 if case == "extreme_logits" else 1.0,
                                    dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    if case == "all_masked":
        teacher.mask = torch.zeros_like(teacher.mask)
    if case == "all_mass_on_ids":
        logits = logits.detach().scatter_add(1, teacher.topk_ids[:, :1], torch.full((len(logits), 1), 200.0)).requires_grad_(True)
    if case == "confident_target":
        teacher.target_ids = teacher.topk_ids[:, 0].clone()
        teacher.target_logprob = teacher.topk_logprobs[:, 0].clone()
        logits = logits.detach().scatter_add(1, teacher.target_ids[:, None], torch.full((len(logits), 1), 23.0)).requires_grad_(True)
    try:
        loss = KDLoss(name, support=support, **params)
    except ValueError as refused:  # infinite under this support: refused by name, nothing to run
        assert support == "teacher_renormalized" and "infinite" in str(refused)
        return
    out = loss(logits, teacher, progress=(3, 10))
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_position).all()
    assert torch.isfinite(grad.float()).all()
    assert out.loss.dtype == torch.float32
    if case == "all_masked":
        assert float(out.loss) == 0.0 and float(grad.abs().max()) == 0.0


def test_alpha_near_one_is_continuous():
    logits, teacher = awkward_batch(seed=2)
    values = [float(KDLoss("amid", alpha=a)(logits, teacher).loss) for a in (1 - 1e-3, 1 - 1e-6, 1.0, 1 + 1e-6, 1 + 1e-3)]
    assert max(values) - min(values) < 1e-3


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "atkd"])
def test_reduction_is_independent_of_batch_shape_and_padding(name):
    """Mean over supervised positions: the same positions split, padded and reordered give one value."""
    logits, teacher = awkward_batch(n=12, seed=3)
    loss = KDLoss(name)
    whole = loss(logits, teacher, progress=(1, 5)).loss

    def part(rows, pad):
        index = torch.tensor(rows + [0] * pad)
        mask = teacher.mask[index].clone()
        mask[len(rows):] = False  # padding positions
        sub = TeacherTargets(teacher.topk_ids[index], teacher.topk_logprobs[index], teacher.target_ids[index],
                             teacher.target_logprob[index], mask)
        out = loss(logits[index], sub, progress=(1, 5))
        return out.per_position.sum(), mask.sum()

    sums, counts = zip(part([0, 1, 2, 3, 4], pad=3), part([5, 6, 7, 8, 9, 10, 11], pad=0))
    torch.testing.assert_close(sum(sums) / sum(counts), whole)
    padded_sum, padded_count = part(list(range(12)), pad=5)
    torch.testing.assert_close(padded_sum / padded_count, whole)


def test_masked_mean_guards_empty_masks():
    assert float(masked_mean(torch.tensor([1.0, 2.0]), torch.tensor([False, False]))) == 0.0


FUSED_CASES = [(name, support, kd_ratio) for name in LOSS_FUNCTIONS for support in SUPPORT_MODES for kd_ratio in (1.0, 0.6)]


def fused_case(name, support, kd_ratio, n=13, h=16, v=50, dtype=torch.float64, bias=False, seed=4):
    """(loss, teacher, hidden [n, h], weight [v, h], bias [v] or None) for one loss × support × kd_ratio;
    skipped where the library refuses the combination (a loss infinite at p = 0 < q on a support that gives
    the teacher no rest)."""
    try:
        loss = KDLoss(name, support=support, kd_ratio=kd_ratio)
    except ValueError as refused:
        pytest.skip(str(refused))
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=generator, dtype=dtype, requires_grad=True)
    head_bias = torch.randn(v, generator=generator, dtype=dtype, requires_grad=True) if bias else None
    _, teacher = awkward_batch(n=n, v=v, seed=seed + 1)
    if support == "sampled":  # the drawn ids' empirical weights p̂, two unused slots per row
        weights = torch.rand(teacher.topk_ids.shape, generator=generator, dtype=torch.float64)
        weights[:, -2:] = 0
        teacher.sample_weights = weights / weights.sum(-1, keepdim=True)
    teacher.topk_logprobs = teacher.topk_logprobs.to(dtype)
    teacher.target_logprob = teacher.target_logprob.to(dtype)
    return loss, teacher, hidden, weight, head_bias


def dense_logits(hidden, weight, bias):
    return hidden @ weight.T + (bias if bias is not None else 0)


@pytest.mark.parametrize("name,support,kd_ratio", FUSED_CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fused_head_equals_full_logits_for_every_loss_support_and_kd_ratio(name, support, kd_ratio, bias):
    """Hidden states + LM head (chunked over positions, never [N, V]) give the full-logits path's values and
    gradients for every loss, support mode and CE weight: in float64 (the blocks are float32 by design, so
    to float32 rounding), and in float32 against the float64 full logits (to float32 rounding)."""
    loss, teacher, hidden, weight, head_bias = fused_case(name, support, kd_ratio, bias=bias)
    inputs = (hidden, weight) + ((head_bias,) if bias else ())
    dense = loss(dense_logits(hidden, weight, head_bias), teacher)
    dense_grads = torch.autograd.grad(2.5 * dense.loss, inputs)  # scaled, as gradient accumulation divides it
    for dtype, chunk in ((torch.float64, 3), (torch.float64, 1024), (torch.float32, 5)):
        cast = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
        fused = loss(StudentHead(cast[0], cast[1], cast[2] if bias else None, chunk=chunk), teacher)
        torch.testing.assert_close(fused.loss.double(), dense.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.per_position.double(), dense.per_position, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(2.5 * fused.loss, cast), dense_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2.5e-6)
    assert loss.needs_full_vocabulary == (support != "renormalized" or kd_ratio < 1)


@pytest.mark.parametrize("name,support,kd_ratio", FUSED_CASES)
def test_fused_head_under_bf16_autocast(name, support, kd_ratio):
    """The trainer runs the forward under bf16 autocast (the default on a GPU) and backward outside it: the
    head's blocks recomputed in backward must not depend on autocast (a bf16 @ fp32 matmul raised there).
    Under autocast both paths round the logits to bf16 (the matmul's output dtype); the fused path's value
    and gradients equal the full-logits path's (``F.linear`` under the same autocast) to that rounding, and
    both stay within it of float64 full logits of the same bf16 operands."""
    loss, teacher, hidden, weight, _ = fused_case(name, support, kd_ratio, dtype=torch.float32, seed=6)
    hidden = hidden.detach().bfloat16().requires_grad_(True)  # a decoder's last hidden state under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss(StudentHead(hidden, weight, chunk=5), teacher)
        full = loss(torch.nn.functional.linear(hidden, weight), teacher)
    fused_grads = torch.autograd.grad(fused.loss, (hidden, weight))  # outside autocast, as in the trainer
    full_grads = torch.autograd.grad(full.loss, (hidden, weight))
    assert fused_grads[0].dtype == torch.bfloat16 and fused_grads[1].dtype == torch.float32
    reference = TeacherTargets(teacher.topk_ids, teacher.topk_logprobs.double(), teacher.target_ids,
                               teacher.target_logprob.double(), teacher.mask, teacher.sample_weights)
    operands = (hidden.detach().double().requires_grad_(True), weight.detach().bfloat16().double().requires_grad_(True))
    exact = loss(operands[0] @ operands[1].T, reference)
    exact_grads = torch.autograd.grad(exact.loss, operands)
    for value, grads in ((fused.loss, fused_grads), (full.loss, full_grads)):
        torch.testing.assert_close(value.double(), exact.loss, rtol=2e-3, atol=1e-4)
        for a, b in zip(grads, exact_grads):
            assert float((a.double() - b).norm() / b.norm()) < 2e-2
    torch.testing.assert_close(fused.loss, full.loss.float(), rtol=2e-3, atol=1e-4)
    for a, b in zip(fused_grads, full_grads):
        assert float((a.double() - b.double()).norm() / b.double().norm()) < 2e-2


def test_ce_mix_matches_cross_entropy():
    logits, teacher = awkward_batch(seed=6)
    out = KDLoss("forward_kl", kd_ratio=0.0)(logits, teacher)
    expected = torch.nn.functional.cross_entropy(logits[teacher.mask], teacher.target_ids[teacher.mask])
    torch.testing.assert_close(out.loss, expected)


def test_taid_schedules():
    from amid_pipeline.losses import TAIDSchedule

    linear = TAIDSchedule(mode="linear")
    assert linear.value(0, 100) == pytest.approx(0.4) and linear.value(100, 100) == pytest.approx(1.0)
    adaptive = TAIDSchedule(step_size=0.05)
    values = []
    for step, loss in enumerate([5.0, 4.0, 3.5, 3.4, 3.4, 3.6]):
        adaptive.observe(step, 100, loss)
        values.append(adaptive.value(step + 1, 100))
    assert values == sorted(values) and values[-1] <= 1.0
    assert values[0] > linear.value(1, 100)  # a falling loss pushes t ahead of the linear schedule


@pytest.mark.parametrize("alpha", [-3.0, 0.5, 3.0])
def test_amid_gradient_is_finite_where_teacher_and_student_both_have_zero(alpha):
    """p = q = 0 at one outcome: r = 0 there and the gradient is 0 there (logaddexp(-inf, -inf) has a
    NaN gradient if differentiated); the loss equals the one on the other outcomes alone."""
    import math

    from amid_pipeline.losses import functional as F

    log_p = torch.tensor([[math.log(0.7), math.log(0.3), float("-inf")]])
    log_q = torch.tensor([[math.log(0.6), math.log(0.4), float("-inf")]], requires_grad=True)
    value = F.amid(log_p, log_q, alpha=alpha, lam=0.1)
    (grad,) = torch.autograd.grad(value.sum(), log_q)
    assert torch.isfinite(grad).all() and grad[0, 2] == 0
    torch.testing.assert_close(value, F.amid(log_p[:, :2], log_q.detach()[:, :2], alpha=alpha, lam=0.1))


def quantized_confident_case(n=64, v=500, k=32, seed=0):
    """An expert-like teacher (top-1 between 0.9 and 1 − 1e-9) stored as the q64-delta shards store it,
    the same teacher exact in float64, and a student near the teacher."""
    from amid_pipeline.shards.schema import decode_topk_logprobs, encode_topk_logprobs

    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(n, v, generator=generator, dtype=torch.float64)
    teacher_logits[:, 0] += torch.linspace(5, 28, n, dtype=torch.float64)
    log_p = torch.log_softmax(teacher_logits, -1)
    values, ids = log_p.topk(k, dim=-1)
    stored = encode_topk_logprobs(values.numpy(), "q64-delta").reshape(-1)
    decoded = torch.from_numpy(decode_topk_logprobs(stored, k, "q64-delta").reshape(n, k)).double()
    targets = ids[:, 0]

    def targets_with(topk_logprobs):
        return TeacherTargets(ids, topk_logprobs, targets, topk_logprobs[:, 0], torch.ones(n, dtype=torch.bool))

    student = (teacher_logits + torch.randn(n, v, generator=generator, dtype=torch.float64)).requires_grad_(True)
    return targets_with(values), targets_with(decoded), student


@pytest.mark.parametrize("name", ["reverse_kl", "akl", "forward_kl", "amid"])
def test_tail_support_survives_rounding_that_fills_the_stored_mass(name):
    """q64 rounding can make a confident position's decoded top-k mass reach 1 (rest 0): the tail bucket
    keeps what rounding hid, so the loss on the decoded targets stays near the loss on the exact ones
    (largest difference per position: 0.11 for reverse KL; 240 for reverse KL and 118 for AKL when the
    rest was taken as 1 − Σ p = 0)."""
    from amid_pipeline.losses.support import support_distributions

    exact, decoded, student = quantized_confident_case()
    assert (decoded.topk_logprobs.exp().sum(-1) >= 1).sum() >= 8  # the case this test is about occurs
    log_p, _, _ = support_distributions(student, decoded, "tail")
    torch.testing.assert_close(torch.logsumexp(log_p, -1), torch.zeros(len(log_p), dtype=torch.float64))
    assert (log_p[:, -1] > float("-inf")).all()
    loss = KDLoss(name, support="tail")
    on_exact, on_decoded = loss(student, exact).per_position, loss(student, decoded).per_position
    assert (on_decoded - on_exact).abs().max() < 0.25
    (grad,) = torch.autograd.grad(loss(student, decoded).loss, student)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1.0


def confident_student_batch(n=64, v=512, k=16, only_target=False):
    """A student whose mass outside the teacher's top-k (``only_target``: outside the actual token, the
    teacher's top id) falls from 1e-5 to 1e-8 over the rows: where 1 − Σ_S q and 1 − q_g cancel in float32."""
    generator = torch.Generator().manual_seed(7)
    log_p = torch.log_softmax(torch.randn(n, v, generator=generator, dtype=torch.float64) * 3, -1)
    values, ids = log_p.topk(k, dim=-1)
    teacher = TeacherTargets(ids, values, ids[:, 0].clone(), values[:, 0].clone(), torch.ones(n, dtype=torch.bool))
    logits = torch.randn(n, v, generator=generator, dtype=torch.float64)
    boosted = ids[:, :1] if only_target else ids
    boost = torch.linspace(16, 22, n, dtype=torch.float64)[:, None].expand(*boosted.shape).contiguous()
    logits.scatter_add_(1, boosted, boost)
    return logits, teacher


@pytest.mark.parametrize("name,only_target", [("forward_kl", False), ("amid", False), ("atkd", False), ("akl", False),
                                              ("skl", False), ("atkd", True)])
@pytest.mark.parametrize("support", ["tail", "teacher_renormalized", "renormalized"])
def test_float32_equals_float64_where_the_student_leaves_almost_no_mass_outside_the_ids(name, only_target, support):
    """The rest bucket's q_rest is a logsumexp over the logits outside the ids (not 1 − Σ_S q) and ATKD's
    1 − q_g a logsumexp over the other outcomes: in float32 the old forms read forward KL 738 for 3.56
    and ATKD 1146 for 4.58, with gradients off by 17-69 %."""
    logits, teacher = confident_student_batch(only_target=only_target)
    try:
        loss = KDLoss(name, support=support)
    except ValueError:  # infinite under teacher_renormalized: refused
        return
    float32 = TeacherTargets(teacher.topk_ids, teacher.topk_logprobs.float(), teacher.target_ids,
                             teacher.target_logprob.float(), teacher.mask)
    results = []
    for z, targets in ((logits.float(), float32), (logits, teacher)):
        z = z.clone().requires_grad_(True)
        out = loss(z, targets)
        results.append((out.loss.detach().double(), torch.autograd.grad(out.loss, z)[0].double()))
    (loss32, grad32), (loss64, grad64) = results
    torch.testing.assert_close(loss32, loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad32, grad64, rtol=1e-3, atol=1e-6 * float(grad64.abs().max()))


def test_log1mexp_gradient_is_finite_and_exact_next_to_zero():
    """d/dx log(1 − e^x) = −e^x / (1 − e^x); its untaken torch.where branch used to make it NaN for
    0 > x > −3e-8 in float32."""
    from amid_pipeline.losses.functional import _log1mexp

    x = torch.tensor([-1e-9, -2e-8, -1e-7, -1e-3, -0.5, -5.0, -80.0], requires_grad=True)
    (grad,) = torch.autograd.grad(_log1mexp(x).sum(), x)
    exact = -torch.exp(x.double()) / -torch.expm1(x.double())
    torch.testing.assert_close(grad.double(), exact.detach(), rtol=1e-4, atol=0.0)


def test_logsumexps_of_a_row_without_finite_logits_is_minus_inf_not_nan():
    """A row whose logits are all −inf (a fully masked vocabulary) has no mass anywhere: −inf, not NaN."""
    from amid_pipeline.losses.sparse_head import logsumexps

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [float("-inf")] * 4])
    lse, rest = logsumexps(logits, torch.tensor([[3], [0]]))
    torch.testing.assert_close(lse[0], torch.logsumexp(logits[0], -1))
    torch.testing.assert_close(rest[0], torch.logsumexp(logits[0, :3], -1))
    assert torch.isneginf(lse[1]) and torch.isneginf(rest[1])


@pytest.mark.parametrize("gap", [30.0, 100.0])
def test_fused_head_keeps_the_rest_gradient_where_the_student_leaves_almost_no_mass_there(gap):
    """The fused head rescales the rest's softmax from exp(z − peak) while the rest lies within 60 nats of
    the peak, and takes exp(z − rest) itself below that: in both regimes forward KL on the tail support
    (whose gradient at the rest's ids is O(1) however small q_rest is) equals the float64 full logits."""
    generator = torch.Generator().manual_seed(11)
    n, h, v, k = 6, 8, 40, 4
    hidden = torch.randn(n, h, generator=generator, dtype=torch.float64)
    weight = torch.randn(v, h, generator=generator, dtype=torch.float64) * 0.1
    _, teacher = awkward_batch(n=n, v=v, k=k, seed=12)
    teacher.mask = torch.ones(n, dtype=torch.bool)
    teacher.topk_logprobs = torch.log_softmax(torch.randn(n, k, generator=generator), -1) + math.log(0.7)  # p_rest 0.3
    bias = torch.zeros(v, dtype=torch.float64)
    bias[teacher.topk_ids[0]] = gap  # the ids of row 0 get every position's mass; the rest lies ~gap nats below
    teacher.topk_ids = teacher.topk_ids[:1].expand(n, k).contiguous()
    loss = KDLoss("forward_kl", support="tail")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    dense = loss(leaves[0] @ leaves[1].T + leaves[2], teacher)
    expected = torch.autograd.grad(dense.loss, leaves)
    cast = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]
    fused = loss(StudentHead(*cast, chunk=4), teacher)
    assert torch.isfinite(fused.loss) and float(fused.loss) > 1.0  # the student's rest is far too small
    torch.testing.assert_close(fused.loss.double(), dense.loss, rtol=1e-5, atol=1e-5)
    as_float32 = [t.float().requires_grad_(True) for t in (hidden, weight, bias)]  # logits of ~gap carry its rounding
    float32_grads = torch.autograd.grad(loss(as_float32[0] @ as_float32[1].T + as_float32[2], teacher).loss, as_float32)
    for a, b, c in zip(torch.autograd.grad(fused.loss, cast), expected, float32_grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)
        assert float((a.double() - b).abs().max()) < 1e-3 * float(b.abs().max())


def test_fused_head_under_no_grad_gives_the_value_and_forms_no_gradients(monkeypatch):
    """Held-out evaluation runs the loss under no_grad: the same value, and no block's gradient is formed
    (autograd's needs_input_grad still says True there, so the fused head must ask torch itself)."""
    import amid_pipeline.losses.sparse_head as sparse_head

    loss, teacher, hidden, weight, _ = fused_case("amid", "tail", 0.6, dtype=torch.float32)
    with_grad = loss(StudentHead(hidden, weight, chunk=5), teacher)
    asked = []
    original = sparse_head._fused_block
    monkeypatch.setattr(sparse_head, "_fused_block", lambda *args, gradient: asked.append(gradient) or original(
        *args, gradient=gradient))
    with torch.no_grad():
        without = loss(StudentHead(hidden, weight, chunk=5), teacher)
    assert asked == [False, False, False]  # 13 positions in blocks of 5
    torch.testing.assert_close(without.loss, with_grad.loss.detach())
    torch.testing.assert_close(without.per_position, with_grad.per_position.detach())
