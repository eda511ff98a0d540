"""Straightforward dense float64 references for the losses, written from docs/losses.md in probability
space (no log-space tricks), for tests only. Each takes p, q: [N, V] float64 probability rows."""

from __future__ import annotations

import torch


def kl(a, b):
    terms = torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a))
    return terms.sum(-1)


def tvd(a, b):
    return 0.5 * (a - b).abs().sum(-1)


def ab(a_dist, b_dist, a, b):
    return -(a_dist**a * b_dist**b - a / (a + b) * a_dist ** (a + b) - b / (a + b) * b_dist ** (a + b)).sum(-1) / (a * b)


def assistant(p, q, alpha, lam):
    if alpha == 1:
        r = p**lam * q ** (1 - lam)
    else:
        s = (1 - alpha) / 2
        r = (lam * p**s + (1 - lam) * q**s) ** (1 / s)
    return r / r.sum(-1, keepdim=True)


def amid(p, q, alpha, lam, divergence="kl", order="pr", a=0.2, b=0.7):
    r = assistant(p, q, alpha, lam)
    x, y = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[order]
    return {"kl": kl, "tvd": tvd}[divergence](x, y) if divergence != "ab" else ab(x, y, a, b)


def skl(p, q, skew):
    return kl(p, skew * p + (1 - skew) * q)


def srkl(p, q, skew):
    return kl(q, (1 - skew) * p + skew * q)


def jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def akl(p, q, mu):
    """The head/tail weights use the detached student (docs/losses.md §2)."""
    out = []
    for p_row, q_row in zip(p, q):
        order = torch.argsort(p_row, descending=True)
        ps, qs = p_row[order], q_row[order]
        head = torch.cumsum(ps, 0) <= mu
        head[0] = True
        gap = (ps - qs.detach()).abs()
        g_head, g_tail = gap[head].sum(), gap[~head].sum()
        w = g_head / (g_head + g_tail)
        out.append(w * kl(p_row[None], q_row[None])[0] + (1 - w) * kl(q_row[None], p_row[None])[0])
    return torch.stack(out)


def taid(p, q, t):
    """p_t is built from the detached student (stopgrad), docs/losses.md §4."""
    logits = (1 - t) * torch.log(q.detach()) + t * torch.log(p)
    pt = torch.softmax(logits, -1)
    return kl(pt, q)


def atkd(p, q, targets, lam):
    n = p.shape[0]
    rows = torch.arange(n)
    pg, qg = p[rows, targets], q[rows, targets]
    tkd = pg * torch.log(pg / qg) + (1 - pg) * torch.log((1 - pg) / (1 - qg))
    others = torch.ones_like(p, dtype=torch.bool)
    others[rows, targets] = False
    p_hat = torch.where(others, p, 0) / (1 - pg)[:, None]
    q_hat = torch.where(others, q, 0) / (1 - qg)[:, None]
    dkd = kl(p_hat, torch.where(others, q_hat, 1.0))
    unc = 1 - pg
    hard = unc >= unc.median()
    easy = ~hard
    value = torch.zeros((), dtype=p.dtype)
    if easy.any():
        value = value + lam * dkd[easy].mean()
    if hard.any():
        value = value + (1 - lam) * (tkd + dkd)[hard].mean()
    return value, tkd, dkd, unc
