"""Divergences between distributions given as log-probabilities on the last axis.

Every function takes ``log_a``, ``log_b`` of shape [N, S] (rows are distributions over S outcomes,
entries may be ``-inf``) and returns [N] per-row values, in float32 or wider. Entries where the
weighting distribution is zero contribute exactly 0 (never ``0 * -inf``), in value and in gradient.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
LOG_FLOOR = -1e4  # log B is floored here: where A > 0 = B the divergence is large but finite
EPS_PARAM = 1e-6  # |a|, |b| or |a + b| below this use the analytic limit of the AB-divergence


def _where_finite(log_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of finite entries, log_x with -inf replaced by 0 so that unused branches stay finite)."""
    finite = torch.isfinite(log_x)
    return finite, torch.where(finite, log_x, torch.zeros_like(log_x))


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ_y A(y) (log A(y) − log B(y)), entropy term included (0 at A = B); log B >= -1e4."""
    finite, safe_a = _where_finite(log_a)
    safe_b = torch.where(finite, log_b.clamp(min=LOG_FLOOR), torch.zeros_like(log_b))
    terms = torch.where(finite, safe_a.exp() * (safe_a - safe_b), torch.zeros_like(safe_a))
    return terms.sum(dim=-1)


def tvd(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ_y |A(y) − B(y)|."""
    return 0.5 * (log_a.exp() - log_b.exp()).abs().sum(dim=-1)


def _lse(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, dim=-1)


def _power_sum(log_a: torch.Tensor, power: float, log_b: torch.Tensor | None = None, power_b: float = 0.0) -> torch.Tensor:
    """Σ_y A^power · B^power_b via logsumexp; zero-probability entries of a factor with a negative
    power are excluded (their terms are infinite only where the other measure is also absent)."""
    exponent = power * torch.where(torch.isfinite(log_a), log_a, torch.zeros_like(log_a))
    valid = torch.isfinite(log_a) if power != 0 else torch.ones_like(log_a, dtype=torch.bool)
    if log_b is not None:
        exponent = exponent + power_b * torch.where(torch.isfinite(log_b), log_b, torch.zeros_like(log_b))
        if power_b != 0:
            valid = valid & torch.isfinite(log_b)
    return _lse(torch.where(valid, exponent, torch.full_like(exponent, NEG_INF))).exp()


def ab_divergence(log_a: torch.Tensor, log_b: torch.Tensor, a: float = 0.2, b: float = 0.7) -> torch.Tensor:
    """Alpha-beta divergence of Cichocki and Amari (as in ABKD), default a = 0.2, b = 0.7:

        D_AB(A‖B) = −1/(ab) Σ [A^a B^b − a/(a+b) A^(a+b) − b/(a+b) B^(a+b)]

    with the analytic limits a = 0, b = 0, a + b = 0 (a=1, b=0 is KL(A‖B); a=0, b=1 is KL(B‖A);
    a = b = 0 is ½ Σ (log B − log A)²). Sums are taken with logsumexp in log space.
    """
    small_a, small_b, small_ab = abs(a) < EPS_PARAM, abs(b) < EPS_PARAM, abs(a + b) < EPS_PARAM
    if small_a and small_b:
        finite = torch.isfinite(log_a) & torch.isfinite(log_b)
        diff = torch.where(finite, log_b, torch.zeros_like(log_b)) - torch.where(finite, log_a, torch.zeros_like(log_a))
        return 0.5 * (diff**2).sum(dim=-1)
    if small_a:  # b⁻² Σ [B^b (b log(B/A) − 1) + A^b]
        return _limit_one_zero(log_b, log_a, b)
    if small_b:  # a⁻² Σ [A^a (a log(A/B) − 1) + B^a]
        return _limit_one_zero(log_a, log_b, a)
    if small_ab:  # a⁻² Σ [a log(B/A) + (A/B)^a − 1]
        finite = torch.isfinite(log_a) & torch.isfinite(log_b)
        la = torch.where(finite, log_a, torch.zeros_like(log_a))
        lb = torch.where(finite, log_b, torch.zeros_like(log_b))
        terms = torch.where(finite, a * (lb - la) + torch.exp(a * (la - lb)) - 1, torch.zeros_like(la))
        return terms.sum(dim=-1) / a**2
    cross = _power_sum(log_a, a, log_b, b)
    own_a = _power_sum(log_a, a + b)
    own_b = _power_sum(log_b, a + b)
    return -(cross - a / (a + b) * own_a - b / (a + b) * own_b) / (a * b)


def _limit_one_zero(log_x: torch.Tensor, log_y: torch.Tensor, c: float) -> torch.Tensor:
    """c⁻² Σ [X^c (c log(X/Y) − 1) + Y^c], the AB limit where the other exponent is 0."""
    finite = torch.isfinite(log_x) & torch.isfinite(log_y)
    lx = torch.where(finite, log_x, torch.zeros_like(log_x))
    ly = torch.where(finite, log_y, torch.zeros_like(log_y))
    terms = torch.exp(c * lx) * (c * (lx - ly) - 1) + torch.exp(c * ly)
    return torch.where(finite, terms, torch.zeros_like(terms)).sum(dim=-1) / c**2


DIVERGENCES = {"kl": kl, "ab": ab_divergence, "tvd": tvd}
