"""DivPrune (Alvar et al., CVPR 2025) and its simple variant ``diversity``: max-min diversity."""

from __future__ import annotations

import torch

from ._rows import DENSE_LIMIT, PickedRows, block_rows
from .core import Request, budget_counts, image_budget, strategy


@strategy("diversity", style=("tab:orange", "D"), rank=5,
          help="the simple variant of DivPrune: max-min on the tower features, crop by crop")
def _diversity(req: Request) -> torch.Tensor:
    return diversity(req.features, req.retention, req.budget, req.valid)


@strategy("divprune", needs=("projected",), version="1", label="DivPrune", peer="Alvar et al., CVPR 2025",
          style=("tab:brown", "X"), rank=8, help="DivPrune: max-min diversity on the projected tokens of the image")
def _divprune(req: Request) -> torch.Tensor:
    return divprune(req.need("projected"), req.retention, req.budget, req.valid)


def diversity(features: torch.Tensor, retention: float, budget: str, valid: torch.Tensor,
              dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """``diversity``, the simple variant of DivPrune: greedy max-min diversity on cosine distance between
    the *tower* features (the projector's input), within each crop's budget (``--budget global``: over the
    image). What differs from DivPrune: the space (tower, not projected) and the per-crop split."""
    crops, tokens = features.shape[:2]
    k = budget_counts(valid, retention, budget)
    if budget == "per-crop":
        return _max_min(features.float(), k, valid, dense_limit)  # all crops at once
    flat = features.float().reshape(1, crops * tokens, -1)
    return _max_min(flat, k, valid.reshape(1, -1), dense_limit).view(crops, tokens)


def divprune(projected: torch.Tensor, retention: float, budget: str, valid: torch.Tensor,
             dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """``divprune``: DivPrune as its paper and reference code run it (vbdi/divprune, ``DivPrune`` on the
    output of ``mm_projector``).

    Faithful: greedy max-min on cosine distance over the *projected* (LLM-space) tokens of the whole
    image, as one set: the first token is the one farthest from its nearest neighbour, then repeatedly
    the token farthest from everything kept. K (the image's budget, :func:`image_budget`) falls wherever
    diversity puts it. What differs: the reference prunes the packed sequence (after LLaVA-NeXT's
    unpadding, so padding is never a candidate there either, but with the row newlines among the
    candidates); here the candidates are the image's valid encoder tokens, and row newlines follow the
    kept rows as for every strategy. On Qwen-VL the projected tokens are the merger's output (the merged
    tokens the LLM sees, at its width) of the whole image, which is one crop. Memory: O(N) per pick beyond the features
    (:func:`_max_min`); ``dense_limit`` is the distance-matrix size up to which it is built whole."""
    crops, tokens = projected.shape[:2]
    k = torch.tensor([image_budget(valid, retention, budget)], device=projected.device)
    flat = projected.float().reshape(1, crops * tokens, -1)
    return _max_min(flat, k, valid.reshape(1, -1), dense_limit).view(crops, tokens)


def _max_min(x: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
             dense_limit: int = DENSE_LIMIT) -> torch.Tensor:
    """(B, N, C), (B,) counts, (B, N) allowed -> (B, N) mask of k[b] allowed tokens picked by greedy
    max-min diversity on cosine distance, batched over B.

    The distances to the kept set live in one running (B, N) vector; each pick min-s in its row of
    distances. Up to ``dense_limit`` elements the whole (B, N, N) distance matrix is built first and
    the rows are read from it. Above it (a whole OneVision page, 22.6k tokens: 2 GB) each item goes
    through :func:`_max_min_rows`, in O(N) memory."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    b, n = unit.shape[:2]
    if b * n * n > dense_limit:
        return torch.stack([_max_min_rows(unit[i], int(k[i]), allowed[i], dense_limit) for i in range(b)])
    dist = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
    rows = torch.arange(b, device=x.device)
    nearest = _nearest(dist, allowed[:, None, :], 0).masked_fill(~allowed, float("-inf"))
    first = nearest.argmax(dim=1)
    taken = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    taken[rows, first] = k > 0
    to_set = dist[rows, first]  # (B, N): distance of every token to the kept set
    for step in range(1, int(k.max()) if k.numel() else 0):
        nxt = to_set.masked_fill(taken | ~allowed, float("-inf")).argmax(dim=1)
        more = step < k  # rows that still pick
        taken[rows[more], nxt[more]] = True
        to_set = torch.minimum(to_set, dist[rows, nxt])
    return taken


def _max_min_rows(unit: torch.Tensor, k: int, allowed: torch.Tensor, dense_limit: int) -> torch.Tensor:
    """:func:`_max_min` for one item, unit rows (N, C), without the (N, N) matrix: the first pick's
    nearest-neighbour distances are computed in blocks of rows, and each pick's row of distances comes
    from :class:`PickedRows`, in blocks of the likeliest next picks. Memory: O(N) per pick (blocks of
    at most 256 rows). Same picks as the whole matrix, from the same normalization and matmul; the BLAS
    may round a block's dot products differently from the whole matrix's in the last bit, so a pick
    could differ only where two distances tie to float32 rounding (``tests/test_peer_rows.py``)."""
    n = unit.shape[0]
    taken = torch.zeros(n, dtype=torch.bool, device=unit.device)
    if k <= 0 or n == 0:
        return taken
    size = block_rows(n, dense_limit)
    buf = unit.new_empty(size, n)  # every block is written here: no large allocation per block
    nearest = unit.new_empty(n)
    for a in range(0, n, size):
        d = _distances(unit, torch.arange(a, min(a + size, n), device=unit.device), buf)
        d.diagonal(offset=a).fill_(float("inf"))  # not its own neighbour
        torch.amin(d.masked_fill_(~allowed, float("inf")), dim=1, out=nearest[a:a + d.shape[0]])
    nearest.masked_fill_(~allowed, float("-inf"))
    rows = PickedRows(lambda ids: _distances(unit, ids, buf), n, size)
    first = int(nearest.argmax())
    taken[first] = True
    to_set = rows.get(first, nearest).clone()
    for _ in range(1, k):
        open_ = to_set.masked_fill(taken | ~allowed, float("-inf"))
        nxt = int(open_.argmax())
        taken[nxt] = True
        torch.minimum(to_set, rows.get(nxt, open_), out=to_set)
    return taken


def _distances(unit: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Cosine distances (M, N) of unit rows ``ids`` (M,) to all of ``unit`` (N, C), written into the
    first M rows of ``out``: 1 - (their rows of unit @ unit^T), the whole matrix's products."""
    d = torch.matmul(unit[ids], unit.T, out=out[:ids.numel()])
    return d.neg_().add_(1.0)  # -s + 1 is 1 - s to the bit (both the rounding of the same value)


def _nearest(dist: torch.Tensor, allowed: torch.Tensor, start: int) -> torch.Tensor:
    """(..., m, N) distances of tokens start..start+m-1 to all, (..., 1, N) allowed -> (..., m) distance
    of each to its nearest other allowed token (inf when it has none)."""
    m, n = dist.shape[-2:]
    own = torch.arange(start, start + m, device=dist.device)[:, None] == torch.arange(n, device=dist.device)
    return dist.masked_fill(own | ~allowed, float("inf")).min(dim=-1).values
