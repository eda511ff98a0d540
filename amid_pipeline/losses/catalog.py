"""The names a configuration may use, without importing torch (the CLI builds its --help from these).

:mod:`amid_pipeline.losses.registry` maps each name of :data:`LOSS_FUNCTIONS` to its function and checks
at import that the two lists agree.
"""

from __future__ import annotations

SUPPORT_MODES = ("renormalized", "tail", "teacher_renormalized", "sampled")
FULL_NORMALIZER_MODES = ("tail", "teacher_renormalized", "sampled")  # need the student's full-vocabulary logsumexp
BATCH_STATISTIC_LOSSES = ("atkd",)  # a position's value depends on the batch (ATKD's median split): no fused head
LOSS_FUNCTIONS = ("akl", "amid", "atkd", "forward_kl", "jsd", "reverse_kl", "skl", "srkl", "taid", "tvd")
PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    # The AMiD paper's main table (GPT-2, Dolly): AB(0.2, 0.7), teacher-anchored, λ = 0.1. The paper's notes
    # here do not state that table's α; 0.5 is the official training scripts' default.
    "amid-paper": ("amid", {"alpha": 0.5, "lam": 0.1, "divergence": "ab", "ab_a": 0.2, "ab_b": 0.7, "order": "pr"}),
}
LOSS_NAMES = (*LOSS_FUNCTIONS, *PRESETS)
