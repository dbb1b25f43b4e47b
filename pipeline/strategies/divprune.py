"""DivPrune (Alvar et al., CVPR 2025) and its simple variant ``diversity``: max-min diversity."""

from __future__ import annotations

import torch

from .core import Request, budget_counts, image_budget, strategy


@strategy("diversity", style=("tab:orange", "D"), rank=5,
          help="the simple variant of DivPrune: max-min on the tower features, crop by crop")
def _diversity(req: Request) -> torch.Tensor:
    return diversity(req.features, req.retention, req.budget, req.valid)


@strategy("divprune", needs=("projected",), version="1", label="DivPrune", peer="Alvar et al., CVPR 2025",
          style=("tab:brown", "X"), rank=8, help="DivPrune: max-min diversity on the projected tokens of the image")
def _divprune(req: Request) -> torch.Tensor:
    return divprune(req.need("projected"), req.retention, req.budget, req.valid)


def diversity(features: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """``diversity``, the simple variant of DivPrune: greedy max-min diversity on cosine distance between
    the *tower* features (the projector's input), within each crop's budget (``--budget global``: over the
    image). What differs from DivPrune: the space (tower, not projected) and the per-crop split."""
    crops, tokens = features.shape[:2]
    k = budget_counts(valid, retention, budget)
    if budget == "per-crop":
        return _max_min(features.float(), k, valid)  # all crops at once
    return _max_min(features.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


def divprune(projected: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """``divprune``: DivPrune as its paper and reference code run it (vbdi/divprune, ``DivPrune`` on the
    output of ``mm_projector``).

    Faithful: greedy max-min on cosine distance over the *projected* (LLM-space) tokens of the whole
    image, as one set: the first token is the one farthest from its nearest neighbour, then repeatedly
    the token farthest from everything kept. K (the image's budget, :func:`image_budget`) falls wherever
    diversity puts it. What differs: only valid tokens are candidates (the reference runs before
    LLaVA-NeXT's unpadding), and row newlines follow the kept rows as for every strategy (the
    reference prunes after packing, newlines included)."""
    crops, tokens = projected.shape[:2]
    k = torch.tensor([image_budget(valid, retention, budget)], device=projected.device)
    return _max_min(projected.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


def _max_min(x: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B,) counts, (B, N) allowed -> (B, N) mask of k[b] allowed tokens picked by greedy
    max-min diversity on cosine distance, batched over B."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
    b, n = dist.shape[:2]
    rows = torch.arange(b, device=x.device)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    others = (~eye) & allowed[:, None, :]  # distances to other allowed tokens only
    nearest = dist.masked_fill(~others, float("inf")).min(dim=2).values  # to the nearest other allowed token
    nearest = nearest.masked_fill(~allowed, float("-inf"))
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


