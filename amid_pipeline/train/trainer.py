"""Stage two: train a student from teacher shards.

    amid-pipeline distill -c stages/distill_jargon.toml
    torchrun --nproc-per-node 2 -m amid_pipeline distill -c stages/distill_jargon.toml   # DDP
    torchrun --nproc-per-node 8 -m amid_pipeline distill -c ... --parallel fsdp           # sharded student

Phases: (1) processes and devices, (2) shards, student and the compatibility checks, (3) optimiser,
schedule and resume, (4) the step loop: micro-batches -> student hidden states at the stored
positions -> KD loss (sparse head when allowed) -> clip -> step -> log / evaluate / checkpoint,
(5) the final model, saved with ``save_pretrained`` beside its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amid_pipeline.chat import template_sha256
from amid_pipeline.config import save_config
from amid_pipeline.losses import KDLoss, StudentHead, TeacherTargets, forward_kl
from amid_pipeline.models import model_source, tokenizer_fingerprint
from amid_pipeline.shards.manifest import load_manifest, teacher_differences, write_json_atomic
from amid_pipeline.shards.storage import exclusive
from amid_pipeline.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.data import DataSettings, ShardBatches, count_batches, duplicate_ids, list_files


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, incompatible inputs); the message says what and where."""


class DistillModule(nn.Module):
    """The student and the KD loss in one forward, so that DDP and FSDP see every use of every parameter.

    The LM head is applied only at the stored positions ([N, H] hidden states), and only at the stored
    ids when ``sparse``. ``forward(...)`` returns the :class:`LossOutput`; with ``metrics=True`` it
    returns the held-out metric sums of :func:`heldout_sums` instead.
    """

    def __init__(self, model: nn.Module, loss_fn: KDLoss, sparse: bool) -> None:
        super().__init__()
        self.model, self.loss_fn, self.sparse = model, loss_fn, sparse

    def forward(self, inputs: dict[str, torch.Tensor], teacher: TeacherTargets, progress=None, metrics: bool = False):
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      position_ids=inputs["position_ids"]).last_hidden_state[inputs["row"], inputs["column"]]
        head = self.model.get_output_embeddings()
        if metrics:
            return heldout_sums(hidden, head, teacher, self.loss_fn)
        return self.loss_fn(student_output(hidden, head, self.sparse), teacher, progress=progress)


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


def check_student(manifest_header: dict, tokenizer, head_size: int, student_name: str) -> list[str]:
    """Refuse a student that cannot learn from these shards; return notes on accepted differences."""
    shard_tok = manifest_header["tokenizer"]
    student_tok = tokenizer_fingerprint(tokenizer)
    if student_tok["fingerprint"] != shard_tok.get("fingerprint"):
        raise TrainingError(
            f"student tokenizer ({student_name}: {student_tok['vocab_size']} tokens, fingerprint "
            f"{student_tok['fingerprint'][:12]}) differs from the shards' ({manifest_header['teacher'].get('name_or_path')}: "
            f"{shard_tok.get('vocab_size')} tokens, fingerprint {str(shard_tok.get('fingerprint'))[:12]}); "
            f"the student must use the teacher's tokenizer"
        )
    if head_size < shard_tok.get("vocab_size", 0):
        raise TrainingError(f"student head has {head_size} outputs but the tokenizer has {shard_tok['vocab_size']} tokens")
    notes = []
    if head_size > student_tok["vocab_size"]:
        notes.append(f"student head has {head_size} outputs for {student_tok['vocab_size']} tokens (padded head: fine, "
                     f"the extra outputs are never targets)")
    if head_size < manifest_header["model_vocab_size"]:
        notes.append(f"teacher head had {manifest_header['model_vocab_size']} outputs, student {head_size}: ids beyond the "
                     f"student head would be refused per sample")
    template = template_warning(manifest_header, tokenizer, student_name)
    if template:
        notes.append(template)
    return notes


def template_warning(header: dict, tokenizer, model_name: str) -> str | None:
    """A warning when the shards' rows were rendered with a chat template other than the model's own:
    the model learns (or is measured on) conversations in a format it will not be prompted with."""
    rendered = header.get("dataset", {}).get("chat_template_sha256")
    if rendered is None or rendered == template_sha256(tokenizer):
        return None
    own = "has no chat template" if template_sha256(tokenizer) is None else "has another chat template"
    return (f"warning: the shards were rendered with the teacher's chat template (sha256 {rendered[:12]}) but {model_name} "
            f"{own}; prompt it with the shards' template (copy the teacher's tokenizer_config.json chat_template)")


def check_shard_dirs(directories: list[str]) -> dict:
    """Refuse directories that cannot be read as one dataset (other teacher, tokenizer, k or encoding)."""
    headers = [(d, load_manifest(d).header) for d in directories]
    first_dir, first = headers[0]
    for directory, header in headers[1:]:
        reasons = teacher_differences(first, header)
        if reasons:
            raise TrainingError(f"{directory} cannot be trained on together with {first_dir}: {'; '.join(reasons)}")
    return first


def lr_factor(step: int, total: int, config: DistillConfig) -> float:
    """Warm-up then cosine/linear/constant decay to ``min_lr_ratio``; ``step`` counts finished steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min((step - config.warmup_steps) / max(total - config.warmup_steps, 1), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


def teacher_targets(batch: dict, device) -> TeacherTargets:
    return TeacherTargets(batch["topk_ids"].to(device), batch["topk_logprobs"].to(device), batch["target_ids"].to(device),
                          batch["target_logprob"].to(device), batch["mask"].to(device))


def student_inputs(batch: dict, device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "row", "column")}


def student_output(hidden: torch.Tensor, head: nn.Module, sparse: bool) -> torch.Tensor | StudentHead:
    """The loss's view of the student at the stored positions: the head itself, or its logits [N, V]."""
    if sparse:
        return StudentHead(hidden, head.weight, getattr(head, "bias", None))
    return head(hidden)


def heldout_sums(hidden: torch.Tensor, head: nn.Module, teacher: TeacherTargets, loss_fn: KDLoss) -> dict[str, float]:
    """Sums over supervised positions of: the run's KD loss (``kd``), KL(p̃‖q̃) to the teacher on its
    renormalised top-k (``kl_to_teacher``, comparable across losses), CE on the actual tokens, top-1
    agreement with the teacher, student mass on the teacher's support; and their count."""
    mask = teacher.mask.float()
    sums = {"kd": 0.0, "kl_to_teacher": 0.0, "ce": 0.0, "top1_agreement": 0.0, "support_mass": 0.0,
            "positions": float(mask.sum())}
    if sums["positions"] == 0:
        return sums
    sums["kd"] = float(loss_fn(student_output(hidden, head, not loss_fn.needs_full_vocabulary), teacher).kd) * sums["positions"]
    for a in range(0, hidden.shape[0], 1024):  # full logits for the metrics, 1024 positions at a time
        b = a + 1024
        logits = head(hidden[a:b]).float()
        log_q = torch.log_softmax(logits, dim=-1)
        m = mask[a:b]
        sums["ce"] += float(-(log_q.gather(1, teacher.target_ids[a:b, None])[:, 0] * m).sum())
        sums["top1_agreement"] += float(((logits.argmax(-1) == teacher.topk_ids[a:b, 0]).float() * m).sum())
        log_q_support = log_q.gather(1, teacher.topk_ids[a:b].long())
        sums["support_mass"] += float((log_q_support.exp().sum(-1) * m).sum())
        log_p = teacher.topk_logprobs[a:b].float()
        kl = forward_kl(log_p - log_p.logsumexp(-1, keepdim=True), log_q_support.log_softmax(-1))
        sums["kl_to_teacher"] += float((kl * m).sum())
    return sums


@torch.no_grad()
def evaluate(module: nn.Module, batches, device, autocast) -> dict[str, float]:
    """Held-out metrics (see :func:`heldout_sums`) averaged over supervised positions, plus perplexity.

    Under several processes every rank runs the same number of batches (the smallest share: forward
    passes are collective under FSDP and DDP) and the sums are added across ranks.
    """
    batches = list(batches)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        count = torch.tensor(len(batches))
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        batches = batches[: int(count)]
    totals = dict.fromkeys(("kd", "kl_to_teacher", "ce", "top1_agreement", "support_mass", "positions"), 0.0)
    for batch in batches:
        with autocast:
            sums = module(student_inputs(batch, device), teacher_targets(batch, device), metrics=True)
        for key, value in sums.items():
            totals[key] += value
    if distributed:
        summed = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(summed)
        totals = dict(zip(totals, summed.tolist()))
    count = totals.pop("positions")
    metrics = {key: value / max(count, 1.0) for key, value in totals.items()}
    metrics["perplexity"] = math.exp(min(metrics.get("ce", 0.0), 50.0))
    metrics["positions"] = count
    return metrics


def distill(config: DistillConfig) -> RunSummary:
    """Train the student on the shards (see the module docstring); one writer per output directory."""
    with exclusive(config.output) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _distill(config)


def _distill(config: DistillConfig) -> RunSummary:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    output = Path(config.output)

    # --- 1. processes and devices --------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(config.seed)

    # --- 2. shards, student, checks ------------------------------------------------------------
    header = check_shard_dirs(config.shards)
    files = list_files(config.shards)
    tokenizer = AutoTokenizer.from_pretrained(model_source(config.student, "student"))
    checkpoints = output / "checkpoints"
    resume_from = latest_checkpoint(checkpoints) if config.resume else None
    if resume_from is None and not config.resume and latest_checkpoint(checkpoints) is not None:
        raise TrainingError(f"{output} already holds checkpoints: use --resume to continue, or another --output")
    model = AutoModelForCausalLM.from_pretrained(resume_from or config.student, dtype=torch.float32).to(device)
    notes = check_student(header, tokenizer, model.get_output_embeddings().weight.shape[0], config.student)
    if config.support == "renormalized" and config.kd_ratio == 1.0:
        notes.append("the renormalised support never sees the student's mass outside the teacher's top-k, which "
                     "can leak there (README, Evidence); --support tail or --kd-ratio < 1 keeps it in check")
    if len(config.shards) > 1:
        repeated = duplicate_ids(files)
        if repeated:
            examples = ", ".join(repr(sample_id) for sample_id in list(repeated)[:5])
            notes.append(f"{len(repeated)} sample ids occur more than once across --shards (e.g. {examples}); those rows "
                         f"are trained on once per copy (`amid-pipeline combine --duplicates drop` writes a view without them)")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    head = model.get_output_embeddings()  # read for its size only; used inside DistillModule
    loss_fn = KDLoss(config.loss, support=config.support, kd_ratio=config.kd_ratio, **config.loss_params)
    recorded = output / "loss.json"
    if resume_from is not None and recorded.exists() and json.loads(recorded.read_text()) != loss_fn.resolved():
        raise TrainingError(f"{recorded} records another objective than this --resume asks for "
                            f"({json.loads(recorded.read_text())} vs {loss_fn.resolved()}): resume with the same loss settings")
    sparse = config.sparse_head == "on" or (config.sparse_head == "auto" and not loss_fn.needs_full_vocabulary)
    settings = DataSettings(batch_size=config.batch_size, max_length=config.max_length, packing=config.packing,
                            shuffle_buffer=config.shuffle_buffer, heldout_fraction=config.heldout_fraction,
                            skip_bad_files=config.skip_bad_files, student_vocab=head.weight.shape[0])
    if config.eval_shards:  # evaluate on those; train on every row of --shards
        check_shard_dirs([*config.shards, *config.eval_shards])
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
    fsdp = world > 1 and config.parallel == "fsdp"
    if fsdp:  # shard every decoder layer, then the rest; the loss runs inside the sharded forward
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, model.base_model_prefix).layers:
            fully_shard(layer)
        fully_shard(module)
    wrapped = nn.parallel.DistributedDataParallel(module) if world > 1 and not fsdp else module
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, config))
    step, epoch, consumed, tokens = 0, 0, 0, 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        load_optimizer_state(module, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        if loss_fn.schedule is not None:
            loss_fn.schedule.load_state_dict(state["loss_schedule"])
        step, epoch, consumed, tokens = state["step"], state["epoch"], state["consumed"], state["tokens"]
        set_rng_state(state["rng"])
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        save_config(config, output / "distill_config.toml")
        write_json_atomic(output / "loss.json", loss_fn.resolved())  # every parameter as it ran, presets expanded
        trim_metrics(output / "metrics.jsonl", step)
        for note in notes:
            print(note if note.startswith("warning:") else f"note: {note}")
        print(f"distill: {len(files)} shard files, {batches_per_epoch} batches/epoch/process, {total_steps} steps, "
              f"{world} process(es), loss {config.loss} ({config.support}), "
              f"{'sparse head' if sparse else 'full logits'}, held out: {heldout}")

    def train_batches(epoch: int, skip: int):
        data = ShardBatches(files, settings, seed=config.seed, epoch=epoch, rank=rank, world=world, skip_batches=skip)
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=config.num_data_workers)
        return data, iter(loader)

    def heldout_batches():
        data = ShardBatches(eval_files, settings, seed=config.seed, rank=rank, world=world,
                            heldout=not config.eval_shards, shuffle=False)
        for index, batch in enumerate(data):
            if index >= config.eval_batches:
                break
            yield batch

    def checkpoint() -> None:
        weights, optimizer_state = full_states(module, optimizer, fsdp)  # collective under FSDP
        if rank == 0:
            save_checkpoint(checkpoints, step, model, tokenizer, {
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "epoch": epoch,
                "consumed": consumed, "tokens": tokens,
                "loss_schedule": loss_fn.schedule.state_dict() if loss_fn.schedule else None,
            }, config.keep_checkpoints, weights=weights)
        if world > 1:
            dist.barrier()

    # --- 4. the step loop ---------------------------------------------------------------------------
    data, batches = train_batches(epoch, consumed)
    batches_per_epoch = epoch_batches(epoch)
    bar = tqdm(total=total_steps, initial=step, disable=not config.progress or rank != 0, unit="step", desc="distill")
    metrics_file = MetricsLog(output, tensorboard=config.tensorboard) if rank == 0 else None
    last_loss, last_eval, run_tokens, run_started = float("nan"), {}, 0, time.perf_counter()
    try:
        while step < total_steps:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            step_loss = step_kd = 0.0
            for micro in range(config.grad_accum):
                if consumed >= batches_per_epoch:  # every process ends its epoch after the same count
                    epoch, consumed = epoch + 1, 0
                    data, batches = train_batches(epoch, 0)
                    batches_per_epoch = epoch_batches(epoch)
                batch = next(batches)
                consumed += 1
                teacher = teacher_targets(batch, device)
                last_micro = micro == config.grad_accum - 1
                sync = wrapped.no_sync() if world > 1 and not fsdp and not last_micro else nullcontext()
                with sync:
                    with autocast:
                        out = wrapped(student_inputs(batch, device), teacher, progress=(step, total_steps))
                    if not torch.isfinite(out.loss):
                        raise TrainingError(
                            f"non-finite loss at step {step + 1} (samples {batch['sample_ids'][:8]}, files "
                            f"{batch['files']}); the last checkpoint in {checkpoints} is intact")
                    (out.loss / config.grad_accum).backward()
                step_loss += float(out.loss.detach()) / config.grad_accum
                step_kd += float(out.kd.detach()) / config.grad_accum
                tokens += batch["tokens"] * world
                run_tokens += batch["tokens"] * world
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf")))
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
                model.eval()
                last_eval = evaluate(wrapped, heldout_batches(), device, autocast)
                if metrics_file:
                    metrics_file.write({"step": step, "eval": last_eval})
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                checkpoint()
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    # --- 5. the final model ---------------------------------------------------------------------------
    weights, _ = full_states(module, None, fsdp)
    if rank == 0:
        final = output / "model"
        model.save_pretrained(final, state_dict=weights)
        tokenizer.save_pretrained(final)
    if world > 1:
        dist.barrier()
    return RunSummary(output=output, steps=step, tokens=tokens, seconds=time.perf_counter() - started,
                      final_loss=last_loss, eval=last_eval, heldout=heldout,
                      bad_files=data.bad_files, sparse_head=sparse)


def full_states(module: DistillModule, optimizer, fsdp: bool) -> tuple[dict | None, dict | None]:
    """(full model state dict for ``save_pretrained`` or None = the model's own, optimizer state).

    Under FSDP both are gathered from the shards (every rank must call this) into rank 0's CPU memory.
    """
    if not fsdp:
        return None, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=options).items()}
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    return weights, optimizer_state


def load_optimizer_state(module: DistillModule, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


class MetricsLog:
    """``RUN_DIR/metrics.jsonl`` (one JSON object per line, always) and TensorBoard event files under
    ``RUN_DIR/tensorboard`` when the ``tensorboard`` package is installed (``tensorboard`` setting on)."""

    def __init__(self, output: Path, tensorboard: bool) -> None:
        self.file = open(output / "metrics.jsonl", "a", encoding="utf-8")
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.board = SummaryWriter(str(output / "tensorboard"))

    def write(self, payload: dict[str, Any]) -> None:
        self.file.write(json.dumps(payload) + "\n")
        self.file.flush()
        if self.board is not None:
            scalars = payload.get("eval", payload)
            prefix = "eval/" if "eval" in payload else "train/"
            for key, value in scalars.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.board.add_scalar(prefix + key, value, payload["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curves have each step once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
