"""Stage-one throughput: the engine alone vs cache-teacher end to end, on the same model and data.

    python benchmarks/capture.py [--backend vllm|hf] [--rows 100] [--k 64] [--dtype bfloat16]

Prints tokens/s for (a) the engine's plain prompt processing (vLLM: max_tokens=1, no logprobs; hf: a
forward pass computing logits at every position), (b) the engine with prompt_logprobs=k and nothing
written (hf: forward + fp32 log_softmax + top-k), (c) cache-teacher end to end (tokenising, engine,
conversion, writing zstd shards), and the ratios c/b and c/a. Default teacher: SmolLM2-135M-Instruct
(offline), data: the shipped jargon pairs, every position stored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.capture.backends import HFBackend, VLLMBackend  # noqa: E402
from amid_pipeline.capture.config import CaptureConfig  # noqa: E402
from amid_pipeline.capture.generation import iter_examples  # noqa: E402
from amid_pipeline.capture.run import run_capture  # noqa: E402
from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.dataset.examples import load_rows, resolve_format  # noqa: E402
from amid_pipeline.models import smollm2_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--teacher", default=None, help="model folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    teacher = args.teacher or str(smollm2_teacher())
    out = tempfile.mkdtemp()
    config = load_config(CaptureConfig, None, {
        "teacher": teacher, "dataset": str(ROOT / "data" / "jargon" / "train.jsonl"), "output": out,
        "limit": args.rows, "k": args.k, "dtype": args.dtype, "backend": args.backend, "positions": "all",
        "max_length": 512, "batch_tokens": args.batch_tokens, "progress": False,
    })
    from transformers import AutoTokenizer

    rows = load_rows(config)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    fmt = resolve_format(config, rows.column_names)
    sequences = [e.input_ids for examples in iter_examples(rows, list(range(len(rows))), fmt, tokenizer, config, {})
                 for e in examples]
    tokens = sum(len(s) for s in sequences)

    if args.backend == "vllm":
        backend = VLLMBackend(teacher, k=args.k, dtype=args.dtype, max_length=512, batch_tokens=args.batch_tokens)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences]
        plain = SamplingParams(max_tokens=1, detokenize=False)
        backend.engine.generate(prompts[:4], plain, use_tqdm=False)  # warm-up
        t_plain = timed(lambda: backend.engine.generate(prompts, plain, use_tqdm=False))
        t_logprobs = timed(lambda: backend.engine.generate(prompts, backend.params, use_tqdm=False))
        labels = ("vLLM prompt processing, no logprobs", f"vLLM prompt_logprobs={args.k}, nothing written")
    else:
        backend = HFBackend(teacher, k=args.k, dtype=args.dtype, batch_tokens=args.batch_tokens)

        def forward_only() -> None:
            with torch.no_grad():
                for seq in sequences:
                    backend.model(input_ids=torch.as_tensor(seq[None].astype(np.int64))).logits.float()

        backend.score(sequences[:2])  # warm-up
        t_plain = timed(forward_only)
        t_logprobs = timed(lambda: backend.score(sequences))
        labels = ("hf forward, logits at every position", f"hf forward + log_softmax + top-{args.k}, nothing written")
    summary = run_capture(config, backend=backend)
    t_end = summary.seconds
    assert summary.tokens == tokens, (summary.tokens, tokens)
    table = [
        [labels[0], tokens, t_plain, round(tokens / t_plain), 1.0],
        [labels[1], tokens, t_logprobs, round(tokens / t_logprobs), t_plain / t_logprobs],
        ["cache-teacher end to end (writes shards)", tokens, t_end, round(tokens / t_end), t_plain / t_end],
    ]
    print(f"teacher {teacher}, {len(sequences)} sequences, k={args.k}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print_table(f"Capture throughput ({args.backend})", ["what", "tokens", "seconds", "tokens/s", "vs plain"], table)
    print(f"\nend to end / engine with logprobs: {t_logprobs / t_end:.3f}   end to end / plain: {t_plain / t_end:.3f}")
    print(f"shards: {summary.bytes / summary.positions:.1f} bytes per position")


if __name__ == "__main__":
    main()
