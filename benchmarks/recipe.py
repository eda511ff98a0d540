"""The faithful protocol's first stages, measured: expert teacher, pruned students, healed students.

    python benchmarks/recipe.py [--work runs] [--rouge-prompts 214] [--sample-seeds 3]

Runs the documented commands one after the other (each resumes or is skipped when already done):

    amid-pipeline sft -c stages/sft_teacher_jargon.toml                          # expert teacher
    amid-pipeline cache-teacher -c stages/cache_teacher_jargon.toml              # its shards (train)
    amid-pipeline cache-teacher -c stages/cache_teacher_jargon.toml --dataset data/jargon/heldout.jsonl \
        --output runs/jargon-heldout-k64                                         # and of the held-out pairs
    amid-pipeline init-student runs/sft-teacher-jargon/model runs/student-init-every --keep-every 3
    amid-pipeline init-student runs/sft-teacher-jargon/model runs/student-init-importance \
        --by importance --calibration runs/jargon-smollm2-k64
    amid-pipeline sft -c stages/heal_student_jargon.toml --model runs/student-init-every --output runs/heal-every
    amid-pipeline sft -c stages/heal_student_jargon.toml --model runs/student-init-importance --output runs/heal-importance
    amid-pipeline eval MODEL --data data/jargon/heldout.jsonl --generate N --sample-seeds S [--chat-template off]

and prints the table of held-out perplexity (every supervised token of the 214 held-out pairs, never used
for a choice) and ROUGE-L (greedy; sampled at temperature 1, mean ± sd over seeds). Results are kept
in WORK/recipe-eval/*.json, so a rerun only evaluates what is new.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    """Run ``amid-pipeline ARGS`` from the repository root; its stdout (stops the script on failure)."""
    command = [sys.executable, "-m", "amid_pipeline", *args]
    print("$ amid-pipeline " + " ".join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): amid-pipeline {' '.join(args)}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs"), help="run folder, relative to the repository root")
    parser.add_argument("--rouge-prompts", type=int, default=214)
    parser.add_argument("--sample-seeds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    from amid_pipeline.models import smollm2_teacher

    work = args.work
    teacher = str(smollm2_teacher())
    expert = f"{work}/sft-teacher-jargon/model"
    cli("sft", "-c", "stages/sft_teacher_jargon.toml", "--model", teacher, "--output", f"{work}/sft-teacher-jargon",
        "--resume", "--no-progress")
    shards = f"{work}/jargon-smollm2-k64"
    cli("cache-teacher", "-c", "stages/cache_teacher_jargon.toml", "--teacher", expert, "--output", shards, "--no-progress")
    cli("cache-teacher", "-c", "stages/cache_teacher_jargon.toml", "--teacher", expert, "--dataset",
        "data/jargon/heldout.jsonl", "--output", f"{work}/jargon-heldout-k64", "--no-progress")  # for distill's evaluation
    students = {"every": ["--keep-every", "3"], "importance": ["--by", "importance", "--calibration", shards]}
    for name, options in students.items():
        if not (ROOT / work / f"student-init-{name}" / "config.json").exists():
            cli("init-student", expert, f"{work}/student-init-{name}", *options)
        cli("sft", "-c", "stages/heal_student_jargon.toml", "--model", f"{work}/student-init-{name}",
            "--output", f"{work}/heal-{name}", "--resume", "--no-progress")

    models = {
        "teacher, raw prompt + response": (teacher, ["--chat-template", "off"]),
        "teacher, chat template": (teacher, []),
        "teacher after SFT (expert)": (expert, []),
        **{f"student ({name} layers), pruned": (f"{work}/student-init-{name}", ["--generate", "0"]) for name in students},
        **{f"student ({name} layers), healed": (f"{work}/heal-{name}/model", []) for name in students},
    }
    results = ROOT / work / "recipe-eval"
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (model, options) in models.items():
        cached = results / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".json")
        if not cached.exists():
            out = cli("eval", model, "--data", "data/jargon/heldout.jsonl", "--generate", str(args.rouge_prompts),
                      "--sample-seeds", str(args.sample_seeds), "--max-new-tokens", str(args.max_new_tokens),
                      "--json", *options)  # options come last: a pruned student's --generate 0 (its answers are noise)
            cached.write_text(out)
        metrics = json.loads(cached.read_text())
        rows.append((label, metrics))
    print("\n| model | held-out perplexity | ROUGE-L greedy | ROUGE-L sampled (T = 1) |")
    print("|---|---|---|---|")
    for label, m in rows:
        sampled = f"{m['rouge_l_sampled']:.1f} ± {m['rouge_l_sampled_sd']:.1f}" if "rouge_l_sampled" in m else "–"
        greedy = f"{m['rouge_l']:.1f}" if "rouge_l" in m else "–"
        print(f"| {label} | {m['data_perplexity']:,.1f} | {greedy} | {sampled} |")
    for name in students:
        record = json.loads((ROOT / work / f"student-init-{name}" / "amid_pipeline_init.json").read_text())
        print(f"layers kept ({name}): {record['layers_kept']}")


if __name__ == "__main__":
    main()
