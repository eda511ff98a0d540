"""Student logits without the [positions × vocabulary] matrix: the LM head applied in chunks.

- :func:`support_logits`: z[n, j] = h[n] · W[ids[n, j]] (+ bias) for the k stored ids only. Memory
  O(chunk · k · H) in forward and backward (the gathered rows are recomputed in backward, not saved).
- :func:`full_logsumexp`: lse[n] = logsumexp_v(h[n] · W[v] + bias[v]) over the whole vocabulary,
  holding at most one [chunk × V] float32 block; backward recomputes each block's softmax. Given
  ``outside_of`` ids [N, S] it also returns rest[n] = logsumexp over the ids not in row n's S (−inf
  where S covers the vocabulary), from the same blocks: log q_rest = rest − lse with no cancellation.

Both run their matmuls in the inputs' dtype (bf16 on GPU) and accumulate the logits in float32.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 256  # positions per block: [256, k, H] gathered rows or one [256, V] logits block


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
            rows = weight[ids[a:b]]  # [c, k, H]
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
                grad_hidden[a:b] = torch.einsum("ck,ckh->ch", g.to(weight.dtype), weight[chunk_ids]).to(hidden.dtype)
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
    logits = (hidden @ weight.T).float()
    return logits + bias.float() if bias is not None else logits


def _outside(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with −inf at each row's ``ids``, [rows] mask of rows that keep at least one entry)."""
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(1, ids, False)
    return torch.where(outside, logits, torch.full_like(logits, float("-inf"))), outside.any(dim=-1)


def logsumexp_outside(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of ``logits`` [N, V] over the entries not in its ``ids`` [N, S]; −inf (and no
    gradient, where logsumexp's own would be NaN) for a row whose ids cover the vocabulary. -> [N]."""
    masked, kept = _outside(logits, ids)
    safe = torch.where(kept[:, None], masked, torch.zeros_like(masked))
    return torch.where(kept, torch.logsumexp(safe, dim=-1), torch.full_like(kept, float("-inf"), dtype=logits.dtype))


class _FullLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk, outside_of):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        rest = torch.empty_like(out) if outside_of is not None else None
        for a, b in _chunks(hidden.shape[0], chunk):
            logits = _logits_block(hidden[a:b], weight, bias)
            out[a:b] = torch.logsumexp(logits, dim=-1)
            if rest is not None:
                rest[a:b] = logsumexp_outside(logits, outside_of[a:b])
        ctx.save_for_backward(hidden, weight, bias, out, rest, outside_of)
        ctx.chunk = chunk
        return out if rest is None else (out, rest)

    @staticmethod
    def backward(ctx, grad_out, grad_rest=None):
        hidden, weight, bias, lse, rest, outside_of = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _gradient_buffers(ctx, hidden, weight, bias)
        for a, b in _chunks(hidden.shape[0], ctx.chunk):
            logits = _logits_block(hidden[a:b], weight, bias)
            probs = torch.exp(logits - lse[a:b, None]) * grad_out[a:b, None]  # d lse / d logits, scaled
            if grad_rest is not None:  # d rest / d logits: the softmax over the entries outside the ids
                masked, kept = _outside(logits, outside_of[a:b])
                shift = torch.where(kept, rest[a:b], torch.zeros_like(rest[a:b]))
                probs = probs + torch.exp(masked - shift[:, None]) * (grad_rest[a:b] * kept)[:, None]
            if grad_hidden is not None:
                grad_hidden[a:b] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += probs.T @ hidden[a:b].float()
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        return (*_cast_gradients(grad_hidden, grad_weight, grad_bias, weight, bias), None, None)


def full_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   chunk: int = DEFAULT_CHUNK, outside_of: torch.Tensor | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the whole vocabulary of hidden @ weight.T (+ bias). [N, H], [V, H] -> [N] float32;
    with ``outside_of`` ids [N, S], the pair (that, the logsumexp over the ids outside each row's S)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    return _FullLogSumExp.apply(hidden, weight, bias, chunk, None if outside_of is None else outside_of.long())
