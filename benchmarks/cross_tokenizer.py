"""Cross-tokenizer distillation on the known-optimum ladder: what a student of another tokenizer learns from
the ladder's cached top-K shards, against CE and against a student of the teacher's own tokenizer.

    python benchmarks/cross_tokenizer.py probe                  # 20 steps of each arm, timed
    python benchmarks/cross_tokenizer.py select [--arms ...]    # each arm's lr on dev, seed 0
    python benchmarks/cross_tokenizer.py final [--arms ...] [--seeds 0 1 2]
    python benchmarks/cross_tokenizer.py report                 # docs/cross-tokenizer/results-OUT.md, .json

Needs ``python benchmarks/ladder.py build`` (runs/ladder: T*, its tokenizer, its samples, train-topk).
Options: --work runs/ladder (read), --out runs/cross-tokenizer (written; every run folder resumes and its
result file is written as it ends), --jobs 2, --lrs 1e-3 3e-3 1e-2.

Protocol (written before the runs; docs/cross-tokenizer.md):

- Teacher: the ladder's T* (byte-level BPE of 2,048 ids) and its top-87 shards of T*'s own samples, written
  before format 1.4 (no tokenizer copy: the teacher tokenizer is given, and checked against the shards).
- Student tokenizer: the shipped BPE recipe (data/tiny_models.py) trained to 3,072 ids on the same text.
- Arms, all from a random 1 × 64 Llama (the ladder's S shape; seed 1 weights), ≤ 10 epochs of 8 sequences (the ladder's budget),
  evaluated every 50 steps on the dev rows (sha1 bucket < 10 %), the model with the lowest dev CE kept,
  stopped after 3 evaluations without a new one:
  CE (student tokenizer, kd_ratio 0, on the aligned positions); cross-KD (forward KL on the mapped targets,
  tail support, first-token rule); cross-KD exact (the same with the exact rule); ULD (kd_ratio 0.5, no
  vocabulary map: the teacher's own top-87 against the student's 87 largest); same-tokenizer KD (the
  ceiling: forward KL, tail, a student on T*'s own tokenizer). Added after the first table, before any
  choice was revisited: same-tokenizer CE (that student's own baseline, so that each tokenizer's KD gain is
  measured against its own CE).
- lr: per arm, the lowest dev CE (per student token: comparable within an arm) over --lrs at seed 0,
  widened by half a decade while the choice sits at an end. Final: 3 paired seeds (data order).
- Endpoint: bits per byte of T*'s 856 held-out reference responses (4 per held-out prompt, never seen in any
  choice) under each student: the NLL of the student tokens that start in the response, over their bytes —
  a measure no tokenizer can flatter. Floor: T* itself. Paired differences against CE per seed, mean and
  95 % t-interval over seeds (each arm against the CE arm of its own student tokenizer).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT = {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 256}
STUDENT_VOCAB, MAX_LENGTH, BATCH = 3072, 384, 8
ARMS = {
    "CE": {"tokenizer": "student", "loss": "forward_kl", "kd_ratio": 0.0},
    "cross-KD": {"tokenizer": "student", "loss": "forward_kl"},
    "cross-KD exact": {"tokenizer": "student", "loss": "forward_kl", "cross_tokenizer_map": "exact"},
    "ULD": {"tokenizer": "student", "loss": "uld", "kd_ratio": 0.5, "cross_tokenizer_map": "none"},
    "same-tokenizer KD": {"tokenizer": "teacher", "loss": "forward_kl"},
    "same-tokenizer CE": {"tokenizer": "teacher", "loss": "forward_kl", "kd_ratio": 0.0},
}


def tiny_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_models", ROOT / "data" / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_students(work: Path, out: Path, student_tokenizer: str) -> dict[str, Path]:
    """The random 1 × 64 students: on T*'s tokenizer (the ladder's S init) and on ``student_tokenizer``: the
    shipped BPE recipe at 3,072 ids ("bpe3072"), or a tokenizer folder (e.g. SmolLM2's)."""
    from transformers import AutoTokenizer

    tiny = tiny_module()
    folder = out / "student-init"
    if not (folder / "config.json").exists():
        tokenizer = (tiny.build_tokenizer(out / "tokenizer-3072", vocab_size=STUDENT_VOCAB) if student_tokenizer == "bpe3072"
                     else AutoTokenizer.from_pretrained(student_tokenizer))
        tiny.build_llama(folder, tokenizer, **STUDENT, seed=1, max_positions=2 * MAX_LENGTH)
    return {"student": folder, "teacher": work / "student-init"}


def run_folder(out: Path, arm: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{arm.replace(' ', '_')}-lr{lr:g}-seed{seed}"


def train(work: Path, out: Path, students: dict, arm: str, lr: float, seed: int, max_steps: int | None = None) -> dict:
    """One run (resumed where it stopped); its dev result, written to RUN/result.json as it ends."""
    folder = run_folder(out, arm, lr, seed) if max_steps is None else out / "probe" / arm.replace(" ", "_")
    result = folder / "result.json"
    if result.exists() and max_steps is None:
        return json.loads(result.read_text())
    spec = ARMS[arm]
    command = [sys.executable, "-m", "amid_pipeline", "distill", "--shards", str(work / "train-topk"),
               "--student", str(students[spec["tokenizer"]]), "--output", str(folder), "--loss", spec["loss"],
               "--kd-ratio", str(spec.get("kd_ratio", 1.0)), "--support", "tail", "--lr", f"{lr:g}", "--seed", str(seed),
               "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH), "--warmup-steps", "20",
               "--heldout-fraction", "0.1", "--eval-batches", "32", "--dtype", "float32", "--no-progress",
               "--log-every", "10", "--save-every", "100"]
    if spec["tokenizer"] == "student":
        command += ["--cross-tokenizer", "--teacher-tokenizer", str(work / "tokenizer"),
                    "--cross-tokenizer-map", spec.get("cross_tokenizer_map", "first")]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps), "--eval-every", "0", "--save-every", "0"]
        folder.parent.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    else:
        command += ["--epochs", "10", "--eval-every", "50", "--best-metric", "ce", "--patience", "3"]
        command += ["--resume"] if (folder / "checkpoints").exists() else []
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{arm} lr {lr} seed {seed}: {done.stderr[-1500:]}")
    seconds = time.perf_counter() - started
    if max_steps is not None:
        return {"arm": arm, "seconds": seconds, "steps": max_steps}
    best = json.loads((folder / "best.json").read_text())
    record = {"arm": arm, "lr": lr, "seed": seed, "dev_ce": best["value"], "best_step": best["step"],
              "last_step": best["last_step"], "stopped_early": best["stopped_early"], "seconds": round(seconds)}
    result.write_text(json.dumps(record, indent=1))
    return record


def bits_per_byte(model_folder: Path, references: list[dict], teacher_tokenizer, same_tokenizer: bool) -> dict:
    """The model's NLL of the reference responses in bits per byte (module docstring)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amid_pipeline.alignment.rows import CrossTokenizer
    from amid_pipeline.alignment.vocabulary import token_bytes

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    teacher_bytes, own_bytes = token_bytes(teacher_tokenizer), token_bytes(tokenizer)
    cross = None if same_tokenizer else CrossTokenizer.build(teacher_tokenizer, tokenizer)  # as training tokenised
    nats = count = 0.0
    with torch.no_grad():
        for ref in references:
            pieces = [teacher_bytes[i] for i in ref["input_ids"]]
            start = sum(len(p) for p in pieces[: ref["loss_mask"].index(True)])  # the response's first byte
            text = b"".join(pieces)
            ids = ref["input_ids"] if cross is None else cross.student_tokens(text, ref["id"]).tolist()
            ends = np.cumsum([len(own_bytes[i]) for i in ids])
            starts = ends - [len(own_bytes[i]) for i in ids]
            log_q = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            nll = -log_q.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
            scored = starts[1:] >= start
            nats += float(nll[scored].sum())
            count += float((ends[1:] - starts[1:])[scored].sum())
    return {"bits_per_byte": nats / count / math.log(2), "bytes": count}


def evaluate(work: Path, out: Path, folder: Path, arm: str | None) -> dict:
    """RUN/heldout.json: bits per byte of the held-out references (computed once)."""
    from transformers import AutoTokenizer

    target = folder / "heldout.json"
    if target.exists():
        return json.loads(target.read_text())
    references = [json.loads(line) for line in (work / "heldout-refs.jsonl").read_text().splitlines()]
    same = arm is None or ARMS[arm]["tokenizer"] == "teacher"
    result = bits_per_byte(folder / "model" if arm else folder, references, AutoTokenizer.from_pretrained(work / "tokenizer"), same)
    target.write_text(json.dumps(result, indent=1))
    return result


def chosen_lr(out: Path, arm: str) -> float | None:
    path = out / "selection" / f"{arm.replace(' ', '_')}.json"
    return json.loads(path.read_text())["lr"] if path.exists() else None


def select(work, out, students, arm, lrs, jobs) -> float:
    """The arm's lr: the lowest dev CE at seed 0 over ``lrs``, widened by half a decade while at an end."""
    grid = sorted(lrs)
    while True:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda lr: train(work, out, students, arm, lr, 0), grid))
        best = min(results, key=lambda r: r["dev_ce"])
        if best["lr"] == grid[0]:
            grid = [grid[0] / math.sqrt(10), *grid]
        elif best["lr"] == grid[-1]:
            grid = [*grid, grid[-1] * math.sqrt(10)]
        else:
            break
    (out / "selection").mkdir(parents=True, exist_ok=True)
    (out / "selection" / f"{arm.replace(' ', '_')}.json").write_text(json.dumps({"lr": best["lr"], "grid": results}, indent=1))
    return best["lr"]


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % t half-width."""
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}
    mean = statistics.fmean(values)
    return mean, (t.get(len(values) - 1, 2.0) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def report(work: Path, out: Path, seeds: list[int]) -> None:
    from transformers import AutoTokenizer

    from amid_pipeline.alignment.rows import CrossTokenizer
    from amid_pipeline.shards.reader import ShardReader

    rows = {}
    for arm in ARMS:
        lr = chosen_lr(out, arm)
        if lr is None:
            continue
        for seed in seeds:
            folder = run_folder(out, arm, lr, seed)
            if (folder / "result.json").exists():
                rows.setdefault(arm, {})[seed] = {**json.loads((folder / "result.json").read_text()),
                                                  **evaluate(work, out, folder, arm)}
    floor = evaluate(work, out, work / "teacher-sft" / "model", None)
    teacher_tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    student_tok = AutoTokenizer.from_pretrained(out / "student-init")
    import itertools

    coverage = {rule: CrossTokenizer.build(teacher_tok, student_tok, rule).coverage(
        list(itertools.islice(ShardReader(work / "train-topk"), 200))) for rule in ("first", "exact")}
    lines = ["| arm | lr | seeds | bits/byte (mean) | Δ vs its tokenizer's CE (95 % t) | dev CE/token | best step |",
             "|---|---|---|---|---|---|---|"]
    summary = {"teacher_bits_per_byte": floor["bits_per_byte"], "coverage": coverage, "arms": {}}
    for arm, by_seed in rows.items():
        values = [by_seed[s]["bits_per_byte"] for s in sorted(by_seed)]
        base = "CE" if ARMS[arm]["tokenizer"] == "student" else "same-tokenizer CE"  # its own tokenizer's CE
        delta = ("–" if arm == base or base not in rows else
                 "{:+.4f} ± {:.4f}".format(*t_interval([by_seed[s]["bits_per_byte"] - rows[base][s]["bits_per_byte"]
                                                        for s in sorted(by_seed) if s in rows[base]])))
        lines.append(f"| {arm} | {chosen_lr(out, arm):g} | {len(values)} | {statistics.fmean(values):.4f} | {delta} | "
                     f"{statistics.fmean(by_seed[s]['dev_ce'] for s in by_seed):.4f} | "
                     f"{', '.join(str(by_seed[s]['best_step']) for s in sorted(by_seed))} |")
        summary["arms"][arm] = {"lr": chosen_lr(out, arm), "per_seed": by_seed}
    lines.append(f"| T* (floor) | – | – | {floor['bits_per_byte']:.4f} | – | – | – |")
    docs = ROOT / "docs" / "cross-tokenizer"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"results-{out.name}.md").write_text("\n".join(lines) + "\n\ncoverage on 200 training rows: "
                                                + json.dumps(coverage) + "\n")
    (docs / f"results-{out.name}.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    print(json.dumps(coverage, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("probe", "select", "final", "report"))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ladder")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "cross-tokenizer")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--student-tokenizer", default="bpe3072",
                        help="bpe3072 (the shipped BPE recipe at 3,072 ids) or a tokenizer folder (use its own --out)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    students = build_students(args.work, args.out, args.student_tokenizer)
    if args.stage == "probe":
        for arm in args.arms:
            print(json.dumps(train(args.work, args.out, students, arm, 3e-3, 0, max_steps=20)))
    elif args.stage == "select":
        for arm in args.arms:
            print(arm, select(args.work, args.out, students, arm, args.lrs, args.jobs), flush=True)
    elif args.stage == "final":
        jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for record in pool.map(lambda job: train(args.work, args.out, students, job[0], chosen_lr(args.out, job[0]), job[1]), jobs):
                print(json.dumps(record), flush=True)
    else:
        report(args.work, args.out, args.seeds)


if __name__ == "__main__":
    main()
