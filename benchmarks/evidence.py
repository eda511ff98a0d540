"""Does AMiD from cached shards train a better student than CE and the KD losses users compare it with?

    python benchmarks/recipe.py            # first: expert teacher, its shards (train, held-out), healed student
    python benchmarks/evidence.py [--work runs] [--student runs/heal-importance/model] [--seeds 0 1 2] \\
        [--steps 30] [--lrs 3e-5 1e-4] [--rouge-prompts 32] [--max-new-tokens 192] [--generate-batch 32] [--jobs 2] \\
        [--arms NAME ...] [--targets top-64 top-20 sampled-24 sampled-4+8 online] [--dtype bfloat16]

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
where they are cut (at 64 tokens the healed student scored 11.88 greedy, at 192 8.60). Also the expected
calibration error of the top-1 prediction of the actual token (15 bins). Writes WORK/evidence/results.md,
results.json and curves.png (held-out curves on the first 32 held-out pairs, every 10 steps, seed 0).
Runs are kept, so a rerun only does what is missing.

``--targets`` trains every arm on each kind of teacher target (:data:`TARGETS`): the top-64 shards, the
top-20 shards (about the bytes of sampled-24 padded), the sampled shards (24 draws, support ``sampled``), the
sampled shards with an exact top (the teacher's top 4, then 8 draws from the rest: less gradient variance than
24 draws at fewer bytes, ``benchmarks/exact_top_split.py``), or
``online`` — the teacher's full-vocabulary distribution computed during training (``distill
--online-teacher``, the reference), on the top-64 shards' rows. Every kind holds the same rows and the same
train/dev split; all are evaluated against the same held-out top-64 shards.

Two phases, each a list of independent runs spread over ``--jobs`` processes: (1) every arm at every lr,
seed 0, scored on dev (and the student before, on held-out); (2) every arm at its chosen lr and every seed,
scored on held-out. On 2 CPU cores, two one-thread jobs: one arm and the student before took 13.5 minutes
(110–131 s per training run), so the 7 arms take about 65 minutes (estimated from those run times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.evaluate import evaluate_on_shards, load_model, rouge_l_on_prompts  # noqa: E402
from amid_pipeline.losses.registry import infinite_under_zero_teacher_mass, resolve_loss  # noqa: E402
from amid_pipeline.shards.manifest import load_manifest  # noqa: E402
from amid_pipeline.shards.stats import collect_stats  # noqa: E402
from amid_pipeline.shards.views import subset_directory  # noqa: E402
from amid_pipeline.train.checks import TrainingError  # noqa: E402
from amid_pipeline.train.config import DistillConfig  # noqa: E402
from amid_pipeline.train.data import ids_and_lengths, list_files  # noqa: E402
from amid_pipeline.train.loop import distill  # noqa: E402
from amid_pipeline.train.order import is_heldout  # noqa: E402

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
TARGETS = {  # teacher targets: shard directory under WORK (its rows and stored targets), or the online teacher
    "top-64": {"shards": "jargon-smollm2-k64"},
    "top-20": {"shards": "jargon-smollm2-k20"},
    "sampled-24": {"shards": "jargon-smollm2-sampled24"},
    "sampled-4+8": {"shards": "jargon-smollm2-sampled4+8"},  # the teacher's top 4 exactly, 8 draws from the rest
    "online": {"shards": "jargon-smollm2-k64", "online_teacher": "sft-teacher-jargon/model"},
}
METRICS = {"perplexity": "held-out perplexity", "kl_to_teacher": "KL to teacher", "top1_agreement": "top-1 agreement",
           "ece": "ECE", "rouge_l": "ROUGE-L greedy", "rouge_l_sampled": "ROUGE-L sampled",
           "greedy_words": "words per greedy answer"}
DEV_FRACTION = 0.05
CURVE_BATCHES = 4
PROMPTS = ROOT / "data" / "jargon" / "heldout.jsonl"


def arm_settings(name: str, target: str = "top-64") -> dict:
    """The arm's loss, loss_params and support: the library default support (``sampled`` on sampled
    shards), or 'tail' where the loss is infinite under it (AKL's reverse-KL term under
    'teacher_renormalized')."""
    settings = dict(ARMS[name])
    support = "sampled" if target.startswith("sampled") else DEFAULTS["support"].default
    if support in ("teacher_renormalized", "sampled") and infinite_under_zero_teacher_mass(*resolve_loss(settings["loss"], {})):
        support = "tail"
    return {"support": support, **settings}


def arm_label(name: str, target: str) -> str:
    return name if target == "top-64" else f"{name}, {target}"


def split_train_dev(shards: str, work: Path, tag: str = "") -> tuple[str, str]:
    """Views of ``shards``: the training rows and the dev rows (sample-id hash < DEV_FRACTION)."""
    train, dev = work / f"shards-train-view{tag}", work / f"shards-dev-view{tag}"
    if not (dev / "manifest.json").exists():
        ids = [s for f in list_files([shards]) for s in ids_and_lengths(f)[0].to_pylist()]
        subset_directory(shards, str(train), sample_ids=[s for s in ids if not is_heldout(s, DEV_FRACTION)])
        subset_directory(shards, str(dev), sample_ids=[s for s in ids if is_heldout(s, DEV_FRACTION)])
    return str(train), str(dev)


def run_arm(arm: tuple[str, str], lr: float, seed: int, args) -> Path:
    """The arm (objective, targets) trained at ``lr`` and ``seed`` (trained once; a later call finds it on disk)."""
    name, target = arm
    tag = "".join(c if c.isalnum() else "_" for c in arm_label(name, target)).strip("_")
    precision = "" if args.dtype == "bfloat16" else f"-{args.dtype}"  # runs of another dtype are other runs
    run = args.work / "evidence" / f"{tag}-lr{lr:g}-seed{seed}{precision}"
    if not (run / "model" / "config.json").exists():
        started = time.perf_counter()
        online = TARGETS[target].get("online_teacher")
        distill(load_config(DistillConfig, None, {
            "shards": [args.train[target]], "eval_shards": [args.heldout], "student": args.student, "output": str(run),
            "max_steps": args.steps, "batch_size": 8, "max_length": 256, "lr": lr, "warmup_steps": 2,
            "weight_decay": 0.01, "seed": seed, "eval_every": 10, "eval_batches": CURVE_BATCHES, "save_every": 0,
            "dtype": args.dtype, "progress": False, "resume": True, **arm_settings(name, target),
            **({"online_teacher": str(args.work / online)} if online else {})}))
        print(f"  {arm_label(name, target)}, lr {lr:g}, seed {seed}: trained in {time.perf_counter() - started:.0f} s",
              flush=True)
    return run


def measured(run: Path, key: str, compute) -> dict:
    """``compute()`` cached in RUN/KEY.json."""
    path = run / f"{key}.json"
    if not path.exists():
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def heldout_metrics(model_dir: Path, args) -> dict:
    """Held-out perplexity, KL, top-1 (all pairs) and ROUGE-L greedy and sampled (the first prompts)."""
    model, tokenizer = load_model(model_dir)
    metrics = evaluate_on_shards(model, args.heldout)
    settings = {"limit": args.rouge_prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.generate_batch}
    greedy = rouge_l_on_prompts(model, tokenizer, PROMPTS, **settings)
    sampled = rouge_l_on_prompts(model, tokenizer, PROMPTS, sample_seeds=1, temperature=1.0, **settings)
    return {**metrics, **greedy, "rouge_l_sampled": sampled["rouge_l_sampled"]}


def dev_perplexity(arm: tuple[str, str], lr: float, args) -> float:
    """Phase 1, the per-arm lr choice: the arm trained at the first seed, its perplexity on the dev rows."""
    run = run_arm(arm, lr, args.seeds[0], args)
    return measured(run, "dev", lambda: evaluate_on_shards(load_model(run / "model")[0], args.dev))["perplexity"]


def heldout_of_seed(arm: tuple[str, str], lr: float, seed: int, args) -> dict:
    """Phase 2: the arm at its chosen lr and ``seed``, measured on the held-out pairs."""
    run = run_arm(arm, lr, seed, args)
    return measured(run, args.key, lambda: heldout_metrics(run / "model", args))


def heldout_of_student(args) -> dict:
    """The student before any distillation, on the same held-out measures and its step-0 curve point."""
    out, tag = args.work / "evidence", f"before-{Path(args.student).parent.name}"
    measured(out, f"{tag}-curve", lambda: evaluate_on_shards(load_model(args.student)[0], args.heldout, max_batches=CURVE_BATCHES))
    return measured(out, f"{tag}-{args.key}", lambda: heldout_metrics(Path(args.student), args))


def start_worker(threads: int) -> None:
    """A pool worker: ``threads`` torch threads and, on Linux, a SIGTERM when this script dies (prctl
    PR_SET_PDEATHSIG), so that killing the script does not leave its runs training on in the background."""
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def in_parallel(calls: list[tuple], jobs: int) -> list:
    """``[function(*arguments) for function, *arguments in calls]``, over ``jobs`` processes of
    cpu_count / jobs torch threads each; a TrainingError (e.g. a non-finite loss) is returned, not raised,
    so that one stopped run does not stop the others."""
    def guarded(call):
        try:
            return call[0](*call[1:])
        except TrainingError as error:
            return error

    if jobs == 1:
        return [guarded(call) for call in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                             initargs=(max(1, (os.cpu_count() or 1) // jobs),)) as pool:
        futures = [pool.submit(*call) for call in calls]
        return [future.exception() if isinstance(future.exception(), TrainingError) else future.result()
                for future in futures]


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
    parser.add_argument("--jobs", type=int, default=2, help="runs trained and measured at once, in processes of "
                        "cpu_count / jobs threads (2 on a 2-core CPU; 1 on one GPU)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="training compute dtype (float32 on a CPU without native bfloat16: there it is ~20x faster)")
    parser.add_argument("--targets", nargs="+", default=["top-64"], choices=list(TARGETS),
                        help="teacher targets every arm is trained on (default: the top-64 shards)")
    args = parser.parse_args()
    started = time.perf_counter()
    args.work = ROOT / args.work
    args.student = args.student or str(args.work / "heal-importance" / "model")
    args.heldout = str(args.work / "jargon-heldout-k64")
    sources = {target: str(args.work / TARGETS[target]["shards"]) for target in args.targets}
    online = [str(args.work / TARGETS[t]["online_teacher"]) for t in args.targets if "online_teacher" in TARGETS[t]]
    for needed in (args.student, args.heldout, *sources.values(), *online):
        if not Path(needed).exists():
            raise SystemExit(f"{needed} is missing: run `python benchmarks/recipe.py` first (and, for top-20 and "
                             f"the sampled targets, the cache-teacher commands in docs/benchmarks.md)")
    load_manifest(args.heldout)
    args.dev = split_train_dev(str(args.work / TARGETS["top-64"]["shards"]), args.work / "evidence")[1]
    args.train = {target: split_train_dev(shards, args.work / "evidence",  # the same sample ids in every kind's views
                                          "" if shards.endswith(TARGETS["top-64"]["shards"]) else f"-{target}")[0]
                  for target, shards in sources.items()}
    args.key = f"heldout-{args.rouge_prompts}x{args.max_new_tokens}-b{args.generate_batch}"
    bytes_per_position = {target: "online" if "online_teacher" in TARGETS[target] else
                          f"{collect_stats(shards).bytes_per_position:.1f}" for target, shards in sources.items()}

    # phase 1: every arm at every lr, seed 0, scored on dev rows; the student before on held-out beside them
    arms = [(name, target) for target in args.targets for name in args.arms]
    lr_runs = [(arm, lr) for arm in arms for lr in args.lrs]
    before, *dev = in_parallel([(heldout_of_student, args), *((dev_perplexity, arm, lr, args) for arm, lr in lr_runs)],
                               args.jobs)
    stopped: dict[tuple[str, str], str] = {}
    dev_by_arm: dict[tuple[str, str], dict[float, float]] = {arm: {} for arm in arms}
    for (arm, lr), value in zip(lr_runs, dev):
        if isinstance(value, TrainingError):
            stopped[arm] = str(value).split(" (samples")[0]
        else:
            dev_by_arm[arm][lr] = value
    chosen = {arm: min(values, key=values.get) for arm, values in dev_by_arm.items() if values}
    # phase 2: the chosen lr of every arm at every seed, on the held-out pairs
    seed_runs = [(arm, chosen[arm], seed) for arm in chosen for seed in args.seeds]
    measures = in_parallel([(heldout_of_seed, arm, lr, seed, args) for arm, lr, seed in seed_runs], args.jobs)
    results: dict[tuple[str, str], dict] = {}
    for arm in chosen:
        per_seed = dict((seed, value) for (run_arm_, _, seed), value in zip(seed_runs, measures) if run_arm_ == arm)
        failed = [value for value in per_seed.values() if isinstance(value, TrainingError)]
        if failed:
            stopped[arm] = str(failed[0]).split(" (samples")[0]
            continue
        stopped.pop(arm, None)  # an lr that stopped, when the other one trained, is simply not chosen
        results[arm] = {"lr": chosen[arm], "dev_perplexity": dev_by_arm[arm], "settings": arm_settings(*arm),
                        "targets": arm[1], "bytes_per_position": bytes_per_position[arm[1]], "seeds": per_seed}
    for arm, reason in stopped.items():
        print(f"{arm_label(*arm)}: stopped, {reason}", flush=True)

    def cell(arm: tuple[str, str], key: str) -> str:
        values = [s[key] for s in results[arm]["seeds"].values()]
        return f"{statistics.fmean(values):,.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:,.2f}"

    columns = ["objective", "targets", "bytes per position", "support", "lr (dev)", *METRICS.values()]
    rows = [["student before (healed)", "–", "–", "–", "–", *(f"{before[key]:,.2f}" for key in METRICS)]]
    rows += [[name, target, bytes_per_position[target],
              results[(name, target)]["settings"]["support"] if name != "CE (ground truth only)" else "–",
              f"{results[(name, target)]['lr']:g}", *(cell((name, target), key) for key in METRICS)]
             for name, target in results]
    rows += [[name, target, "–", "–", "–", f"stopped: {reason}", *[""] * (len(METRICS) - 1)]
             for (name, target), reason in stopped.items()]
    title = (f"Held-out (214 pairs; ROUGE-L on {args.rouge_prompts} prompts, {args.max_new_tokens} new tokens, "
             f"{before['reference_words']:.1f} words per reference), "
             f"{args.steps} steps x 8 sequences from {Path(args.student).parent.name}, seeds {args.seeds}, mean ± sd")
    print_table(title, columns, rows)
    out = args.work / "evidence"
    (out / "results.json").write_text(json.dumps({arm_label(*arm): value for arm, value in results.items()}, indent=1))
    (out / "results.md").write_text(f"{title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                                    + "".join("| " + " | ".join(r) + " |\n" for r in rows))
    start = json.loads((out / f"before-{Path(args.student).parent.name}-curve.json").read_text())
    plot_curves(out, {arm_label(*arm): run_arm(arm, results[arm]["lr"], args.seeds[0], args) for arm in results}, start)
    print(f"{len(lr_runs) + len(seed_runs) - len(chosen)} training runs, {args.jobs} at a time: "
          f"{(time.perf_counter() - started) / 60:.1f} minutes (runs already on disk are reused)")


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
