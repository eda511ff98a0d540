"""Does distillation beat plain fine-tuning? CE-only vs forward KL vs AMiD, same steps, same tokens.

    python benchmarks/evidence.py [--work runs/evidence] [--steps 120] [--train-rows 800] [--heldout-rows 150]

Real teacher SmolLM2-135M-Instruct, student = its every third layer (63.7 M), the shipped Jargon File
pairs; stage one runs once (cached under --work). Every run uses the same seed, data order, batch size,
learning rate and steps; only the objective differs. Held-out metrics on the separate held-out split
(every supervised position): perplexity on the reference responses, KL to the teacher on its top-64
support, top-1 agreement, student mass on that support, and ROUGE-L of greedy responses. Writes
results.md (the table) and curves.png (held-out curves) under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.capture.config import CaptureConfig  # noqa: E402
from amid_pipeline.capture.run import run_capture  # noqa: E402
from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.evaluate import evaluate_on_shards, load_model, rouge_l_on_prompts  # noqa: E402
from amid_pipeline.models import init_student, smollm2_teacher  # noqa: E402
from amid_pipeline.train.config import DistillConfig  # noqa: E402
from amid_pipeline.train.trainer import distill  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "CE only (ground truth)": {"loss": "forward_kl", "kd_ratio": 0.0},
    "forward KL, renormalized": {"loss": "forward_kl"},
    "forward KL, tail": {"loss": "forward_kl", "support": "tail"},
    "AMiD defaults, renormalized": {"loss": "amid", "loss_params": {"alpha": -3.0, "lam": 0.1}},
    "AMiD defaults, tail": {"loss": "amid", "support": "tail", "loss_params": {"alpha": -3.0, "lam": 0.1}},
    "AMiD α=-5, tail": {"loss": "amid", "support": "tail", "loss_params": {"alpha": -5.0, "lam": 0.1}},
    "AMiD α=0.5, tail": {"loss": "amid", "support": "tail", "loss_params": {"alpha": 0.5, "lam": 0.1}},
}
METRICS = ("perplexity", "kl_to_teacher", "top1_agreement", "support_mass", "rouge_l")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "evidence")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--heldout-rows", type=int, default=150)
    parser.add_argument("--rouge-prompts", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="subset of the run names")
    args = parser.parse_args()
    work = args.work
    teacher = smollm2_teacher()
    student = work / "student-init"
    if not (student / "config.json").exists():
        init_student(teacher, student, keep_every=3)
    shards = {}
    for split, rows in (("train", args.train_rows), ("heldout", args.heldout_rows)):
        shards[split] = work / f"shards-{split}"
        run_capture(load_config(CaptureConfig, ROOT / "stages" / "quickstart_cache_teacher.toml", {
            "teacher": str(teacher), "dataset": str(ROOT / "data" / "jargon" / f"{split}.jsonl"),
            "output": str(shards[split]), "limit": rows, "progress": False}))

    results = {}
    for name in args.runs:
        run_dir = work / ("run-" + "".join(c if c.isalnum() else "_" for c in name).strip("_"))
        config = load_config(DistillConfig, ROOT / "stages" / "quickstart_distill.toml", {
            "shards": [str(shards["train"])], "eval_shards": [str(shards["heldout"])], "student": str(student),
            "output": str(run_dir), "max_steps": args.steps, "eval_every": max(args.steps // 6, 1), "eval_batches": 1000,
            "save_every": args.steps, "lr": args.lr, "resume": True, "progress": False, **RUNS[name]})
        distill(config)
        model, tokenizer = load_model(run_dir / "model")
        metrics = evaluate_on_shards(model, shards["heldout"])
        metrics.update(rouge_l_on_prompts(model, tokenizer, ROOT / "data" / "jargon" / "heldout.jsonl",
                                          limit=args.rouge_prompts))
        results[name] = metrics
        print(name, {k: round(v, 4) for k, v in metrics.items()}, flush=True)
    for label, path in (("student before", student), ("teacher", teacher)):
        model, tokenizer = load_model(path)
        metrics = evaluate_on_shards(model, shards["heldout"])
        metrics.update(rouge_l_on_prompts(model, tokenizer, ROOT / "data" / "jargon" / "heldout.jsonl",
                                          limit=args.rouge_prompts))
        results[label] = metrics

    rows = [[name, *(round(results[name][m], 4) for m in METRICS)] for name in results]
    print_table(f"Held-out ({args.heldout_rows} pairs), {args.steps} steps x 8 sequences, lr {args.lr}",
                ["objective", *METRICS], rows)
    (work / "results.md").write_text("| objective | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
                                     + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows))
    plot_curves(work, [n for n in args.runs])


def plot_curves(work: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the same metric for every objective (a run's own loss value is not comparable across objectives)
    titles = {"perplexity": "held-out perplexity (log)", "kl_to_teacher": "held-out KL(p̃‖q̃) to teacher",
              "top1_agreement": "top-1 agreement", "support_mass": "mass on teacher support"}
    evals = {}
    for name in names:
        run_dir = work / ("run-" + "".join(c if c.isalnum() else "_" for c in name).strip("_"))
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals[name] = [m for m in lines if "eval" in m]
    keys = [k for k in titles if all(e and k in e[0]["eval"] for e in evals.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for name, points in evals.items():
        for axis, key in zip(axes, keys):
            axis.plot([m["step"] for m in points], [m["eval"][key] for m in points], marker="o", label=name)
    for axis, key in zip(axes, keys):
        axis.set_title(titles[key])
        axis.set_xlabel("step")
        if key == "perplexity":
            axis.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(work / "curves.png", dpi=100)
    print(f"wrote {work / 'results.md'} and {work / 'curves.png'}")


if __name__ == "__main__":
    main()
