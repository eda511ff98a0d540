"""Student logits without the [positions × vocabulary] matrix: the LM head applied in chunks.

- :func:`support_logits`: z[n, j] = h[n] · W[ids[n, j]] (+ bias) for the k stored ids only. Memory
  O(chunk · k · H) in forward and backward (the gathered rows are recomputed in backward, not saved).
- :func:`fused_head_loss`: a per-position objective of (the support logits, the logsumexp, the logsumexp
  outside the support, the actual token's logit), summed with given weights over positions: each
  [chunk × V] block is computed once, the objective's gradient taken on the block's small per-position
  inputs, and the head's gradients formed from the block at once (three matmuls, as full logits take);
  backward only scales them. The tail support, the CE term and every loss whose value at a position
  depends on that position alone train through it.
- :func:`full_logsumexp`: lse[n] = logsumexp_v(h[n] · W[v] + bias[v]) over the whole vocabulary,
  holding at most one [chunk × V] float32 block; backward recomputes each block's softmax. Given
  ``outside_of`` ids [N, S] it also returns rest[n] = logsumexp over the ids not in row n's S (−inf
  where S covers the vocabulary), from the same blocks: log q_rest = rest − lse with no cancellation.

Both run their matmuls in the hidden states' dtype (bf16 under autocast on GPU; the weight is cast to it),
so the logits come out rounded to that dtype exactly as the full-logits path's ``head(hidden)`` does; every
reduction after it (logsumexp, softmax, the gradients' sums) is float32. In backward too, where autocast is
off (backward runs outside the forward's autocast region, so the compute dtype is stated, not inherited:
the blocks recomputed there equal the forward's).

None of them holds the [N, V] logits: at most one [chunk, V] float32 block (and its gradient) at a time.
:func:`full_logsumexp` recomputes each block in backward (one more [N, H] × [H, V] matmul than full
logits); :func:`fused_head_loss` does not, at the price of holding the head's gradients from forward to
backward (a [V, H] float32 buffer, the size of the weight's own gradient).
"""

from __future__ import annotations

import contextlib

import torch

DEFAULT_CHUNK = 512  # positions per block: [512, k, H] gathered rows or one [512, V] logits block (256: 4 % slower on a CPU at V = 151,936)
DENSE_CHUNK = 32  # rows per block of given logits on a CPU: [32, V] stays in cache (256 rows ran 3x slower)
GPU_BLOCK_ELEMENTS = 2**26  # on a GPU, blocks of ~64 M logits (256 MB float32): few, large kernels


def dense_chunk(logits: torch.Tensor) -> int:
    """Rows per block of dense logits [N, V]: cache-sized on a CPU, ~2^26 entries on an accelerator."""
    return DENSE_CHUNK if logits.device.type == "cpu" else max(DENSE_CHUNK, GPU_BLOCK_ELEMENTS // max(logits.shape[-1], 1))


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _gradient_buffers(ctx, hidden, weight, bias):
    """Zeroed gradients for the inputs that need them: hidden in its dtype, weight and bias in float32."""
    grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
    wants_bias = bias is not None and ctx.needs_input_grad[2]
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_bias else None
    return grad_hidden, grad_weight, grad_bias


def _cast_gradients(grad_hidden, grad_weight, grad_bias, weight, bias):
    return (grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None)


class _SupportLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk):
        out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)
        for a, b in _chunks(hidden.shape[0], chunk):
            rows = weight[ids[a:b]].to(hidden.dtype)  # [c, k, H]
            out[a:b] = torch.einsum("ch,ckh->ck", hidden[a:b], rows).float()
            if bias is not None:
                out[a:b] += bias[ids[a:b]].float()
        ctx.save_for_backward(hidden, weight, bias, ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, ids = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _gradient_buffers(ctx, hidden, weight, bias)
        for a, b in _chunks(hidden.shape[0], ctx.chunk):
            g = grad_out[a:b]  # [c, k]
            chunk_ids = ids[a:b]
            if grad_hidden is not None:
                grad_hidden[a:b] = torch.einsum("ck,ckh->ch", g.to(hidden.dtype), weight[chunk_ids].to(hidden.dtype))
            if grad_weight is not None:
                contrib = g[:, :, None] * hidden[a:b, None, :].float()  # [c, k, H]
                grad_weight.index_add_(0, chunk_ids.reshape(-1), contrib.reshape(-1, hidden.shape[1]))
            if grad_bias is not None:
                grad_bias.index_add_(0, chunk_ids.reshape(-1), g.reshape(-1))
        return (*_cast_gradients(grad_hidden, grad_weight, grad_bias, weight, bias), None, None)


def support_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                   bias: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Student logits at the support ids. hidden [N, H], weight [V, H], ids [N, k] -> [N, k] float32."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"ids must be [N, k] with N = {hidden.shape[0]}, got {tuple(ids.shape)}")
    return _SupportLogits.apply(hidden, weight, bias, ids.long(), chunk)


def _logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The one [chunk, V] float32 block of full logits held at a time."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    return logits + bias.float() if bias is not None else logits


def _block_logsumexps(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over all entries, over the entries not in ``ids``) of a [c, V] float block, from one
    exp: the rest is a sum of non-negative terms, so it keeps full relative precision however small."""
    peak = logits.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exps = torch.exp(logits - peak)
    lse = peak[:, 0] + torch.log(exps.sum(dim=-1))
    rest = peak[:, 0] + torch.log(exps.scatter_(1, ids, 0.0).sum(dim=-1))  # −inf where the ids cover the row
    return lse, rest


def _block_gradient(logits, ids, lse, rest, grad_lse, grad_rest) -> torch.Tensor:
    """d(grad_lse·lse + grad_rest·rest) / d logits for one [c, V] block: the softmax over every entry, plus
    the softmax over the entries outside ``ids`` (none where the rest is empty)."""
    grad = torch.exp(logits - lse[:, None]) * grad_lse[:, None]
    if grad_rest is None:
        return grad
    kept = torch.isfinite(rest)
    outside = torch.exp(logits - torch.where(kept, rest, lse)[:, None])  # every entry <= 1: finite times 0 is 0
    outside = outside.scatter_(1, ids, 0.0) * torch.where(kept, grad_rest, torch.zeros_like(grad_rest))[:, None]
    return grad + outside


class _LogSumExps(torch.autograd.Function):
    """(logsumexp, logsumexp outside ``ids``) of dense logits [N, V], one [chunk, V] block at a time."""

    @staticmethod
    def forward(ctx, logits, ids, chunk):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        rest = torch.empty_like(lse)
        for a, b in _chunks(logits.shape[0], chunk):
            lse[a:b], rest[a:b] = _block_logsumexps(logits[a:b].to(dtype), ids[a:b])
        ctx.save_for_backward(logits, ids, lse, rest)
        ctx.chunk = chunk
        return lse, rest

    @staticmethod
    def backward(ctx, grad_lse, grad_rest):
        logits, ids, lse, rest = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a, b in _chunks(logits.shape[0], ctx.chunk):
            grad[a:b] = _block_gradient(logits[a:b].to(lse.dtype), ids[a:b], lse[a:b], rest[a:b], grad_lse[a:b],
                                        grad_rest[a:b])
        return grad, None, None


def logsumexps(logits: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp over the vocabulary [N], logsumexp over the ids not in each row's ``ids`` [N]) of dense
    logits [N, V], in float32 (float64 stays float64); the second is −inf where ``ids`` cover the row.
    log q_rest = rest − lse, exact where 1 − Σ_S q would cancel. ``chunk``: rows per block (default
    :func:`dense_chunk`)."""
    return _LogSumExps.apply(logits, ids.long(), chunk or dense_chunk(logits))


class _FullLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk, outside_of):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        rest = torch.empty_like(out) if outside_of is not None else None
        for a, b in _chunks(hidden.shape[0], chunk):
            logits = _logits_block(hidden[a:b], weight, bias)
            if rest is None:
                out[a:b] = torch.logsumexp(logits, dim=-1)
            else:
                out[a:b], rest[a:b] = _block_logsumexps(logits, outside_of[a:b])
        ctx.save_for_backward(hidden, weight, bias, out, rest, outside_of)
        ctx.chunk = chunk
        return out if rest is None else (out, rest)

    @staticmethod
    def backward(ctx, grad_out, grad_rest=None):
        hidden, weight, bias, lse, rest, outside_of = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _gradient_buffers(ctx, hidden, weight, bias)
        for a, b in _chunks(hidden.shape[0], ctx.chunk):
            logits = _logits_block(hidden[a:b], weight, bias)
            rest_part = (None, None, None) if grad_rest is None else (outside_of[a:b], rest[a:b], grad_rest[a:b])
            ids, block_rest, block_grad_rest = rest_part
            probs = _block_gradient(logits, ids, lse[a:b], block_rest, grad_out[a:b], block_grad_rest)
            if grad_hidden is not None:
                grad_hidden[a:b] = probs.to(hidden.dtype) @ weight.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.T @ hidden[a:b].float()
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        return (*_cast_gradients(grad_hidden, grad_weight, grad_bias, weight, bias), None, None)


SCALED_REST_LIMIT = 60.0  # peak − rest (nats) up to which the rest's softmax is rescaled from exp(z − peak)


def _fused_block(logits, ids, target_ids, position_weights, objective, a, b, gradient: bool = True):
    """One block of :func:`fused_head_loss`: (the weighted objective, its reported values, d(weighted) /
    d logits [c, V] float32 or None without ``gradient``), from the block's logits [c, V] float32.

    One exp: e_v = exp(z_v − peak) gives lse = peak + log Σ_v e_v and, with the ids' entries zeroed, rest =
    peak + log Σ_{v∉S} e_v (a sum of non-negative terms: full relative precision however small). The
    gradient g_lse·softmax_v + g_rest·exp(z_v − rest)·[v∉S] is e_v times a per-row factor where
    peak − rest ≤ 60 (e_v is then a normal float32 wherever it matters); further below it is exp(z − rest)
    itself, for those rows only. The ids' and the actual token's own gradients are added at their columns."""
    z_support, z_target = logits.gather(1, ids), logits.gather(1, target_ids[:, None])[:, 0]
    peak = logits.amax(dim=-1)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exps = (logits - peak[:, None]).exp_()
    lse = peak + torch.log(exps.sum(dim=-1))
    support_exps = exps.gather(1, ids)
    rest = peak + torch.log(exps.scatter_(1, ids, 0.0).sum(dim=-1))  # −inf where the ids cover the row
    with torch.enable_grad() if gradient else contextlib.nullcontext():
        inputs = [t.detach().requires_grad_(gradient) for t in (z_support, lse, rest, z_target)]
        values, *extras = objective(a, b, *inputs)
        weighted = (values * position_weights).sum()
        reported = [values.detach(), *(e.detach() for e in extras)]
        if not gradient:  # evaluation: the value alone, one matmul per block
            return weighted.float(), reported, None
        grads = torch.autograd.grad(weighted, inputs, allow_unused=True)
    grad_support, grad_lse, grad_rest, grad_target = (torch.zeros_like(x) if g is None else g.float()
                                                      for g, x in zip(grads, inputs))
    kept = torch.isfinite(rest) & (grad_rest != 0)
    gap = torch.where(kept, peak - rest, torch.zeros_like(rest))
    scaled = kept & (gap <= SCALED_REST_LIMIT)
    softmax_scale = torch.exp(peak - lse)
    factor = grad_lse * softmax_scale + torch.where(scaled, grad_rest * torch.exp(gap.clamp(max=SCALED_REST_LIMIT)),
                                                    torch.zeros_like(gap))
    gradient = exps.mul_(factor[:, None])  # zero at the ids
    if (far := kept & ~scaled).any():  # a rest below peak − 60 nats: exp(z − rest) itself
        rows = far.nonzero()[:, 0]
        outside = torch.exp(logits[rows] - rest[rows, None]).scatter_(1, ids[rows], 0.0)
        gradient[rows] += outside * grad_rest[rows, None]
    gradient.scatter_add_(1, ids, grad_support + (grad_lse * softmax_scale)[:, None] * support_exps)
    gradient.scatter_add_(1, target_ids[:, None], grad_target[:, None])
    return weighted.detach().float(), reported, gradient


def _fused_pass(hidden, weight, bias, ids, target_ids, position_weights, objective, chunk, wants):
    """(Σ_n w_n·f_n, [f, other outputs] [N] each, the head's gradients (hidden, weight, bias), each None
    unless ``wants`` says so), one [chunk, V] block at a time; without any gradient wanted, one matmul per
    block and no autograd."""
    grad_hidden = torch.zeros_like(hidden) if wants[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and wants[2] else None
    wanted = any(wants)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    reported = []
    for a, b in _chunks(hidden.shape[0], chunk):
        logits = _logits_block(hidden[a:b], weight, bias)  # [c, V], under the caller's autocast
        weighted, values, block = _fused_block(logits, ids[a:b], target_ids[a:b], position_weights[a:b], objective,
                                               a, b, gradient=wanted)
        del logits
        total += weighted
        reported.append(values)
        if block is None:
            continue
        with torch.autocast(hidden.device.type, enabled=False):
            if grad_hidden is not None:
                grad_hidden[a:b] = block.to(hidden.dtype) @ weight.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(block.T, hidden[a:b].float())
            if grad_bias is not None:
                grad_bias += block.sum(0)
    outputs = [torch.cat(parts) for parts in zip(*reported)]
    return total, outputs, _cast_gradients(grad_hidden, grad_weight, grad_bias, weight, bias)


class _FusedHeadLoss(torch.autograd.Function):
    """Σ_n w_n·f(z_n[ids_n], lse_n, rest_n, z_n[y_n]) with the head's gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, target_ids, position_weights, objective, chunk):
        total, outputs, gradients = _fused_pass(hidden, weight, bias, ids, target_ids, position_weights, objective,
                                                chunk, ctx.needs_input_grad[:3])
        ctx.present = tuple(g is not None for g in gradients)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in gradients))
        ctx.mark_non_differentiable(*outputs)
        return (total, *outputs)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        scaled = (g * grad_total.to(g.dtype) if present else None for g, present in zip(ctx.saved_tensors, ctx.present))
        return (*scaled, None, None, None, None, None)


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                    target_ids: torch.Tensor, position_weights: torch.Tensor, objective, chunk: int = DEFAULT_CHUNK
                    ) -> tuple[torch.Tensor, ...]:
    """(Σ_n w_n·f_n, f [N], the objective's other outputs [N]...) where f_n = ``objective``(a, b, z_S, lse,
    rest, z_y)[0] is evaluated on positions a:b at a time: z_S [c, S] the logits of hidden @ weight.T
    (+ bias) at ``ids`` [N, S], lse and rest [c] their logsumexp over the vocabulary and over the ids not in
    the row's S, z_y [c] the logit of ``target_ids`` [N]. f_n must depend on position n's inputs alone.
    ``position_weights`` [N] (e.g. mask / supervised count). Gradients reach hidden, weight and bias;
    the other outputs are reported values (no gradient)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    inputs = (hidden, weight, bias, ids.long(), target_ids.long(), position_weights, objective, chunk)
    if not torch.is_grad_enabled():  # evaluation: no gradients formed (ctx.needs_input_grad would still ask for them)
        total, outputs, _ = _fused_pass(*inputs, wants=(False, False, False))
        return (total, *outputs)
    return _FusedHeadLoss.apply(*inputs)


def full_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   chunk: int = DEFAULT_CHUNK, outside_of: torch.Tensor | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the whole vocabulary of hidden @ weight.T (+ bias). [N, H], [V, H] -> [N] float32;
    with ``outside_of`` ids [N, S], the pair (that, the logsumexp over the ids outside each row's S)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    return _FullLogSumExp.apply(hidden, weight, bias, chunk, None if outside_of is None else outside_of.long())
