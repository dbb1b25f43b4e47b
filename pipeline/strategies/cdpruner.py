"""CDPruner (Zhang et al., 2025): a conditional DPP over the projected tokens, by greedy MAP."""

from __future__ import annotations

import math

import torch

from .core import Request, budget_counts, image_budget, strategy


@strategy("cdpruner", needs=("projected",), uses=("relevance",), version="1", label="CDPruner",
          peer="Zhang et al., 2025", style=("tab:cyan", "*"), rank=9,
          help="CDPruner: conditional DPP on the projected tokens (conditioned with --text-encoder)")
def _cdpruner(req: Request) -> torch.Tensor:
    return cdpruner(req.need("projected"), req.context.relevance, req.retention, req.budget, req.valid)


def cdpruner(projected: torch.Tensor, relevance: torch.Tensor | None, retention: float, budget: str,
             valid: torch.Tensor) -> torch.Tensor:
    """``cdpruner``: CDPruner's conditional DPP (Theia-4869/CDPruner, ``llava_arch.py``).

    Faithful: the kernel is over the projected (``mm_projector``, LLM-space) tokens: S = cosine
    similarity of the L2-normalized tokens, L = diag(q) S diag(q) with q each token's relevance to the
    question (``pipeline.relevance``: their CLIP text-image similarity, negated and min-max normalized
    over the whole image); the kept tokens are the greedy MAP of the DPP with incremental Cholesky
    updates (:func:`dpp_greedy`, their fast greedy). As in their LLaVA-NeXT code the DPP runs per crop
    (B = crops) with each crop's budget; ``--budget global`` runs one DPP over the whole image with
    K (:func:`image_budget`). ``relevance=None`` is the unconditioned DPP (their DPPruner ablation):
    L = S. What differs: only valid tokens are candidates and newlines follow the kept rows (their
    NeXT code turns off unpadding and newlines: fixed 672x672, ``_unpad`` stripped)."""
    crops, tokens = projected.shape[:2]
    if relevance is not None and tuple(relevance.shape) != (crops, tokens):
        raise ValueError(f"relevance shape {tuple(relevance.shape)} does not match features {(crops, tokens)}")
    x = torch.nn.functional.normalize(projected.float(), dim=-1)
    q = None if relevance is None else relevance.float().to(x.device)
    mask = torch.zeros(crops, tokens, dtype=torch.bool, device=projected.device)
    if budget == "per-crop":
        groups = [(c, int(n)) for c, n in enumerate(budget_counts(valid, retention, budget))]
    else:
        x, mask, valid = x.reshape(1, crops * tokens, -1), mask.view(1, -1), valid.reshape(1, -1)
        q = None if q is None else q.reshape(1, -1)
        groups = [(0, image_budget(valid, retention, budget))]
    for g, k in groups:
        idx = valid[g].nonzero().flatten()
        if k == 0 or idx.numel() == 0:
            continue
        xi = x[g][idx]
        kernel = xi @ xi.T
        if q is not None:
            kernel = q[g][idx][:, None] * kernel * q[g][idx][None, :]
        mask[g][idx[dpp_greedy(kernel, k)]] = True
    return mask.view(crops, tokens)


def dpp_greedy(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """Indices of the k items the greedy MAP of a DPP with kernel ``kernel`` (N, N) picks, in pick order.

    Incremental Cholesky (Chen, Zhang and Zhou, NeurIPS 2018; CDPruner's fast greedy): d_i^2 starts as
    L_ii; after picking j, e_i = (L_ji - <c_j, c_i>) / d_j is appended to every c_i and d_i^2 -= e_i^2;
    the next pick is the largest d_i^2. Ties go to the lower index. When no item adds volume any more
    (every d_i^2 <= eps * max L_ii: the kernel's rank is spent, e.g. more picks than the tokens'
    width), the reference would divide by zero; here the rest are taken by their diagonal L_ii (their
    relevance), largest first, so exactly k distinct items come back."""
    n = kernel.shape[0]
    k = min(int(k), n)
    kernel = kernel.double()
    diag = torch.diagonal(kernel).clone()
    floor = eps * max(float(diag.max()), 0.0) if n else 0.0
    cis = kernel.new_zeros(k, n)
    di2 = diag.clone()
    picked = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    out = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        open_ = di2.masked_fill(picked, float("-inf"))
        j = int(open_.argmax())
        if float(open_[j]) <= floor:  # rank spent: the rest by relevance
            rest = diag.masked_fill(picked, float("-inf")).argsort(descending=True, stable=True)[:k - i]
            out[i:] = rest
            break
        out[i] = j
        picked[j] = True
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(di2[j]))
        cis[i] = e
        di2 = di2 - e * e
    return out
