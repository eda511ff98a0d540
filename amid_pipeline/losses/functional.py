"""Per-position distillation losses on a common support (docs/losses.md).

Every loss takes ``log_p`` (teacher) and ``log_q`` (student) of shape [N, S]: log-probabilities of N
positions over the same S outcomes (the stored top-k, renormalised; or top-k plus a tail bucket; or
the whole vocabulary), and returns [N] per-position values. ``log_q`` carries the gradient; ``log_p``
is data. Inputs are upcast to float32 (float64 stays float64). Reduction over supervised positions
happens once, in :func:`amid_pipeline.losses.support.masked_mean`.

Conventions where public code disagrees:

- JSD(β): m = β·p + (1−β)·q, JSD = β·KL(p‖m) + (1−β)·KL(q‖m); the endpoints are defined as the limits
  of JSD/β and JSD/(1−β): β = 0 is KL(p‖q) (forward), β = 1 is KL(q‖p) (reverse).
- SKL(a) = KL(p ‖ a·p + (1−a)·q) and SRKL(a) = KL(q ‖ (1−a)·p + a·q), as in DistiLLM: ``skew`` = a is
  the weight of the anchor distribution inside the mixture; default 0.1.
- AMiD's λ weights the TEACHER in the assistant distribution.
"""

from __future__ import annotations

import math

import torch

from amid_pipeline.losses.divergences import DIVERGENCES, LOG_FLOOR, ab_divergence, kl, tvd

GEOMETRIC_TOLERANCE = 1e-4  # |α − 1| below this uses the geometric mixture (the s → 0 limit)
ORDERS = ("pr", "qr", "rp", "rq")


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.dtype == torch.float64 else t.float() for t in tensors]


def check_pair(log_p: torch.Tensor, log_q: torch.Tensor) -> None:
    if log_p.shape != log_q.shape or log_p.dim() != 2:
        raise ValueError(f"log_p and log_q must both be [N, S]; got {tuple(log_p.shape)} and {tuple(log_q.shape)}")


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q). [N, S] x2 -> [N]."""
    check_pair(log_p, log_q)
    return kl(*_upcast(log_p, log_q))


def sampled_forward_kl(log_weights: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo estimate of KL(p‖q) from draws v ~ p kept as weights: Σ_i p̂_i (log p_i − log q_i).

    ``log_weights`` [N, S] = log p̂ (the draws' empirical distribution, −inf where none landed);
    ``log_p`` [N, S] the exact teacher log-probabilities and ``log_q`` [N, S] the student's, both over
    the full vocabulary. Unbiased for p̂_i = c_i/N (E p̂_i = p_i), in value and gradient. -> [N].
    """
    check_pair(log_weights, log_q)
    log_weights, log_q = _upcast(log_weights, log_q)
    drawn = torch.isfinite(log_weights)
    gap = torch.where(drawn, log_p.to(log_q.dtype) - log_q, torch.zeros_like(log_q))
    return (log_weights.exp() * gap).sum(dim=-1)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) = Σ q (log q − log p). [N, S] x2 -> [N]."""
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    return kl(log_q, log_p)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """TVD = ½ Σ |p − q|. [N, S] x2 -> [N]."""
    check_pair(log_p, log_q)
    return tvd(*_upcast(log_p, log_q))


def _mixture(log_x: torch.Tensor, log_y: torch.Tensor, weight_x: float) -> torch.Tensor:
    """log(w·x + (1−w)·y) for w in [0, 1], in log space; −inf, with no NaN gradient, where x = y = 0."""
    if weight_x <= 0:
        return log_y
    if weight_x >= 1:
        return log_x
    absent = torch.isneginf(log_x) & torch.isneginf(log_y)  # logaddexp(−inf, −inf) differentiates to NaN
    log_y_safe = torch.where(absent, torch.zeros_like(log_y), log_y)
    mixed = torch.logaddexp(log_x + math.log(weight_x), log_y_safe + math.log1p(-weight_x))
    return torch.where(absent, torch.full_like(mixed, float("-inf")), mixed)


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """DistiLLM SKL(a) = KL(p ‖ a·p + (1−a)·q), a = ``skew``. [N, S] x2 -> [N]."""
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    return kl(log_p, _mixture(log_p, log_q, skew))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """DistiLLM SRKL(a) = KL(q ‖ (1−a)·p + a·q), a = ``skew``. [N, S] x2 -> [N]."""
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    return kl(log_q, _mixture(log_p, log_q, 1 - skew))


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; β = 0 → KL(p‖q), β = 1 → KL(q‖p)."""
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    if beta <= 0:
        return kl(log_p, log_q)
    if beta >= 1:
        return kl(log_q, log_p)
    log_m = _mixture(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def assistant_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, lam: float,
                        official_geometric: bool = False) -> torch.Tensor:
    """AMiD's α-mixture assistant distribution r, as log-probabilities [N, S].

        log r̃ = (1/s)·logaddexp(log λ + s·log p, log(1−λ) + s·log q),  s = (1−α)/2   (α ≠ 1)
        log r̃ = λ·log p + (1−λ)·log q                                   (|α − 1| < 1e-4)
        log r  = log r̃ − logsumexp(log r̃)

    λ weights the teacher (λ = 1: r = p; λ = 0: r = q). For α < 1 the support of r is the union of the
    supports of p and q, for α ≥ 1 their intersection. ``official_geometric``: treat every α ≥ 1 as
    the geometric mixture, as the paper's official code does. log r is floored at -1e4.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if lam == 1.0:  # r = p; kept on the student's graph so that backward() gives zero gradients
        return log_p + 0.0 * log_q.clamp(min=LOG_FLOOR)
    if lam == 0.0:
        return log_q
    geometric = abs(alpha - 1.0) < GEOMETRIC_TOLERANCE or (official_geometric and alpha >= 1.0)
    if geometric:
        finite = torch.isfinite(log_p)
        log_tilde = lam * torch.where(finite, log_p, torch.zeros_like(log_p)) + (1 - lam) * log_q
        log_tilde = torch.where(finite, log_tilde, torch.full_like(log_tilde, float("-inf")))
    else:
        s = (1.0 - alpha) / 2.0
        finite = torch.isfinite(log_p)
        teacher_term = math.log(lam) + s * torch.where(finite, log_p, torch.zeros_like(log_p))
        # p = 0: p^s is 0 for s > 0 (the term vanishes) and +inf for s < 0 (then r̃ = 0)
        teacher_term = torch.where(finite, teacher_term, torch.full_like(teacher_term, float("-inf")))
        student_term = math.log1p(-lam) + s * log_q
        # p = q = 0 (e.g. a rest bucket the teacher leaves empty and the student has emptied): r̃ = 0, and
        # logaddexp(-inf, -inf) must not be differentiated (its gradient is NaN)
        absent = torch.isneginf(teacher_term) & torch.isneginf(student_term)
        log_tilde = torch.logaddexp(teacher_term, torch.where(absent, torch.zeros_like(student_term), student_term)) / s
        if s < 0:
            log_tilde = torch.where(finite, log_tilde, torch.full_like(log_tilde, float("-inf")))
        log_tilde = torch.where(absent, torch.full_like(log_tilde, float("-inf")), log_tilde)
    log_r = log_tilde - torch.logsumexp(log_tilde, dim=-1, keepdim=True)
    return log_r.clamp(min=LOG_FLOOR)


def amid(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float = 0.5, lam: float = 0.1,
         divergence: str = "kl", order: str = "pr", ab_a: float = 0.2, ab_b: float = 0.7,
         official_geometric: bool = False) -> torch.Tensor:
    """AMiD: a divergence between one anchor and the assistant r = r(p, q; α, λ). [N, S] x2 -> [N].

    ``order``: 'pr' = D(p‖r) (default), 'qr' = D(q‖r), 'rp' = D(r‖p), 'rq' = D(r‖q). ``divergence``:
    'kl', 'ab' (AB-divergence with ``ab_a``, ``ab_b``) or 'tvd'. Gradients flow through q both directly
    and through r (including its normaliser), as in the official code.

    Defaults α = 0.5, λ = 0.1, KL, 'pr', chosen on a dev split (docs/benchmarks.md, "Evidence"). The gradient on an
    outcome is weighted by w = (1−λ)q^s / (λp^s + (1−λ)q^s), s = (1−α)/2: where the student under-predicts
    (q ≪ p) w → 0 as (q/p)^s. At α = −3 (s = 2) an id with q = p/10 keeps 8 % of its pull and the loss is
    flat there (it is bounded by (2/(1−α))·log(1/λ)), so a student that under-predicts a fifth of the
    teacher's mass is never pulled back there; at α = 0.5 (s = 1/4) it keeps 84 %.
    """
    check_pair(log_p, log_q)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    log_p, log_q = _upcast(log_p, log_q)
    log_r = assistant_log_probs(log_p, log_q, alpha, lam, official_geometric)
    first, second = {"pr": (log_p, log_r), "qr": (log_q, log_r), "rp": (log_r, log_p), "rq": (log_r, log_q)}[order]
    second = second.clamp(min=LOG_FLOOR)
    if divergence == "ab":
        return ab_divergence(first, second, ab_a, ab_b)
    return DIVERGENCES[divergence](first, second)


def adaptive_kl(log_p: torch.Tensor, log_q: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL (Wu et al., COLING 2025): head/tail-weighted mix of forward and reverse KL. [N, S] x2 -> [N].

    Sort outcomes by teacher probability (descending), cumulative teacher mass C; head
    H = {C ≤ μ} ∪ {top outcome}, tail T = the rest. With q detached for the weights,
    g_head = Σ_H |p − q|, g_tail = Σ_T |p − q|, and
    AKL = g_head/(g_head + g_tail)·KL(p‖q) + g_tail/(g_head + g_tail)·KL(q‖p).
    """
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    p = log_p.exp()
    order = torch.argsort(p, dim=-1, descending=True)
    p_sorted = p.gather(-1, order)
    gap_sorted = (p_sorted - log_q.detach().exp().gather(-1, order)).abs()
    cumulative = p_sorted.cumsum(dim=-1)
    head = cumulative <= mu
    head[..., 0] = True
    g_head = (gap_sorted * head).sum(-1)
    g_tail = (gap_sorted * ~head).sum(-1)
    total = g_head + g_tail
    w_head = torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), torch.full_like(total, 0.5))
    return w_head * kl(log_p, log_q) + (1 - w_head) * kl(log_q, log_p)


def taid(log_p: torch.Tensor, log_q: torch.Tensor, t: float) -> torch.Tensor:
    """TAID at interpolation ``t`` ∈ [0, 1]: KL(p_t‖q), p_t = softmax((1−t)·stopgrad(log q) + t·log p).

    Log-probabilities stand for the logits (they differ by a per-position constant, which softmax
    ignores). TAID's −Σ p_t log q differs from this by the entropy of the detached p_t: same gradient;
    this form is 0 when q = p. Equals AMiD(α = 1, λ = t, KL, 'rq') with a detached student. [N, S] -> [N].
    """
    check_pair(log_p, log_q)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    log_p, log_q = _upcast(log_p, log_q)
    log_pt = assistant_log_probs(log_p, log_q.detach(), alpha=1.0, lam=t)
    return kl(log_pt, log_q)


def atkd_parts(log_p: torch.Tensor, log_q: torch.Tensor, target_index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATKD's split of KL(p‖q) at the ground-truth outcome g (column ``target_index`` [N]).

    b_p = [p_g, 1−p_g], b_q = [q_g, 1−q_g]; p̂, q̂ = p, q over the other outcomes, renormalised.
    Returns (L_TKD = KL(b_p‖b_q) [N], L_DKD = KL(p̂‖q̂) [N], UNC = 1 − p_g [N]), so that
    KL(p‖q) = L_TKD + UNC·L_DKD.
    """
    check_pair(log_p, log_q)
    log_p, log_q = _upcast(log_p, log_q)
    index = target_index.long()[:, None]
    lp_g, lq_g = log_p.gather(-1, index)[:, 0], log_q.gather(-1, index)[:, 0]
    others = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, index, False)
    neg_inf = torch.full_like(log_p, float("-inf"))
    rest_p = torch.where(others, log_p, neg_inf)
    rest_q = torch.where(others, log_q, neg_inf)
    # log(1 − p_g) as the logsumexp of the other outcomes, not log1mexp(log p_g): a confident student's
    # log q_g lies within float32 rounding of 0, where 1 − q_g cancels (value off, gradient NaN)
    log_rest_p, log_rest_q = torch.logsumexp(rest_p, dim=-1), torch.logsumexp(rest_q, dim=-1)
    binary_p = torch.stack([lp_g, log_rest_p], dim=-1)
    binary_q = torch.stack([lq_g, log_rest_q], dim=-1)
    rest_p = rest_p - log_rest_p.clamp(min=LOG_FLOOR)[:, None]
    rest_q = rest_q - log_rest_q.clamp(min=LOG_FLOOR)[:, None]
    tkd = kl(binary_p, binary_q)
    dkd = kl(rest_p, rest_q)
    return tkd, dkd, -torch.expm1(lp_g)


def universal_logit_distance(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al., 2024, "Towards cross-tokenizer distillation") on stored targets: the L1 distance
    between the teacher's k stored probabilities and the student's k largest, each sorted, plus the
    difference between what each leaves outside them (a lower bound on the rest of the sorted L1, which the
    shards do not hold): Σ_{i≤k} |p_(i) − q_(i)| + |Σ_{i≤k} q_(i) − Σ_{i≤k} p_(i)|. Vocabulary-free: no id
    of either side is compared; k is each row's count of finite teacher values (−inf slots are padding).
    ``log_p`` [N, k], ``log_q`` [N, V] the student's full log-distribution -> [N]."""
    p = torch.sort(log_p.to(log_q.dtype).exp(), dim=-1, descending=True).values
    q = torch.topk(log_q.exp(), min(p.shape[1], log_q.shape[1]), dim=-1).values
    p = p[:, : q.shape[1]]
    held = torch.arange(q.shape[1], device=q.device) < torch.isfinite(log_p).sum(-1, keepdim=True)  # k_t per row
    q = q * held  # a row's −inf slots (padding) hold no target: its k is the finite ones
    return (p - q).abs().sum(-1) + (q.sum(-1) - p.sum(-1)).abs()


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(log_x)) for log_x ≤ 0, accurate near 0 and at −inf; −inf at log_x = 0.

    log(−expm1(x)) for x > −log 2, log1p(−exp(x)) below. Each formula only ever sees inputs where it is
    finite: torch.where back-propagates 0 × the untaken branch's gradient, which is NaN where that branch
    is infinite (log1p(−exp(x)) for 0 > x > −3e-8 in float32, where exp(x) rounds to 1).
    """
    log_x = log_x.clamp(max=0.0)
    negative, near_zero = log_x < 0, log_x > -math.log(2)
    placeholder = torch.full_like(log_x, -1.0)
    near = torch.where(negative & near_zero, log_x, placeholder)
    far = torch.where(near_zero, placeholder, log_x)
    out = torch.where(near_zero, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))
    return torch.where(negative, out, torch.full_like(out, float("-inf")))


def atkd(log_p: torch.Tensor, log_q: torch.Tensor, target_index: torch.Tensor, mask: torch.Tensor,
         lam: float = 0.2) -> torch.Tensor:
    """ATKD (Zhong et al., ACL 2024): λ·mean_easy[L_DKD] + (1−λ)·mean_hard[L_TKD + L_DKD].

    Positions with UNC = 1 − p_g at or above the median UNC of the batch's supervised positions are
    hard, the rest easy. Returned per position [N] and scaled by (supervised / group size) so that
    :func:`masked_mean` of the result is exactly the ATKD objective (an empty group contributes 0).
    """
    tkd, dkd, unc = atkd_parts(log_p, log_q, target_index)
    mask = mask.bool()
    if not mask.any():
        return 0.0 * (tkd + dkd)
    threshold = unc[mask].median()
    hard = (unc >= threshold) & mask
    easy = ~hard & mask
    supervised = mask.sum()
    easy_scale = supervised / easy.sum().clamp(min=1)
    hard_scale = supervised / hard.sum().clamp(min=1)
    return torch.where(hard, (1 - lam) * hard_scale * (tkd + dkd), lam * easy_scale * dkd) * mask
