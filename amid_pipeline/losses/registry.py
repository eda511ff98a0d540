"""Losses selected by name: parameters validated, defaults taken from the functions themselves.

    loss = KDLoss("amid", alpha=0.5, lam=0.1, support="tail", kd_ratio=1.0)
    out = loss(student_logits_or_head, teacher_targets, progress=(step, total_steps))
    out.loss.backward()          # scalar, averaged over supervised positions
    out.per_position             # [N], for monitoring

Total objective: (1 − kd_ratio)·CE(ground truth) + kd_ratio·KD (kd_ratio = 1 by default). CE and the
supports other than ``renormalized`` need the student's full normaliser: given a :class:`StudentHead`,
the objective then runs through :func:`~amid_pipeline.losses.sparse_head.fused_head_loss` (one
[chunk × V] block at a time, its gradient formed at once; losses whose value at a position depends on
the batch (:attr:`LossSpec.batch_statistic`: ATKD) recompute the blocks in backward
instead). With kd_ratio = 1 and ``support='renormalized'`` a :class:`StudentHead` builds no [chunk × V]
block at all.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from amid_pipeline.losses import functional as F
from amid_pipeline.losses.catalog import (
    LOSS_FUNCTIONS,
    LOSS_NAMES,
    PRESETS,
    SUPPORT_MODES,
    SUPPORTS,
)
from amid_pipeline.losses.divergences import DIVERGENCES
from amid_pipeline.losses.sparse_head import fused_head_loss
from amid_pipeline.losses.support import (
    StudentHead,
    TeacherTargets,
    distributions_on_support,
    masked_mean,
    support_distributions,
    support_ids,
    target_column,
)


def _unit(name: str) -> Callable[[float], str | None]:
    return lambda v: None if 0.0 <= v <= 1.0 else f"{name} must lie in [0, 1], got {v}"


def _finite(name: str) -> Callable[[float], str | None]:
    return lambda v: None if math.isfinite(v) else f"{name} must be a finite number, got {v}"


TAID_SETTINGS = {"t_start": 0.4, "t_end": 1.0, "taid_momentum": 0.99, "taid_step": 5e-4, "taid_schedule": "adaptive"}


def _taid_settings_check(settings: dict[str, object]) -> list[str]:
    errors = []
    if not 0.0 <= settings["t_start"] <= settings["t_end"] <= 1.0:
        errors.append(f"taid needs 0 <= t_start <= t_end <= 1, got {settings['t_start']} and {settings['t_end']}")
    if settings["taid_schedule"] not in ("adaptive", "linear"):
        errors.append(f"taid_schedule must be 'adaptive' or 'linear', got {settings['taid_schedule']!r}")
    return errors


def _amid_infinite_at_zero_teacher(params: dict[str, object]) -> str | None:
    """AMiD's D(anchor‖other) is infinite where the anchor is positive and the other side 0: with p = 0 < q,
    q > 0 always and the mixture r is positive for α < 1 (union support), 0 for α ≥ 1 (intersection)."""
    if params["divergence"] == "tvd":
        return None
    lam, union = params["lam"], params["alpha"] < 1
    r_positive = False if lam >= 1 else True if lam <= 0 else union  # λ = 1: r = p; λ = 0: r = q
    anchor, other = {"pr": ("p", "r"), "qr": ("q", "r"), "rp": ("r", "p"), "rq": ("r", "q")}[params["order"]]
    positive = {"p": False, "q": True, "r": r_positive}
    if params["divergence"] == "ab":  # finite for a, b > 0 (positive powers); the limits hold logarithms
        if positive[anchor] != positive[other] and (params["ab_a"] <= 0 or params["ab_b"] <= 0):
            return f"AMiD's AB-divergence between {anchor} and {other} with a non-positive parameter"
    elif positive[anchor] and not positive[other]:
        return f"AMiD's KL({anchor}‖{other}) at alpha = {params['alpha']}, lam = {lam}"
    return None


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss and what it declares: :class:`KDLoss` and the checks dispatch on these, never on its name."""

    function: Callable  # (log_p [N, S], log_q [N, S], **params) -> [N]; see the flags for extra arguments
    checks: dict[str, Callable[[object], str | None]] = dataclasses.field(default_factory=dict)  # per parameter
    needs_target: bool = False  # also takes the actual token's column in the support and the mask (ATKD)
    batch_statistic: bool = False  # its value at a position depends on the batch: no one-pass fused head
    schedule_settings: dict[str, object] | None = None  # a schedule's settings beside the parameters: takes t
    settings_check: Callable[[dict[str, object]], list[str]] | None = None  # across parameters and settings
    infinite_at_zero_teacher: Callable[[dict[str, object]], str | None] = lambda params: None  # the term, where p = 0 < q
    sampled_estimator: Callable | None = None  # its unbiased form on the sampled support (exact log p, log p̂, log q)
    vocabulary_free: bool = False  # (teacher log p [N, k], the student's full log q [N, V]): no support, no ids


LOSSES: dict[str, LossSpec] = {
    "forward_kl": LossSpec(F.forward_kl, sampled_estimator=F.sampled_forward_kl),
    "reverse_kl": LossSpec(F.reverse_kl, infinite_at_zero_teacher=lambda params: "KL(q‖p)"),
    "tvd": LossSpec(F.total_variation),
    "skl": LossSpec(F.skew_kl, {"skew": _unit("skew")}),
    "srkl": LossSpec(F.skew_reverse_kl, {"skew": _unit("skew")}),
    "jsd": LossSpec(F.generalized_jsd, {"beta": _unit("beta")}, infinite_at_zero_teacher=lambda params: (
        "JSD at beta = 1, KL(q‖p)" if params["beta"] >= 1.0 else None)),
    "amid": LossSpec(F.amid, {
        "alpha": _finite("alpha"), "lam": _unit("lam"), "ab_a": _finite("ab_a"), "ab_b": _finite("ab_b"),
        "divergence": lambda v: None if v in DIVERGENCES else f"divergence must be one of {tuple(DIVERGENCES)}, got {v!r}",
        "order": lambda v: None if v in F.ORDERS else f"order must be one of {F.ORDERS}, got {v!r}",
        "official_geometric": lambda v: None if isinstance(v, bool) else "official_geometric must be true or false",
    }, infinite_at_zero_teacher=_amid_infinite_at_zero_teacher),
    "akl": LossSpec(F.adaptive_kl, {"mu": _unit("mu")}, infinite_at_zero_teacher=lambda params: "AKL's KL(q‖p) term"),
    "taid": LossSpec(F.taid, schedule_settings=TAID_SETTINGS, settings_check=_taid_settings_check),
    "atkd": LossSpec(F.atkd, {"lam": _unit("lam")}, needs_target=True, batch_statistic=True),
    "uld": LossSpec(F.universal_logit_distance, vocabulary_free=True),
}
assert tuple(sorted(LOSSES)) == LOSS_FUNCTIONS, "losses.catalog.LOSS_FUNCTIONS must list every loss"


def resolve_loss(name: str, params: dict[str, object]) -> tuple[str, dict[str, object]]:
    """(loss name, its complete parameters): a preset expanded (``params`` override its values), then
    every parameter not given filled with its default. Raises ``ValueError`` on an unknown name."""
    base, preset = PRESETS.get(name, (name, {}))
    if base not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return base, {**loss_defaults(base), **preset, **params}


def loss_defaults(name: str) -> dict[str, object]:
    """The tunable parameters of loss ``name`` with their defaults (read from the function signature)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    spec = LOSSES[name]
    skip = {"log_p", "log_q", "target_index", "mask", "t"}
    defaults = {p.name: p.default for p in inspect.signature(spec.function).parameters.values() if p.name not in skip}
    return {**defaults, **(spec.schedule_settings or {})}


def validate_loss_params(name: str, params: dict[str, object]) -> list[str]:
    """Every problem with (name, params), as messages naming the parameter."""
    name = PRESETS.get(name, (name, {}))[0]
    if name not in LOSSES:
        return [f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}"]
    defaults = loss_defaults(name)
    errors = [f"loss {name!r} has no parameter {key!r} (it takes: {', '.join(defaults) or 'none'})"
              for key in params if key not in defaults]
    for key, check in LOSSES[name].checks.items():
        if key in params:
            problem = check(params[key])
            if problem:
                errors.append(problem)
    if LOSSES[name].settings_check is not None:
        errors += LOSSES[name].settings_check({**defaults, **params})
    return errors


def support_refusal(support: str, name: str, params: dict[str, object]) -> str | None:
    """Why loss ``name`` (with ``params``) cannot train on ``support`` (None when it can): a support that gives
    the teacher 0 outside its ids makes a loss that is infinite at p = 0 < q infinite there."""
    reason = infinite_under_zero_teacher_mass(*resolve_loss(name, params)) if SUPPORTS[support].zero_teacher_rest else None
    return reason and (f"support {support!r} gives the teacher probability 0 outside its stored ids, where the "
                       f"student keeps mass: {reason} is infinite there; use support 'tail'")


def infinite_under_zero_teacher_mass(name: str, params: dict[str, object]) -> str | None:
    """Why loss ``name`` is infinite at an outcome where p = 0 < q (None when it stays finite): a
    divergence D(A‖B) is infinite where A > 0 = B (each loss declares its term)."""
    return LOSSES[name].infinite_at_zero_teacher(params)


class TAIDSchedule:
    """TAID's interpolation t_n: linear t_start → t_end, or adaptive (pushed up while the loss falls).

        δ_n = (J_{n−1} − J_n)/(J_{n−1} + 1e−15),  m_n = β·m_{n−1} + (1 − β)·δ_n
        t_n = min(t_end, max(t_lin(n), t_{n−1} + a·sigmoid(m_n)·(1 − t_{n−1})))
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, momentum: float = 0.99, step_size: float = 5e-4,
                 mode: str = "adaptive") -> None:
        self.t_start, self.t_end, self.momentum, self.step_size, self.mode = t_start, t_end, momentum, step_size, mode
        self.t = t_start
        self.m = 0.0
        self.previous_loss: float | None = None

    def linear(self, step: int, total: int) -> float:
        return self.t_start + (self.t_end - self.t_start) * min(step / max(total, 1), 1.0)

    def value(self, step: int, total: int) -> float:
        return self.linear(step, total) if self.mode == "linear" else max(self.t, self.linear(step, total))

    def observe(self, step: int, total: int, loss: float) -> None:
        """Update after the loss J_n of step n is known (adaptive mode)."""
        if self.mode == "linear":
            return
        if self.previous_loss is not None:
            delta = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
            self.m = self.momentum * self.m + (1 - self.momentum) * delta
        self.previous_loss = loss
        pushed = self.t + self.step_size * (1 / (1 + math.exp(-self.m))) * (1 - self.t)
        self.t = min(self.t_end, max(self.linear(step, total), pushed))

    def state_dict(self) -> dict[str, float | None]:
        return {"t": self.t, "m": self.m, "previous_loss": self.previous_loss}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.t, self.m, self.previous_loss = state["t"], state["m"], state["previous_loss"]


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor  # scalar
    per_position: torch.Tensor  # [N] total objective per position (0 where unsupervised)
    kd: torch.Tensor  # scalar KD part
    ce: torch.Tensor | None  # scalar CE part (when kd_ratio < 1)


class KDLoss(nn.Module):
    """A distillation objective chosen by name; see :data:`LOSSES` and :func:`loss_defaults`.

    Args:
        name: forward_kl, reverse_kl, tvd, skl, srkl, jsd, amid, akl, taid, atkd, or a preset of
            :data:`PRESETS` (e.g. 'amid-paper'), whose values ``params`` override.
        support: 'tail' (default: the stored ids plus one bucket for the rest, p and q both normalised over
            the full vocabulary), 'teacher_renormalized' or 'renormalized' (docs/losses.md §7). Measured on a dev
            split (docs/benchmarks.md, "Evidence"), tail trained the best students: 'renormalized' never sees the student's
            mass outside the ids, which leaks there; 'teacher_renormalized' pushes that mass to 0 although the
            teacher's own mass outside its top-k is not 0.
        kd_ratio: weight of KD against ground-truth CE, (1 − kd_ratio)·CE + kd_ratio·KD.
        **params: the loss's parameters; unknown names and out-of-range values raise ``ValueError``.
    """

    def __init__(self, name: str = "amid", *, support: str = "tail", kd_ratio: float = 1.0, **params) -> None:
        super().__init__()
        errors = validate_loss_params(name, params)
        if support not in SUPPORT_MODES:
            errors.append(f"support must be one of {SUPPORT_MODES}, got {support!r}")
        elif not errors and (refusal := support_refusal(support, name, params)):
            errors.append(refusal)
        if not 0.0 <= kd_ratio <= 1.0:
            errors.append(f"kd_ratio must lie in [0, 1], got {kd_ratio}")
        if not errors and LOSSES[resolve_loss(name, params)[0]].vocabulary_free and SUPPORTS[support].sampled_kind:
            errors.append(f"{name} compares sorted probabilities: it needs the teacher's top-k, not draws (support 'sampled')")
        if errors:
            raise ValueError("; ".join(errors))
        self.preset = name if name in PRESETS else None
        self.name, self.params = resolve_loss(name, params)
        self.support, self.kd_ratio = support, kd_ratio
        self.spec = LOSSES[self.name]
        self.schedule = None
        if self.spec.schedule_settings is not None:
            p = self.params
            self.schedule = TAIDSchedule(p["t_start"], p["t_end"], p["taid_momentum"], p["taid_step"], p["taid_schedule"])

    def resolved(self) -> dict[str, object]:
        """The objective exactly as it runs: loss, preset (or None), support, kd_ratio and every parameter."""
        return {"loss": self.name, "preset": self.preset, "support": self.support, "kd_ratio": self.kd_ratio,
                "params": dict(self.params)}

    @property
    def needs_full_vocabulary(self) -> bool:
        """True when the student's full normaliser is needed (tail support or a CE term)."""
        return SUPPORTS[self.support].full_normalizer or self.kd_ratio < 1.0

    def forward(self, student: torch.Tensor | StudentHead, teacher: TeacherTargets,
                progress: tuple[int, int] | None = None) -> LossOutput:
        if self.spec.vocabulary_free:
            return self._vocabulary_free(student, teacher)
        if isinstance(student, StudentHead) and self.needs_full_vocabulary and not self.spec.batch_statistic:
            return self._through_fused_head(student, teacher, progress)
        log_p, log_q, lse = support_distributions(student, teacher, self.support, with_target=self.spec.needs_target)
        mask = teacher.mask.bool()
        kd_values = self._kd_values(log_p, log_q, teacher, progress)
        kd = masked_mean(kd_values, mask)
        per_position = self.kd_ratio * kd_values
        ce = None
        if self.kd_ratio < 1.0:
            if lse is None:
                _, lse = _normalizer(student)
            ce_values = lse - _target_logits(student, teacher.target_ids)
            ce = masked_mean(ce_values, mask)
            per_position = per_position + (1 - self.kd_ratio) * ce_values
        loss = self.kd_ratio * kd + ((1 - self.kd_ratio) * ce if ce is not None else 0.0)
        return LossOutput(loss=loss, per_position=per_position * mask, kd=kd, ce=ce)


    def _kd_values(self, log_p: torch.Tensor, log_q: torch.Tensor, teacher: TeacherTargets,
                   progress: tuple[int, int] | None) -> torch.Tensor:
        """The KD loss per position [N] on the support's (log p, log q)."""
        spec = self.spec
        if spec.sampled_estimator is not None and SUPPORTS[self.support].sampled_kind:  # exact log p, unbiased
            return spec.sampled_estimator(log_p[:, :-1], teacher.topk_logprobs, log_q[:, :-1])
        if self.schedule is not None:
            step, total = progress if progress is not None else (0, 1)
            return spec.function(log_p, log_q, t=self.schedule.value(step, total))
        kwargs = {k: v for k, v in self.params.items() if k not in (spec.schedule_settings or {})}
        targets = (target_column(teacher), teacher.mask.bool()) if spec.needs_target else ()
        return spec.function(log_p, log_q, *targets, **kwargs)

    def _through_fused_head(self, head: StudentHead, teacher: TeacherTargets,
                            progress: tuple[int, int] | None) -> LossOutput:
        """The same objective with the head's logits never built and never recomputed (``fused_head_loss``):
        per block of positions, the support's distributions, KD and CE from the block's logits at the ids,
        its normalisers and the actual token's logit."""
        ids, log_p = support_ids(teacher, self.support)
        mask = teacher.mask.bool()
        vocabulary = head.weight.shape[0]

        def objective(a, b, z, lse, rest, z_target):
            part = teacher.rows(a, b)
            kd_values = self._kd_values(*distributions_on_support(z, lse, rest, log_p[a:b], part, self.support, False,
                                                                  vocabulary), part, progress)
            ce_values = lse - z_target
            total = kd_values if self.kd_ratio == 1.0 else self.kd_ratio * kd_values + (1 - self.kd_ratio) * ce_values
            return total, kd_values, ce_values

        weights = mask.float() / mask.sum().clamp(min=1)
        loss, per_position, kd_values, ce_values = fused_head_loss(head.hidden, head.weight, head.bias, ids,
                                                                   teacher.target_ids, weights, objective, head.chunk)
        ce = masked_mean(ce_values, mask) if self.kd_ratio < 1.0 else None
        return LossOutput(loss=loss, per_position=per_position * mask, kd=masked_mean(kd_values, mask), ce=ce)

    def _vocabulary_free(self, student: torch.Tensor | StudentHead, teacher: TeacherTargets) -> LossOutput:
        """A loss that compares the teacher's stored probabilities with the student's whole distribution
        without ids (ULD): the student's full logits are built (from the head's hidden states when fused)."""
        if isinstance(student, StudentHead):
            head = student
            student = head.hidden @ head.weight.to(head.hidden.dtype).T
            student = student if head.bias is None else student + head.bias
        log_q = torch.log_softmax(student if student.dtype == torch.float64 else student.float(), dim=-1)
        mask = teacher.mask.bool()
        kd_values = self.spec.function(teacher.topk_logprobs, log_q)
        ce_values = -log_q.gather(1, teacher.target_ids.long()[:, None])[:, 0]
        kd, ce = masked_mean(kd_values, mask), masked_mean(ce_values, mask) if self.kd_ratio < 1.0 else None
        per_position = self.kd_ratio * kd_values + (1 - self.kd_ratio) * ce_values
        loss = self.kd_ratio * kd + ((1 - self.kd_ratio) * ce if ce is not None else 0.0)
        return LossOutput(loss=loss, per_position=per_position * mask, kd=kd, ce=ce)

    def end_step(self, step: int, total: int, kd_value: float) -> None:
        """Call once per optimiser step with that step's KD loss (drives TAID's adaptive schedule)."""
        if self.schedule is not None:
            self.schedule.observe(step, total, kd_value)


def _normalizer(student: torch.Tensor | StudentHead) -> tuple[None, torch.Tensor]:
    from amid_pipeline.losses.sparse_head import full_logsumexp

    if isinstance(student, StudentHead):
        return None, full_logsumexp(student.hidden, student.weight, student.bias, student.chunk)
    return None, torch.logsumexp(student if student.dtype == torch.float64 else student.float(), dim=-1)


def _target_logits(student: torch.Tensor | StudentHead, target_ids: torch.Tensor) -> torch.Tensor:
    from amid_pipeline.losses.sparse_head import support_logits

    if isinstance(student, StudentHead):
        return support_logits(student.hidden, student.weight, target_ids.long()[:, None], student.bias, student.chunk)[:, 0]
    logits = student.gather(1, target_ids.long()[:, None])[:, 0]
    return logits if logits.dtype == torch.float64 else logits.float()
