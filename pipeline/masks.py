"""Which tokens of one image a selector keeps, crop by crop, next to a random baseline (``atr mask``).

Pure compute: the model, its processor and a built selector come in; the crop
layout, the kept token indices per crop and the counts come out. Drawing lives
in ``flows.present.plots``; checkpoint files in ``storage.selectors``.
"""

from __future__ import annotations

from typing import Any

import torch

from .extract import FeatureExtractor
from .selector import keep_count, random_indices


def kept_tokens(model, processor, selector, image, retention: float, seed: int) -> dict[str, Any]:
    """Layout and kept indices of ``image`` at ``retention``: the selector's top-k and a seeded random-k.

    Returns ``layout``, ``boxes`` (one per crop, original-image pixels), ``side``
    (the crop's token grid), ``tokens`` (L), ``cls_offset`` (1 when the features
    carry a CLS token), ``k`` and, per crop, the sorted ``selector`` and
    ``random`` index lists."""
    fx = FeatureExtractor(model, processor, crops="all")
    feats = fx([image])[0]  # (crops, L, C) float32
    layout = fx.layout(*image.size)
    n, tokens = feats.shape[0], fx.tokens_per_crop
    kept = selector.kept_indices(torch.from_numpy(feats), retention)
    rand = random_indices(n, tokens, retention, torch.Generator().manual_seed(seed))
    return {"layout": layout, "boxes": layout.boxes[:n], "side": fx.side, "tokens": tokens,
            "cls_offset": tokens - fx.side * fx.side, "k": keep_count(retention, tokens),
            "selector": [sorted(int(i) for i in row) for row in kept.tolist()],
            "random": [sorted(int(i) for i in row) for row in rand.tolist()]}


def encoder_shape(model, processor) -> tuple[int, int]:
    """(tokens per crop L, feature width C) of the model's projector input."""
    fx = FeatureExtractor(model, processor, crops="all")
    return fx.tokens_per_crop, fx.feature_dim


def _num(v: float) -> float | int:
    v = round(float(v), 3)
    return int(v) if v.is_integer() else v


def mask_json(kept: dict[str, Any], retention: float) -> dict[str, Any]:
    """``atr mask --json``: one entry per crop (box, token grid, kept indices) for the selector and random."""
    side = kept["side"]

    def entries(index_lists):
        return [{"box": [_num(v) for v in box], "grid": [side, side], "kept": indices}
                for box, indices in zip(kept["boxes"], index_lists)]

    return {"crops": entries(kept["selector"]), "random": entries(kept["random"]), "retention": retention,
            "k": kept["k"]}


__all__ = ["kept_tokens", "encoder_shape", "mask_json"]
