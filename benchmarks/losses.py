"""Loss forward+backward time and peak memory: full-logits CE vs KD on dense logits vs the sparse head.

    python benchmarks/losses.py [--positions 8192] [--k 64] [--hidden 576] [--vocab 49152 151936]
                                [--losses amid forward_kl ...]

(a) plain CE over full logits (h @ W.T, cross_entropy); (b) each KD loss on the same full logits;
(c) each KD loss through the fused head (StudentHead: never [N × V]; the tail support and CE term in one
[chunk × V] block at a time, the renormalised support at the k stored ids only). Every case
runs in a fresh process; peak memory is the process's peak RSS above its inputs. Prints the median
of 3 timed runs and the ratios to (a).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median_seconds, print_table  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(kind: str, loss_name: str, positions: int, k: int, hidden_size: int, vocab: int) -> dict:
    from amid_pipeline.losses import KDLoss, StudentHead, TeacherTargets

    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_(True)
    ids = torch.randint(0, vocab, (positions, k))
    values = torch.log_softmax(torch.randn(positions, k), -1).sort(-1, descending=True).values - 0.5
    targets = torch.randint(0, vocab, (positions,))
    teacher = TeacherTargets(ids, values, targets, torch.full((positions,), -3.0), torch.ones(positions, dtype=torch.bool))
    loss = KDLoss(loss_name) if kind != "ce" else None

    def step() -> None:
        hidden.grad = weight.grad = None
        if kind == "ce":
            value = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
        elif kind == "dense":
            value = loss(hidden @ weight.T, teacher, progress=(1, 10)).loss
        else:
            value = loss(StudentHead(hidden, weight), teacher, progress=(1, 10)).loss
        value.backward()

    base = peak_rss_mib()
    seconds = median_seconds(step, repeats=3, warmup=1)
    return {"seconds": seconds, "peak_mib": peak_rss_mib() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--losses", nargs="+", default=["amid", "forward_kl", "akl", "atkd", "taid"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, name, vocab = args.case.split(":")
        print(json.dumps(run_case(kind, name, args.positions, args.k, args.hidden, int(vocab))))
        return

    def measure(kind: str, name: str, vocab: int) -> dict:
        command = [sys.executable, __file__, "--case", f"{kind}:{name}:{vocab}", "--positions", str(args.positions),
                   "--k", str(args.k), "--hidden", str(args.hidden)]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    started = time.perf_counter()
    for vocab in args.vocab:
        ce = measure("ce", "-", vocab)
        rows = [["(a) CE, full logits", ce["seconds"], round(ce["peak_mib"]), 1.0, 1.0]]
        for name in args.losses:
            for kind, label in (("dense", "(b) dense logits"), ("sparse", "(c) sparse head")):
                m = measure(kind, name, vocab)
                rows.append([f"{label}: {name}", m["seconds"], round(m["peak_mib"]),
                             m["seconds"] / ce["seconds"], m["peak_mib"] / max(ce["peak_mib"], 1)])
        print_table(f"N = {args.positions}, k = {args.k}, hidden = {args.hidden}, vocab = {vocab} "
                    f"(torch threads {torch.get_num_threads()})",
                    ["forward + backward", "seconds", "peak MiB", "time vs (a)", "memory vs (a)"], rows)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
