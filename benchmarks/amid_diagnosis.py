"""Why does AMiD (α = −3, λ = 0.1) on the sparse support blow the student's perplexity up? A short,
equal-budget run of each objective from the same healed student, with diagnostics of what moved.

    python benchmarks/amid_diagnosis.py --student runs/heal-importance/model --shards runs/jargon-smollm2-k64 \\
        --heldout runs/jargon-heldout-k64 [--steps 20] [--lr 1e-4] [--work runs/amid-diagnosis]

Per objective: held-out perplexity on the actual tokens, KL(p̃‖q̃) to the teacher on its top-k, top-1
agreement, the student's mass on the teacher's ids, and two diagnostics of the hypothesis that a bounded
loss abandons tokens: the teacher mass (renormalised over its ids) on ids where the student gives less
than a tenth of the teacher's probability ("abandoned"), and the mean AMiD gradient weight
w = (1−λ)q^s / (λp^s + (1−λ)q^s) on those ids (the share of the gradient a token can still pull).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.evaluate import evaluate_on_shards, load_model  # noqa: E402
from amid_pipeline.train.config import DistillConfig  # noqa: E402
from amid_pipeline.train.data import DataSettings, ShardBatches, list_files  # noqa: E402
from amid_pipeline.train.trainer import distill  # noqa: E402

ARMS = {
    "CE": {"loss": "forward_kl", "kd_ratio": 0.0},
    "forward KL, tail": {"loss": "forward_kl", "support": "tail"},
    "AMiD α=-3 λ=0.1, renormalized": {"loss": "amid", "support": "renormalized"},
    "AMiD α=-3 λ=0.1, renormalized + ½ CE": {"loss": "amid", "support": "renormalized", "kd_ratio": 0.5},
    "AMiD α=-3 λ=0.1, teacher_renormalized": {"loss": "amid", "support": "teacher_renormalized"},
    "AMiD α=-3 λ=0.1, tail": {"loss": "amid", "support": "tail"},
    "AMiD α=0.5 λ=0.1, tail": {"loss": "amid", "support": "tail", "loss_params": {"alpha": 0.5, "lam": 0.1}},
    "AMiD α=0.5 λ=0.1, teacher_renormalized": {"loss": "amid", "support": "teacher_renormalized",
                                                "loss_params": {"alpha": 0.5, "lam": 0.1}},
}


@torch.no_grad()
def abandonment(model, shards: str, alpha: float = -3.0, lam: float = 0.1) -> dict[str, float]:
    """Teacher mass on ids where q < p/10 (both renormalised over the ids), and the mean AMiD weight w there."""
    settings = DataSettings(batch_size=8, max_length=1024, heldout_fraction=0.0,
                            student_vocab=model.get_output_embeddings().weight.shape[0])
    s = (1 - alpha) / 2
    abandoned = weight = positions = 0.0
    for batch in ShardBatches(list_files([shards]), settings, seed=0, shuffle=False):
        base = getattr(model, model.base_model_prefix)
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).last_hidden_state[batch["row"], batch["column"]]
        log_q = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1).gather(1, batch["topk_ids"].long())
        p = torch.softmax(batch["topk_logprobs"].float(), -1)
        q = torch.softmax(log_q, -1)
        low = q < p / 10
        w = (1 - lam) * q**s / (lam * p**s + (1 - lam) * q**s)
        mask = batch["mask"].float()
        abandoned += float(((p * low).sum(-1) * mask).sum())
        weight += float((torch.where(low, w, torch.zeros_like(w)).sum(-1) / low.sum(-1).clamp(min=1) * mask).sum())
        positions += float(mask.sum())
    return {"abandoned_mass": abandoned / positions, "w_on_abandoned": weight / positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/amid-diagnosis"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    args = parser.parse_args()
    rows = []
    for name in ["student before", *args.arms]:
        cached = args.work / (name.replace(" ", "_").replace("/", "") + f"-seed{args.seed}.json")
        if not cached.exists():
            model_dir = args.student
            if name != "student before":
                run = args.work / cached.stem
                settings = {**({"loss_params": {"alpha": -3.0, "lam": 0.1}} if ARMS[name]["loss"] == "amid" else {}), **ARMS[name]}
                distill(load_config(DistillConfig, None, {
                    "shards": [args.shards], "student": args.student, "output": str(run), "max_steps": args.steps,
                    "batch_size": 8, "max_length": 256, "lr": args.lr, "warmup_steps": 2, "seed": args.seed,
                    "heldout_fraction": 0.0, "eval_every": 0, "eval_batches": 1, "save_every": 0, "dtype": "bfloat16",
                    "progress": False, "resume": True, **settings}))
                model_dir = run / "model"
            model, _ = load_model(model_dir)
            metrics = evaluate_on_shards(model, args.heldout)
            metrics.update(abandonment(model, args.heldout))
            args.work.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(metrics))
        metrics = json.loads(cached.read_text())
        rows.append([name, metrics["perplexity"], metrics["kl_to_teacher"], metrics["top1_agreement"],
                     metrics["support_mass"], metrics["abandoned_mass"], metrics["w_on_abandoned"]])
    print_table(f"{args.steps} steps from {args.student}, lr {args.lr}, seed {args.seed}",
                ["objective", "held-out perplexity", "KL to teacher", "top-1", "mass on teacher ids",
                 "abandoned teacher mass", "AMiD w on abandoned ids"], rows)


if __name__ == "__main__":
    main()
