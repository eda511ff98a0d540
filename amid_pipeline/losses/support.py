"""From stored teacher top-k and student outputs to (log p, log q) on a common support.

Inputs, flattened over supervised-or-not positions N:

- :class:`TeacherTargets`: ``topk_ids`` [N, k], ``topk_logprobs`` [N, k] (normalised over the teacher's
  FULL vocabulary, ``-inf`` allowed), ``target_ids`` [N] (the actual next token), ``target_logprob``
  [N] (the teacher's log-probability of it, stored even when it is outside the top-k), ``mask`` [N].
- the student as full logits [N, V], or as :class:`StudentHead` (final hidden states [N, H] and the LM
  head weight [V, H]), which never materialises [N, V].

Support modes (docs/losses.md §7); each equals the dense definition when the ids cover the vocabulary:

- ``renormalized`` (this function's default; :class:`KDLoss` defaults to ``tail``): S = the k stored ids; p̃ = p|_S / Σ_S p, q̃ = softmax(z_S).
- ``tail``: S ∪ {rest}; p_rest = 1 − Σ_S p (floored where rounding hid it: :func:`teacher_tail`),
  q normalised over the student's full vocabulary, q_rest = Σ_{v∉S} q_v, computed as a logsumexp over
  the logits outside S (1 − Σ_S q cancels in float32 once the student's mass outside S falls below
  ~1e-7: forward KL read 738 instead of 3.56 on such a batch). Needs the student's full normaliser
  (computed chunked for a StudentHead).
- ``teacher_renormalized``: S ∪ {rest}; p̃ = p|_S / Σ_S p and p_rest = 0 (the teacher renormalised over
  its stored ids), q normalised over the full vocabulary with q_rest as under ``tail`` (the convention of
  DistillKit, Axolotl and Gemma 3). Losses that weigh the teacher's zero at ``rest`` against the
  student's mass there (reverse KL, AKL, JSD at β = 1, AMiD orders that anchor on q or r where r can
  be positive while p = 0) are infinite under it and refused (:func:`infinite_under_zero_teacher_mass`).

- ``sampled`` (shards of the sampled kind, :attr:`TeacherTargets.sample_weights`): S ∪ {rest}; the teacher
  side is the empirical distribution of the draws, p̂_i = c_i/N (importance-weighted and self-normalised,
  p̂_i ∝ c_i·p_i^(1−1/τ), for a proposal at temperature τ; with an exact top, p̂ = p on it and the draws
  share the rest's mass: :func:`amid_pipeline.shards.targets.sample_weights`), p̂_rest = 0; q over the full vocabulary with
  q_rest as under ``tail``. E[p̂_i] = p_i for τ = 1, so a loss linear in p is estimated without bias:
  forward KL (its value through :func:`amid_pipeline.losses.functional.sampled_forward_kl`, which weighs
  the exact log p_i) and the CE part of every loss; any other loss is a plug-in estimate D(p̂‖q)
  (consistent as N grows, biased at finite N). Losses infinite where p = 0 < q are refused, as under
  ``teacher_renormalized``.

On sampled shards every support sees S = the distinct drawn ids; unused slots (weight 0, teacher −inf)
are masked with −inf on the student side too, so they carry no mass. ``tail`` and ``renormalized`` there
use the exact stored p_i on that random S (a plug-in estimate of another kind).

``with_target=True`` appends the actual next token as an extra column (teacher value from
``target_logprob``) when it is not already among the ids, so that losses needing p_g and q_g (ATKD)
see it; a duplicate is masked with ``-inf`` on both sides.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from amid_pipeline.losses.catalog import SUPPORT_MODES, SUPPORTS
from amid_pipeline.losses.functional import _log1mexp
from amid_pipeline.losses.sparse_head import DEFAULT_CHUNK, full_logsumexp, logsumexps, support_logits


def map_tensors(value, fn):
    """A copy of the dataclass ``value`` with ``fn`` applied to each of its tensor fields (None stays None):
    moving a batch to a device, or pinning it for an asynchronous copy."""
    return dataclasses.replace(value, **{f.name: fn(v) for f in dataclasses.fields(value)
                                         if isinstance(v := getattr(value, f.name), torch.Tensor)})


LOG_ROUNDING_REST = math.log(-math.expm1(-1 / 128))  # log ρ: the most mass q64 rounding can hide (see teacher_tail)


@dataclasses.dataclass
class TeacherTargets:
    topk_ids: torch.Tensor  # [N, k] long
    topk_logprobs: torch.Tensor  # [N, k] float, full-vocabulary normaliser
    target_ids: torch.Tensor  # [N] long
    target_logprob: torch.Tensor  # [N] float
    mask: torch.Tensor  # [N] bool
    sample_weights: torch.Tensor | None = None  # sampled shards: [N, k] float p̂ (Σ = 1; 0 = unused slot)

    def to(self, device, non_blocking: bool = False) -> TeacherTargets:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def rows(self, start: int, stop: int) -> TeacherTargets:
        """Positions ``start:stop`` (a view)."""
        return map_tensors(self, lambda t: t[start:stop])

    def check(self) -> None:
        n, k = self.topk_ids.shape if self.topk_ids.dim() == 2 else (None, None)
        if n is None or k == 0:
            raise ValueError(f"topk_ids must be [N, k] with k >= 1, got {tuple(self.topk_ids.shape)}")
        expected = {"topk_logprobs": (n, k), "target_ids": (n,), "target_logprob": (n,), "mask": (n,)}
        if self.sample_weights is not None:
            expected["sample_weights"] = (n, k)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")


@dataclasses.dataclass
class StudentHead:
    """The student's last hidden states and LM head, for logits computed only where needed."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None
    chunk: int = DEFAULT_CHUNK


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t values_t·mask_t / max(Σ_t mask_t, 1): the one reduction over supervised positions."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _support_ids(teacher: TeacherTargets, with_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, S], teacher log-probabilities [N, S]) with the target column appended if asked."""
    ids, log_p = teacher.topk_ids.long(), _fp32_or_wider(teacher.topk_logprobs)
    if not with_target:
        return ids, log_p
    present = (ids == teacher.target_ids[:, None]).any(dim=-1)
    target_logprob = teacher.target_logprob.to(log_p.dtype)
    extra = torch.where(present, torch.full_like(target_logprob, float("-inf")), target_logprob)
    return torch.cat([ids, teacher.target_ids.long()[:, None]], dim=1), torch.cat([log_p, extra[:, None]], dim=1)


def target_column(teacher: TeacherTargets) -> torch.Tensor:
    """[N] column of the actual next token in a ``with_target`` support: its top-k slot, else k."""
    match = teacher.topk_ids.long() == teacher.target_ids.long()[:, None]
    k = teacher.topk_ids.shape[1]
    return torch.where(match.any(dim=-1), match.float().argmax(dim=-1), torch.full_like(teacher.target_ids.long(), k))


def student_logits_at(student: torch.Tensor | StudentHead, ids: torch.Tensor, need_normalizer: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(z [N, S] float32 at ``ids``, full-vocabulary logsumexp [N], logsumexp over the ids outside each
    row's ``ids`` [N]); the last two None unless ``need_normalizer``."""
    if isinstance(student, StudentHead):
        z = support_logits(student.hidden, student.weight, ids, student.bias, student.chunk)
        if not need_normalizer:
            return z, None, None
        return z, *full_logsumexp(student.hidden, student.weight, student.bias, student.chunk, outside_of=ids)
    if student.dim() != 2 or student.shape[0] != ids.shape[0]:
        raise ValueError(f"student logits must be [N, V] with N = {ids.shape[0]}, got {tuple(student.shape)}")
    if ids.numel() and int(ids.max()) >= student.shape[1]:
        raise ValueError(f"teacher id {int(ids.max())} is outside the student vocabulary ({student.shape[1]})")
    z = _fp32_or_wider(student.gather(1, ids))
    if not need_normalizer:
        return z, None, None
    return z, *logsumexps(student, ids)


def padding_slots(teacher: TeacherTargets) -> torch.Tensor:
    """[N, k] bool: the slots that hold no target, and so no mass on either side of any loss: they repeat
    the row's first id with teacher log-probability −inf (a sampled shard's unused slots, the padding of
    a position whose cross-tokenizer targets map to fewer than k student ids). Stored top-k ids are
    distinct, so no top-k slot is one."""
    ids = teacher.topk_ids
    padding = torch.isneginf(teacher.topk_logprobs) & (ids == ids[:, :1])
    padding[:, 0] = False
    return padding


def vocabulary_size(student: torch.Tensor | StudentHead) -> int:
    return student.weight.shape[0] if isinstance(student, StudentHead) else student.shape[-1]


def teacher_tail(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p over the ids [N, S], log p_rest [N]) for a rest bucket that holds at least one id.

    p_rest = max(1 − m, min(p_min, ρ)), m = Σ_S p, p_min = the smallest stored probability,
    ρ = 1 − e^(−1/128); where the floor applies, the stored ids are scaled by (1 − p_rest)/m so that the
    k + 1 outcomes sum to 1. Why: stored values carry the code's rounding (± 1/128 in log space for q64),
    so a confident position's decoded mass m can reach 1 and leave p_rest = 0 although every id of a
    softmax has p > 0 — and then losses that divide by p (reverse KL, AKL) put log(q_rest/0) there (an
    expert teacher's shards: AKL's loss 20–40 from the first step, then NaN). The floor is the mass of
    one more id below the k-th, capped at ρ, the most the rounding can hide; 1 − m is kept wherever it
    is larger.
    """
    log_mass = torch.logsumexp(log_p, dim=-1)
    log_rest = _log1mexp(log_mass)
    smallest = torch.where(torch.isfinite(log_p), log_p, torch.zeros_like(log_p)).amin(dim=-1)
    log_floor = torch.where(torch.isfinite(log_mass), smallest.clamp(max=LOG_ROUNDING_REST), log_mass)
    floored = log_floor > log_rest
    scale = torch.where(floored, _log1mexp(log_floor) - log_mass, torch.zeros_like(log_mass))
    return log_p + scale[:, None], torch.where(floored, log_floor, log_rest)


def support_distributions(student: torch.Tensor | StudentHead, teacher: TeacherTargets, mode: str = "renormalized",
                          with_target: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p [N, S'], log q [N, S'], student full logsumexp [N] or None) on the chosen support."""
    ids, log_p = support_ids(teacher, mode, with_target)
    z, lse, lse_outside = student_logits_at(student, ids, need_normalizer=SUPPORTS[mode].full_normalizer)
    return (*distributions_on_support(z, lse, lse_outside, log_p, teacher, mode, with_target, vocabulary_size(student)),
            lse)


def support_ids(teacher: TeacherTargets, mode: str, with_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked targets' (ids [N, S], teacher log-probabilities [N, S]) for ``mode`` (S = k, or k + 1 with
    the target column)."""
    if mode not in SUPPORT_MODES:
        raise ValueError(f"support mode must be one of {SUPPORT_MODES}, got {mode!r}")
    teacher.check()
    if SUPPORTS[mode].sampled_kind and teacher.sample_weights is None:
        raise ValueError(f"support {mode!r} needs shards of the sampled target kind (sample_weights)")
    return _support_ids(teacher, with_target)


def distributions_on_support(z: torch.Tensor, lse: torch.Tensor | None, lse_outside: torch.Tensor | None,
                             log_p: torch.Tensor, teacher: TeacherTargets, mode: str, with_target: bool,
                             vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) on ``mode``'s support from the student's logits at the ids z [N, S], its full
    logsumexp and the logsumexp outside the ids [N] (None where ``mode`` needs no normaliser) and the
    teacher's log p [N, S] at the ids (:func:`support_ids`); ``vocabulary``: the student's head size."""
    ids = teacher.topk_ids
    weights = teacher.sample_weights
    duplicate = torch.isneginf(log_p) & (torch.arange(z.shape[1], device=z.device) == z.shape[1] - 1) if with_target else None
    if duplicate is not None:
        z = torch.where(duplicate, torch.full_like(z, float("-inf")), z)
    unused = padding_slots(teacher)  # sampled shards' unused slots, cross-tokenizer rows' padding: no mass either side
    if with_target:
        unused = torch.cat([unused, torch.zeros_like(unused[:, :1])], dim=1)
    z = torch.where(unused, torch.full_like(z, float("-inf")), z)  # unconditional: no host sync per block
    log_p = log_p.to(z.dtype) if z.dtype == torch.float64 else log_p
    if mode == "renormalized":
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        return log_p, torch.log_softmax(z, dim=-1)
    log_q = z - lse[:, None]
    if mode == "sampled":
        log_p = weights.to(log_p.dtype).log()
        if with_target:
            log_p = torch.cat([log_p, torch.full_like(log_p[:, :1], float("-inf"))], dim=1)
        log_p_rest = torch.full_like(log_p[:, 0], float("-inf"))
    elif mode == "teacher_renormalized":
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p_rest = torch.full_like(log_p[:, 0], float("-inf"))
    elif ids.shape[1] < vocabulary:
        log_p, log_p_rest = teacher_tail(log_p)
    else:  # the ids cover the vocabulary: the rest bucket holds no id, so no mass on either side
        log_p_rest = torch.full_like(log_p[:, 0], float("-inf"))  # (1 − Σp is float32 rounding, ~1e-7, against q = 0)
    log_q_rest = lse_outside - lse
    return torch.cat([log_p, log_p_rest[:, None]], dim=1), torch.cat([log_q, log_q_rest[:, None]], dim=1)
