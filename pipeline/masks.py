"""Which tokens of one image a selector keeps, crop by crop, next to a random baseline (``atr mask``).

Pure compute: the model, its processor and a built selector come in; the crop
layout, the kept token indices per crop and the counts come out. Drawing lives
in ``flows.present.plots``; checkpoint files in ``storage.selectors``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .extract import FeatureExtractor
from .prune import valid_tokens
from .strategies import Context, budget_counts, keep_mask


@dataclasses.dataclass(frozen=True)
class WholeImage:
    """The "crop layout" of a family without crops (Qwen-VL): one box, the whole image, resized by the
    processor to ``rows x cols`` merged tokens (``grid`` (1, 1): no grid crops)."""

    boxes: tuple[tuple[float, float, float, float], ...]
    tokens: tuple[int, int]
    grid: tuple[int, int] = (1, 1)


def kept_tokens(model, processor, selector, image, retention: float, seed: int,
                strategy: str = "selector") -> dict[str, Any]:
    """Layout and kept indices of ``image`` at ``retention``: ``strategy``'s keep (the selector's top-k by
    default) and a seeded random-k, both among the valid tokens of each crop (the padding LLaVA-NeXT's
    unpadding drops is never kept). A family without crops (Qwen-VL, ``Family.has_crops`` False) has one
    entry, the whole image on its resized grid of merged tokens (:func:`whole_image_tokens`).

    Returns ``layout``, ``boxes`` (one per crop, original-image pixels), ``side``
    (the crop's token grid), ``tokens`` (L), ``cls_offset`` (1 when the features
    carry a CLS token), ``k`` (per crop), ``valid`` (per crop: the valid token
    count) and ``valid_indices``, ``selector`` and ``random`` (per crop: sorted
    index lists)."""
    from .families import family_of

    if not family_of(model).has_crops:
        return whole_image_tokens(model, processor, selector, image, retention, seed, strategy)
    if strategy != "selector":
        return _crop_tokens(model, processor, selector, image, retention, seed, strategy)
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


def _select(model, feats, strategy: str, retention: float, selector) -> torch.Tensor:
    """(crops, L) keep mask of ``strategy`` on one image's ImageFeatures, through eval's selection path
    (``pipeline.evaluate.strategy_inputs``: the tower outputs and projected tokens it needs)."""
    from .evaluate import strategy_inputs
    from .families import family_of
    from .strategies import get, select
    from .strategies.core import check_family

    check_family([strategy], family_of(model))
    if get(strategy).retention is not None or not get(strategy).sends_image:
        from .config import ConfigError

        raise ConfigError(f"atr mask draws a pruning strategy's keep; {strategy!r} keeps a fixed share")
    extra = strategy_inputs(model, strategy, feats)
    if getattr(selector, "feature_kind", None) == "merged":  # a Qwen selector of the merger's output (as eval)
        from .prune import project

        extra.setdefault("projected", project(model, feats.features))
    sel = select(strategy, feats.features, retention, "per-crop", Context(selector=selector, **extra), feats.valid)
    return sel.mask


def _encode(model, processor, image, strategy: str):
    from .prune import encode_images
    from .strategies import tower_outputs

    outputs = tower_outputs([strategy])
    return encode_images(model, processor, [image], attention=outputs.attention)[0]


def whole_image_tokens(model, processor, selector, image, retention: float, seed: int,
                       strategy: str = "selector") -> dict[str, Any]:
    """:func:`kept_tokens` for a family without crops (Qwen-VL): one entry, the whole image (box (0, 0, w, h)
    in original pixels) on the processor's resized grid of ``rows x cols`` merged tokens (the image's token
    grid (t, h, w) over the 2 x 2 merge), k = round(R * rows * cols); kept indices are raster indices over
    that grid. VisionZip's contextual tokens (merged, no place of their own) are not drawn."""
    feats = _encode(model, processor, image, strategy)
    merge = model.config.vision_config.spatial_merge_size
    _, gh, gw = feats.grid
    rows, cols = gh // merge, gw // merge
    tokens = feats.tokens_per_crop
    if rows * cols != tokens:
        raise ValueError(f"{rows} x {cols} merged grid does not match the image's {tokens} tokens")
    w, h = image.size
    valid = feats.valid
    chosen = _select(model, feats, strategy, retention, selector)
    rand = keep_mask("random", feats.features, retention, "per-crop",
                     Context(generator=torch.Generator().manual_seed(seed)), valid)

    def indices(mask: torch.Tensor) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in mask]

    box = (0.0, 0.0, float(w), float(h))
    layout = WholeImage((box,), (rows, cols))
    return {"layout": layout, "boxes": [box], "side": (rows, cols), "span": None, "tokens": tokens,
            "cls_offset": 0, "k": budget_counts(valid, retention, "per-crop").tolist(),
            "valid": valid.sum(dim=1).tolist(), "valid_indices": indices(valid), "strategy": strategy,
            "selector": indices(chosen), "random": indices(rand)}


def _crop_tokens(model, processor, selector, image, retention: float, seed: int, strategy: str) -> dict[str, Any]:
    """:func:`kept_tokens` of a strategy other than the selector on a family with crops: the crop layout of the
    selector's drawing, the keep of eval's selection path on ``prune.encode_images``' features."""
    fx = FeatureExtractor(model, processor, crops="all")
    feats = _encode(model, processor, image, strategy)
    layout = fx.layout(*image.size)
    n, tokens = feats.features.shape[:2]
    w, h = image.size
    valid = valid_tokens(model, n, tokens, (h, w))
    feats.valid = valid
    chosen = _select(model, feats, strategy, retention, selector)
    rand = keep_mask("random", feats.features, retention, "per-crop",
                     Context(generator=torch.Generator().manual_seed(seed)), valid)

    def indices(mask: torch.Tensor) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in mask]

    return {"layout": layout, "boxes": layout.boxes[:n], "side": fx.side, "span": fx.span, "tokens": tokens,
            "cls_offset": tokens - fx.side * fx.side, "k": budget_counts(valid, retention, "per-crop").tolist(),
            "valid": valid.sum(dim=1).tolist(), "valid_indices": indices(valid), "strategy": strategy,
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
    grid = list(side) if isinstance(side, (tuple, list)) else [side, side]  # Qwen-VL: the merged rows x cols

    def entries(index_lists):
        return [{"box": [_num(v) for v in box], "grid": grid, "valid": valid, "k": k, "kept": indices}
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


__all__ = ["kept_tokens", "whole_image_tokens", "WholeImage", "encoder_shape", "mask_json", "padding_share"]
