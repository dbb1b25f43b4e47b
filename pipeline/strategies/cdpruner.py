"""CDPruner (Zhang et al., 2025): a conditional DPP over the projected tokens, by greedy MAP."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._rows import DENSE_LIMIT, PickedRows, block_rows
from .core import Request, budget_counts, image_budget, strategy


# version 2: the relevance reads the feature layer (-2 on LLaVA-NeXT), as the reference does, not the last
@strategy("cdpruner", needs=("projected",), uses=("relevance",), version="2", label="CDPruner",
          peer="Zhang et al., 2025", style=("tab:cyan", "*"), rank=9,
          help="CDPruner: conditional DPP on the projected tokens (conditioned with --text-encoder)")
def _cdpruner(req: Request) -> torch.Tensor:
    return cdpruner(req.need("projected"), req.context.relevance, req.retention, req.budget, req.valid)


def cdpruner(projected: torch.Tensor, relevance: torch.Tensor | None, retention: float, budget: str,
             valid: torch.Tensor, dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """``cdpruner``: CDPruner's conditional DPP (Theia-4869/CDPruner, ``llava_arch.py``).

    Faithful: the kernel is over the projected (``mm_projector``, LLM-space) tokens: S = cosine
    similarity of the L2-normalized tokens, L = diag(q) S diag(q) with q each token's relevance to the
    question (``pipeline.relevance``: their CLIP text-image similarity, negated and min-max normalized
    over the whole image); the kept tokens are the greedy MAP of the DPP with incremental Cholesky
    updates (:func:`dpp_greedy`, their fast greedy). As in their LLaVA-NeXT code the DPP runs per crop
    (B = crops) with each crop's budget; ``--budget global`` runs one DPP over the whole image with
    K (:func:`image_budget`). ``relevance=None`` is the unconditioned DPP (their DPPruner ablation):
    L = S. What differs: only valid tokens are candidates and newlines follow the kept rows (their
    NeXT code turns off unpadding and newlines: fixed 672x672, ``_unpad`` stripped). On Qwen-VL the
    kernel is over the merger's output (the merged tokens the LLM sees) of the whole image, one crop;
    its relevance needs a CLIP tower's post-norm states, which Qwen has none of, so only the
    unconditioned DPP runs there (``--text-encoder`` is refused in one line).

    Memory: a DPP over more than ``dense_limit`` kernel elements (a whole OneVision page under
    ``--budget global``) never builds its (N, N) kernel: the greedy reads one kernel row per pick,
    computed from the tokens (:func:`_dpp_greedy_rows`); its state is the (K, N) Cholesky rows."""
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
        xi, qi = x[g][idx], None if q is None else q[g][idx]
        if idx.numel() ** 2 <= dense_limit:
            kernel = xi @ xi.T
            if qi is not None:
                kernel = qi[:, None] * kernel * qi[None, :]
            pick = dpp_greedy(kernel, k)
        else:
            pick = _dpp_greedy_streamed(xi, qi, k, dense_limit)
        mask[g][idx[pick]] = True
    return mask.view(crops, tokens)


def _dpp_greedy_streamed(x: torch.Tensor, q: torch.Tensor | None, k: int, dense_limit: int) -> torch.Tensor:
    """:func:`dpp_greedy` on L = diag(q) (x x^T) diag(q) for unit rows x (N, C), without the (N, N)
    kernel: its diagonal from blocks of rows, and the picks' rows from :class:`PickedRows` (blocks of
    the likeliest next picks, the largest d_i^2). The same float32 products, scaled in the same order
    (L_ij = (q_i S_ij) q_j), then widened to float64, as the whole kernel; the BLAS may round a block's
    dot products differently from the whole matrix's in the last bit, so a pick could differ only where
    two d_i^2 tie to that rounding (``tests/test_peer_rows.py``)."""
    n = x.shape[0]
    size = block_rows(n, dense_limit)
    buf, wide = x.new_empty(size, n), x.new_empty(size, n, dtype=torch.float64)  # every block goes here

    def block(ids: torch.Tensor) -> torch.Tensor:
        s = torch.matmul(x[ids], x.T, out=buf[:ids.numel()])
        if q is not None:
            s.mul_(q[ids][:, None]).mul_(q[None, :])
        return wide[:ids.numel()].copy_(s)

    diag = x.new_empty(n)  # from row blocks like the picks' rows: the same products as theirs
    for a in range(0, n, size):
        s = torch.matmul(x[a:a + size], x.T, out=buf[:min(size, n - a)])
        diag[a:a + s.shape[0]] = s.diagonal(offset=a)
    diag = (diag if q is None else q * diag * q).double()
    rows = PickedRows(block, n, size)
    return _dpp_greedy_rows(diag, rows.get, k)


def dpp_greedy(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """Indices of the k items the greedy MAP of a DPP with kernel ``kernel`` (N, N) picks, in pick order
    (:func:`_dpp_greedy_rows` on the rows of ``kernel``, in float64)."""
    kernel = kernel.double()
    return _dpp_greedy_rows(torch.diagonal(kernel).clone(), lambda j, _: kernel[j], k, eps)


def _dpp_greedy_rows(diag: torch.Tensor, row: Callable[[int, torch.Tensor], torch.Tensor], k: int,
                     eps: float = 1e-10) -> torch.Tensor:
    """Indices of the k items the greedy MAP of a DPP picks, in pick order, from the kernel's diagonal
    ``diag`` (N,) and ``row(j, d2)``, its row j (N,), both float64 (``d2``: every item's current d_i^2,
    -inf once picked, the likeliest next picks first): only the rows of the picks are read, so the
    state is the (k, N) Cholesky rows, never the (N, N) kernel.

    Incremental Cholesky (Chen, Zhang and Zhou, NeurIPS 2018; CDPruner's fast greedy): d_i^2 starts as
    L_ii; after picking j, e_i = (L_ji - <c_j, c_i>) / d_j is appended to every c_i and d_i^2 -= e_i^2;
    the next pick is the largest d_i^2. Ties go to the lower index. When no item adds volume any more
    (every d_i^2 <= eps * max L_ii: the kernel's rank is spent, e.g. more picks than the tokens'
    width), the reference would divide by zero; here the rest are taken by their diagonal L_ii (their
    relevance), largest first, so exactly k distinct items come back."""
    n = diag.shape[0]
    k = min(int(k), n)
    floor = eps * max(float(diag.max()), 0.0) if n else 0.0
    cis = diag.new_zeros(k, n)
    di2 = diag.clone()
    picked = torch.zeros(n, dtype=torch.bool, device=diag.device)
    out = torch.empty(k, dtype=torch.long, device=diag.device)
    for i in range(k):
        open_ = di2.masked_fill(picked, float("-inf"))
        j = int(open_.argmax())
        if float(open_[j]) <= floor:  # rank spent: the rest by relevance
            rest = diag.masked_fill(picked, float("-inf")).argsort(descending=True, stable=True)[:k - i]
            out[i:] = rest
            break
        out[i] = j
        picked[j] = True
        e = (row(j, open_) - cis[:i, j] @ cis[:i]) / math.sqrt(float(di2[j]))
        cis[i] = e
        di2 = di2 - e * e
    return out
