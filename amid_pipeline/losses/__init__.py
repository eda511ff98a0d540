"""Distillation losses on the sparse teacher support: functional forms, the KDLoss module, registry.

Data flow: TeacherTargets + student (logits or StudentHead) -> support_distributions -> a per-position
loss from ``functional`` -> masked_mean over supervised positions.

Names are imported on first use, so that ``amid_pipeline.losses.catalog`` (what a configuration may name)
loads without torch and the command line's --help stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "functional": ("adaptive_kl", "amid", "assistant_log_probs", "atkd", "atkd_parts", "forward_kl", "generalized_jsd",
                   "reverse_kl", "skew_kl", "skew_reverse_kl", "taid", "total_variation"),
    "registry": ("LOSSES", "KDLoss", "LossOutput", "TAIDSchedule", "loss_defaults", "validate_loss_params"),
    "sparse_head": ("full_logsumexp", "support_logits"),
    "support": ("StudentHead", "TeacherTargets", "masked_mean", "support_distributions"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
