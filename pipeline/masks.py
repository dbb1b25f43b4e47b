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



def document_share(kept: dict[str, Any], doc_box: tuple[float, float, float, float]) -> dict[str, float]:
    """How much of the budget lands on a document pasted into a larger canvas.

    A token is on the document when its centre (original-image pixels) lies in
    ``doc_box``. Returns the document's share of the valid tokens, the share of
    the selector's and of random's kept tokens that fall on it, and each of those
    over the first (1.0 = no better than chance)."""
    import numpy as np

    from .extract import token_boxes

    x0, y0, x1, y1 = doc_box
    on_doc, valid, chosen, rand = [], [], [], []
    for i, box in enumerate(kept["boxes"]):
        cells = token_boxes(box, kept["side"], kept.get("span", 1.0))
        cx, cy = (cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2
        inside = np.zeros(kept["tokens"], dtype=bool)
        inside[kept["cls_offset"]:] = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        on_doc.append(inside)
        for out, name in ((valid, "valid_indices"), (chosen, "selector"), (rand, "random")):
            out.append(inside[kept[name][i]])
    share = {name: float(np.concatenate(v).mean()) for name, v in
             (("doc_valid_share", valid), ("selector_share", chosen), ("random_share", rand))}
    share["selector_over_doc"] = share["selector_share"] / share["doc_valid_share"]
    share["random_over_doc"] = share["random_share"] / share["doc_valid_share"]
    return share


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


def attention_profile(model, processor, images, top_share: float = 0.02) -> dict[str, float]:
    """Does the tower's CLS attention sit on a few high-norm tokens, as in real CLIP towers (Darcet et
    al., "Vision Transformers Need Registers")? Over every crop of ``images``:

    ``top_mass``: the share of CLS attention on the top ``top_share`` of tokens (at least one token;
    ``uniform``: that share under uniform attention);
    ``norm_ratio``: max / median token norm of the feature layer (Darcet's artifacts: about 10x);
    ``top_attention_norm_rank``: the mean norm percentile of each crop's most attended token
    (1.0: it is the highest-norm token); ``norm_attention_corr``: Pearson correlation of norm and attention."""
    import torch

    from .prune import encode_images

    top_mass, ratio, rank, corr, uniform = [], [], [], [], []
    for f in encode_images(model, processor, list(images), attention=True):
        a, norms = f.cls_attention.float(), f.features.float().norm(dim=-1)
        k = max(1, round(top_share * a.shape[1]))
        top_mass.append((a.topk(k, dim=1).values.sum(1) / a.sum(1)).mean())
        uniform.append(torch.tensor(k / a.shape[1]))
        ratio.append((norms.max(1).values / norms.median(1).values).mean())
        best = a.argmax(1)
        pct = (norms <= norms.gather(1, best[:, None])).float().mean(1)
        rank.append(pct.mean())
        x, y = norms - norms.mean(1, keepdim=True), a - a.mean(1, keepdim=True)
        corr.append(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-12)).mean())
    mean = lambda v: float(torch.stack(v).mean())  # noqa: E731
    return {"images": len(top_mass), "top_share": top_share, "top_mass": mean(top_mass), "uniform": mean(uniform),
            "norm_ratio": mean(ratio),
            "top_attention_norm_rank": mean(rank), "norm_attention_corr": mean(corr)}


__all__ = ["kept_tokens", "encoder_shape", "mask_json", "document_share", "padding_share", "attention_profile"]
