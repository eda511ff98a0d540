"""Does AMiD from cached shards train a better student than CE and the KD losses users compare it with?

    python benchmarks/recipe.py            # first: expert teacher, its shards (train, held-out), healed student
    python benchmarks/evidence.py [--work runs] [--student runs/heal-importance/model] [--seeds 0 1 2] \\
        [--steps 30] [--lrs 3e-5 1e-4] [--rouge-prompts 32] [--max-new-tokens 192] [--generate-batch 32] [--arms NAME ...]

Protocol (every arm identical except the objective): the expert teacher's top-64 shards of the shipped
training split, the healed student, ``--steps`` optimiser steps of 8 sequences, the same data order per
seed, cosine schedule. The training rows exclude a dev split (5 % of the sample ids, stable hash); each
arm's learning rate is the one of ``--lrs`` with the lowest dev perplexity at seed 0 (the only choice made,
on dev rows only). The chosen lr is then run for every seed. Reported on the 214 held-out pairs, which no
choice ever sees: perplexity of the reference tokens (every supervised position), KL(p̃‖q̃) to the
teacher on its top-64, top-1 agreement, and ROUGE-L of responses to the first ``--rouge-prompts``
held-out prompts (greedy, and sampled at temperature 1 with one sampling seed per training seed) with the
mean words per greedy answer; mean ± sd over seeds. ``--max-new-tokens`` should cover the references
(held-out: median 86 tokens, p95 195, max 313; the default 192 covers 94 %): answers cut shorter score by
where they are cut (at 64 tokens the healed student scored 11.88 greedy, at 192 8.60). Writes WORK/evidence/results.md, results.json and curves.png (held-out curves on the first
32 held-out pairs, every 10 steps, seed 0). Runs are kept, so a rerun only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.evaluate import evaluate_on_shards, load_model, rouge_l_on_prompts  # noqa: E402
from amid_pipeline.losses.registry import infinite_under_zero_teacher_mass, resolve_loss  # noqa: E402
from amid_pipeline.shards.manifest import load_manifest  # noqa: E402
from amid_pipeline.shards.views import subset_directory  # noqa: E402
from amid_pipeline.train.config import DistillConfig  # noqa: E402
from amid_pipeline.train.data import ids_and_lengths, list_files  # noqa: E402
from amid_pipeline.train.order import is_heldout  # noqa: E402
from amid_pipeline.train.checks import TrainingError  # noqa: E402
from amid_pipeline.train.loop import distill  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = DistillConfig.__dataclass_fields__
ARMS = {  # objective settings; support is the library's default unless the loss is infinite there
    "CE (ground truth only)": {"loss": "forward_kl", "kd_ratio": 0.0},
    "forward KL": {"loss": "forward_kl"},
    "SKL (DistiLLM, a = 0.1)": {"loss": "skl"},
    "AKL": {"loss": "akl"},
    "ATKD": {"loss": "atkd"},
    "AMiD, paper preset": {"loss": "amid-paper"},
    "AMiD, library default": {"loss": "amid"},
}
METRICS = {"perplexity": "held-out perplexity", "kl_to_teacher": "KL to teacher", "top1_agreement": "top-1 agreement",
           "rouge_l": "ROUGE-L greedy", "rouge_l_sampled": "ROUGE-L sampled", "greedy_words": "words per greedy answer"}
DEV_FRACTION = 0.05
CURVE_BATCHES = 4


def arm_settings(name: str) -> dict:
    """The arm's loss, loss_params and support: the library default support, or 'tail' where the loss is
    infinite under it (AKL's reverse-KL term under 'teacher_renormalized')."""
    settings = dict(ARMS[name])
    support = DEFAULTS["support"].default
    if support == "teacher_renormalized" and infinite_under_zero_teacher_mass(*resolve_loss(settings["loss"], {})):
        support = "tail"
    return {"support": support, **settings}


def split_train_dev(shards: str, work: Path) -> tuple[str, str]:
    """Views of ``shards``: the training rows and the dev rows (sample-id hash < DEV_FRACTION)."""
    train, dev = work / "shards-train-view", work / "shards-dev-view"
    if not (dev / "manifest.json").exists():
        ids = [s for f in list_files([shards]) for s in ids_and_lengths(f)[0].to_pylist()]
        subset_directory(shards, str(train), sample_ids=[s for s in ids if not is_heldout(s, DEV_FRACTION)])
        subset_directory(shards, str(dev), sample_ids=[s for s in ids if is_heldout(s, DEV_FRACTION)])
    return str(train), str(dev)


def run_arm(name: str, lr: float, seed: int, args, train: str, heldout: str) -> Path:
    tag = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    run = args.work / "evidence" / f"{tag}-lr{lr:g}-seed{seed}"
    if not (run / "model" / "config.json").exists():
        started = time.perf_counter()
        distill(load_config(DistillConfig, None, {
            "shards": [train], "eval_shards": [heldout], "student": args.student, "output": str(run),
            "max_steps": args.steps, "batch_size": 8, "max_length": 256, "lr": lr, "warmup_steps": 2,
            "weight_decay": 0.01, "seed": seed, "eval_every": 10, "eval_batches": CURVE_BATCHES, "save_every": 0,
            "dtype": "bfloat16", "progress": False, "resume": True, **arm_settings(name)}))
        print(f"  {name}, lr {lr:g}, seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return run


def measured(run: Path, key: str, compute) -> dict:
    """``compute()`` cached in RUN/KEY.json."""
    path = run / f"{key}.json"
    if not path.exists():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs"), help="the recipe's run folder")
    parser.add_argument("--student", default=None, help="default: WORK/heal-importance/model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--rouge-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--generate-batch", type=int, default=32, help="prompts generated together (CPU: one batch of all)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    args = parser.parse_args()
    args.work = ROOT / args.work
    args.student = args.student or str(args.work / "heal-importance" / "model")
    shards, heldout = str(args.work / "jargon-smollm2-k64"), str(args.work / "jargon-heldout-k64")
    for needed in (args.student, shards, heldout):
        if not Path(needed).exists():
            raise SystemExit(f"{needed} is missing: run `python benchmarks/recipe.py` first")
    load_manifest(heldout)
    train, dev = split_train_dev(shards, args.work / "evidence")
    prompts = ROOT / "data" / "jargon" / "heldout.jsonl"

    def heldout_metrics(model_dir: Path) -> dict:
        model, tokenizer = load_model(model_dir)
        metrics = evaluate_on_shards(model, heldout)
        settings = {"limit": args.rouge_prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.generate_batch}
        greedy = rouge_l_on_prompts(model, tokenizer, prompts, **settings)
        sampled = rouge_l_on_prompts(model, tokenizer, prompts, sample_seeds=1, temperature=1.0, **settings)
        return {**metrics, **greedy, "rouge_l_sampled": sampled["rouge_l_sampled"]}

    key = f"heldout-{args.rouge_prompts}x{args.max_new_tokens}-b{args.generate_batch}"
    before = measured(args.work / "evidence", f"before-{Path(args.student).parent.name}-{key}", lambda: heldout_metrics(Path(args.student)))
    start = measured(args.work / "evidence", f"before-{Path(args.student).parent.name}-curve",
                     lambda: evaluate_on_shards(load_model(args.student)[0], heldout, max_batches=CURVE_BATCHES))
    results: dict[str, dict] = {}
    stopped: dict[str, str] = {}
    for name in args.arms:
        try:
            results[name] = run_arm_seeds(name, args, train, dev, heldout, key, heldout_metrics)
        except TrainingError as error:  # e.g. a non-finite loss: a row that says so, the other arms go on
            stopped[name] = str(error).split(" (samples")[0]
            print(f"{name}: stopped, {stopped[name]}", flush=True)


    def cell(name: str, key: str) -> str:
        values = [s[key] for s in results[name]["seeds"].values()]
        return f"{statistics.fmean(values):,.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:,.2f}"

    columns = ["objective", "support", "lr (dev)", *METRICS.values()]
    rows = [["student before (healed)", "–", "–", *(f"{before[key]:,.2f}" for key in METRICS)]]
    rows += [[name, results[name]["settings"]["support"] if name != "CE (ground truth only)" else "–",
             f"{results[name]['lr']:g}", *(cell(name, key) for key in METRICS)] for name in results]
    rows += [[name, "–", "–", f"stopped: {reason}", *[""] * (len(METRICS) - 1)] for name, reason in stopped.items()]
    title = (f"Held-out (214 pairs; ROUGE-L on {args.rouge_prompts} prompts, {args.max_new_tokens} new tokens, "
             f"{before['reference_words']:.1f} words per reference), "
             f"{args.steps} steps x 8 sequences from {Path(args.student).parent.name}, seeds {args.seeds}, mean ± sd")
    print_table(title, columns, rows)
    out = args.work / "evidence"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(f"{title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                                    + "".join("| " + " | ".join(r) + " |\n" for r in rows))
    plot_curves(out, {name: run_arm(name, results[name]["lr"], args.seeds[0], args, train, heldout) for name in results},
                start)


def run_arm_seeds(name: str, args, train: str, dev: str, heldout: str, key: str, heldout_metrics) -> dict:
    """The arm's lr chosen on dev rows at the first seed, then its held-out metrics at every seed."""
    dev_perplexity = {}
    for lr in args.lrs:  # the per-arm lr choice: seed 0, dev rows only
        run = run_arm(name, lr, args.seeds[0], args, train, heldout)
        dev_perplexity[lr] = measured(run, "dev", lambda: evaluate_on_shards(load_model(run / "model")[0], dev))["perplexity"]
    lr = min(dev_perplexity, key=dev_perplexity.get)
    per_seed = [measured(run_arm(name, lr, seed, args, train, heldout), key,
                         lambda seed=seed: heldout_metrics(run_arm(name, lr, seed, args, train, heldout) / "model"))
                for seed in args.seeds]
    print(name, {k: round(statistics.fmean(s[k] for s in per_seed), 3) for k in METRICS}, flush=True)
    return {"lr": lr, "dev_perplexity": dev_perplexity, "settings": arm_settings(name), "seeds": dict(zip(args.seeds, per_seed))}


def plot_curves(out: Path, runs: dict[str, Path], start: dict[str, float]) -> None:
    """One panel per metric: every arm's in-run evaluations, from the student's value at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"perplexity": "held-out perplexity", "kl_to_teacher": "held-out KL(p̃‖q̃) to teacher",
              "top1_agreement": "held-out top-1 agreement"}
    fig, axes = plt.subplots(1, len(titles), figsize=(4.4 * len(titles), 3.6))
    for name, run in runs.items():
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        points = [{"step": 0, "eval": start}] + [m for m in points if "eval" in m]
        for axis, key in zip(axes, titles):
            axis.plot([m["step"] for m in points], [m["eval"][key] for m in points], marker="o", label=name)
    for axis, title in zip(axes, titles.values()):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"first {CURVE_BATCHES * 8} held-out pairs, seed 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"wrote {out / 'results.md'}, results.json and curves.png")


if __name__ == "__main__":
    main()
