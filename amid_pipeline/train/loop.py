"""Stage two: train a student from teacher shards. The recipe; its parts are the modules beside it.

    amid-pipeline distill -c stages/distill_jargon.toml
    torchrun --nproc-per-node 2 -m amid_pipeline distill -c stages/distill_jargon.toml   # DDP
    torchrun --nproc-per-node 8 -m amid_pipeline distill -c ... --parallel fsdp           # sharded student

(1) processes and devices, (2) shards, student, objective and the pre-flight checks, (3) parallel
wrapping, optimiser, schedule and resume, (4) the step loop: micro-batches -> student hidden states at
the stored positions -> KD loss (fused head wherever the student's head allows) -> clip -> step -> log / evaluate (with
``--best-metric``: keep the best evaluated model in RUN_DIR/model, stop after ``--patience`` evaluations
without a new best) / checkpoint, (5) the final model (the last, or the best one kept), saved with
``save_pretrained`` beside its tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from amid_pipeline.alignment.rows import CrossTokenizer, teacher_tokenizer_of
from amid_pipeline.alignment.vocabulary import AlignmentError
from amid_pipeline.config import save_config
from amid_pipeline.losses import KDLoss
from amid_pipeline.losses.registry import LOSSES, resolve_loss
from amid_pipeline.models import emulated_bfloat16_warning, model_source
from amid_pipeline.shards.storage import exclusive, write_json_atomic
from amid_pipeline.train.best import BestModel
from amid_pipeline.train.checkpoint import (
    SHARDED,
    TrainPosition,
    restore,
    resume_point,
    save_checkpoint,
    save_model,
    staging_folder,
)
from amid_pipeline.train.checks import (
    RUN_RECORD,
    TrainingError,
    check_eval_shard_dirs,
    check_online_teacher,
    check_resumed_objective,
    check_shard_dirs,
    check_student,
    model_fingerprint,
    objective_and_data_notes,
    packed_attention_mode,
    run_record,
)
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.data import DataSettings, ShardBatches, ShardSet, TrainStream, count_batches
from amid_pipeline.train.distributed import full_weights, place, save_sharded, start_processes, wrap
from amid_pipeline.train.metrics import MetricsLog, evaluate, trim_metrics
from amid_pipeline.train.step import DistillModule, HeadLogits, OnlineTeacher, StoredTargets


@dataclasses.dataclass
class RunSummary:
    output: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    eval: dict[str, float]
    heldout: str
    bad_files: list[str]
    sparse_head: bool
    best: BestModel | None  # with --best-metric: the step RUN_DIR/model holds, and whether a plateau stopped the run


def distill(config: DistillConfig) -> RunSummary:
    """Train the student on the shards (see the module docstring); one writer per output directory."""
    with exclusive(config.output) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _distill(config)


def fused_head_choice(config: DistillConfig, model, online: bool, notes: list[str]) -> bool:
    """Whether the loss gets the fused head (``sparse_head``: auto = wherever the student's head allows it,
    for every loss, support and CE weight; on = refuse a student whose head does not; off = full logits).
    An online teacher's full-vocabulary targets always take full logits."""
    if online or config.sparse_head == "off":
        return False
    if LOSSES[resolve_loss(config.loss, config.loss_params)[0]].vocabulary_free:
        if config.sparse_head == "on":
            raise TrainingError(f"sparse_head: 'on', but {config.loss} compares the student's whole distribution (use auto)")
        notes.append(f"full logits: {config.loss} compares the student's whole sorted distribution")
        return False
    reason = HeadLogits.of(model).fused_refusal(model.get_output_embeddings())
    if reason and config.sparse_head == "on":
        raise TrainingError(f"sparse_head: 'on', but {reason}: the fused head cannot compute its logits (use auto or off)")
    if reason:
        notes.append(f"full logits: {reason}, which the fused head does not compute")
    return reason is None


def _distill(config: DistillConfig) -> RunSummary:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    started, output = time.perf_counter(), Path(config.output)
    processes = start_processes()
    use_bf16 = config.uses_bfloat16(processes.device.type)
    autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(config.seed)

    shards = ShardSet.open(config.shards)
    check_shard_dirs(shards, config.support)
    eval_shards = ShardSet.open(config.eval_shards) if config.eval_shards else None
    if eval_shards:  # evaluate on those (any target kind and k of the same teacher); train on every row of --shards
        check_eval_shard_dirs(shards, eval_shards)
    tokenizer = AutoTokenizer.from_pretrained(model_source(config.student, "student"))
    record = _run_record(config, shards, eval_shards)
    resume_from = resume_point(output, config.resume, record)
    notes = objective_and_data_notes(config, shards.files)
    model = _setup_student(config, processes, resume_from, shards, tokenizer, notes)
    head_size = model.get_output_embeddings().weight.shape[0]
    loss_fn = KDLoss(config.loss, support=config.support, kd_ratio=config.kd_ratio, **config.loss_params)
    objective = {**loss_fn.resolved(), "online_teacher": config.online_teacher}
    if resume_from is not None:
        check_resumed_objective(output / "loss.json", objective)
    teacher = _setup_teacher(config, shards.header, processes.device, use_bf16, head_size)
    sparse = fused_head_choice(config, model, teacher.full_vocabulary, notes)
    cross = _setup_cross_tokenizer(config, shards, tokenizer)
    settings = _data_settings(config, model, eval_shards, head_size, cross, notes)
    per_epoch = _batches_per_epoch(config, shards, settings, processes.world)
    total_steps = config.max_steps or max(per_epoch * config.epochs // config.grad_accum, 1)
    trainee = _setup_trainee(config, model, tokenizer, loss_fn, sparse, processes, use_bf16, total_steps)
    best = BestModel(config.best_metric, config.patience) if config.best_metric != "last" else None
    position = (TrainPosition() if resume_from is None else
                restore(resume_from, trainee.module, trainee.optimizer, trainee.scheduler, loss_fn.schedule, best, trainee.fsdp))
    heldout = (f"all rows of {', '.join(config.eval_shards)}" if eval_shards
               else f"sample ids with sha1 bucket < {config.heldout_fraction:.0%}")
    if processes.main:
        _start_run_folder(config, output, record, objective, resume_from, position.step, notes, cross)
        print(f"distill: {len(shards.files)} shard files, {per_epoch} batches/epoch/process, {total_steps} steps, "
              f"{processes.world} process(es), loss {config.loss} ({config.support}), {'fused head' if sparse else 'full logits'}, held out: {heldout}"
              + (f", targets: {config.online_teacher}'s full vocabulary, online" if teacher.full_vocabulary else ""))

    stream = TrainStream(shards.files, settings, seed=config.seed, rank=processes.rank, world=processes.world,
                         workers=config.num_data_workers, pin_memory=processes.device.type == "cuda",
                         epoch=position.epoch, consumed=position.consumed)
    eval_files = (eval_shards or shards).files
    heldout_data = functools.partial(ShardBatches, eval_files, settings, seed=config.seed, rank=processes.rank,
                                     world=processes.world, heldout=not eval_shards, shuffle=False)
    bar = tqdm(total=total_steps, initial=position.step, disable=not config.progress or not processes.main, unit="step",
               desc="distill")
    metrics_file = MetricsLog(output, config.report_to, dataclasses.asdict(config)) if processes.main else None

    def evaluate_heldout() -> dict[str, float]:
        batches = (batch for _, batch in zip(range(config.eval_batches), heldout_data()))
        return _evaluate_heldout(trainee, batches, processes, autocast, metrics_file, position.step, best, output)

    last_loss, last_eval, run_tokens, run_started = float("nan"), {}, 0, time.perf_counter()
    skipped: dict[str, None] = {}  # bad files skipped (--skip-bad-files), in the order met
    try:
        if position.step == 0 and config.eval_every:  # the curves start from the student as it came
            evaluate_heldout()
        while position.step < total_steps and not (best and best.stopped):
            tokens_before = position.tokens
            step_loss, step_kd, grad_norm = _train_step(config, trainee, stream, teacher, processes, autocast,
                                                        position, skipped, output / "checkpoints")
            position.step += 1
            loss_fn.end_step(position.step, total_steps, step_kd)
            last_loss, run_tokens = step_loss, run_tokens + position.tokens - tokens_before
            speed = run_tokens / max(time.perf_counter() - run_started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tokens_per_s=f"{speed:,.0f}")
            step, final = position.step, position.step == total_steps
            if metrics_file and (step % config.log_every == 0 or final):
                metrics_file.write({"step": step, "epoch": stream.epoch, "loss": step_loss, "kd": step_kd,
                                    "lr": trainee.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                    "tokens": position.tokens, "tokens_per_s": speed})
            if (config.eval_every and step % config.eval_every == 0) or final:
                last_eval = evaluate_heldout()
            if (config.save_every and step % config.save_every == 0) or final or (best and best.stopped):
                position.epoch, position.consumed = stream.epoch, stream.consumed
                _save_checkpoint(trainee, output / "checkpoints", position, loss_fn, best, processes, config.keep_checkpoints)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    if best is None:  # the final model: the last one, or the best one already kept in RUN_DIR/model
        weights = full_weights(trainee.module, trainee.fsdp)  # collective under FSDP
        if processes.main:
            save_model(model, tokenizer, output / "model", weights)
    elif processes.main and (warning := best.write(output / "best.json", position.step, heldout, output / "model")):
        print(warning)
    processes.barrier()
    return RunSummary(output=output, steps=position.step, tokens=position.tokens, seconds=time.perf_counter() - started,
                      final_loss=last_loss, eval=last_eval, heldout=heldout,
                      bad_files=list({**skipped, **dict.fromkeys(stream.data.bad_files)}), sparse_head=sparse, best=best)


@dataclasses.dataclass
class Trainee:
    """The student as the step loop holds it: the model, its :class:`DistillModule` (student and loss) and that
    module wrapped for the processes (DDP or FSDP), the optimiser and the schedule, and the tokenizer saved with it."""

    model: nn.Module
    tokenizer: object
    module: DistillModule
    wrapped: nn.Module
    fsdp: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int  # the schedule's length


def _run_record(config: DistillConfig, shards: ShardSet, eval_shards: ShardSet | None) -> dict:
    """What ``--resume`` must find unchanged: the settings and the fingerprints of every input."""
    return run_record(config, {
        "shards": shards.fingerprints,
        "eval_shards": eval_shards.fingerprints if eval_shards else [],
        "student": model_fingerprint(model_source(config.student, "student")),
        "online_teacher": model_fingerprint(config.online_teacher and model_source(config.online_teacher, "online teacher"))})


def _setup_student(config: DistillConfig, processes, resume_from: Path | None, shards: ShardSet, tokenizer,
                   notes: list[str]) -> nn.Module:
    """The student in float32 on this process's device (its weights from the checkpoint when resuming one
    that holds them; an FSDP checkpoint's are loaded with the optimizer), checked against the shards."""
    from transformers import AutoModelForCausalLM

    sharded = resume_from is not None and (resume_from / SHARDED).is_dir()
    weights_from = config.student if resume_from is None or sharded else resume_from
    model = place(AutoModelForCausalLM.from_pretrained(weights_from, dtype=torch.float32), processes, config.parallel)
    notes[:0] = check_student(shards.header, tokenizer, model.get_output_embeddings().weight.shape[0], config.student,
                              config.cross_tokenizer)
    notes += [warning] if (warning := emulated_bfloat16_warning(config.dtype, processes.device.type)) else []
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _setup_teacher(config: DistillConfig, header, device: torch.device, use_bf16: bool,
                   head_size: int) -> StoredTargets | OnlineTeacher:
    """The run's teacher signal: the shards' stored targets, or ``--online-teacher`` run on every batch."""
    if not config.online_teacher:
        return StoredTargets()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(config.online_teacher, "online teacher")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    model = model.to(device).eval().requires_grad_(False)
    check_online_teacher(header, AutoTokenizer.from_pretrained(source), model.get_output_embeddings().weight.shape[0],
                         config.online_teacher, head_size)
    return OnlineTeacher(model, head_size)


def _setup_cross_tokenizer(config: DistillConfig, shards: ShardSet, tokenizer) -> CrossTokenizer | None:
    """With ``--cross-tokenizer``: the teacher's tokenizer (given, or the shards' own copy; checked against
    the shards' fingerprint) and the student's, aligned (:class:`CrossTokenizer`); else None."""
    if not config.cross_tokenizer:
        return None
    if shards.header.sampling is not None:
        raise TrainingError(f"cross_tokenizer: {shards.directories[0]} holds sampled targets; cross-tokenizer "
                            f"distillation reads top-k shards")
    try:
        teacher_tokenizer = teacher_tokenizer_of(shards.manifests[0], config.teacher_tokenizer)
        return CrossTokenizer.build(teacher_tokenizer, tokenizer, config.cross_tokenizer_map)
    except AlignmentError as exc:
        raise TrainingError(f"cross_tokenizer: {exc}") from exc


def _data_settings(config: DistillConfig, model, eval_shards: ShardSet | None, head_size: int,
                   cross: CrossTokenizer | None, notes: list[str]) -> DataSettings:
    """Batching settings from the config; none of the rows of ``--shards`` is held out when ``--eval-shards`` is given."""
    return DataSettings(batch_size=config.batch_size, max_length=config.max_length, packing=config.packing,
                        packed_attention=packed_attention_mode(config, model, notes),
                        shuffle_buffer=config.shuffle_buffer,
                        heldout_fraction=0.0 if eval_shards else config.heldout_fraction,
                        skip_bad_files=config.skip_bad_files, student_vocab=head_size, cross=cross)


def _batches_per_epoch(config: DistillConfig, shards: ShardSet, settings: DataSettings, world: int) -> int:
    """The batches each process takes in the first epoch; no training rows at all is refused."""
    batches = count_batches(shards.files, settings, seed=config.seed, epoch=0, world=world,
                            workers=config.num_data_workers)
    if batches == 0:
        raise TrainingError(f"no training rows for {world} process(es) in {config.shards}")
    return batches


def _setup_trainee(config: DistillConfig, model, tokenizer, loss_fn: KDLoss, sparse: bool, processes, use_bf16: bool,
                   total_steps: int) -> Trainee:
    """The student and loss as one module, wrapped for the processes, with AdamW and the learning-rate schedule."""
    module = DistillModule(model, loss_fn, sparse)
    wrapped, fsdp = wrap(module, model, processes, config.parallel, use_bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_factor(s, total_steps))
    return Trainee(model, tokenizer, module, wrapped, fsdp, optimizer, scheduler, total_steps)


def _start_run_folder(config: DistillConfig, output: Path, record: dict, objective: dict, resume_from: Path | None,
                      step: int, notes: list[str], cross: CrossTokenizer | None) -> None:
    """The run folder's records (a resumed run keeps the config and record it was started with; a
    cross-tokenizer run its vocabulary map, ``cross_tokenizer.json``), the metrics log cut back to ``step``,
    and the start-up notes printed."""
    output.mkdir(parents=True, exist_ok=True)
    if cross is not None:
        write_json_atomic(output / "cross_tokenizer.json", cross.vocabulary.record())
        notes.append(f"cross_tokenizer: {cross.vocabulary.describe()}")
    if resume_from is None or not (output / RUN_RECORD).exists():
        save_config(config, output / "distill_config.toml")
        write_json_atomic(output / RUN_RECORD, record)
    write_json_atomic(output / "loss.json", objective)  # every parameter as it ran, presets expanded
    trim_metrics(output / "metrics.jsonl", step)
    for note in notes:
        print(note if note.startswith("warning:") else f"note: {note}")


def _train_step(config: DistillConfig, trainee: Trainee, stream: TrainStream, teacher, processes, autocast,
                position: TrainPosition, skipped: dict[str, None], checkpoints: Path) -> tuple[float, float, float]:
    """One optimizer step over ``grad_accum`` micro-batches: forward and backward (gradients synchronised on the
    last micro-batch only), clip, then step unless a loss is not finite (every process stops, the weights
    untouched). Returns the step's loss, KD term and gradient norm (one host sync)."""
    trainee.model.train()
    trainee.optimizer.zero_grad(set_to_none=True)
    world, device = processes.world, processes.device
    losses, kds, sources = [], [], []
    for micro in range(config.grad_accum):
        # a shard that fails to read on one rank stops every rank, before the collective forward
        batch = processes.together(lambda: next(stream).to(device, non_blocking=True))
        skipped.update(dict.fromkeys(batch.bad_files))  # seen in whichever process read the batch
        last_micro = micro == config.grad_accum - 1
        with trainee.wrapped.no_sync() if world > 1 and not trainee.fsdp and not last_micro else nullcontext():
            with autocast:
                out = trainee.wrapped(batch.inputs, teacher(batch), progress=(position.step, trainee.total_steps))
            (out.loss / config.grad_accum).backward()
        losses.append(out.loss.detach().float())
        kds.append(out.kd.detach().float())
        sources.append((batch.sample_ids[:8], batch.files))
        position.tokens += batch.tokens * world
    grad_norm = nn.utils.clip_grad_norm_(trainee.model.parameters(), config.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the norm over every rank's shard
        grad_norm = grad_norm.full_tensor()
    values = torch.cat([torch.stack(losses), torch.stack(kds), grad_norm.float()[None]]).tolist()
    bad = next((i for i, value in enumerate(values[: len(losses)]) if not math.isfinite(value)), None)
    processes.stop_together(None if bad is None else TrainingError(  # before the step: the weights stay finite
        f"non-finite loss at step {position.step + 1} (samples {sources[bad][0]}, files {sources[bad][1]}); "
        f"the last checkpoint in {checkpoints} is intact"))
    trainee.optimizer.step()
    trainee.scheduler.step()
    step_loss, step_kd = (sum(part) / config.grad_accum for part in (values[: len(losses)], values[len(losses):-1]))
    return step_loss, step_kd, values[-1]


def _evaluate_heldout(trainee: Trainee, batches, processes, autocast, metrics_file: MetricsLog | None, step: int,
                      best: BestModel | None, output: Path) -> dict[str, float]:
    """Held-out metrics at ``step``, logged; with --best-metric the model is kept in RUN_DIR/model when it is the best."""
    trainee.model.eval()
    metrics = evaluate(trainee.wrapped, batches, processes, autocast)
    if metrics_file:
        metrics_file.write({"step": step, "eval": metrics})
    if best is not None and best.update(step, metrics):
        weights = full_weights(trainee.module, trainee.fsdp)  # collective under FSDP
        if processes.main:
            save_model(trainee.model, trainee.tokenizer, output / "model", weights, records=best.kept())
        processes.barrier()
    return metrics


def _save_checkpoint(trainee: Trainee, checkpoints: Path, position: TrainPosition, loss_fn: KDLoss,
                     best: BestModel | None, processes, keep: int) -> None:
    """Checkpoint ``position``: under FSDP every process writes its shards first (nothing is gathered)."""
    if trainee.fsdp:
        staging = staging_folder(checkpoints, position.step)
        if processes.main:
            shutil.rmtree(staging, ignore_errors=True)
        processes.barrier()
        save_sharded(trainee.module, trainee.optimizer, staging / SHARDED)
    if processes.main:
        save_checkpoint(checkpoints, position.step, trainee.model, trainee.tokenizer, {
            "optimizer": None if trainee.fsdp else trainee.optimizer.state_dict(),
            "scheduler": trainee.scheduler.state_dict(), "epoch": position.epoch, "consumed": position.consumed,
            "tokens": position.tokens, "loss_schedule": loss_fn.schedule.state_dict() if loss_fn.schedule else None,
            "best": best.state_dict() if best else None,
        }, keep, sharded=trainee.fsdp)
    processes.barrier()
