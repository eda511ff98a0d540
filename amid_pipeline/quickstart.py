"""The quickstart recipe: the whole job end to end on an embedded default.

Real offline teacher (SmolLM2-135M-Instruct, 30 layers, converted once and cached), a student made of
every sixth teacher layer (5), the shipped Jargon File instruction pairs (train and held-out splits):
cache-teacher on both splits, distill with the library's default objective (AMiD) and, beside it, train
the same student on the ground-truth tokens alone (CE, same steps, data and lr), then compare the teacher
(read from its held-out shards), the student before and both students after on the held-out split.
Everything goes under one output folder; a second run reuses the teacher shards (and the finished runs).
The stage settings come from stages/quickstart_*.toml; the sizes fit a 2-core CPU without native bfloat16
(docs/benchmarks.md, "Quickstart sizes").
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.capture.run import run_capture
from amid_pipeline.config import load_config
from amid_pipeline.evaluate import evaluate_on_shards, load_model, rouge_l_on_prompts, teacher_on_its_shards
from amid_pipeline.models import init_student, smollm2_teacher
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.loop import distill

ROOT = Path(__file__).resolve().parents[1]
KEEP_EVERY = 6  # the student: every sixth teacher layer (5 of 30)
COLUMNS = ("perplexity", "kl_with_rest", "kl_to_teacher", "top1_agreement", "support_mass", "rouge_l")
LOWER_IS_BETTER = ("perplexity", "kl_with_rest", "kl_to_teacher")
# (row, run folder, settings over stages/quickstart_distill.toml): the distilled student, and beside it the
# same steps, data and lr on the ground-truth tokens alone
RUNS = (("student after", "distill", {}), ("student after, CE only", "distill-ce", {"loss": "forward_kl", "kd_ratio": 0.0}))


class QuickstartMismatch(ValueError):
    """The output folder holds a quickstart made with other sizes (or by an earlier release)."""


def check_output(output: Path, sizes: dict[str, int]) -> None:
    """Record ``sizes`` in OUTPUT/quickstart.json, or refuse (one line) a folder whose quickstart was made with
    other ones: its shards, student and runs would not match these (a second run with the same sizes reuses
    them). A folder from before the record, holding a student or shards, counts as other sizes."""
    record = output / "quickstart.json"
    if record.exists():
        before = json.loads(record.read_text())
        if before != sizes:
            differing = ", ".join(f"{key}: {before.get(key)} there, {value} now" for key, value in sizes.items()
                                  if before.get(key) != value)
            raise QuickstartMismatch(f"{output} holds a quickstart with other sizes ({differing}); "
                                     f"use another --output, or delete it")
        return
    if any((output / name).exists() for name in ("student-init", "shards-train", "shards-heldout", "distill")):
        raise QuickstartMismatch(f"{output} holds a quickstart from an earlier release (other sizes); use another "
                                 f"--output, or delete it")
    output.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(sizes) + "\n")


class Phases:
    """Each phase's seconds, with a line as it ends: its time and the total so far."""

    def __init__(self):
        self.started = self.phase_started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.phase_started
        self.phase_started = now
        print(f"quickstart: {phase} done in {self.seconds[phase]:.0f} s ({now - self.started:.0f} s in all)", flush=True)


@dataclasses.dataclass
class QuickstartResult:
    output: Path
    table: dict[str, dict[str, float]]  # model -> metrics
    seconds: dict[str, float]

    def behind(self) -> list[str]:
        """The columns where the distilled student is not ahead of the CE-only one."""
        kd, ce = self.table["student after"], self.table["student after, CE only"]
        return [c for c in COLUMNS if c in kd and not (kd[c] < ce[c] if c in LOWER_IS_BETTER else kd[c] > ce[c])]

    def comparison(self) -> str:
        """One line: the columns where the distilled student is ahead of the CE-only one, and behind."""
        behind = self.behind()
        ahead = [c for c in COLUMNS if c in self.table["student after"] and c not in behind]
        return (f"distilled vs CE only (same steps, data and lr): ahead on {', '.join(ahead) or 'nothing'}"
                + (f"; behind on {', '.join(behind)}" if behind else ""))


def run_quickstart(output: Path, *, train_rows: int, heldout_rows: int, steps: int, rouge_prompts: int,
                   backend: str = "auto", progress: bool = True) -> QuickstartResult:
    data = ROOT / "data" / "jargon"
    stages = ROOT / "stages"
    if not (data / "train.jsonl").exists() or not stages.is_dir():
        raise FileNotFoundError(f"the quickstart needs a source checkout (data/jargon and stages/ under {ROOT})")
    check_output(output, {"keep_every": KEEP_EVERY, "train_rows": train_rows, "heldout_rows": heldout_rows,
                          "steps": steps})
    phases = Phases()
    teacher = smollm2_teacher()
    student_init = output / "student-init"
    if not (student_init / "config.json").exists():
        init_student(teacher, student_init, keep_every=KEEP_EVERY)
    phases.done("teacher and student folders")

    shards = {}
    for split, rows in (("train", train_rows), ("heldout", heldout_rows)):
        shards[split] = output / f"shards-{split}"
        run_capture(load_config(CaptureConfig, stages / "quickstart_cache_teacher.toml", {
            "teacher": str(teacher), "dataset": str(data / f"{split}.jsonl"), "output": str(shards[split]),
            "limit": rows, "backend": backend, "progress": progress}))
        phases.done(f"cache-teacher ({split}, {rows} rows)")

    students = {"student before": student_init}
    for name, run_name, objective in RUNS:
        run = output / run_name
        distill(load_config(DistillConfig, stages / "quickstart_distill.toml", {
            "shards": [str(shards["train"])], "student": str(student_init), "output": str(run), "max_steps": steps,
            "resume": True, "progress": progress, **objective}))
        phases.done(f"{run_name} ({steps} steps)")
        students[name] = run / "model"

    table = {}
    for name, path in (("teacher", teacher), *students.items()):
        label = f"evaluate {name}" if progress else None
        # the teacher's row is read from its shards; it runs only to answer prompts for ROUGE-L
        metrics = teacher_on_its_shards(shards["heldout"]) if name == "teacher" else None
        if metrics is None or rouge_prompts:
            model, tokenizer = load_model(path)
            metrics = metrics or evaluate_on_shards(model, shards["heldout"], progress=label)
        if rouge_prompts:
            metrics.update(rouge_l_on_prompts(model, tokenizer, data / "heldout.jsonl", limit=rouge_prompts, progress=label))
        table[name] = metrics
    phases.done("evaluation")
    return QuickstartResult(output=output, table=table, seconds=phases.seconds)
