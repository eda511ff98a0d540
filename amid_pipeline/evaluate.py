"""Evaluate a model folder on held-out data: against teacher shards, and by generating responses.

- :func:`evaluate_on_shards`: for every stored supervised position of a shard directory, the model's
  cross-entropy on the actual next token (perplexity on the responses), KL(p̃‖q̃) to the teacher on its
  renormalised top-k support, top-1 agreement with the teacher and the model's mass on that support.
- :func:`rouge_l_on_prompts`: greedy responses to held-out prompts, scored with ROUGE-L F1 (word-level
  longest common subsequence) against the references, the metric the AMiD paper reports.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from amid_pipeline.losses import KDLoss
from amid_pipeline.models import model_source
from amid_pipeline.train.data import DataSettings, ShardBatches, list_files
from amid_pipeline.train.trainer import DistillModule, evaluate


def load_model(path: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_source(path, "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_on_shards(model, shards: str | Path, *, batch_size: int = 8, max_length: int = 1024,
                       max_batches: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Metrics over every row of ``shards`` (or its first ``max_batches`` batches)."""
    settings = DataSettings(batch_size=batch_size, max_length=max_length, heldout_fraction=0.0,
                            student_vocab=model.get_output_embeddings().weight.shape[0])
    data = ShardBatches(list_files([str(shards)]), settings, seed=0, shuffle=False)
    batches = (b for i, b in enumerate(data) if max_batches is None or i < max_batches)
    module = DistillModule(model, KDLoss("forward_kl"), sparse=True)
    metrics = evaluate(module, batches, torch.device(device), nullcontext())
    metrics.pop("kd")  # the same forward KL as kl_to_teacher here
    return metrics


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts, on lower-cased whitespace tokens."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def rouge_l_on_prompts(model, tokenizer, data: str | Path, *, limit: int = 20, max_new_tokens: int = 64,
                       prompt_field: str = "prompt", response_field: str = "response") -> dict[str, float]:
    """Mean ROUGE-L F1 (×100) of greedy responses to the first ``limit`` prompts of a JSONL file."""
    scores = []
    with open(data, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(limit))]
    for row in rows:
        prompt = tokenizer(row[prompt_field], return_tensors="pt").input_ids.to(model.device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        scores.append(rouge_l(text, row[response_field]))
    return {"rouge_l": 100 * sum(scores) / max(len(scores), 1), "generated": len(scores)}
