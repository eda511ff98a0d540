"""Supervised fine-tuning on dataset rows: the recipe stage before distillation.

    amid-pipeline sft -c stages/sft_teacher_jargon.toml       # make the teacher an expert on the data
    amid-pipeline sft -c stages/heal_student_jargon.toml      # heal a pruned student to a plateau

The objective is the mean over supervised tokens of −log q(y_t | y_<t), on exactly the tokens and
targets that ``cache-teacher`` would store for the same rows (both tokenise through
:mod:`amid_pipeline.dataset.examples`: same chat template, same supervised assistant tokens).

Phases: (1) rows → examples, split into train and dev (a dev file, or sample ids held out by a stable
hash); (2) model, AdamW, warm-up + decay, resume; (3) the step loop: a batch in (seed, epoch) order →
CE at the supervised positions → clip → step → log; every ``eval_every`` steps the dev loss, the best
model so far written to ``OUTPUT/model``, and a stop after ``patience`` evaluations without a new best;
(4) a final checkpoint marked done, so ``--resume`` of a finished run does nothing. The paper's
protocol (AMiD, MiniLLM) fine-tunes teacher and student this way and keeps the checkpoint with the
best validation loss. One process (no torchrun).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amid_pipeline.config import save_config
from amid_pipeline.dataset.examples import Example, dataset_examples
from amid_pipeline.models import emulated_bfloat16_warning, model_source, resolve_device
from amid_pipeline.shards.storage import write_json_atomic
from amid_pipeline.train.checkpoint import (
    load_trainer_state,
    resume_point,
    save_checkpoint,
    save_model,
    set_rng_state,
)
from amid_pipeline.train.checks import RUN_RECORD, TrainingError, model_fingerprint, run_record
from amid_pipeline.train.config import SFTConfig
from amid_pipeline.train.metrics import MetricsLog, trim_metrics
from amid_pipeline.train.order import is_heldout


@dataclasses.dataclass
class SFTSummary:
    output: Path
    steps: int
    tokens: int
    seconds: float
    train_examples: int
    dev_examples: int
    skipped: dict[str, int]
    best_step: int | None
    best_dev_loss: float | None
    stopped_early: bool


def split_examples(examples: list[Example], config: SFTConfig, dev: list[Example] | None
                   ) -> tuple[list[Example], list[Example]]:
    """(train, dev): the dev file's examples, else the sample ids whose stable hash falls in ``dev_fraction``.
    Windows of one row (``id#wN``) share their row's fate."""
    if dev is not None:
        return examples, dev
    held = [is_heldout(e.sample_id.split("#")[0], config.dev_fraction) for e in examples]
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """Example order of one epoch: a permutation seeded by (seed, epoch)."""
    order = list(range(count))
    random.Random(f"sft:{seed}:{epoch}").shuffle(order)
    return order


def collate_examples(examples: list[Example]) -> dict[str, torch.Tensor]:
    """``input_ids`` [B, T] (right-padded), ``attention_mask`` [B, T], and per supervised prediction
    position (N of them): ``row`` [N], ``column`` [N] and ``target_ids`` [N] (the next token)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    attention = torch.zeros(len(examples), width, dtype=torch.long)
    rows, columns, targets = [], [], []
    for b, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[b, :length] = torch.from_numpy(example.input_ids.astype(np.int64))
        attention[b, :length] = 1
        positions = np.flatnonzero(example.target_mask[1:])
        rows.append(np.full(len(positions), b))
        columns.append(positions)
        targets.append(example.input_ids[positions + 1].astype(np.int64))
    return {"input_ids": input_ids, "attention_mask": attention,
            "row": torch.from_numpy(np.concatenate(rows)), "column": torch.from_numpy(np.concatenate(columns)),
            "target_ids": torch.from_numpy(np.concatenate(targets))}


def supervised_ce_sum(model: nn.Module, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, int]:
    """(Σ over supervised positions of −log q(target), their count N); the LM head runs only at those
    N positions ([N, V] logits, fp32 log-softmax)."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    logits = model.get_output_embeddings()(hidden[batch["row"].to(device), batch["column"].to(device)])
    loss = nn.functional.cross_entropy(logits.float(), batch["target_ids"].to(device), reduction="sum")
    return loss, int(batch["target_ids"].numel())


@torch.no_grad()
def dev_loss(model: nn.Module, examples: list[Example], batch_size: int, device, autocast) -> dict[str, float]:
    """Mean CE over every supervised position of ``examples``, and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    for start in range(0, len(ordered), batch_size):
        with autocast:
            loss, n = supervised_ce_sum(model, collate_examples(ordered[start : start + batch_size]), device)
        total, count = total + float(loss), count + n
    ce = total / max(count, 1)
    return {"ce": ce, "perplexity": math.exp(min(ce, 50.0)), "positions": count}


def examples_fingerprint(examples: list[Example]) -> str:
    """sha256 over the tokenised examples (ids, tokens, supervised mask): the data as trained on, whatever
    file, template or tokenizer produced it."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.sample_id.encode() + b"\0" + example.input_ids.astype(np.int64).tobytes()
                      + example.target_mask.astype(np.uint8).tobytes())
    return digest.hexdigest()


def sft(config: SFTConfig) -> SFTSummary:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    output = Path(config.output)
    device = torch.device(resolve_device())
    use_bf16 = config.uses_bfloat16(device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    torch.manual_seed(config.seed)

    # --- 1. data: rows -> examples (capture's tokenisation), train / dev ---------------------------------
    source = model_source(config.model, "model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    examples, skipped = dataset_examples(config, tokenizer)
    dev = None
    if config.dev_dataset:
        dev, dev_skipped = dataset_examples(dataclasses.replace(config, dataset=config.dev_dataset, start=0, limit=None),
                                            tokenizer)
        skipped.update({f"dev: {reason}": n for reason, n in dev_skipped.items()})
    train, dev = split_examples(examples, config, dev)
    if not train:
        raise TrainingError(f"{config.dataset}: no training examples (skipped: {skipped or 'none'})")
    if config.patience and not dev:
        raise TrainingError("patience needs a dev split: give --dev-dataset or a --dev-fraction above 0")
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.max_steps or max(batches_per_epoch * config.epochs // config.grad_accum, 1)

    # --- 2. model, optimiser, schedule, resume ----------------------------------------------------------
    checkpoints = output / "checkpoints"
    record = run_record(config, {"model": model_fingerprint(source), "dataset": examples_fingerprint(train),
                                 "dev_dataset": examples_fingerprint(dev or [])})
    resume_from = resume_point(output, config.resume, record)
    model = AutoModelForCausalLM.from_pretrained(resume_from or source, dtype=torch.float32).to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_factor(s, total_steps))
    state = {"step": 0, "consumed": 0, "tokens": 0, "best_step": None, "best_dev_loss": None, "bad_evals": 0, "done": False}
    if resume_from is not None:
        saved = load_trainer_state(resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["sft"]
        set_rng_state(saved["rng"])
    output.mkdir(parents=True, exist_ok=True)
    if resume_from is None or not (output / RUN_RECORD).exists():  # a resumed run keeps the record it was started with
        save_config(config, output / "sft_config.toml")
        write_json_atomic(output / RUN_RECORD, record)
    trim_metrics(output / "metrics.jsonl", state["step"])
    warning = emulated_bfloat16_warning(config.dtype, device.type)
    if warning:
        print(warning)
    print(f"sft: {len(train)} training and {len(dev)} dev examples, {total_steps} steps of "
          f"{config.batch_size * config.grad_accum} sequences, device {device.type}")

    def summary() -> SFTSummary:
        return SFTSummary(output=output, steps=state["step"], tokens=state["tokens"], seconds=time.perf_counter() - started,
                          train_examples=len(train), dev_examples=len(dev), skipped=skipped, best_step=state["best_step"],
                          best_dev_loss=state["best_dev_loss"], stopped_early=state["done"] and state["step"] < total_steps)

    if state["done"]:
        return summary()

    def evaluate_dev() -> bool:
        """Dev loss at this step; the model is kept when it is the best so far. True = plateau reached."""
        metrics = dev_loss(model, dev, config.batch_size, device, autocast)
        log.write({"step": state["step"], "eval": metrics})
        if state["best_dev_loss"] is None or metrics["ce"] < state["best_dev_loss"]:
            state.update(best_dev_loss=metrics["ce"], best_step=state["step"], bad_evals=0)
            save_model(model, tokenizer, output / "model")
        else:
            state["bad_evals"] += 1
        return bool(config.patience) and state["bad_evals"] >= config.patience

    def checkpoint() -> None:
        save_checkpoint(checkpoints, state["step"], model, tokenizer, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sft": dict(state)},
            config.keep_checkpoints)

    # --- 3. the step loop -------------------------------------------------------------------------------
    log = MetricsLog(output)
    bar = tqdm(total=total_steps, initial=state["step"], disable=not config.progress, unit="step", desc="sft")
    plateau = False
    try:
        if state["step"] == 0 and dev:
            plateau = evaluate_dev()  # the starting point: step 0 of the curves, and the model to beat
        while state["step"] < total_steps and not plateau:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for _ in range(config.grad_accum):
                epoch, index = divmod(state["consumed"], batches_per_epoch)
                order = epoch_order(len(train), config.seed, epoch)
                batch_examples = [train[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
                with autocast:
                    loss_sum, count = supervised_ce_sum(model, collate_examples(batch_examples), device)
                loss = loss_sum / max(count, 1)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss at step {state['step'] + 1} (samples "
                                        f"{[e.sample_id for e in batch_examples[:8]]})")
                (loss / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                step_tokens += sum(len(e.input_ids) for e in batch_examples)
                state["consumed"] += 1
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf")))
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["tokens"] += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            last = state["step"] == total_steps
            if state["step"] % config.log_every == 0 or last:
                log.write({"step": state["step"], "epoch": state["consumed"] // batches_per_epoch, "loss": step_loss,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": state["tokens"]})
            if dev and ((config.eval_every and state["step"] % config.eval_every == 0) or last):
                plateau = evaluate_dev()
            if (config.save_every and state["step"] % config.save_every == 0) and not (last or plateau):
                checkpoint()

        # --- 4. done: the best model is in OUTPUT/model (the last one when there is no dev split) ----------
        if not dev:
            save_model(model, tokenizer, output / "model")
        state["done"] = True
        checkpoint()
    finally:
        bar.close()
        log.close()
    return summary()
