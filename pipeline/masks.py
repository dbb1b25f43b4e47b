"""Which tokens of one image a selector keeps, crop by crop, next to a random baseline (``atr mask``).

Pure compute: the model, its processor and a built selector come in; the crop
layout, the kept token indices per crop and the counts come out. Drawing lives
in ``flows.present.plots``; checkpoint files in ``storage.selectors``.
"""

from __future__ import annotations

from typing import Any

import torch

from .extract import FeatureExtractor
from .prune import valid_tokens
from .strategies import Context, budget_counts, keep_mask


def kept_tokens(model, processor, selector, image, retention: float, seed: int) -> dict[str, Any]:
    """Layout and kept indices of ``image`` at ``retention``: the selector's top-k and a seeded random-k,
    both among the valid tokens of each crop (the padding LLaVA-NeXT's unpadding drops is never kept).

    Returns ``layout``, ``boxes`` (one per crop, original-image pixels), ``side``
    (the crop's token grid), ``tokens`` (L), ``cls_offset`` (1 when the features
    carry a CLS token), ``k`` (per crop), ``valid`` (per crop: the valid token
    count) and ``valid_indices``, ``selector`` and ``random`` (per crop: sorted
    index lists)."""
    fx = FeatureExtractor(model, processor, crops="all")
    feats = torch.from_numpy(fx([image])[0])  # (crops, L, C) float32
    layout = fx.layout(*image.size)
    n, tokens = feats.shape[0], fx.tokens_per_crop
    w, h = image.size
    valid = valid_tokens(model, n, tokens, (h, w))
    chosen = keep_mask("selector", feats, retention, "per-crop", Context(selector=selector), valid)
    rand = keep_mask("random", feats, retention, "per-crop", Context(generator=torch.Generator().manual_seed(seed)),
                     valid)

    def indices(mask: torch.Tensor) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in mask]

    return {"layout": layout, "boxes": layout.boxes[:n], "side": fx.side, "span": fx.span, "tokens": tokens,
            "cls_offset": tokens - fx.side * fx.side, "k": budget_counts(valid, retention, "per-crop").tolist(),
            "valid": valid.sum(dim=1).tolist(), "valid_indices": indices(valid),
            "selector": indices(chosen), "random": indices(rand)}


def encoder_shape(model, processor) -> tuple[int, int]:
    """(tokens per crop L, feature width C) of the model's projector input."""
    fx = FeatureExtractor(model, processor, crops="all")
    return fx.tokens_per_crop, fx.feature_dim


def _num(v: float) -> float | int:
    v = round(float(v), 3)
    return int(v) if v.is_integer() else v


def mask_json(kept: dict[str, Any], retention: float) -> dict[str, Any]:
    """``atr mask --json``: one entry per crop (box, token grid, valid token count, k, kept indices) for
    the selector and random; the top-level ``k`` lists every crop's k."""
    side = kept["side"]

    def entries(index_lists):
        return [{"box": [_num(v) for v in box], "grid": [side, side], "valid": valid, "k": k, "kept": indices}
                for box, valid, k, indices in zip(kept["boxes"], kept["valid"], kept["k"], index_lists)]

    return {"crops": entries(kept["selector"]), "random": entries(kept["random"]), "retention": retention,
            "k": kept["k"]}


def padding_share(model, sizes) -> dict[str, float]:
    """How much of a set of images the model's unpadding drops (LLaVA-NeXT and OneVision), from its own packing.

    ``sizes`` are (width, height). Returns ``images``, ``padded_images`` (the share of
    images that lose at least one grid row or column) and ``padding_tokens`` (the
    share of grid-crop tokens dropped; the base crop is never padded)."""
    from .extract import crop_layout

    from .families import family_of

    cfg = model.config
    crop = cfg.vision_config.image_size
    tokens = family_of(cfg).tokens_per_crop(cfg)
    padded = dropped = grid = 0
    sizes = list(sizes)
    for w, h in sizes:
        crops = len(crop_layout(w, h, crop, cfg.image_grid_pinpoints).boxes)
        valid = valid_tokens(model, crops, tokens, (h, w))[1:]
        lost = int((~valid).sum())
        padded += lost > 0
        dropped += lost
        grid += valid.numel()
    n = max(1, len(sizes))
    return {"images": len(sizes), "padded_images": padded / n, "padding_tokens": dropped / max(1, grid)}


__all__ = ["kept_tokens", "encoder_shape", "mask_json", "padding_share"]
