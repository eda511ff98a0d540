"""The fused head against full logits: time and peak memory of the LM head plus loss, and of a training step.

    python benchmarks/fused_head.py                      # CPU: float32; GPU: bf16 autocast (self-sizing)
    python benchmarks/fused_head.py --positions 1024 8192 --vocab 151936 --hidden 896 --k 64

Head alone (hidden states [N, H] and a [V, H] head in, forward + backward of the loss):
(a) CE on full logits (the anchor: what plain fine-tuning pays), (b) the default KD objective (AMiD, tail
support) on full logits, (c) the same through the fused head (never [N, V]), (d) (c) with a CE term
(kd_ratio 0.5), and on a GPU where ``liger_kernel`` imports (e) Liger-Kernel's fused linear cross-entropy.
Then one training step (forward, backward, AdamW) of a synthetic Qwen2-shaped student built from a config
(random weights, no download) at the same vocabulary: CE on full logits, KD on full logits, KD fused.

Every case runs in a fresh process; its result is appended to --out (JSON lines) as it finishes, so a run cut
off by a time limit keeps what it measured. Peak memory: on a CPU the process's resident peak above its
inputs (sampled), on a GPU CUDA's allocator peak above its inputs. A case that runs out of memory is
reported as such. Prints Markdown tables with each case's time and memory as ratios to (a).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakRSS, median_seconds, print_table  # noqa: E402

HEAD_CASES = {"ce": "(a) CE, full logits", "tail": "(b) KD tail, full logits", "fused": "(c) KD tail, fused head",
              "fused_ce": "(d) KD tail + CE term, fused head", "liger": "(e) Liger fused linear CE"}
STEP_CASES = {"ce": "CE, full logits", "tail": "KD tail, full logits", "fused": "KD tail, fused head"}


class PeakCUDA:
    """CUDA's allocator peak (MiB) above the memory allocated at entry."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20


def synthetic_targets(positions: int, k: int, vocab: int, device: str):
    """Teacher top-k targets at ``positions`` supervised positions: random ids, a decreasing top-k holding
    60 % of the mass, random actual tokens."""
    from amid_pipeline.losses import TeacherTargets

    generator = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(min(positions, 64))])
    ids = ids.repeat(positions // ids.shape[0] + 1, 1)[:positions]
    values = torch.log_softmax(torch.randn(positions, k, generator=generator), -1).sort(-1, descending=True).values
    values = values + torch.log(torch.tensor(0.6))
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    teacher = TeacherTargets(ids, values, targets, torch.full((positions,), -3.0), torch.ones(positions, dtype=torch.bool))
    return teacher.to(device)


def timed(step, device: str, repeats: int) -> dict:
    """Median seconds of ``step`` (after one warm-up) and its peak memory."""
    def synchronised() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    synchronised()
    with PeakCUDA() if device == "cuda" else PeakRSS() as memory:
        seconds = median_seconds(synchronised, repeats=repeats, warmup=0)
    return {"seconds": seconds, "peak_mib": memory.mib}


def head_case(case: str, positions: int, vocab: int, hidden_size: int, k: int, device: str, repeats: int) -> dict:
    """Forward + backward of one head case (see the module docstring) on random hidden states and head."""
    from amid_pipeline.losses import KDLoss, StudentHead

    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, device=device, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).requires_grad_(True)
    teacher = synthetic_targets(positions, k, vocab, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    loss = KDLoss(kd_ratio=0.5 if case == "fused_ce" else 1.0)  # the default objective: AMiD, tail support
    if case == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def step() -> None:
        hidden.grad = weight.grad = None
        with autocast:
            h = hidden.to(torch.bfloat16) if device == "cuda" else hidden  # a decoder's output under autocast
            if case == "ce":
                value = torch.nn.functional.cross_entropy((h @ weight.to(h.dtype).T).float(), teacher.target_ids)
            elif case == "tail":
                value = loss(h @ weight.to(h.dtype).T, teacher).loss
            elif case == "liger":
                value = liger_fused_linear_cross_entropy(h, weight.to(h.dtype), teacher.target_ids)
            else:
                value = loss(StudentHead(h, weight), teacher).loss
        value.backward()

    return timed(step, device, repeats)


def step_case(case: str, positions: int, vocab: int, hidden_size: int, layers: int, k: int, device: str,
              repeats: int) -> dict:
    """One training step of a synthetic Qwen2-shaped student (``layers`` decoder layers, tied head) on one
    sequence of ``positions`` tokens, every position supervised."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from amid_pipeline.losses import KDLoss
    from amid_pipeline.train.data import StudentInputs
    from amid_pipeline.train.step import DistillModule

    torch.manual_seed(0)
    heads = max(hidden_size // 64, 1)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 4 + hidden_size // 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 7, 1),
                         max_position_embeddings=max(positions, 2048), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    teacher = synthetic_targets(positions, k, vocab, device)
    ids = torch.randint(0, vocab, (1, positions), device=device)
    rows = torch.zeros(positions, dtype=torch.long, device=device)
    inputs = StudentInputs(ids, torch.ones_like(ids), None, rows, torch.arange(positions, device=device))
    module = DistillModule(model, KDLoss(), sparse=case == "fused")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if case == "ce":
                logits = model(input_ids=ids, use_cache=False).logits[0]
                value = torch.nn.functional.cross_entropy(logits.float(), teacher.target_ids)
            else:
                value = module(inputs, teacher).loss
        value.backward()
        optimizer.step()

    result = timed(step, device, repeats)
    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (the GPU when there is one)")
    parser.add_argument("--positions", type=int, nargs="+", default=None,
                        help="head-alone sizes (default: 1024 2048 4096 8192 on a CPU, up to 16384 on a GPU)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case, after one warm-up (the median)")
    parser.add_argument("--step-positions", type=int, default=None, help="tokens of the training step (CPU 1024, GPU 8192)")
    parser.add_argument("--step-layers", type=int, default=None, help="student decoder layers (CPU 2, GPU 24: a 0.5 B Qwen2 shape)")
    parser.add_argument("--out", type=Path, default=Path("runs/fused-head.jsonl"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.case:
        kind, case, size = args.case.split(":")
        if kind == "head":
            result = head_case(case, int(size), args.vocab, args.hidden, args.k, device, args.repeats)
        else:
            result = step_case(case, int(size), args.vocab, args.hidden, args.step_layers, args.k, device, args.repeats)
        print(json.dumps(result))
        return

    gpu = device == "cuda"
    positions = args.positions or ([1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096, 8192])
    args.step_positions = args.step_positions or (8192 if gpu else 1024)
    args.step_layers = args.step_layers or (24 if gpu else 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'cpu'} "
          f"({'bf16 autocast' if gpu else 'float32'}, {torch.get_num_threads()} threads); results -> {args.out}", flush=True)

    def measure(kind: str, case: str, size: int) -> dict:
        command = [sys.executable, __file__, "--case", f"{kind}:{case}:{size}", "--device", device, "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--k", str(args.k), "--repeats", str(args.repeats),
                   "--step-layers", str(args.step_layers)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:  # out of memory, or Liger not installed: say which
            tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
            result = {"error": "out of memory" if "out of memory" in done.stderr.lower() or done.returncode == -9 else tail}
        record = {"kind": kind, "case": case, "size": size, "device": device, "vocab": args.vocab, "hidden": args.hidden,
                  "k": args.k, "date": time.strftime("%Y-%m-%d"), **result}
        with open(args.out, "a") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return result

    def table(title: str, cases: dict[str, str], kind: str, sizes: list[int]) -> None:
        rows = []
        for size in sizes:
            results = {case: measure(kind, case, size) for case in cases if case != "liger" or gpu}
            anchor = results["ce"]
            for case, result in results.items():
                if "error" in result:
                    rows.append([size, cases[case], result["error"], "", "", ""])
                    continue
                ratio = lambda key: result[key] / anchor[key] if "error" not in anchor and anchor[key] > 0 else ""  # noqa: E731
                rows.append([size, cases[case], result["seconds"], round(result["peak_mib"]), ratio("seconds"),
                             ratio("peak_mib")])
        print_table(title, ["positions", "case", "seconds", "peak MiB", "time vs CE", "memory vs CE"], rows)

    started = time.perf_counter()
    table(f"Head alone: V = {args.vocab}, H = {args.hidden}, k = {args.k}", HEAD_CASES, "head", positions)
    table(f"Training step: Qwen2-shaped student, {args.step_layers} layers, H = {args.hidden}, V = {args.vocab}, "
          f"one sequence", STEP_CASES, "step", [args.step_positions])
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
