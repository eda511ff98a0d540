"""The names a configuration may use, without importing torch (the CLI builds its --help from these).

:mod:`amid_pipeline.losses.registry` maps each name of :data:`LOSS_FUNCTIONS` to its function and checks
at import that the two lists agree.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Support:
    """One support mode's rules (docs/losses.md §7), the one place the trainer, the checks and the loss read
    them from."""

    full_normalizer: bool  # needs the student's logsumexp over its whole vocabulary (the fused head computes it)
    sampled_kind: bool  # needs shards of the sampled target kind (the draws' p̂)
    zero_teacher_rest: bool  # the teacher has 0 outside its ids: losses infinite where p = 0 < q are refused
    on_topk_eval: str  # the mode its held-out KD metric takes on top-k evaluation shards
    note: str = ""  # printed when distill starts with kd_ratio = 1: a setting that trains, maybe not as meant


SUPPORTS = {
    "renormalized": Support(False, False, False, "renormalized", note=(
        "the renormalised support never sees the student's mass outside the teacher's top-k, which can leak there "
        "(docs/benchmarks.md, Evidence); --support tail or --kd-ratio < 1 keeps it in check")),
    "tail": Support(True, False, False, "tail"),
    "teacher_renormalized": Support(True, False, True, "teacher_renormalized"),
    "sampled": Support(True, True, True, "tail"),  # top-k shards hold no draws: the same loss on tail
}
SUPPORT_MODES = tuple(SUPPORTS)
LOSS_FUNCTIONS = ("akl", "amid", "atkd", "forward_kl", "jsd", "reverse_kl", "skl", "srkl", "taid", "tvd", "uld")
PRESETS: dict[str, tuple[str, dict[str, object]]] = {
    # The AMiD paper's main table (GPT-2, Dolly): AB(0.2, 0.7), teacher-anchored, λ = 0.1. The paper's notes
    # here do not state that table's α; 0.5 is the official training scripts' default.
    "amid-paper": ("amid", {"alpha": 0.5, "lam": 0.1, "divergence": "ab", "ab_a": 0.2, "ab_b": 0.7, "order": "pr"}),
}
LOSS_NAMES = (*LOSS_FUNCTIONS, *PRESETS)
