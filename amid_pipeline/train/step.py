"""The module that DDP and FSDP wrap: the student and the KD loss in one forward, and the held-out sums.

The LM head is applied only at the ``N`` stored positions ([N, H] hidden states). With the fused head
(``sparse``) the loss sees a :class:`StudentHead` and the [N, V] logits are never built: the stored ids'
logits, the full normaliser and the rest bucket come from chunked blocks (``losses/sparse_head.py``), for
every support mode and CE term. :class:`HeadLogits` is what the student's own forward does to its head's
output (scaling, soft-capping), applied on both paths.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from amid_pipeline.losses import KDLoss, StudentHead, TeacherTargets, forward_kl
from amid_pipeline.losses.catalog import SUPPORTS
from amid_pipeline.losses.functional import _log1mexp
from amid_pipeline.losses.support import padding_slots
from amid_pipeline.train.data import Batch, StudentInputs

METRIC_CHUNK = 1024  # positions whose full [chunk, V] logits are held at once for the metrics
CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)


@dataclasses.dataclass(frozen=True)
class HeadLogits:
    """What a model's forward does to its LM head's output z, read from its config: z · ``scale`` (Cohere's
    ``logit_scale``; Granite's ``logits_scaling`` s divides, scale = 1/s), then ``softcap`` c · tanh(z / c)
    where set (Gemma 2-4's ``final_logit_softcapping``). Identity for Llama, Qwen, SmolLM and most others."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> HeadLogits:
        configs = [model.config] + [c for c in (getattr(model.config, "text_config", None),) if c is not None]
        value = lambda name: next((v for c in configs if (v := getattr(c, name, None)) is not None), None)  # noqa: E731
        scale = float(value("logit_scale") or 1.0) / float(value("logits_scaling") or 1.0)
        softcap = value("final_logit_softcapping")
        return cls(scale, float(softcap) if softcap else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits * self.scale if self.scale != 1.0 else logits
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def fused_refusal(self, head: nn.Module) -> str | None:
        """Why the fused head cannot compute this model's logits (None: it can): it needs a plain linear head
        (tied or not, bias allowed) whose output at most a scale changes (folded into the hidden states,
        which needs no bias); soft-capping is not linear and is refused by name."""
        if not isinstance(head, nn.Linear):
            return f"the LM head is a {type(head).__name__}, not a linear layer"
        if self.softcap:
            return f"the head soft-caps its logits (final_logit_softcapping = {self.softcap:g})"
        if self.scale != 1.0 and head.bias is not None:
            return f"the head scales its logits by {self.scale:g} after a bias"
        return None


class DistillModule(nn.Module):
    """``forward(inputs, teacher)`` returns the loss's :class:`LossOutput`; with ``metrics=True`` the
    held-out metric sums of :func:`heldout_sums` instead (one forward, so that DDP and FSDP see every
    use of every parameter). ``sparse``: the fused head (only where :meth:`HeadLogits.fused_refusal` is None)."""

    def __init__(self, model: nn.Module, loss_fn: KDLoss, sparse: bool) -> None:
        super().__init__()
        self.model, self.loss_fn, self.sparse = model, loss_fn, sparse
        self.head_logits = HeadLogits.of(model)
        if sparse and (reason := self.head_logits.fused_refusal(model.get_output_embeddings())):
            raise ValueError(f"the fused head cannot compute this student's logits: {reason}")

    def forward(self, inputs: StudentInputs, teacher: TeacherTargets, progress=None, metrics: bool = False):
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                      use_cache=False).last_hidden_state[inputs.row, inputs.column]  # no KV cache in training
        head = self.model.get_output_embeddings()
        if metrics:
            return heldout_sums(hidden, head, teacher, self.loss_fn, self.sparse, self.head_logits)
        return self.loss_fn(student_output(hidden, head, self.sparse, self.head_logits), teacher, progress=progress)


@torch.no_grad()
def packs_by_position_ids(model: nn.Module) -> bool:
    """Whether ``model`` keeps attention inside sequences packed into one row when it is given only
    position ids that restart at 0 (no attention mask, no KV cache), as transformers' packed-sequence
    detection and flash-attention varlen do: of two 4-token sequences packed in one row, the second must
    get the hidden states it has alone."""
    base = getattr(model, model.base_model_prefix)
    ids = torch.arange(1, 9, device=model.device).remainder(model.config.vocab_size)[None]
    positions = torch.arange(4, device=model.device).repeat(2)[None]
    was_training = model.training
    model.eval()
    try:
        packed = base(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0, 4:]
        alone = base(input_ids=ids[:, 4:], position_ids=positions[:, :4], use_cache=False).last_hidden_state[0]
    except (TypeError, ValueError, RuntimeError):  # a model whose forward takes no position ids
        return False
    finally:
        model.train(was_training)
    return torch.allclose(packed.float(), alone.float(), atol=1e-4, rtol=1e-3)


class StoredTargets:
    """The teacher signal of a run on shards: each batch's stored targets (top-k or draws)."""

    full_vocabulary = False

    def __call__(self, batch: Batch) -> TeacherTargets:
        return batch.teacher


@dataclasses.dataclass
class OnlineTeacher:
    """The teacher signal of ``--online-teacher``: a frozen teacher run on each batch, its full-vocabulary
    distribution replacing the stored targets (:func:`online_teacher_targets`) over the student's
    ``head_size`` outputs. It stays outside the wrapped module: DDP and FSDP never see it."""

    model: nn.Module
    head_size: int
    full_vocabulary = True

    def __call__(self, batch: Batch) -> TeacherTargets:
        return online_teacher_targets(self.model, batch.inputs, batch.teacher, self.head_size)


@torch.no_grad()
def online_teacher_targets(teacher_model: nn.Module, inputs: StudentInputs, stored: TeacherTargets,
                           vocabulary: int) -> TeacherTargets:
    """The teacher's full-vocabulary distribution at the batch's ``N`` stored positions, as targets whose
    ids are the student's whole head of ``vocabulary`` outputs ([N, vocabulary] log-probabilities, −inf
    at outputs beyond the teacher's head; ids an [N, vocabulary] view of arange): every support mode then
    equals the dense loss (``sampled`` excepted: no draws). The actual tokens and the mask are the
    stored ones; the stored top-k or draws are not used."""
    base = getattr(teacher_model, teacher_model.base_model_prefix)
    hidden = base(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                  use_cache=False).last_hidden_state[inputs.row, inputs.column]
    logits = HeadLogits.of(teacher_model).apply(teacher_model.get_output_embeddings()(hidden))
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_p = torch.nn.functional.pad(log_p, (0, vocabulary - log_p.shape[1]), value=float("-inf"))
    ids = torch.arange(vocabulary, device=log_p.device).expand_as(log_p)
    target_ids = stored.target_ids.long()
    return TeacherTargets(ids, log_p, target_ids, log_p.gather(1, target_ids[:, None])[:, 0], stored.mask)


def student_output(hidden: torch.Tensor, head: nn.Module, sparse: bool, head_logits: HeadLogits = HeadLogits()
                   ) -> torch.Tensor | StudentHead:
    """The loss's view of the student at the stored positions: the fused head (its scale folded into the
    hidden states: (s·h)·W = s·(h·W) without a bias), or the logits [N, V]."""
    if sparse:
        scaled = hidden * head_logits.scale if head_logits.scale != 1.0 else hidden
        return StudentHead(scaled, head.weight, head.bias)
    return head_logits.apply(head(hidden))


def heldout_sums(hidden: torch.Tensor, head: nn.Module, teacher: TeacherTargets, loss_fn: KDLoss, sparse: bool = False,
                 head_logits: HeadLogits = HeadLogits()) -> dict[str, float]:
    """Sums over supervised positions of: the run's KD loss (``kd``), KL(p̃‖q̃) to the teacher on its
    renormalised stored ids (``kl_to_teacher``, comparable across losses, blind to the student's mass off
    those ids), the KL with the rest of the vocabulary as one bucket (``kl_with_rest``, :func:`kl_with_rest`:
    comparable across losses, and it counts that mass), CE on the actual tokens, top-1
    agreement with the teacher (its first stored id: the argmax for top-k, the most probable drawn id for
    sampled shards), student mass on the stored ids; and their count. A loss on the ``sampled`` support
    evaluated on top-k shards is measured on ``tail`` there. For the expected calibration error
    of the student's top-1 prediction of the actual token, per confidence bin b (``calibration_gap_b``):
    Σ_{t in b} (1[argmax q_t = y_t] − max q_t), so that ECE = Σ_b |gap_b| / positions (equal-width bins).
    The KD loss goes through the fused head where ``sparse``; the metrics hold [1024, V] logits at a time."""
    mask = teacher.mask.float()
    sums = {"kd": 0.0, "kl_to_teacher": 0.0, "kl_with_rest": 0.0, "ce": 0.0, "top1_agreement": 0.0, "support_mass": 0.0,
            **dict.fromkeys(calibration_keys(), 0.0), "positions": float(mask.sum())}
    if sums["positions"] == 0:
        return sums
    if teacher.sample_weights is None and (on_topk := SUPPORTS[loss_fn.support].on_topk_eval) != loss_fn.support:
        loss_fn = KDLoss(loss_fn.name, support=on_topk, kd_ratio=loss_fn.kd_ratio, **loss_fn.params)  # no draws there
    sums["kd"] = float(loss_fn(student_output(hidden, head, sparse, head_logits), teacher).kd) * sums["positions"]
    for a in range(0, hidden.shape[0], METRIC_CHUNK):
        b = a + METRIC_CHUNK
        logits = head_logits.apply(head(hidden[a:b])).float()
        log_q = torch.log_softmax(logits, dim=-1)
        m = mask[a:b]
        sums["ce"] += float(-(log_q.gather(1, teacher.target_ids[a:b, None])[:, 0] * m).sum())
        sums["top1_agreement"] += float(((logits.argmax(-1) == teacher.topk_ids[a:b, 0]).float() * m).sum())
        confidence, predicted = log_q.max(-1)
        confidence = confidence.exp()
        gaps = ((predicted == teacher.target_ids[a:b]).float() - confidence) * m
        bins = (confidence * CALIBRATION_BINS).long().clamp(max=CALIBRATION_BINS - 1)
        for key, gap in zip(calibration_keys(), torch.zeros(CALIBRATION_BINS, device=gaps.device).index_add_(0, bins, gaps).tolist()):
            sums[key] += gap
        log_q_support = log_q.gather(1, teacher.topk_ids[a:b].long())
        log_q_support = log_q_support.masked_fill(padding_slots(teacher.rows(a, b)), float("-inf"))  # no target there
        sums["support_mass"] += float((log_q_support.exp().sum(-1) * m).sum())
        log_p = teacher.topk_logprobs[a:b].float()
        kl = forward_kl(log_p - log_p.logsumexp(-1, keepdim=True), log_q_support.log_softmax(-1))
        sums["kl_to_teacher"] += float((kl * m).sum())
        sums["kl_with_rest"] += float((kl_with_rest(log_p, log_q_support, log_q, teacher.topk_ids[a:b].long()) * m).sum())
    return sums


def kl_with_rest(log_p: torch.Tensor, log_q_support: torch.Tensor, log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) [N] between the teacher and the student coarse-grained to the stored ids S and one bucket for
    the rest of the vocabulary: Σ_{i∈S} p_i log(p_i/q_i) + p_rest log(p_rest/q_rest), with p_rest = 1 − Σ_S p
    (0 where rounding of the stored values leaves none) and q_rest the student's exact mass off S. A lower
    bound of the full KL(p‖q) (coarse-graining loses information) that, unlike KL(p̃‖q̃) on the renormalised
    ids, counts the student mass that is not where the teacher's is. log_p, log_q_support [N, k] (−inf in a
    sampled shard's unused slots), log_q [N, V] the student's log-softmax, ids [N, k]."""
    on_support = torch.where(torch.isfinite(log_p), log_p.exp() * (log_p - log_q_support), torch.zeros_like(log_p)).sum(-1)
    log_p_rest = _log1mexp(log_p.logsumexp(-1))
    log_q_rest = log_q.scatter(1, ids, float("-inf")).logsumexp(-1)
    p_rest = log_p_rest.exp()
    rest = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return on_support + rest


def calibration_keys() -> list[str]:
    """The names of the per-bin sums behind the expected calibration error (see :func:`heldout_sums`)."""
    return [f"calibration_gap_{b}" for b in range(CALIBRATION_BINS)]
