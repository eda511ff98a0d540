"""The known-optimum ladder: a teacher declared the ground truth, data sampled from it, every objective
trained to its dev plateau, scored where the optimum is known.

    python benchmarks/ladder.py build                       # T*, its samples, targets, healed student S
    python benchmarks/ladder.py select [--arms ...]         # each arm's lr (and α) on dev rows, seed 0
    python benchmarks/ladder.py final [--arms ...] [--seeds 0 1 2 3 4]
    python benchmarks/ladder.py report                      # WORK/studies/STUDY/results.md, .json, curves.png
    python benchmarks/ladder.py probe                       # 20 steps of the slowest arms, timed

Options: --work runs/ladder, --jobs 2 (runs at once, cpu_count / jobs threads each), --lrs 3e-4 1e-3 3e-3.
``--study NAME`` keeps one set of choices and its report (WORK/studies/NAME: selection/ARM.json,
results.md, results.json, curves.png; default ``dev-lr``); the runs themselves are shared by every study.
``final --lr X`` trains the arms at X instead of their dev choice (recorded as fixed; a swept arm still
chooses its α on dev at X); ``--alpha-lr X`` has a swept arm choose its α at X and then its lr from
``--lrs`` (widened as usual) instead of around forward KL's lr; ``--smoke`` checks the script end to end
on 60 rows.

Protocol (docs/benchmarks.md, "The known-optimum ladder", written before the runs):

- T*: a Llama of 4 layers × 128 on a byte-level BPE of 2,048 ids trained on the Jargon text, fine-tuned
  with ``amid-pipeline sft`` on the 1,938 training pairs to its dev plateau, then frozen: the ground truth.
- Data sampled from T* at T = 1 from its full distribution, the prompts under the chat template as
  cache-teacher renders them: one response per training prompt; four per held-out prompt (214). T* is
  the Bayes-optimal predictor of every one of them. (Batched here: ``cache-teacher --generate``'s hf
  backend samples one prompt at a time, and its vLLM path spent most of its time building Python
  log-probability objects on this CPU; the targets are then captured by cache-teacher on exactly these
  token sequences, ``--data-format tokens``.)
- Targets on the training samples (same token sequences, same files and order): top-K with K the smallest
  whose mean T* mass is ≥ 0.85 (the real expert's top-64 holds 0.835), sampled (an exact top plus draws,
  about the same bytes), and ``--online-teacher`` T* (exact full-vocabulary targets).
- S: 1 layer × 64 (16× fewer non-embedding parameters), healed by CE (``sft``) to its dev plateau.
- Every arm starts from S; dev = sample ids with sha1 bucket < 10 % (the same rows in sft and distill).
  Each run: ≤ 10 epochs of 8 sequences, evaluated every ``--eval-every`` steps on dev, the best dev value
  of its own objective kept (``--best-metric kd``; CE: ``ce``), stopped after ``--patience`` evaluations
  without a new best. lr is chosen by the arm's own best dev objective from ≥ 3 values half a decade
  apart, widened while the choice sits at an end; the α arms first choose α at forward KL's chosen lr by
  the dev estimate of the per-token reverse KL to T* along the student's samples (P2 − entropy rate),
  then their lr for that α the same way. (The first protocol chose both on dev P1; amended before any
  held-out score, because P1 has no headroom here: docs/benchmarks.md.) Final runs: the chosen setting at 5 paired seeds (the seed sets data order; the same for
  every arm), scored on the held-out prompts, which no choice sees.
- Endpoints: P1 sampled ROUGE-L (3 responses per prompt at T = 1, max over T*'s 4 references; ceiling:
  T*'s own responses); P2 T*'s per-token NLL of the student's responses, with the student's entropy rate
  and distinct-2 beside it; S1 the student's per-token NLL of T*'s references (floor: T*'s own). Paired
  differences over seeds (95 % t-interval) and a bootstrap over prompts.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import in_parallel, measured  # noqa: E402
from recipe import cli  # noqa: E402

from amid_pipeline.chat import cut_at_stop, stop_token_ids  # noqa: E402
from amid_pipeline.config import load_config  # noqa: E402
from amid_pipeline.evaluate import load_model, rouge_l  # noqa: E402
from amid_pipeline.shards.stats import collect_stats  # noqa: E402
from amid_pipeline.train.checks import TrainingError  # noqa: E402
from amid_pipeline.train.config import DistillConfig  # noqa: E402
from amid_pipeline.train.loop import distill  # noqa: E402
from amid_pipeline.train.order import is_heldout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEV_FRACTION = 0.1
TEACHER = {"layers": 4, "hidden": 128, "heads": 2, "intermediate": 512}  # 1.05 M non-embedding parameters
STUDENT = {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 256}  # 65.5 k: 16x fewer
VOCAB, MAX_LENGTH, MAX_NEW_TOKENS, TOP_MASS = 2048, 384, 128, 0.85
ALPHAS = (-5.0, -3.0, -1.0, 0.0, 0.5)  # the AMiD paper's sweep
AB = {"divergence": "ab", "ab_a": 0.2, "ab_b": 0.7}
ARMS = {  # target (topk, sampled, online), distill settings, and what is swept on dev besides the lr
    "CE": {"target": "topk", "loss": "forward_kl", "kd_ratio": 0.0},
    "forward KL": {"target": "topk", "loss": "forward_kl"},
    "AMiD default": {"target": "topk", "loss": "amid"},
    "AMiD KL, α = −5": {"target": "topk", "loss": "amid", "loss_params": {"alpha": -5.0}},  # the paper's best KL α
    "AMiD renormalized": {"target": "topk", "loss": "amid", "support": "renormalized"},
    "forward KL renormalized": {"target": "topk", "loss": "forward_kl", "support": "renormalized"},
    "AMiD KL, α on dev": {"target": "topk", "loss": "amid", "sweep": "alpha"},
    "AMiD AB(0.2, 0.7), α on dev": {"target": "topk", "loss": "amid", "loss_params": AB, "sweep": "alpha"},
    "forward KL, sampled": {"target": "sampled", "loss": "forward_kl", "support": "sampled"},
    "forward KL, online": {"target": "online", "loss": "forward_kl"},
    # the better of the two α arms on dev P1, with its α and divergence, on the other targets (lr chosen again)
    "AMiD dev-chosen, sampled": {"target": "sampled", "loss": "amid", "support": "sampled", "chosen": True},
    "AMiD dev-chosen, online": {"target": "online", "loss": "amid", "chosen": True},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t quantiles by df
SWEPT = ("AMiD KL, α on dev", "AMiD AB(0.2, 0.7), α on dev")


# --- build: models, T*, its samples, the targets, the healed student ----------------------------------------

def llama(tiny, out: Path, tokenizer, shape: dict, seed: int) -> None:
    if not (out / "config.json").exists():
        tiny.build_llama(out, tokenizer, **shape, seed=seed, max_positions=2 * MAX_LENGTH)


def response_start(row) -> int:
    """Index of a stored row's first supervised token (the response follows the prompt)."""
    return int(row.positions[row.loss_mask][0]) + 1


def write_samples(teacher_dir: Path, data: Path, out: Path, n: int, seed: int, limit: int | None) -> None:
    """``n`` T* responses (T = 1) to each prompt of ``data`` (rendered with the chat template, as
    cache-teacher renders them) as a ``tokens`` dataset: id (``ID#gJ`` when n > 1), input_ids, loss_mask on
    the response."""
    from amid_pipeline.chat import render_prompt

    model, tokenizer = load_model(teacher_dir)
    rows = [json.loads(line) for line in open(data)][:limit]
    prompts = [render_prompt(row["prompt"], tokenizer, True) for row in rows]
    with open(out, "w") as f:
        for row, prompt, responses in zip(rows, prompts, sample_responses(model, tokenizer, prompts, n, seed)):
            for j, response in enumerate(responses):
                ids = np.concatenate([prompt, response]).tolist()
                f.write(json.dumps({"id": row["id"] if n == 1 else f"{row['id']}#g{j}", "input_ids": ids,
                                    "loss_mask": [0] * len(prompt) + [1] * len(response)}) + "\n")


def read_samples(path: Path, keep=lambda sample_id: True) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """{prompt id: (prompt ids, [T*'s responses])} of a dataset written by :func:`write_samples`."""
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for line in open(path):
        row = json.loads(line)
        base = row["id"].split("#")[0]
        if keep(base):
            ids, start = np.asarray(row["input_ids"], dtype=np.int32), row["loss_mask"].index(1)
            out.setdefault(base, (ids[:start], []))[1].append(ids[start:])
    return dict(sorted(out.items()))


@torch.no_grad()
def top_mass_curve(teacher_dir: Path, samples: dict, top: int = 512) -> np.ndarray:
    """Mean over response positions of T*'s probability mass in its K most probable ids, K = 1..top."""
    model = load_model(teacher_dir)[0]
    total, count = torch.zeros(top, dtype=torch.float64), 0
    for prompt, responses in samples.values():
        for response in responses:
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            probs = torch.softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
            total += probs.topk(top, -1).values.double().cumsum(-1).sum(0)
            count += len(response)
    return (total / count).numpy()


def build(args) -> dict:
    w = args.work
    record = w / "build.json"
    if record.exists():
        return json.loads(record.read_text())
    loader = ROOT / "data" / "tiny_models.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_models", loader)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tokenizer = tiny.build_tokenizer(w / "tokenizer", vocab_size=VOCAB)
    llama(tiny, w / "teacher-init", tokenizer, TEACHER, seed=0)
    llama(tiny, w / "student-init", tokenizer, STUDENT, seed=1)
    times = {}

    def timed(name, step, *arguments):
        started = time.perf_counter()
        step(*arguments)
        times[name] = round(time.perf_counter() - started)

    common = ["--no-progress", "--max-length", str(MAX_LENGTH)]
    limit = 60 if args.smoke else None  # a few rows and steps: the whole script end to end, fast
    steps = ["--max-steps", "6"] if args.smoke else []
    timed("T* sft", cli, "sft", "--model", f"{w}/teacher-init", "--dataset", "data/jargon/train.jsonl", "--output",
          f"{w}/teacher-sft", "--epochs", "25", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "50",
          "--eval-every", "55", "--save-every", "55", "--patience", "3", "--dev-fraction", str(DEV_FRACTION),
          "--dtype", "float32", "--resume", *common, *steps, *(["--limit", str(limit)] if limit else []))
    teacher = w / "teacher-sft" / "model"
    timed("T* samples, train", write_samples, teacher, ROOT / "data/jargon/train.jsonl", w / "train-tokens.jsonl", 1, 0, limit)
    timed("T* samples, held-out", write_samples, teacher, ROOT / "data/jargon/heldout.jsonl", w / "heldout-refs.jsonl", 4, 1,
          limit and 12)
    curve = top_mass_curve(teacher, read_samples(w / "train-tokens.jsonl"))
    k = min(int(np.searchsorted(curve, TOP_MASS)) + 1, len(curve))
    tokens = ["--dataset", f"{w}/train-tokens.jsonl", "--data-format", "tokens", "--id-field", "id", "--backend", "hf",
              "--dtype", "float32", *common]
    timed("top-K capture", cli, "cache-teacher", "--teacher", str(teacher), "--output", f"{w}/train-topk", "--k", str(k), *tokens)
    exact, draws = max(1, k // 4), max(1, k - k // 4)
    timed("sampled capture", cli, "cache-teacher", "--teacher", str(teacher), "--output", f"{w}/train-sampled",
          "--target-kind", "sampled", "--exact-top", str(exact), "--draws", str(draws), *tokens)
    timed("S heal", cli, "sft", "--model", f"{w}/student-init", "--dataset", f"{w}/train-tokens.jsonl", "--data-format",
          "tokens", "--id-field", "id", "--output", f"{w}/student-heal", "--epochs", "60", "--batch-size", "16",
          "--lr", "5e-3", "--warmup-steps", "50", "--eval-every", "55", "--save-every", "55", "--patience", "3",
          "--dev-fraction", str(DEV_FRACTION), "--dtype", "float32", "--resume", *common, *steps)
    result = {"k": k, "top_k_mass": float(curve[k - 1]), "top_mass_curve": {str(n): float(curve[n - 1]) for n in
              (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}, "exact_top": exact, "draws": draws, "seconds": times,
              "bytes_per_position": {kind: collect_stats(str(w / f"train-{kind}")).bytes_per_position
                                     for kind in ("topk", "sampled")}}
    record.write_text(json.dumps(result, indent=1))
    return result


# --- sampling and scoring --------------------------------------------------------------------------------

@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[np.ndarray], n: int, seed: int, batch: int = 32) -> list[list[np.ndarray]]:
    """``n`` responses per prompt at T = 1 from the full distribution, each up to its stop token."""
    stops = stop_token_ids(tokenizer, True)
    pad = tokenizer.pad_token_id
    out = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start:start + batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.from_numpy(p.astype(np.int64))
            attention[i, width - len(p):] = 1
        torch.manual_seed(seed * 100_003 + b)
        generated = model.generate(ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=n, eos_token_id=stops,
                                   pad_token_id=pad)
        tails = [cut_at_stop(g[width:].numpy().astype(np.int32), stops) for g in generated]
        out += [tails[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


@torch.no_grad()
def score_responses(model, prompts: list[np.ndarray], responses: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per response: (Σ −log model(y_t | prompt, y_<t), Σ entropy of the model's next-token distribution at
    those positions, token count), in float64 sums of float32 log-softmax."""
    nll, entropy, count = [], [], []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    result = {}
    for start in range(0, len(order), batch):
        chosen = order[start:start + batch]
        seqs = [np.concatenate([prompts[i], responses[i]]) for i in chosen]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.from_numpy(s.astype(np.int64))
            attention[r, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        for r, i in enumerate(chosen):
            a, b = len(prompts[i]) - 1, len(seqs[r]) - 1  # positions predicting the response tokens
            lp = logp[r, a:b]
            target = ids[r, a + 1:b + 1]
            result[i] = (-float(lp.gather(1, target[:, None]).double().sum()),
                         -float((lp.exp() * lp).sum(-1).double().sum()), b - a)
    for i in range(len(prompts)):
        nll.append(result[i][0]), entropy.append(result[i][1]), count.append(result[i][2])
    return np.array(nll), np.array(entropy), np.array(count)


@functools.lru_cache(maxsize=1)
def ground_truth(path: Path):
    """T*, loaded once per process."""
    return load_model(path)[0]


def distinct_2(responses: list[np.ndarray]) -> float:
    bigrams = [tuple(r[i:i + 2]) for r in responses for i in range(len(r) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def endpoints(model_dir: Path, refs: dict, samples: int, seed: int, args) -> dict:
    """P1, P2 (with entropy rate, distinct-2, length) and S1 of a model on ``refs``, per prompt and overall."""
    model, tokenizer = load_model(model_dir)
    teacher = ground_truth(args.work / "teacher-sft" / "model")
    ids = list(refs)
    prompts = [refs[i][0] for i in ids]
    drawn = sample_responses(model, tokenizer, prompts, samples, seed)
    texts = {i: [tokenizer.decode(r, skip_special_tokens=True) for r in refs[i][1]] for i in ids}
    p1 = [statistics.fmean(rouge_l(tokenizer.decode(d, skip_special_tokens=True), texts[i]) for d in ds)
          for i, ds in zip(ids, drawn)]
    flat_prompts = [p for p, ds in zip(prompts, drawn) for _ in ds]
    flat = [d for ds in drawn for d in ds]
    t_nll, _, n = score_responses(teacher, flat_prompts, flat)
    _, s_ent, _ = score_responses(model, flat_prompts, flat)
    per = lambda values: np.add.reduceat(values, np.arange(0, len(flat), samples))  # noqa: E731 (sums per prompt)
    p2, ent = per(t_nll) / per(n), per(s_ent) / per(n)
    ref_prompts = [refs[i][0] for i in ids for _ in refs[i][1]]
    ref_responses = [r for i in ids for r in refs[i][1]]
    s_nll, _, s_n = score_responses(model, ref_prompts, ref_responses)
    bounds = np.cumsum([0] + [len(refs[i][1]) for i in ids])
    s1 = [s_nll[a:b].sum() / s_n[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    return {"P1": statistics.fmean(p1), "P2": float(t_nll.sum() / n.sum()), "entropy_rate": float(s_ent.sum() / n.sum()),
            "distinct_2": distinct_2(flat), "tokens_per_response": float(n.mean()),
            "S1": float(s_nll.sum() / s_n.sum()),
            "per_prompt": {"P1": p1, "P2": p2.tolist(), "entropy_rate": ent.tolist(), "S1": s1}}


# --- runs --------------------------------------------------------------------------------------------------

def run_settings(arm: str, params: dict, lr: float, seed: int, args) -> tuple[Path, dict]:
    spec = {k: v for k, v in ARMS[arm].items() if k not in ("target", "sweep", "chosen")}
    target = ARMS[arm]["target"]
    loss_params = {**spec.pop("loss_params", {}), **params}
    tag = "".join(c if c.isalnum() else "_" for c in arm).strip("_")
    suffix = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{v}" for k, v in sorted(params.items()))
    run = args.work / "runs" / f"{tag}{suffix}-lr{lr:g}-seed{seed}"
    settings = {"shards": [str(args.work / f"train-{'sampled' if target == 'sampled' else 'topk'}")],
                "student": str(args.work / "student-heal" / "model"), "output": str(run),
                "heldout_fraction": DEV_FRACTION, "eval_batches": 64, "epochs": args.max_epochs, "batch_size": 8,
                "max_length": MAX_LENGTH, "lr": lr, "warmup_steps": 20, "weight_decay": 0.01, "seed": seed,
                "eval_every": args.eval_every, "patience": args.patience, "save_every": 0, "dtype": "float32",
                "best_metric": "ce" if spec.get("kd_ratio") == 0.0 else "kd", "progress": False, "report_to": ["none"],
                "loss_params": loss_params, **spec}
    if target == "online":
        settings["online_teacher"] = str(args.work / "teacher-sft" / "model")
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    return run, settings


def trained(arm: str, params: dict, lr: float, seed: int, args) -> Path:
    """The run, trained unless finished on disk (a run killed in flight starts again)."""
    run, settings = run_settings(arm, params, lr, seed, args)
    if not (run / "best.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        summary = distill(load_config(DistillConfig, None, settings))
        print(f"  {run.name}: {summary.steps} steps, best step {summary.best.step}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return run


def dev_score(arm: str, params: dict, lr: float, args) -> dict:
    """The run at seed 0 on dev: P1, P2, entropy rate, S1, and its own objective's best dev value."""
    run = trained(arm, params, lr, 0, args)
    scores = measured(run, "dev", lambda: {k: v for k, v in endpoints(run / "model", args.dev_refs, 2, 0, args).items()
                                           if k != "per_prompt"})
    best = json.loads((run / "best.json").read_text())
    return {**scores, "objective": best["value"], "best_step": best["step"], "last_step": best["last_step"]}


def lr_criterion(dev: dict) -> float:
    """Higher is better: the arm's own objective on dev (lowest value), comparable across its lrs."""
    return -dev["objective"]


def alpha_criterion(dev: dict) -> float:
    """Higher is better: −(P2 − entropy rate) on dev, i.e. minus an estimate of the per-token reverse KL
    from the student to T* along the student's own samples (E_q[−log p] − E_q[H(q)]): zero only at q = p,
    so neither a collapsed student (low entropy) nor a diffuse one scores well."""
    return -(dev["P2"] - dev["entropy_rate"])


def heldout_score(arm: str, params: dict, lr: float, seed: int, args) -> dict:
    run = trained(arm, params, lr, seed, args)
    return measured(run, "heldout", lambda: endpoints(run / "model", args.heldout_refs, 3, 1000 + seed, args))


def in_runs(calls, args) -> list:
    """Each call's result, or the TrainingError it stopped with (a finding, reported)."""
    return in_parallel(calls, args.jobs)


def study_dir(args) -> Path:
    return args.work / "studies" / args.study


def selection_path(arm: str, args) -> Path:
    return study_dir(args) / "selection" / f"{''.join(c if c.isalnum() else '_' for c in arm)}.json"


def dev_runs(arm: str, candidates: list[tuple[dict, float]], tried: dict, args) -> None:
    """Train and score on dev the (params, lr) candidates not yet in ``tried`` (a stopped run: its reason)."""
    todo = [(p, lr) for p, lr in candidates if (json.dumps(p, sort_keys=True), lr) not in tried]
    for (p, lr), result in zip(todo, in_runs([(dev_score, arm, p, lr, args) for p, lr in todo], args)):
        tried[(json.dumps(p, sort_keys=True), lr)] = (f"stopped: {str(result).split(' (samples')[0]}"
                                                      if isinstance(result, Exception) else result)


def best_of(tried: dict, criterion, params: str | None = None) -> tuple[str, float] | None:
    scored = {key: criterion(value) for key, value in tried.items()
              if isinstance(value, dict) and (params is None or key[0] == params)}
    return max(scored, key=scored.get) if scored else None


def choose(arm: str, args, fixed: dict | None = None) -> dict:
    """The arm's (params, lr) on dev: the lr by :func:`lr_criterion` from a grid half a decade apart, widened
    while the choice sits at an end; swept arms first choose α by :func:`alpha_criterion` at forward KL's
    chosen lr (or at ``--alpha-lr``, then the lr from ``--lrs``), then the lr for that α."""
    path = selection_path(arm, args)
    if path.exists():
        return json.loads(path.read_text())
    tried: dict[tuple[str, float], dict | str] = {}
    params = dict(fixed or {})
    lrs = sorted(args.lrs)
    if ARMS[arm].get("sweep") == "alpha":
        base = args.lr or args.alpha_lr or choose("forward KL", args)["lr"]
        dev_runs(arm, [({"alpha": a}, base) for a in ALPHAS], tried, args)
        found = best_of(tried, alpha_criterion)
        params = json.loads(found[0]) if found else {"alpha": ALPHAS[-1]}
        lrs = ([base] if args.lr else sorted(args.lrs) if args.alpha_lr
               else [base / math.sqrt(10), base, base * math.sqrt(10)])
    key = json.dumps(params, sort_keys=True)
    for _ in range(0 if args.lr else 4):
        dev_runs(arm, [(params, lr) for lr in lrs], tried, args)
        found = best_of(tried, lr_criterion, key)
        if found is None:
            break
        grid = sorted(lr for p, lr in tried if p == key)
        if found[1] == grid[0]:
            lrs = [grid[0] / math.sqrt(10)]
        elif found[1] == grid[-1]:
            lrs = [grid[-1] * math.sqrt(10)]
        else:
            break
    found = best_of(tried, lr_criterion, key)
    if found is None:
        raise SystemExit(f"{arm}: every dev run stopped: {tried}")
    choice = {"params": params, "lr": found[1], "fixed": bool(args.lr), "dev": [
        {"params": json.loads(p), "lr": lr, **(v if isinstance(v, dict) else {"stopped": v})} for (p, lr), v in tried.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(choice, indent=1))
    return choice


def chosen_amid(args) -> dict:
    """α and divergence of the better of the two swept AMiD arms on dev (:func:`alpha_criterion`)."""
    picks = [choose(arm, args) for arm in SWEPT]
    best = max(zip(SWEPT, picks), key=lambda pair: next(alpha_criterion(d) for d in pair[1]["dev"]
                                                        if d["params"] == pair[1]["params"] and d["lr"] == pair[1]["lr"]))
    return {**ARMS[best[0]].get("loss_params", {}), **best[1]["params"]}


def arm_choice(arm: str, args) -> dict:
    """The arm's dev choice, or with ``--lr`` that lr, fixed (recorded as such): a swept arm still chooses
    its α on dev at that lr, a dev-chosen arm still takes the chosen α and divergence."""
    fixed = chosen_amid(args) if ARMS[arm].get("chosen") else None
    path = selection_path(arm, args)
    if args.lr and not path.exists() and ARMS[arm].get("sweep") != "alpha":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"params": fixed or {}, "lr": args.lr, "fixed": True, "dev": []}, indent=1))
    return choose(arm, args, fixed)


def prepare(args) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    args.build = build(args)
    args.dev_refs = read_samples(args.work / "train-tokens.jsonl", lambda i: is_heldout(i, DEV_FRACTION))
    args.heldout_refs = read_samples(args.work / "heldout-refs.jsonl")


def paired(a: list[float], b: list[float]) -> str:
    """mean difference a − b over paired seeds with its 95 % t-interval."""
    d = np.array(a) - np.array(b)
    half = T_975[len(d) - 1] * d.std(ddof=1) / math.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def bootstrap(a: list[list[float]], b: list[list[float]], draws: int = 2000) -> str:
    """95 % percentile interval of the mean over prompts of (a − b), each prompt's value averaged over seeds."""
    d = np.mean(np.array(a), axis=0) - np.mean(np.array(b), axis=0)
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), (draws, len(d)))].mean(axis=1)
    return f"[{np.percentile(means, 2.5):+.3f}, {np.percentile(means, 97.5):+.3f}]"


def report(args) -> None:
    finals = {}
    for arm in ARMS:
        path = selection_path(arm, args)
        if not path.exists():
            continue
        choice = json.loads(path.read_text())
        seeds = {}
        for seed in args.seeds:
            run, _ = run_settings(arm, choice["params"], choice["lr"], seed, args)
            if (run / "heldout.json").exists():
                seeds[seed] = json.loads((run / "heldout.json").read_text())
        if seeds:
            finals[arm] = {"choice": choice, "seeds": seeds}
    teacher = measured(args.work, "teacher-heldout", lambda: endpoints(args.work / "teacher-sft" / "model",
                                                                       args.heldout_refs, 3, 1000, args))
    student = measured(args.work, "student-heldout", lambda: endpoints(args.work / "student-heal" / "model",
                                                                       args.heldout_refs, 3, 1000, args))
    keys = ("P1", "P2", "entropy_rate", "distinct_2", "tokens_per_response", "S1")
    lines = ["| arm | lr | α / params | seeds | P1 ROUGE-L ↑ | P2 T* NLL of samples ↓ | entropy rate | distinct-2 | "
             "tokens / response | S1 NLL of references ↓ |", "|" + "---|" * 10]
    lines += [f"| T* (ground truth) | – | – | – | " + " | ".join(f"{teacher[k]:.3f}" for k in keys) + " |",
              f"| S healed (start) | – | – | – | " + " | ".join(f"{student[k]:.3f}" for k in keys) + " |"]
    for arm, final in finals.items():
        cells = []
        for k in keys:
            values = [s[k] for s in final["seeds"].values()]
            cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}")
        params = ", ".join(f"{k} {v}" for k, v in final["choice"]["params"].items()) or "–"
        lr = f"{final['choice']['lr']:.3g}" + (" (fixed)" if final["choice"].get("fixed") else " (dev)")
        lines.append(f"| {arm} | {lr} | {params} | {len(final['seeds'])} | " + " | ".join(cells) + " |")
    comparisons = [("AMiD dev-chosen, online", "forward KL, online"), ("AMiD KL, α = −5", "forward KL"), ("AMiD KL, α on dev", "forward KL"),
                   ("AMiD AB(0.2, 0.7), α on dev", "forward KL"), ("AMiD default", "forward KL"),
                   ("AMiD renormalized", "forward KL"), ("forward KL", "CE"), ("forward KL renormalized", "forward KL"),
                   ("AMiD dev-chosen, sampled", "forward KL, sampled"),
                   ("forward KL", "forward KL, online"), ("forward KL, sampled", "forward KL, online"),
                   ("forward KL, sampled", "forward KL"),  # equal bytes per position: sampled against top-K
                   ("forward KL renormalized", "forward KL, online"),
                   ("AMiD KL, α on dev", "AMiD dev-chosen, online"), ("AMiD dev-chosen, sampled", "AMiD dev-chosen, online")]
    lines += ["", "| A − B (paired seeds) | seeds | ΔP1 (t 95 %; bootstrap over prompts) | ΔP2 | Δentropy rate | ΔS1 |",
              "|---|---|---|---|---|---|"]
    for a, b in comparisons:
        if a in finals and b in finals:
            seeds = sorted(set(finals[a]["seeds"]) & set(finals[b]["seeds"]))
            if len(seeds) < 2:
                continue
            cells = []
            for k in ("P1", "P2", "entropy_rate", "S1"):
                va = [finals[a]["seeds"][s][k] for s in seeds]
                vb = [finals[b]["seeds"][s][k] for s in seeds]
                pa = [finals[a]["seeds"][s]["per_prompt"][k] for s in seeds]
                pb = [finals[b]["seeds"][s]["per_prompt"][k] for s in seeds]
                cells.append(f"{paired(va, vb)}; {bootstrap(pa, pb)}")
            lines.append(f"| {a} − {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    study_dir(args).mkdir(parents=True, exist_ok=True)
    (study_dir(args) / "results.md").write_text(text)
    (study_dir(args) / "results.json").write_text(json.dumps({"build": args.build, "teacher": teacher, "student": student,
                                                        "arms": finals}, indent=1))
    print(text)
    plot_dev_curves(args, finals)


def plot_dev_curves(args, finals: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, final in finals.items():
        run, _ = run_settings(arm, final["choice"]["params"], final["choice"]["lr"], min(final["seeds"]), args)
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        points = [p for p in points if "eval" in p]
        for axis, key in zip(axes, ("ce", "kl_to_teacher")):
            axis.plot([p["step"] for p in points], [p["eval"][key] for p in points], label=arm, lw=1)
    axes[0].set_title("dev NLL of T*'s samples (per token)", fontsize=9)
    axes[1].set_title("dev KL(T* top-K ‖ student), renormalised", fontsize=9)
    for axis in axes:
        axis.set_xlabel("step")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(study_dir(args) / "curves.png", dpi=100)


def probe(args) -> None:
    """``--max-steps`` (default 20) of the CE, forward KL tail and AMiD online arms, timed, and one
    dev scoring: the figures that size the whole ladder."""
    args.max_steps = args.max_steps or 20
    for arm in ("CE", "forward KL", "AMiD default", "forward KL, online", "forward KL, sampled"):
        run, _ = run_settings(arm, {}, 1e-3, 99, args)
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        trained(arm, {}, 1e-3, 99, args)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        endpoints(run / "model", args.dev_refs, 2, 0, args)
        print(f"probe {arm}: {args.max_steps} steps {train_s:.1f} s, dev scoring {time.perf_counter() - started:.1f} s",
              flush=True)
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("build", "probe", "select", "final", "report"))
    parser.add_argument("--work", type=Path, default=Path("runs/ladder"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run (probing only)")
    parser.add_argument("--lr", type=float, default=None, help="final: train the arms at this lr instead of "
                        "choosing it on dev (recorded as fixed in the study's selection/ARM.json)")
    parser.add_argument("--alpha-lr", type=float, default=None, help="swept arms: choose α on dev at this lr, "
                        "then their lr from --lrs, instead of around forward KL's chosen lr")
    parser.add_argument("--study", default="dev-lr", help="WORK/studies/STUDY holds this study's choices and report")
    parser.add_argument("--smoke", action="store_true", help="build from 60 rows and a few steps: checks the script")
    args = parser.parse_args()
    args.work = ROOT / args.work
    torch.set_num_threads(max(1, torch.get_num_threads() // args.jobs))
    random.seed(0)
    prepare(args)
    started = time.perf_counter()
    if args.phase == "probe":
        probe(args)
    elif args.phase == "select":
        for arm in args.arms:
            print(f"{arm}: {arm_choice(arm, args)['lr']:g}", flush=True)
    elif args.phase == "final":
        calls = []
        for arm in args.arms:
            choice = arm_choice(arm, args)
            calls += [(heldout_score, arm, choice["params"], choice["lr"], seed, args) for seed in args.seeds]
        for call, result in zip(calls, in_runs(calls, args)):
            if isinstance(result, Exception):
                print(f"{call[1]}, seed {call[4]}: stopped, {result}", flush=True)
    elif args.phase == "report":
        report(args)
    print(f"{args.phase}: {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)


if __name__ == "__main__":
    main()
