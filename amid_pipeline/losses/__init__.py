"""Distillation losses on the sparse teacher support: functional forms, the KDLoss module, registry.

Data flow: TeacherTargets + student (logits or StudentHead) -> support_distributions -> a per-position
loss from ``functional`` -> masked_mean over supervised positions.
"""

from amid_pipeline.losses.functional import (
    adaptive_kl,
    amid,
    assistant_log_probs,
    atkd,
    atkd_parts,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    taid,
    total_variation,
)
from amid_pipeline.losses.registry import LOSSES, KDLoss, LossOutput, TAIDSchedule, loss_defaults, validate_loss_params
from amid_pipeline.losses.sparse_head import full_logsumexp, support_logits
from amid_pipeline.losses.support import StudentHead, TeacherTargets, masked_mean, support_distributions

__all__ = [
    "LOSSES", "KDLoss", "LossOutput", "StudentHead", "TAIDSchedule", "TeacherTargets", "adaptive_kl", "amid",
    "assistant_log_probs", "atkd", "atkd_parts", "forward_kl", "full_logsumexp", "generalized_jsd", "loss_defaults",
    "masked_mean", "reverse_kl", "skew_kl", "skew_reverse_kl", "support_distributions", "support_logits", "taid",
    "total_variation", "validate_loss_params",
]
