"""HiRED (Arif et al., AAAI 2025): an attention-guided budget split across crops, then top-k per crop."""

from __future__ import annotations

import torch

from .core import Request, image_budget, strategy, top_k

HIRED_ALPHA = 0.5  # HiRED's share of the budget for the base (full-image) crop


# crops: HiRED splits its budget between a base crop and a grid, so a family without crops (Qwen-VL) refuses it
@strategy("hired", needs=("cls_attention", "early_attention"), uses=("regions",), crops=True, version="1",
          label="HiRED", peer="Arif et al., AAAI 2025", style=("tab:olive", "P"), rank=7, params={"alpha": HIRED_ALPHA},
          help="HiRED: the base crop gets alpha of the budget, layer-0 CLS attention splits the rest across crops")
def _hired(req: Request) -> torch.Tensor:
    return hired(req.need("cls_attention"), req.need("early_attention"), req.context.regions, req.retention,
                 req.budget, req.valid, req.options["alpha"])


def hired(cls_attention: torch.Tensor, early_attention: torch.Tensor, regions: torch.Tensor | None,
          retention: float, budget: str, valid: torch.Tensor, alpha: float = HIRED_ALPHA) -> torch.Tensor:
    """``hired``: HiRED's two phases (hasanar1f/HiRED, its patched ``modeling_llava_next.py``), on the
    image's budget K (:func:`image_budget`).

    1. Token-budget distribution. The base (full-image) crop gets min(int(alpha * K), its tokens)
       (alpha = 0.5, the value their scripts run). The rest goes to the grid crops: the base image's
       top int(L * (1 - alpha)) tokens by the CLS attention of encoder layer 0 (their "top" layer) are
       counted per grid crop, and each crop gets that share of the rest.
    2. Token selection. In every crop, the top k_c tokens by the CLS attention of the feature layer
       (-2, their "bottom" layer 22).

    ``regions`` (L,) names the grid crop (1-based crop index) each base-crop token lies in, 0 for none
    (``pipeline.prune.base_regions``). Faithful: the layers, alpha, the count-based split, top-k per
    crop, CLS dropped (LLaVA-NeXT's feature select). What differs: (a) HiRED assigns base tokens to grid
    crops by a row-major reshape of the flattened 24x24 map (for a 2x2 grid, bands of 6 rows); here a
    base token goes to the grid crop that covers its centre in the original image, so canvas padding
    draws no budget; (b) their shares are floored, so their total can fall short of K; here the
    largest remainder makes them sum to K exactly, and a crop never gets more than its valid tokens
    (the excess goes on to the others); (c) heads are averaged, not summed (the same ranking); (d) with
    one crop (no grid: ``--crops base``) the reference keeps only int(alpha * K), the base crop's share;
    here that crop gets all of K, so that HiRED sends the budget every strategy sends (docs/peers.md)."""
    crops, tokens = cls_attention.shape
    total = image_budget(valid, retention, budget)
    n_valid = valid.sum(dim=1).cpu()
    k = torch.zeros(crops, dtype=torch.long)
    if crops == 1:
        k[0] = total
    else:
        if regions is None or tuple(regions.shape) != (tokens,):
            raise ValueError("strategy 'hired' needs the base crop's token regions (pipeline.prune.base_regions)")
        k[0] = min(int(total * alpha), int(n_valid[0]))
        top = int(tokens * (1 - alpha))
        chosen = early_attention[0].float().cpu().argsort(descending=True, stable=True)[:top]
        weight = torch.zeros(crops, dtype=torch.float64)
        weight.index_add_(0, regions.long().cpu()[chosen], torch.ones(chosen.numel(), dtype=torch.float64))
        k[1:] = _apportion(total - int(k[0]), weight[1:], n_valid[1:])
        if int(k.sum()) < total:  # grid crops full (tiny images): the base crop takes the rest
            k[0] = min(int(n_valid[0]), int(k[0]) + total - int(k.sum()))
    return top_k(cls_attention, k.to(cls_attention.device), valid, per_crop=True)


def _apportion(total: int, weight: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Integers summing to ``total`` (<= cap.sum()) in proportion to ``weight``, each <= its cap:
    largest remainder, then what a capped entry cannot take goes on to the others in proportion."""
    out = torch.zeros(weight.shape[0], dtype=torch.long)
    left = min(total, int(cap.sum()))
    open_ = (cap > 0) & (weight > 0)
    if not bool(open_.any()):
        open_ = cap > 0
        weight = torch.ones_like(weight)
    while left > 0 and bool(open_.any()):
        w = torch.where(open_, weight, torch.zeros_like(weight))
        share = w / w.sum() * left
        base = share.floor().long()
        rest = left - int(base.sum())
        order = torch.argsort(share - base.double(), descending=True, stable=True)
        base[order[:rest]] += 1
        room = cap - out
        take = torch.minimum(base, room)
        out += take
        left -= int(take.sum())
        open_ = open_ & (out < cap)
        if not bool(open_.any()) and left > 0:  # every weighted crop is full: spill over to any with room
            open_ = out < cap
            weight = torch.ones_like(weight)
    return out
