"""Evaluate a model folder on held-out data: against teacher shards, and by generating responses.

- :func:`evaluate_on_shards`: for every stored supervised position of a shard directory, the model's
  cross-entropy on the actual next token (perplexity on the responses), KL(p̃‖q̃) to the teacher on its
  renormalised top-k support, top-1 agreement with the teacher and the model's mass on that support.
- :func:`teacher_on_its_shards`: the same metrics for the teacher itself, read from its top-k shards
  instead of running it.
- :func:`rouge_l_on_prompts`: responses to held-out prompts (rendered with the model's chat template,
  batched, greedy and optionally sampled over several seeds), scored with ROUGE-L as the AMiD, MiniLLM
  and DistiLLM papers compute it (``rouge-score``, stemmed, max over references, × 100).
"""

from __future__ import annotations

import functools
import json
import statistics
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from amid_pipeline.alignment.rows import CrossTokenizer, teacher_tokenizer_of
from amid_pipeline.chat import cut_at_stop, render_prompt, stop_token_ids, uses_chat_template
from amid_pipeline.losses import KDLoss
from amid_pipeline.models import model_source, resolve_device, tokenizer_fingerprint
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.train.data import DataSettings, ShardBatches, ShardSet
from amid_pipeline.train.distributed import Processes
from amid_pipeline.train.metrics import evaluate
from amid_pipeline.train.step import DistillModule, HeadLogits


def load_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer) of the HF folder ``path``, in float32 on ``device`` (auto: the GPU when there is one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_source(path, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(resolve_device(device)).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_on_shards(model, shards: str | Path, *, batch_size: int = 8, max_length: int = 1024,
                       max_batches: int | None = None, progress: str | None = None, tokenizer=None,
                       teacher_tokenizer: str | None = None) -> dict[str, float]:
    """Metrics over every row of ``shards`` (or its first ``max_batches`` batches), on the model's device;
    ``progress``: the label of a progress bar over the batches (None: none). With the model's ``tokenizer``,
    a model of another tokenizer than the shards' is measured on the rows aligned to its own tokens
    (cross-tokenizer, docs/cross-tokenizer.md; the teacher's tokenizer from ``teacher_tokenizer`` or the
    shards' copy)."""
    cross = None
    shard_set = ShardSet.open([str(shards)])
    if tokenizer is not None and tokenizer_fingerprint(tokenizer)["fingerprint"] != shard_set.header.tokenizer.get("fingerprint"):
        cross = CrossTokenizer.build(teacher_tokenizer_of(shard_set.manifests[0], teacher_tokenizer), tokenizer)
    settings = DataSettings(batch_size=batch_size, max_length=max_length, heldout_fraction=0.0,
                            student_vocab=model.get_output_embeddings().weight.shape[0], cross=cross)
    data = ShardBatches(shard_set.files, settings, seed=0, shuffle=False)
    batches = (b for i, b in enumerate(data) if max_batches is None or i < max_batches)
    batches = tqdm(batches, desc=progress, unit="batch", disable=progress is None)
    fused = HeadLogits.of(model).fused_refusal(model.get_output_embeddings()) is None
    module = DistillModule(model, KDLoss("forward_kl"), sparse=fused)
    metrics = evaluate(module, batches, Processes(1, 0, model.device), nullcontext())
    metrics.pop("kd")  # forward KL on the tail support: kl_with_rest again
    return metrics


def teacher_on_its_shards(shards: str | Path) -> dict[str, float]:
    """:func:`evaluate_on_shards`'s metrics for the teacher that wrote the top-k ``shards``, without running
    it: over the supervised positions t, perplexity exp(−mean_t log p(y_t)) from the stored log-probability
    of the actual token, and ``support_mass`` mean_t Σ_{i∈S_t} p_i; both KLs are 0 and top-1 agreement is 1
    by definition (its own top-k). Equal to evaluating the teacher in the capture's dtype up to the storage
    encoding's rounding (uint16: |error| ≤ 1/128 per stored log-probability)."""
    reader = ShardReader(str(shards))
    if reader.header.sampling is not None:
        raise ValueError(f"{shards}: the teacher's metrics need top-k shards (these hold {reader.header.target_kind} targets)")
    nll = mass = positions = 0.0
    for row in reader:
        supervised = row.loss_mask.astype(bool)
        nll -= float(row.target_logprob[supervised].astype(np.float64).sum())
        mass += float(np.exp(row.topk_logprobs[supervised].astype(np.float64)).sum())
        positions += int(supervised.sum())
    if not positions:
        raise ValueError(f"{shards}: no supervised positions")
    return {"perplexity": float(np.exp(nll / positions)), "kl_with_rest": 0.0, "kl_to_teacher": 0.0,
            "top1_agreement": 1.0, "support_mass": mass / positions, "positions": positions}


def perplexity_on_data(model, tokenizer, data: str | Path, *, limit: int | None = None, chat_template: str = "auto",
                       max_length: int = 2048, batch_size: int = 8, prompt_field: str = "prompt",
                       response_field: str = "response") -> dict[str, float]:
    """Perplexity of the reference responses of a dataset, tokenised as ``cache-teacher`` and ``sft``
    would (``prompt_response``, the model's chat template unless ``chat_template`` is off): exp of the
    mean CE over every supervised token (``data_ce``, ``data_perplexity``, ``data_positions``), and the rows
    that have no single response to score (``data_skipped_rows``)."""
    from amid_pipeline.dataset.examples import dataset_examples
    from amid_pipeline.dataset.settings import DatasetSettings
    from amid_pipeline.train.sft import dev_loss

    settings = DatasetSettings(dataset=str(data), limit=limit, data_format="prompt_response", chat_template=chat_template,
                               max_length=max_length, prompt_field=prompt_field, response_field=response_field)
    examples, skipped = dataset_examples(settings, tokenizer)
    metrics = dev_loss(model, examples, batch_size, model.device, nullcontext())
    metrics["skipped_rows"] = sum(skipped.values())  # e.g. a list of references: no single response to score
    return {f"data_{key}": value for key, value in metrics.items()}


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, references: str | list[str]) -> float:
    """ROUGE-L F1 × 100 as the distillation papers report it (MiniLLM, DistiLLM, AMiD): the
    ``rouge-score`` package's longest-common-subsequence F-measure with its tokenizer (lower case,
    runs of [a-z0-9]) and the Porter stemmer, the maximum over the references."""
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    scorer = _rouge_scorer()
    return 100 * max(scorer.score(reference, candidate)["rougeL"].fmeasure for reference in references)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], *, chat_template: str = "auto", max_new_tokens: int = 64,
                       temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                       progress: str | None = None) -> list[str]:
    """One response per prompt: greedy (``temperature`` 0) or sampled at ``temperature`` from the full
    distribution (top-k 0, top-p 1), in batches of prompts of similar length, left-padded; ``progress``:
    the label of a progress bar over the prompts (None: none).

    Prompts are rendered as one user turn under the model's chat template (``chat_template`` auto: when it
    has one) and each response stops at EOS or the template's end of turn. Batch b is sampled with seed
    ``seed + b``, so a run is reproducible.
    """
    templated = uses_chat_template(chat_template, tokenizer, getattr(model, "name_or_path", "the model"))
    stops = stop_token_ids(tokenizer, templated)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    encoded = [render_prompt(prompt, tokenizer, templated) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sample = temperature > 0
    responses: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None)
    for b, start in enumerate(range(0, len(order), batch_size)):
        chosen = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chosen)
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        attention = torch.zeros(len(chosen), width, dtype=torch.long)
        for row, i in enumerate(chosen):  # left padding: every prompt ends where generation starts
            ids[row, width - len(encoded[i]):] = torch.from_numpy(encoded[i].astype(np.int64))
            attention[row, width - len(encoded[i]):] = 1
        torch.manual_seed(seed + b)
        out = model.generate(ids.to(model.device), attention_mask=attention.to(model.device), do_sample=sample,
                             temperature=temperature if sample else None, top_k=0 if sample else None,
                             top_p=1.0 if sample else None, max_new_tokens=max_new_tokens,
                             eos_token_id=stops or None, pad_token_id=pad)
        for row, i in enumerate(chosen):
            tokens = cut_at_stop(out[row, width:].cpu().numpy(), stops)
            responses[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        bar.update(len(chosen))
    bar.close()
    return responses


def read_prompts(data: str | Path, limit: int | None, prompt_field: str = "prompt",
                 response_field: str = "response") -> tuple[list[str], list[list[str]]]:
    """(prompts, references per prompt) from the first ``limit`` rows of a JSONL file; a list in the
    response field gives several references."""
    prompts, references = [], []
    with open(data, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{data}, line {number}: not JSON ({exc})") from exc
            prompt, reference = row.get(prompt_field), row.get(response_field)
            reference = [reference] if isinstance(reference, str) else reference
            if not isinstance(prompt, str) or not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
                raise ValueError(f"{data}, line {number}: needs a string {prompt_field!r} and a string (or list of "
                                 f"strings) {response_field!r}; found fields {sorted(row)}")
            prompts.append(prompt)
            references.append(reference)
    return prompts, references


def rouge_l_on_prompts(model, tokenizer, data: str | Path, *, limit: int | None = None, max_new_tokens: int = 64,
                       sample_seeds: int = 0, temperature: float = 1.0, batch_size: int = 16, chat_template: str = "auto",
                       prompt_field: str = "prompt", response_field: str = "response",
                       progress: str | None = None) -> dict[str, float]:
    """ROUGE-L (× 100, see :func:`rouge_l`) of responses to the first ``limit`` prompts of a JSONL file:
    greedy (``rouge_l``), and with ``sample_seeds`` > 0 sampled at ``temperature`` once per seed
    (``rouge_l_sampled``: mean over seeds of the per-run mean; ``rouge_l_sampled_sd``: their sd).
    ``greedy_words`` and ``reference_words``: mean words per greedy answer and per (first) reference —
    ROUGE-L's F-measure falls with a length mismatch, e.g. answers cut by ``max_new_tokens``. ``progress``:
    the label of the progress bars of the generation runs (None: none)."""
    prompts, references = read_prompts(data, limit, prompt_field, response_field)
    settings = {"chat_template": chat_template, "max_new_tokens": max_new_tokens, "batch_size": batch_size}

    def score(responses: list[str]) -> float:
        return sum(rouge_l(r, refs) for r, refs in zip(responses, references)) / max(len(references), 1)

    def mean_words(texts: list[str]) -> float:
        return statistics.fmean(len(text.split()) for text in texts) if texts else 0.0

    def label(run: str) -> str | None:
        return None if progress is None else f"{progress}: {run}"

    greedy = generate_responses(model, tokenizer, prompts, progress=label("greedy"), **settings)
    metrics = {"rouge_l": score(greedy), "generated": len(prompts), "greedy_words": mean_words(greedy),
               "reference_words": mean_words([refs[0] for refs in references])}
    if sample_seeds:
        runs = [score(generate_responses(model, tokenizer, prompts, temperature=temperature, seed=1000 * seed,
                                         progress=label(f"sampled, seed {seed}"), **settings))
                for seed in range(sample_seeds)]
        metrics["rouge_l_sampled"] = statistics.fmean(runs)
        metrics["rouge_l_sampled_sd"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
    return metrics
