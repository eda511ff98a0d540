"""How often did the tail bucket's old q_rest = 1 − Σ_S q cancel on real shards, and by how much?

    python benchmarks/rest_bucket_precision.py --student runs/heal-importance/model --shards runs/jargon-smollm2-k64

On the dev rows (5 % of the sample ids, as benchmarks/amid_diagnosis.py) the student's float32 logits
(bf16 autocast, as benchmarks/evidence.py trains) give, per supervised position, q_rest three ways: exact (float64
logsumexp over the ids outside the teacher's top-k), the old float32 form 1 − Σ_S q, and the library's
float32 form (:func:`amid_pipeline.losses.sparse_head.logsumexps`). Reported: the share of positions by
exact q_rest, how far each float32 form is from exact there (median |log ratio|), and forward KL on the
tail support per position, old form vs exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from amid_pipeline.evaluate import load_model  # noqa: E402
from amid_pipeline.losses import KDLoss, TeacherTargets  # noqa: E402
from amid_pipeline.losses.sparse_head import logsumexps  # noqa: E402
from amid_pipeline.losses.support import support_distributions  # noqa: E402
from amid_pipeline.train.data import DataSettings, ShardBatches, list_files  # noqa: E402

DEV_FRACTION = 0.05
BANDS = ((1e-2, 1.0), (1e-4, 1e-2), (1e-6, 1e-4), (6e-8, 1e-6), (0.0, 6e-8))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    model, _ = load_model(args.student)
    settings = DataSettings(batch_size=8, max_length=256, heldout_fraction=DEV_FRACTION,
                            student_vocab=model.get_output_embeddings().weight.shape[0])
    exact, old, new, kl_old, kl_exact = [], [], [], [], []
    loss = KDLoss("forward_kl", support="tail")
    for number, batch in enumerate(ShardBatches(list_files([args.shards]), settings, seed=0, heldout=True, shuffle=False)):
        if number == args.batches:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch.inputs.input_ids, attention_mask=batch.inputs.attention_mask,
                           position_ids=batch.inputs.position_ids).logits[batch.inputs.row, batch.inputs.column]
        mask, ids = batch.teacher.mask, batch.teacher.topk_ids.long()
        logits, ids = logits[mask].float(), ids[mask]
        lse64, rest64 = logsumexps(logits.double(), ids)
        exact.append(rest64 - lse64)
        log_mass = torch.logsumexp(logits.gather(1, ids) - torch.logsumexp(logits, -1, keepdim=True), -1)
        old.append(torch.log1p(-torch.exp(log_mass)).double())  # the old form, in float32
        lse, rest = logsumexps(logits, ids)
        new.append((rest - lse).double())
        teacher = TeacherTargets(ids, batch.teacher.topk_logprobs[mask].float(), batch.teacher.target_ids[mask].long(),
                                 batch.teacher.target_logprob[mask].float(), torch.ones(len(ids), dtype=torch.bool))
        kl_exact.append(loss(logits.double(), teacher).per_position.double())
        # the old form's loss: forward KL with the rest outcome's log q replaced, floored at −1e4 as kl() does
        log_p, log_q, _ = support_distributions(logits, teacher, "tail")
        log_q = torch.cat([log_q[:, :-1], old[-1].float().clamp(min=-1e4)[:, None]], dim=1)
        kl_old.append((log_p.exp() * (log_p - log_q)).sum(-1).double())
    exact, old, new, kl_old, kl_exact = (torch.cat(x) for x in (exact, old, new, kl_old, kl_exact))
    q_rest = exact.exp()
    rows = []
    for low, high in BANDS:
        band = (q_rest >= low) & (q_rest < high)
        if not band.any():
            rows.append([f"[{low:g}, {high:g})", "0.0 %", "–", "–", "–", "–"])
            continue
        gap_old = (old[band] - exact[band]).abs().clamp(max=1e4).median()
        gap_new = (new[band] - exact[band]).abs().median()
        rows.append([f"[{low:g}, {high:g})", f"{100 * float(band.float().mean()):.2f} %", f"{float(gap_old):.3g}",
                     f"{float(gap_new):.3g}", f"{float(kl_old[band].mean()):.4g}", f"{float(kl_exact[band].mean()):.4g}"])
    print_table(f"{len(q_rest):,} dev positions of {args.shards}, student {args.student}",
                ["exact q_rest", "positions", "old |Δ log q_rest|", "new |Δ log q_rest|", "forward KL tail, old",
                 "forward KL tail, exact"], rows)
    print(f"mean forward KL (tail) per position: old form {float(kl_old.mean()):.4f}, exact {float(kl_exact.mean()):.4f}")


if __name__ == "__main__":
    main()
