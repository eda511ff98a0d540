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
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from amid_pipeline.config import save_config
from amid_pipeline.losses import KDLoss
from amid_pipeline.models import emulated_bfloat16_warning, model_source
from amid_pipeline.shards.storage import exclusive, write_json_atomic
from amid_pipeline.train.best import BestModel
from amid_pipeline.train.checkpoint import (
    SHARDED,
    load_trainer_state,
    resume_point,
    save_checkpoint,
    save_model,
    set_rng_state,
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
from amid_pipeline.train.data import DataSettings, ShardBatches, cached_manifest, count_batches, list_files
from amid_pipeline.train.distributed import (
    full_weights,
    load_optimizer_state,
    load_sharded,
    place,
    save_sharded,
    start_processes,
    wrap,
)
from amid_pipeline.train.metrics import MetricsLog, evaluate, trim_metrics
from amid_pipeline.train.step import DistillModule, HeadLogits, online_teacher_targets


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
    reason = HeadLogits.of(model).fused_refusal(model.get_output_embeddings())
    if reason and config.sparse_head == "on":
        raise TrainingError(f"sparse_head: 'on', but {reason}: the fused head cannot compute its logits (use auto or off)")
    if reason:
        notes.append(f"full logits: {reason}, which the fused head does not compute")
    return reason is None


def _distill(config: DistillConfig) -> RunSummary:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started, output = time.perf_counter(), Path(config.output)

    # --- 1. processes and devices --------------------------------------------------------------
    processes = start_processes()
    world, rank, device = processes.world, processes.rank, processes.device
    use_bf16 = config.uses_bfloat16(device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(config.seed)

    # --- 2. shards, student, objective, checks -------------------------------------------------
    header = check_shard_dirs(config.shards, config.support)
    files = list_files(config.shards)
    tokenizer = AutoTokenizer.from_pretrained(model_source(config.student, "student"))
    checkpoints = output / "checkpoints"
    record = run_record(config, {
        "shards": [cached_manifest(d).fingerprint for d in config.shards],
        "eval_shards": [cached_manifest(d).fingerprint for d in config.eval_shards],
        "student": model_fingerprint(model_source(config.student, "student")),
        "online_teacher": model_fingerprint(config.online_teacher and model_source(config.online_teacher, "online teacher"))})
    resume_from = resume_point(output, config.resume, record)
    sharded_resume = resume_from is not None and (resume_from / SHARDED).is_dir()  # an FSDP checkpoint
    weights_from = config.student if resume_from is None or sharded_resume else resume_from
    model = place(AutoModelForCausalLM.from_pretrained(weights_from, dtype=torch.float32), processes, config.parallel)
    head_size = model.get_output_embeddings().weight.shape[0]
    notes = check_student(header, tokenizer, head_size, config.student) + objective_and_data_notes(config, files)
    notes += [warning] if (warning := emulated_bfloat16_warning(config.dtype, device.type)) else []
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    loss_fn = KDLoss(config.loss, support=config.support, kd_ratio=config.kd_ratio, **config.loss_params)
    objective = {**loss_fn.resolved(), "online_teacher": config.online_teacher}
    if resume_from is not None:
        check_resumed_objective(output / "loss.json", objective)
    online_teacher = None
    if config.online_teacher:  # frozen, outside the wrapped module: DDP and FSDP never see it
        online_teacher = AutoModelForCausalLM.from_pretrained(
            model_source(config.online_teacher, "online teacher"), dtype=torch.bfloat16 if use_bf16 else torch.float32
        ).to(device).eval().requires_grad_(False)
        check_online_teacher(header, AutoTokenizer.from_pretrained(model_source(config.online_teacher, "online teacher")),
                             online_teacher.get_output_embeddings().weight.shape[0], config.online_teacher, head_size)
    packed_attention = packed_attention_mode(config, model, notes)
    sparse = fused_head_choice(config, model, online_teacher is not None, notes)
    settings = DataSettings(batch_size=config.batch_size, max_length=config.max_length, packing=config.packing,
                            packed_attention=packed_attention, shuffle_buffer=config.shuffle_buffer,
                            heldout_fraction=config.heldout_fraction,
                            skip_bad_files=config.skip_bad_files, student_vocab=head_size)
    if config.eval_shards:  # evaluate on those (any target kind and k of the same teacher); train on every row of --shards
        check_eval_shard_dirs(header, config.shards[0], config.eval_shards)
        settings = dataclasses.replace(settings, heldout_fraction=0.0)
    eval_files = list_files(config.eval_shards) if config.eval_shards else files
    heldout = (f"all rows of {', '.join(config.eval_shards)}" if config.eval_shards
               else f"sample ids with sha1 bucket < {config.heldout_fraction:.0%}")

    def epoch_batches(epoch: int) -> int:
        return count_batches(files, settings, seed=config.seed, epoch=epoch, world=world, workers=config.num_data_workers)

    batches_per_epoch = epoch_batches(0)
    if batches_per_epoch == 0:
        raise TrainingError(f"no training rows for {world} process(es) in {config.shards}")
    total_steps = config.max_steps or max(batches_per_epoch * config.epochs // config.grad_accum, 1)

    # --- 3. parallel wrapping, optimiser, schedule, resume ---------------------------------------------
    module = DistillModule(model, loss_fn, sparse)
    wrapped, fsdp = wrap(module, model, processes, config.parallel, use_bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_factor(s, total_steps))
    step, epoch, consumed, tokens = 0, 0, 0, 0
    best = BestModel(config.best_metric, config.patience) if config.best_metric != "last" else None
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if sharded_resume:
            load_sharded(module, optimizer, resume_from / SHARDED)
        else:
            load_optimizer_state(module, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        if loss_fn.schedule is not None:
            loss_fn.schedule.load_state_dict(state["loss_schedule"])
        step, epoch, consumed, tokens = state["step"], state["epoch"], state["consumed"], state["tokens"]
        if best is not None:
            best.load_state_dict(state.get("best"))
        set_rng_state(state["rng"])
    if processes.main:
        output.mkdir(parents=True, exist_ok=True)
        if resume_from is None or not (output / RUN_RECORD).exists():  # a resumed run keeps the record it was started with
            save_config(config, output / "distill_config.toml")
            write_json_atomic(output / RUN_RECORD, record)
        write_json_atomic(output / "loss.json", objective)  # every parameter as it ran, presets expanded
        trim_metrics(output / "metrics.jsonl", step)
        for note in notes:
            print(note if note.startswith("warning:") else f"note: {note}")
        print(f"distill: {len(files)} shard files, {batches_per_epoch} batches/epoch/process, {total_steps} steps, "
              f"{world} process(es), loss {config.loss} ({config.support}), "
              f"{'fused head' if sparse else 'full logits'}, held out: {heldout}"
              + (f", targets: {config.online_teacher}'s full vocabulary, online" if online_teacher else ""))

    def train_batches(epoch: int, skip: int):
        data = ShardBatches(files, settings, seed=config.seed, epoch=epoch, rank=rank, world=world, skip_batches=skip)
        return data, iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=config.num_data_workers,
                                                      pin_memory=device.type == "cuda"))

    def heldout_batches():
        data = ShardBatches(eval_files, settings, seed=config.seed, rank=rank, world=world,
                            heldout=not config.eval_shards, shuffle=False)
        return (batch for index, batch in zip(range(config.eval_batches), data))

    def checkpoint() -> None:
        if fsdp:  # every process writes its shards; nothing is gathered
            staging = staging_folder(checkpoints, step)
            if processes.main:
                shutil.rmtree(staging, ignore_errors=True)
            processes.barrier()
            save_sharded(module, optimizer, staging / SHARDED)
        if processes.main:
            save_checkpoint(checkpoints, step, model, tokenizer, {
                "optimizer": None if fsdp else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "consumed": consumed, "tokens": tokens,
                "loss_schedule": loss_fn.schedule.state_dict() if loss_fn.schedule else None,
                "best": best.state_dict() if best else None,
            }, config.keep_checkpoints, sharded=fsdp)
        processes.barrier()

    def evaluate_heldout() -> dict[str, float]:
        """Held-out metrics at this step, logged; with --best-metric the model is kept when it is the best."""
        model.eval()
        metrics = evaluate(wrapped, heldout_batches(), processes, autocast)
        if metrics_file:
            metrics_file.write({"step": step, "eval": metrics})
        if best is not None and best.update(step, metrics):
            weights = full_weights(module, fsdp)  # collective under FSDP
            if processes.main:
                save_model(model, tokenizer, output / "model", weights, records=best.kept())
            processes.barrier()
        return metrics

    # --- 4. the step loop ---------------------------------------------------------------------------
    data, batches = train_batches(epoch, consumed)
    batches_per_epoch = epoch_batches(epoch)
    bar = tqdm(total=total_steps, initial=step, disable=not config.progress or not processes.main, unit="step", desc="distill")
    metrics_file = MetricsLog(output, config.report_to, dataclasses.asdict(config)) if processes.main else None
    last_loss, last_eval, run_tokens, run_started = float("nan"), {}, 0, time.perf_counter()
    skipped: dict[str, None] = {}  # bad files skipped (--skip-bad-files), in the order met
    try:
        if step == 0 and config.eval_every:  # the curves start from the student as it came
            evaluate_heldout()
        while step < total_steps and not (best and best.stopped):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            losses, kds, sources = [], [], []
            for micro in range(config.grad_accum):
                if consumed >= batches_per_epoch:  # every process ends its epoch after the same count
                    epoch, consumed = epoch + 1, 0
                    data, batches = train_batches(epoch, 0)
                    batches_per_epoch = epoch_batches(epoch)
                # a shard that fails to read on one rank stops every rank, before the collective forward
                batch = processes.together(lambda: next(batches).to(device, non_blocking=True))
                skipped.update(dict.fromkeys(batch.bad_files))  # seen in whichever process read the batch
                consumed += 1
                last_micro = micro == config.grad_accum - 1
                with wrapped.no_sync() if world > 1 and not fsdp and not last_micro else nullcontext():
                    with autocast:
                        targets = (batch.teacher if online_teacher is None
                                   else online_teacher_targets(online_teacher, batch.inputs, batch.teacher, head_size))
                        out = wrapped(batch.inputs, targets, progress=(step, total_steps))
                    (out.loss / config.grad_accum).backward()
                losses.append(out.loss.detach().float())
                kds.append(out.kd.detach().float())
                sources.append((batch.sample_ids[:8], batch.files))
                tokens += batch.tokens * world
                run_tokens += batch.tokens * world
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the norm over every rank's shard
                grad_norm = grad_norm.full_tensor()
            values = torch.cat([torch.stack(losses), torch.stack(kds), grad_norm.float()[None]]).tolist()  # one host sync a step
            bad = next((i for i, value in enumerate(values[: len(losses)]) if not math.isfinite(value)), None)
            processes.stop_together(None if bad is None else TrainingError(  # before the step: the weights stay finite
                f"non-finite loss at step {step + 1} (samples {sources[bad][0]}, files {sources[bad][1]}); "
                f"the last checkpoint in {checkpoints} is intact"))
            step_loss, step_kd = (sum(part) / config.grad_accum for part in (values[: len(losses)], values[len(losses):-1]))
            grad_norm = values[-1]
            optimizer.step()
            scheduler.step()
            step += 1
            loss_fn.end_step(step, total_steps, step_kd)
            last_loss = step_loss
            speed = run_tokens / max(time.perf_counter() - run_started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tokens_per_s=f"{speed:,.0f}")
            if metrics_file and (step % config.log_every == 0 or step == total_steps):
                metrics_file.write({"step": step, "epoch": epoch, "loss": step_loss, "kd": step_kd,
                                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": tokens,
                                    "tokens_per_s": speed})
            if (config.eval_every and step % config.eval_every == 0) or step == total_steps:
                last_eval = evaluate_heldout()
            if (config.save_every and step % config.save_every == 0) or step == total_steps or (best and best.stopped):
                checkpoint()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    # --- 5. the final model: the last one, or the best one already kept in RUN_DIR/model ------------------
    if best is None:
        weights = full_weights(module, fsdp)  # collective under FSDP
        if processes.main:
            save_model(model, tokenizer, output / "model", weights)
    elif processes.main and (warning := best.write(output / "best.json", step, heldout, output / "model")):
        print(warning)
    processes.barrier()
    return RunSummary(output=output, steps=step, tokens=tokens, seconds=time.perf_counter() - started,
                      final_loss=last_loss, eval=last_eval, heldout=heldout,
                      bad_files=list({**skipped, **dict.fromkeys(data.bad_files)}), sparse_head=sparse, best=best)
