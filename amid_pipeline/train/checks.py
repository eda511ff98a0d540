"""Pre-flight checks of a distill run (also ``amid-pipeline compat``): refusals with the reason, and the
notes printed at start-up about differences that are accepted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from amid_pipeline.chat import template_sha256
from amid_pipeline.losses.catalog import SUPPORTS
from amid_pipeline.models import tokenizer_fingerprint, weights_fingerprint
from amid_pipeline.shards.manifest import Header, teacher_differences
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.data import ShardFile, ShardSet, duplicate_ids


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, incompatible inputs); the message says what and where."""


def check_shard_dirs(shards: ShardSet, support: str | None = None) -> Header:
    """Refuse directories that cannot be read as one dataset (other teacher, tokenizer, target kind, k or
    encoding), or whose target kind the ``support`` cannot use; return the first one's header."""
    headers = [(directory, manifest.header) for directory, manifest in zip(shards.directories, shards.manifests)]
    first_dir, first = headers[0]
    if support is not None and SUPPORTS[support].sampled_kind and first.sampling is None:
        raise TrainingError(f"support {support!r} needs shards of the sampled target kind; {first_dir} holds "
                            f"{first.target_kind} targets (cache-teacher --target-kind sampled)")
    for directory, header in headers[1:]:
        reasons = teacher_differences(first, header)
        if reasons:
            raise TrainingError(f"{directory} cannot be trained on together with {first_dir}: {'; '.join(reasons)}")
    return first


def check_eval_shard_dirs(train: ShardSet, evaluation: ShardSet) -> Header:
    """Refuse evaluation directories that are not one dataset, or not of the training shards' teacher,
    tokenizer and head size; their target kind, k and encoding may differ from the training shards'."""
    header = check_shard_dirs(evaluation)
    reasons = teacher_differences(train.header, header, same_targets=False)
    if reasons:
        raise TrainingError(f"{evaluation.directories[0]} cannot evaluate a student trained on {train.directories[0]}: "
                            f"{'; '.join(reasons)}")
    return header


def check_student(manifest_header: Header, tokenizer, head_size: int, student_name: str,
                  cross_tokenizer: bool = False) -> list[str]:
    """Refuse a student that cannot learn from these shards; return notes on accepted differences. With
    ``cross_tokenizer`` the student's tokenizer may be any other, and its head must cover that tokenizer."""
    shard_tok = manifest_header.tokenizer
    student_tok = tokenizer_fingerprint(tokenizer)
    if cross_tokenizer:
        if head_size < student_tok["vocab_size"]:
            raise TrainingError(f"student head has {head_size} outputs but its tokenizer has {student_tok['vocab_size']} tokens")
        same = student_tok["fingerprint"] == shard_tok.get("fingerprint")
        return ["cross_tokenizer with the teacher's own tokenizer: every position aligns and every id maps to itself"
                if same else f"cross_tokenizer: {student_name}'s tokenizer ({student_tok['vocab_size']} tokens) "
                f"re-tokenises the rows of {manifest_header.teacher.get('name_or_path')}'s ({shard_tok.get('vocab_size')} tokens)"]
    if student_tok["fingerprint"] != shard_tok.get("fingerprint"):
        raise TrainingError(
            f"student tokenizer ({student_name}: {student_tok['vocab_size']} tokens, fingerprint "
            f"{student_tok['fingerprint'][:12]}) differs from the shards' ({manifest_header.teacher.get('name_or_path')}: "
            f"{shard_tok.get('vocab_size')} tokens, fingerprint {str(shard_tok.get('fingerprint'))[:12]}); "
            f"the student must use the teacher's tokenizer, or distill with --cross-tokenizer"
        )
    if head_size < shard_tok.get("vocab_size", 0):
        raise TrainingError(f"student head has {head_size} outputs but the tokenizer has {shard_tok['vocab_size']} tokens")
    notes = []
    if head_size > student_tok["vocab_size"]:
        notes.append(f"student head has {head_size} outputs for {student_tok['vocab_size']} tokens (padded head: fine, "
                     f"the extra outputs are never targets)")
    if head_size < manifest_header.model_vocab_size:
        notes.append(f"teacher head had {manifest_header.model_vocab_size} outputs, student {head_size}: ids beyond the "
                     f"student head would be refused per sample")
    template = template_warning(manifest_header, tokenizer, student_name)
    if template:
        notes.append(template)
    return notes


def template_warning(header: Header, tokenizer, model_name: str) -> str | None:
    """A warning when the shards' rows were rendered with a chat template other than the model's own:
    the model learns (or is measured on) conversations in a format it will not be prompted with."""
    rendered = header.dataset.get("chat_template_sha256")
    if rendered is None or rendered == template_sha256(tokenizer):
        return None
    own = "has no chat template" if template_sha256(tokenizer) is None else "has another chat template"
    return (f"warning: the shards were rendered with the teacher's chat template (sha256 {rendered[:12]}) but {model_name} "
            f"{own}; prompt it with the shards' template (copy the teacher's tokenizer_config.json chat_template)")


def objective_and_data_notes(config: DistillConfig, files: list[ShardFile]) -> list[str]:
    """Notes on settings that train, but maybe not as meant: a support that lets mass leak, sample ids
    repeated across several shard directories."""
    notes = []
    if SUPPORTS[config.support].note and config.kd_ratio == 1.0:
        notes.append(SUPPORTS[config.support].note)
    if len(config.shards) > 1:
        repeated = duplicate_ids(files)
        if repeated:
            examples = ", ".join(repr(sample_id) for sample_id in list(repeated)[:5])
            notes.append(f"{len(repeated)} sample ids occur more than once across --shards (e.g. {examples}); those rows "
                         f"are trained on once per copy (`amid-pipeline combine --duplicates drop` writes a view without them)")
    return notes


def check_resumed_objective(recorded: Path, objective: dict) -> None:
    """Refuse to resume a run under another objective (loss settings and online teacher) than the one it
    recorded in ``loss.json`` (a record without ``online_teacher`` predates it: none)."""
    if not recorded.exists():
        return
    before = {"online_teacher": None, **json.loads(recorded.read_text())}
    if before != objective:
        raise TrainingError(f"{recorded} records another objective than this --resume asks for "
                            f"({before} vs {objective}): resume with the same loss settings")


# Settings a resumed run may change (how long it runs, how it is watched, kept, parallelised and fed; a new max_steps or
# epochs stretches the lr schedule over the new total from the resumed step on), and the settings that name
# inputs: those are compared by the fingerprint of what they name, so a folder given by another path, or
# moved, is the same input, and a folder whose content changed at the same path is not.
RESUME_FREE_SETTINGS = ("resume", "max_steps", "epochs", "eval_every", "progress", "report_to", "log_every",
                        "save_every", "keep_checkpoints", "parallel", "num_data_workers", "skip_bad_files")
INPUT_SETTINGS = ("output", "shards", "eval_shards", "student", "online_teacher", "teacher_tokenizer", "model", "dataset", "dev_dataset")
RUN_RECORD = "run.json"


def run_record(config, inputs: dict) -> dict:
    """What a ``--resume`` must find unchanged in RUN_DIR/run.json: ``settings``, every setting of
    ``config`` but the resume-free ones and the input paths; ``inputs``, the fingerprints of the inputs
    (shard manifests, model weights, tokenised datasets) by setting name."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in (*RESUME_FREE_SETTINGS, *INPUT_SETTINGS)}
    return json.loads(json.dumps({"settings": settings, "inputs": inputs}))


def check_resumed_run(output: Path, record: dict) -> None:
    """Refuse, naming every difference, to resume a run whose RUN_DIR/run.json records other settings or
    inputs than ``record`` (a run folder without one predates the record: nothing to compare)."""
    path = output / RUN_RECORD
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
        sections = {section: dict(before[section]) for section in ("settings", "inputs")}
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{path}: not a run record ({exc}); resume needs it unchanged, or start another --output") from exc

    def shown(section: str, value) -> str:
        return f"{str(value)[:12]}…" if section == "inputs" and isinstance(value, str) else repr(value)

    differing = [f"{key}: {shown(section, sections[section].get(key))} there, {shown(section, record[section].get(key))} now"
                 for section in ("settings", "inputs")
                 for key in sorted(set(sections[section]) | set(record[section]))
                 if sections[section].get(key) != record[section].get(key)]
    if differing:
        raise TrainingError(f"--resume: {output} was trained with other settings or inputs ({'; '.join(differing)}); "
                            f"resume with the same ones, or start another --output")


def model_fingerprint(name: str | None) -> str | None:
    """The weights fingerprint of a model folder (:func:`amid_pipeline.models.weights_fingerprint`); a hub id
    stands for itself."""
    if name is None:
        return None
    return weights_fingerprint(name) if Path(name).is_dir() else f"hub:{name}"


def check_online_teacher(header: Header, tokenizer, head_size: int, teacher_name: str, student_head_size: int) -> None:
    """Refuse an online teacher whose distribution cannot replace the shards' targets: another tokenizer
    than the one that tokenised the rows, or a head with more outputs than the student's (a student head
    padded beyond the teacher's is fine: the teacher gives its extra outputs probability 0)."""
    fingerprint = tokenizer_fingerprint(tokenizer)["fingerprint"]
    if fingerprint != header.tokenizer.get("fingerprint"):
        raise TrainingError(f"online_teacher: {teacher_name}'s tokenizer (fingerprint {fingerprint[:12]}) is not the one "
                            f"that tokenised the shards ({str(header.tokenizer.get('fingerprint'))[:12]})")
    if head_size > student_head_size:
        raise TrainingError(f"online_teacher: {teacher_name} has {head_size} outputs, the student {student_head_size}: "
                            f"the student cannot be given probabilities for ids beyond its head")


def packed_attention_mode(config: DistillConfig, model, notes: list[str]) -> str:
    """``packed_attention`` resolved for ``model`` ("mask" or "position_ids"; "mask" when not packing):
    auto picks position ids when :func:`packs_by_position_ids` passes (and says so in ``notes``); asking
    for position ids with a student whose attention crosses packed sequences is refused."""
    from amid_pipeline.train.step import packs_by_position_ids

    if not config.packing:
        return "mask"
    if config.packed_attention == "auto":
        mode = "position_ids" if packs_by_position_ids(model) else "mask"
        how = "position ids (no mask)" if mode == "position_ids" else "a block-diagonal mask"
        notes.append(f"packed rows keep attention inside each sequence by {how}")
        return mode
    if config.packed_attention == "position_ids" and not packs_by_position_ids(model):
        raise TrainingError(f"packed_attention: {config.student} does not keep packed sequences apart by position ids "
                            f"alone (its attention crosses them); use packed_attention = 'mask'")
    return config.packed_attention
