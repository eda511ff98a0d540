"""Settings of ``amid-pipeline distill`` (stage two) and ``amid-pipeline sft``. See stages/*.toml."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from amid_pipeline.alignment.vocabulary import MAP_RULES
from amid_pipeline.config import setting
from amid_pipeline.dataset.settings import DatasetSettings
from amid_pipeline.losses.catalog import LOSS_NAMES, SUPPORT_MODES, SUPPORTS

# Held-out metrics that distill can keep its best model by (train/metrics.py's names), and their direction.
HIGHER_IS_BETTER = {"kd": False, "kl_to_teacher": False, "kl_with_rest": False, "ce": False, "perplexity": False, "ece": False,
                    "top1_agreement": True, "support_mass": True}
BEST_METRIC_CHOICES = ("last", *HIGHER_IS_BETTER)
TRACKER_NAMES = ("tensorboard", "wandb", "trackio")  # distill --report-to; each is its package's name


@dataclasses.dataclass
class OptimizationSettings:
    """The optimiser, schedule, evaluation cadence and checkpoints: shared by distill and sft."""

    epochs: int = setting(1, "Passes over the training rows.", minimum=1)
    max_steps: Optional[int] = setting(None, "Stop after this many optimiser steps (default: epochs x steps per epoch).", minimum=1)
    batch_size: int = setting(8, "Sequences (distill: or packed rows) per micro-batch on each process.", minimum=1)
    grad_accum: int = setting(1, "Micro-batches per optimiser step.", minimum=1)
    lr: float = setting(5e-5, "Peak learning rate (AdamW).", minimum=0.0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", minimum=0.0)
    warmup_steps: int = setting(0, "Linear warm-up steps.", minimum=0)
    schedule: str = setting("cosine", "Learning-rate decay after warm-up.", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = setting(0.1, "Final learning rate as a fraction of --lr.", minimum=0.0, maximum=1.0)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = off).", minimum=0.0)
    seed: int = setting(0, "Seed for data order, shuffling and sampling.")
    eval_every: int = setting(50, "Evaluate on the held-out (distill) or dev (sft) rows every N optimiser steps (and at the end; distill also before the first step; 0 = only at the end).", minimum=0)
    save_every: int = setting(50, "Checkpoint every N optimiser steps (and at the end; 0 = only at the end).", minimum=0)
    patience: int = setting(0, "Stop after this many evaluations without a new best (a plateau: sft's dev loss, distill's --best-metric); 0 = run every step.", minimum=0)
    keep_checkpoints: int = setting(2, "Checkpoints kept on disk (oldest deleted first).", minimum=1)
    resume: bool = setting(False, "Continue from the latest checkpoint in --output.")
    dtype: str = setting("auto", "Compute dtype: auto = bf16 autocast on GPU, fp32 on CPU (bfloat16 on a CPU without AMX or AVX512-BF16 is emulated, about 20x slower: warned).", choices=("auto", "float32", "bfloat16"))
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    log_every: int = setting(1, "Write a metrics line every N steps.", minimum=1)
    progress: bool = setting(True, "Show a progress bar.")

    def uses_bfloat16(self, device_type: str) -> bool:
        """bf16 autocast: asked for, or ``auto`` on a GPU (a CPU under ``auto`` computes in float32)."""
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")

    def lr_factor(self, step: int, total: int) -> float:
        """The learning rate at ``step`` (finished steps) of ``total`` as a fraction of ``lr``: linear
        warm-up, then cosine, linear or constant decay to ``min_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(total - self.warmup_steps, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


@dataclasses.dataclass
class DistillConfig(OptimizationSettings):
    """Settings of ``distill``: shards, student, loss, data pipeline, parallelism (and the shared optimisation)."""

    shards: list = setting([], "Teacher shard directories (several, e.g. from several capture runs, are read as one).", required=True)
    student: Optional[str] = setting(None, "Student model: an HF-format folder (any AutoModelForCausalLM).", required=True)
    output: Optional[str] = setting(None, "Run directory: checkpoints, metrics.jsonl, the final model in model/.", required=True)
    loss: str = setting("amid", "Distillation loss, or a preset: amid-paper = the AMiD paper's main configuration (AB-divergence a = 0.2, b = 0.7, teacher-anchored, lam = 0.1, alpha = 0.5); --loss-params override a preset's values.", choices=LOSS_NAMES)
    loss_params: dict = setting({}, "Loss parameters, e.g. {alpha = -1.0, lam = 0.3} in TOML or alpha=-1,lam=0.3 on the command line; defaults in docs/losses.md (amid: alpha 0.5, lam 0.1).")
    support: str = setting("tail", "Support the loss sees: tail (default: the stored top-k plus one bucket for the rest, both sides normalised over the full vocabulary; trained the best students on a dev split, docs/benchmarks.md 'Evidence'), renormalized (teacher and student renormalised over the stored top-k; the student's mass leaks outside them), teacher_renormalized (teacher renormalised over the top-k, student over the full vocabulary with its rest in one outcome where the teacher has 0; as DistillKit, Axolotl and Gemma 3), sampled (shards of the sampled kind only: the teacher side is the empirical distribution of the draws; unbiased for forward_kl, a plug-in estimate for the other losses); tail, teacher_renormalized and sampled need the student's full normaliser, which the fused head computes without full logits.", choices=SUPPORT_MODES)
    online_teacher: Optional[str] = setting(None, "A teacher model folder run on every training batch: its full-vocabulary distribution replaces the shards' stored targets (the reference that top-k and sampled targets approximate: full-vocabulary KD, as online distillation does it; a teacher forward per micro-batch and [positions x vocabulary] logits on both sides, so sparse_head is off). The shards still give the rows, their tokens and the held-out evaluation; the teacher must use the shards' tokenizer and have no more outputs than the student's head.")
    cross_tokenizer: bool = setting(False, "A student with another tokenizer than the teacher's: each row's text is re-tokenised with the student's tokenizer, the positions where both tokenisations end at the same byte carry the teacher's stored distribution mapped onto student ids (teacher ids spelling a student token map exactly; others through their first student token, see cross_tokenizer_map; unmapped mass joins the rest bucket), and every loss applies unchanged (docs/cross-tokenizer.md). Top-k shards only; no packing, no online teacher, no ATKD.")
    teacher_tokenizer: Optional[str] = setting(None, "cross_tokenizer: the teacher's tokenizer folder; default: the shards' own copy (DIR/tokenizer, written by cache-teacher since format 1.4). Its fingerprint must be the shards'.")
    cross_tokenizer_map: str = setting("first", "cross_tokenizer: where a teacher token that is no student token sends its probability. first: to the longest student token its bytes start with; exact: to the rest bucket; none: nothing is mapped, the teacher's own probabilities are kept (vocabulary-free losses only: uld).", choices=MAP_RULES)
    kd_ratio: float = setting(1.0, "Objective = (1 - kd_ratio) * CE(ground truth) + kd_ratio * KD.", minimum=0.0, maximum=1.0)
    sparse_head: str = setting("auto", "The fused head: the student's logits at the stored ids, its full normaliser and the rest bucket from chunked blocks, never the [positions x vocabulary] matrix, for every loss, support and kd_ratio. auto: whenever the student's head is a plain linear layer (tied or not, bias allowed; a logit scale is folded in; soft-capping takes full logits); on: refuse a student whose head is not; off: full logits (the reference).", choices=("auto", "on", "off"))
    max_length: int = setting(1024, "Longest sequence (or packed row) fed to the student; longer rows are cut.", minimum=2)
    packing: bool = setting(False, "Pack several sequences into one row, attention kept inside each (positions restart at 0 in each; see packed_attention).")
    packed_attention: str = setting("auto", "How packed rows keep attention inside each sequence: position_ids (no mask: the model finds the sequences from the restarting positions, as transformers' packed-sequence support and flash-attention varlen do; no [T x T] mask), mask (a block-diagonal [B, 1, T, T] mask; any model), auto (position_ids when a two-sequence check at start-up shows the student supports it, else mask).", choices=("auto", "position_ids", "mask"))
    shuffle_buffer: int = setting(1024, "Rows held in the shuffle buffer.", minimum=1)
    eval_shards: list = setting([], "Shard directories evaluated instead of a held-out fraction of --shards (all their rows).")
    heldout_fraction: float = setting(0.05, "Fraction of sample ids held out for evaluation (stable hash of the id).", minimum=0.0, maximum=0.5)
    eval_batches: int = setting(16, "Held-out batches per evaluation.", minimum=1)
    best_metric: str = setting("last", "What RUN_DIR/model holds: last (the weights after the last step) or the evaluated weights (step 0 included) with the best value of this held-out metric (kd, kl_to_teacher, kl_with_rest, ce and perplexity of the reference tokens, and ece: lowest; top1_agreement and support_mass: highest), as HF Trainer's load_best_model_at_end; RUN_DIR/best.json says which step and why. The choice is made on the evaluation rows: make them a dev split (the held-out fraction, or --eval-shards of dev rows), not the rows you report.", choices=BEST_METRIC_CHOICES)
    parallel: str = setting("ddp", "Several processes (torchrun): ddp (a full student per process) or fsdp (student sharded across processes).", choices=("ddp", "fsdp"))
    num_data_workers: int = setting(0, "DataLoader worker processes per training process.", minimum=0)
    skip_bad_files: bool = setting(False, "Skip unreadable shard files (reported at the end) instead of stopping.")
    report_to: list = setting(["auto"], "Trackers that get the train and eval scalars beside RUN_DIR/metrics.jsonl: any of tensorboard (RUN_DIR/tensorboard), wandb (RUN_DIR/wandb; WANDB_MODE=offline works without network), trackio (local SQLite under TRACKIO_DIR); none = metrics.jsonl only; auto = tensorboard when it is installed, else none, silently. One named but not installed is skipped with a warning.")

    def check(self) -> list[str]:
        from amid_pipeline.losses.registry import support_refusal, validate_loss_params

        errors = [f"loss_params: {e}" for e in validate_loss_params(self.loss, self.loss_params)]
        errors += [f"report_to: {name!r} is not one of {', '.join(TRACKER_NAMES)}, none, auto" for name in self.report_to
                   if name not in TRACKER_NAMES and name not in ("none", "auto")]
        if self.online_teacher and (self.sparse_head == "on" or SUPPORTS[self.support].sampled_kind):
            errors.append("online_teacher: the full-vocabulary targets need full student logits and a support other "
                          "than 'sampled' (they hold every id; no draws)")
        if self.cross_tokenizer:
            from amid_pipeline.losses.registry import LOSSES

            clashes = [what for what, clash in (
                ("packing (batches are counted on the teacher's row lengths)", self.packing),
                ("an online teacher (it needs the student's tokens)", self.online_teacher),
                ("the sampled support (draws are not mapped across tokenizers)", SUPPORTS[self.support].sampled_kind),
                (f"{self.loss} (it needs the teacher's probability of the student's next token)",
                 LOSSES[self.loss].needs_target if self.loss in LOSSES else False)) if clash]
            errors += [f"cross_tokenizer: not with {what}" for what in clashes]
            if self.cross_tokenizer_map == "none" and self.loss in LOSSES and not LOSSES[self.loss].vocabulary_free:
                errors.append(f"cross_tokenizer_map: 'none' maps no teacher id, which {self.loss} compares; "
                              f"use 'first' or 'exact', or a vocabulary-free loss (uld)")
        if self.patience and self.best_metric == "last":
            errors.append("patience: stopping at a plateau needs a --best-metric to watch (e.g. kl_to_teacher); it is 'last'")
        if not errors and (refusal := support_refusal(self.support, self.loss, self.loss_params)):
            errors.append(f"support: {refusal}")
        return errors


@dataclasses.dataclass
class SFTConfig(OptimizationSettings, DatasetSettings):
    """Settings of ``amid-pipeline sft``: the dataset settings (as cache-teacher's, so a row is tokenised
    identically in both stages), then the model, the dev split and the optimiser."""

    model: Optional[str] = setting(None, "Model to fine-tune: an HF-format folder (any AutoModelForCausalLM): a teacher to make an expert of, or a pruned student to heal.", required=True)
    output: Optional[str] = setting(None, "Run directory: checkpoints, metrics.jsonl, sft_config.toml, and the model with the best dev loss in model/.", required=True)
    dev_dataset: Optional[str] = setting(None, "Dev data (same format) for choosing the checkpoint and stopping at a plateau (default: a held-out fraction of --dataset).")
    dev_fraction: float = setting(0.1, "Fraction of --dataset's sample ids held out as the dev split when --dev-dataset is not given (stable hash of the id).", minimum=0.0, maximum=0.5)
    epochs: int = setting(3, "Passes over the training rows.", minimum=1)
