"""The whole pipeline on one accelerator, in one command, from nothing but torch, transformers and this
repository: a synthetic teacher and student built from configs (random weights, no download), hf capture,
``distill`` with the default objective through the fused head (bf16 autocast on a GPU), a kill between
checkpoints and its resume (compared with the run that was not killed), the same run on full logits (its
time and memory beside the fused head's), the fused head under bf16 autocast (on a CPU too), held-out
evaluation and generation. Each stage prints its time (the device synchronised) and its peak memory (CUDA's allocator on
a GPU, the process's resident peak so far on a CPU); any failure stops the script with a non-zero exit.

    python benchmarks/gpu_smoke.py                       # --size gpu on a GPU, cpu otherwise
    python benchmarks/gpu_smoke.py --size cpu --work /tmp/smoke    # the same stages, tiny (a test runs this)

Every finished stage is appended to WORK/smoke.jsonl at once, so a command cut off by a time limit still
returns what ran. Sizes: ``gpu`` = a 12 × 1024 teacher and a 4 × 1024 student on a 32,768-id head (the
Jargon BPE, padded), 512 rows of up to 512 tokens, k = 64, 2 × 40 steps of 8 sequences: a few minutes on
one H100/H200 (start-up included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "cpu": {"teacher": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128},
            "student": {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128},
            "vocab": 512, "head": 512, "rows": 32, "max_length": 128, "k": 16, "steps": 4, "batch": 4},
    "gpu": {"teacher": {"layers": 12, "hidden": 1024, "heads": 16, "intermediate": 4096},
            "student": {"layers": 4, "hidden": 1024, "heads": 16, "intermediate": 4096},
            "vocab": 2048, "head": 32768, "rows": 512, "max_length": 512, "k": 64, "steps": 40, "batch": 8},
}


FOLDERS = ("tokenizer", "teacher", "student", "shards", "distill", "killed", "full", "sparse")  # what a run writes in WORK


class Stages:
    """Runs named stages, timing each and recording its peak memory; writes each result as it finishes."""

    def __init__(self, work: Path, device: str):
        self.log, self.device, self.results = work / "smoke.jsonl", device, []
        self.log.unlink(missing_ok=True)

    def run(self, name: str, work, *arguments, **options):
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = work(*arguments, **options)
        if cuda:
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        record = {"stage": name, "seconds": round(time.perf_counter() - started, 2), "peak_gib": round(peak / 2**30, 3),
                  "memory": "CUDA allocated, this stage" if cuda else "process RSS, so far",
                  **(result if isinstance(result, dict) else {})}
        self.results.append(record)
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name:<28} {record['seconds']:>8.1f} s  {record['peak_gib']:>7.2f} GiB  "
              + " ".join(f"{k}={v}" for k, v in record.items() if k not in ("stage", "seconds", "peak_gib", "memory")),
              flush=True)
        return result


def build_models(work: Path, size: dict) -> dict:
    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "data" / "tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tokenizer = tiny.build_tokenizer(work / "tokenizer", vocab_size=size["vocab"])
    padding = max(0, size["head"] - len(tokenizer))
    for role, seed in (("teacher", 0), ("student", 1)):
        tiny.build_llama(work / role, tokenizer, **size[role], seed=seed, head_padding=padding, head_scale=8.0,
                         max_positions=2 * size["max_length"])
    return {"vocabulary": len(tokenizer) + padding}


def capture(work: Path, size: dict, dtype: str) -> dict:
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config
    from amid_pipeline.shards.stats import collect_stats

    config = load_config(CaptureConfig, None, {
        "teacher": str(work / "teacher"), "dataset": str(ROOT / "data" / "jargon" / "train.jsonl"),
        "output": str(work / "shards"), "limit": size["rows"], "backend": "hf", "dtype": dtype, "k": size["k"],
        "max_length": size["max_length"], "progress": False})
    run_capture(config)
    stats = collect_stats(str(work / "shards"))
    return {"positions": stats.positions, "bytes_per_position": round(stats.bytes_per_position, 1)}


def distill_settings(work: Path, size: dict, run: str, **overrides):
    from amid_pipeline.config import load_config
    from amid_pipeline.train.config import DistillConfig

    return load_config(DistillConfig, None, {
        "shards": [str(work / "shards")], "student": str(work / "student"), "output": str(work / run),
        "batch_size": size["batch"], "max_length": size["max_length"], "max_steps": 2 * size["steps"],
        "save_every": size["steps"], "eval_every": size["steps"], "eval_batches": 4, "lr": 3e-4, "warmup_steps": 2,
        "heldout_fraction": 0.1, "progress": False, "report_to": ["none"], "dtype": "auto", **overrides})


def train(work: Path, size: dict, run: str, **overrides) -> dict:
    from amid_pipeline.train.loop import distill

    summary = distill(distill_settings(work, size, run, **overrides))
    if not torch.isfinite(torch.tensor(summary.final_loss)):
        raise SystemExit(f"{run}: the final loss is not finite ({summary.final_loss})")
    return {"steps": summary.steps, "loss": round(summary.final_loss, 4), "sparse_head": summary.sparse_head,
            "tokens_per_s": round(summary.tokens / summary.seconds)}


def killed_and_resumed(work: Path, size: dict) -> dict:
    """The same run killed one step after its first checkpoint, then resumed: its final weights against the
    run that was never killed (equal on a CPU; on a GPU nondeterministic kernels may differ slightly)."""
    from safetensors.torch import load_file

    from amid_pipeline.losses import KDLoss
    from amid_pipeline.train.loop import distill

    original = KDLoss.end_step

    def kill_after_checkpoint(self, finished, total, kd_value):
        if finished == size["steps"] + 1:
            raise KeyboardInterrupt  # as a kill -9 between two checkpoints
        return original(self, finished, total, kd_value)

    KDLoss.end_step = kill_after_checkpoint
    try:
        distill(distill_settings(work, size, "killed"))
        raise SystemExit("the run was not killed")
    except KeyboardInterrupt:
        pass
    finally:
        KDLoss.end_step = original
    summary = distill(distill_settings(work, size, "killed", resume=True))
    resumed, straight = (load_file(work / run / "model" / "model.safetensors") for run in ("killed", "distill"))
    difference = max(float((resumed[name].float() - straight[name].float()).abs().max()) for name in straight)
    if summary.steps != 2 * size["steps"]:
        raise SystemExit(f"the resumed run ended at step {summary.steps}, not {2 * size['steps']}")
    return {"steps": summary.steps, "max_weight_difference": difference}


def evaluate_and_generate(work: Path) -> dict:
    from amid_pipeline.evaluate import evaluate_on_shards, generate_responses, load_model, read_prompts

    model, tokenizer = load_model(work / "distill" / "model")
    metrics = evaluate_on_shards(model, work / "shards", max_batches=8)
    prompts = read_prompts(ROOT / "data" / "jargon" / "heldout.jsonl", 8)[0]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0)
    if not all(metrics[key] == metrics[key] for key in metrics) or len(responses) != len(prompts):
        raise SystemExit(f"evaluation failed: {metrics}, {len(responses)} responses")
    return {"kl_to_teacher": round(metrics["kl_to_teacher"], 4), "perplexity": round(metrics["perplexity"], 1),
            "device": str(model.device), "responses": len(responses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-smoke"))
    parser.add_argument("--size", choices=tuple(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    size, device = SIZES[args.size], "cuda" if torch.cuda.is_available() else "cpu"
    for folder in FOLDERS:  # every run starts from nothing
        shutil.rmtree(args.work / folder, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"size {args.size}", flush=True)
    stages = Stages(args.work, device)
    stages.run("models", build_models, args.work, size)
    stages.run("capture (hf)", capture, args.work, size, "bfloat16" if device == "cuda" else "float32")
    stages.run("distill (default objective)", train, args.work, size, "distill")
    stages.run("kill and resume", killed_and_resumed, args.work, size)
    stages.run("distill (full logits)", train, args.work, size, "full", sparse_head="off", max_steps=size["steps"],
               save_every=0)
    stages.run("distill (fused head, bf16)", train, args.work, size, "sparse", sparse_head="on", dtype="bfloat16",
               max_steps=size["steps"], save_every=0)
    stages.run("eval and generation", evaluate_and_generate, args.work)
    print(f"smoke: all {len(stages.results)} stages passed ({args.work / 'smoke.jsonl'})")


if __name__ == "__main__":
    main()
