"""The paper's strategies and its baselines: ``full``, ``none``, ``random`` and ``selector``."""

from __future__ import annotations

import torch

from ..config import ConfigError
from .core import Request, strategy, top_k


@strategy("full", retention=1.0, label="full image", style=("green", "_"), rank=0,
          help="every valid token (the reference)")
def full(req: Request) -> torch.Tensor:
    """Every valid token."""
    return req.valid.clone()


@strategy("none", retention=0.0, sends_image=False, label="no image", style=("red", "_"), rank=1,
          help="no image at all: the prompt carries no image tokens")
def none(req: Request) -> None:
    """No image: the prompt carries no image tokens."""
    return None


@strategy("random", needs=("generator",), seeded=True, style=("tab:gray", "s"), rank=2,
          help="uniform among valid tokens, one result per seed")
def random(req: Request) -> torch.Tensor:
    """Uniform among valid tokens, from the Context's generator (eval seeds it per row)."""
    crops, tokens = req.features.shape[:2]
    scores = torch.rand(crops, tokens, generator=req.context.generator).to(req.features.device)
    return req.top(scores)


SELECTOR_VARIANTS = ("nearest", "range")  # or "p<value>": the checkpoint trained at exactly that p
ALLOCATIONS = ("crop", "image", "grid")
CALIBRATIONS = ("none", "crop-z")


def _check_selector(options) -> None:
    variant = options["variant"]
    if variant in SELECTOR_VARIANTS:
        return
    try:
        ok = variant.startswith("p") and 0.0 < float(variant[1:]) <= 1.0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"option selector.variant must be nearest, range or p<retention> (e.g. p0.25), "
                          f"got {variant!r}")


def calibrated(logits: torch.Tensor, valid: torch.Tensor, calibration: str) -> torch.Tensor:
    """(crops, L) keep-logits made comparable across an image's crops. ``none``: as the head gives them
    (the rate term of the loss is a mean over a batch of crops, so a crop with more content may already keep
    more); ``crop-z``: standardized within each crop over its valid tokens (each crop's mean and spread
    removed: only how far a token stands out in its own crop counts)."""
    if calibration == "none":
        return logits
    x = logits.float().masked_fill(~valid, float("nan"))
    mean = x.nanmean(dim=1, keepdim=True)
    std = (x - mean).pow(2).nanmean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
    return ((logits.float() - mean.nan_to_num(0.0)) / std.nan_to_num(1.0)).masked_fill(~valid, 0.0)


def _keep_probability(selector, features: torch.Tensor) -> torch.Tensor:
    """The Gumbel head's own keep probability (crops, L): sigmoid of the logits it samples from. A
    range-trained selector takes its offset at the middle of its range (the offset moves every logit of
    every image alike, so a threshold sweep traces the same frontier at any p; only the thresholds'
    labels shift)."""
    rng = selector.cfg.retention_range
    return selector.keep_probability(features, (rng[0] + rng[1]) / 2 if rng else None)


def _grid_scores(selector, reqs: list[Request], adaptive: bool) -> list[torch.Tensor]:
    """A dynamic-grid selector (Qwen-VL: one crop per image, L varying): one forward over the images padded
    to the longest, each with its own (rows, cols) (``Context.grid``) and the key-padding mask, so each image
    gets the scores it gets alone; per image (1, L_i). A selector trained on the merger's output
    (``feature_kind`` merged) reads ``Context.projected`` where given (eval), else the features as they
    come (already merged: the train stage's held-out images)."""
    from ..config import ConfigError
    from ..selector import pad_grids

    merged = getattr(selector, "feature_kind", None) == "merged"
    feats, grids = [], []
    for r in reqs:
        if r.features.shape[0] != 1:
            raise ConfigError(f"a dynamic-grid selector takes one token grid per image, got {r.features.shape[0]} "
                              f"crops: it was trained on a family without crops (Qwen-VL)")
        grid = r.context.grid
        if grid is None:
            raise ConfigError("strategy 'selector' with a dynamic-grid selector needs each image's token grid "
                              "(rows, cols): encode the image with a family without crops (Qwen-VL)")
        # merged: eval passes the merger's output as ``projected`` beside the pre-merger features; features
        # extracted as merged (the train stage's held-out crops) come as the features themselves
        x = r.context.projected if merged and r.context.projected is not None else r.features
        if x.shape[-1] != selector.channels:
            what = "the merger's output" if merged else "pre-merger groups"
            raise ConfigError(f"this selector was trained on {what} of width {selector.channels}; these features "
                              f"have width {x.shape[-1]}" + (" (pass the merger's output as projected)" if merged
                                                            else ""))
        feats.append(x[0].float())
        grids.append(tuple(int(v) for v in grid))
    x, lengths = pad_grids(feats)
    x = x.to(reqs[0].features.device)
    grid = torch.tensor(grids, device=x.device)
    if adaptive:
        rng = selector.cfg.retention_range
        scores = selector.keep_probability(x, (rng[0] + rng[1]) / 2 if rng else None, grid)
    else:
        scores = selector.keep_logits(x, grid)
    return [scores[i:i + 1, :int(n)] for i, n in enumerate(lengths)]


def _selector_batch(reqs: list[Request]) -> list[torch.Tensor]:
    """One selector forward over all crops of all images (it attends within each crop, so every image
    gets the mask it gets alone)."""
    selector = reqs[0].need("selector")
    adaptive = reqs[0].adaptive
    if getattr(selector, "dynamic", False):
        per_image = _grid_scores(selector, reqs, adaptive)
    else:
        x = torch.cat([r.features for r in reqs]).float()
        scores = _keep_probability(selector, x) if adaptive else selector.keep_logits(x)
        per_image = torch.split(scores, [r.features.shape[0] for r in reqs])
    out = []
    for r, s in zip(reqs, per_image, strict=True):
        if adaptive:  # the whole image's tokens compete; with allocation=grid only the grid crops'
            grid = _grid_valid(r.valid) if r.options.get("allocation") == "grid" else None
            out.append(r.keep_by_probability(s, grid))
            continue
        s = calibrated(s, r.valid, r.options.get("calibration", "none"))
        out.append(_allocate(s, r))
    return out


def _allocate(scores: torch.Tensor, r: Request) -> torch.Tensor:
    """(crops, L) keep mask from calibrated logits under the request's budget and ``allocation``."""
    allocation = r.options.get("allocation", "crop")
    if allocation == "crop" or not r.per_crop and allocation == "image":
        return top_k(scores, r.counts(), r.valid, per_crop=r.per_crop)
    k = r.counts().sum().reshape(1)  # the image's K, whatever the budget
    grid = _grid_valid(r.valid) if allocation == "grid" else None
    # grid: K over the high-resolution crops only; the base crop keeps nothing, unless the grid crops hold
    # fewer than K valid tokens
    use = grid if grid is not None and int(grid.sum()) >= int(k) else r.valid
    return top_k(scores, k, use, per_crop=False)


def _grid_valid(valid: torch.Tensor) -> torch.Tensor | None:
    """(crops, L) the valid tokens of the grid crops alone: the base crop (crop 0, the whole image at one
    crop's resolution) masked out; None for an image without grid crops holding a valid token."""
    if valid.shape[0] < 2 or not bool(valid[1:].any()):
        return None
    return torch.cat([torch.zeros_like(valid[:1]), valid[1:]])


@strategy("selector", needs=("selector",), uses=("grid",), batch=_selector_batch, style=("tab:red", "o"), rank=3,
          adaptive=True,
          params={"variant": "nearest", "allocation": "crop", "calibration": "none"},
          choices={"allocation": ALLOCATIONS, "calibration": CALIBRATIONS}, check=_check_selector,
          help="the paper's trained selector: top-k by keep-logit (needs --selector); options: variant "
               "(nearest | range | p0.25: which checkpoint of a train stage), allocation (crop: k per crop, "
               "the paper's | image: the image's K by logit over all crops | grid: over the high-resolution "
               "grid crops only), calibration (none | crop-z)")
def selector(req: Request) -> torch.Tensor:
    """The paper's trained selector: the top-k tokens by keep-logit.

    Options: ``variant`` picks the checkpoint of a train stage (eval resolves it: ``nearest`` trained p,
    the ``range``-trained one, or ``p0.25``); ``allocation`` ``crop`` keeps k per crop (the paper's,
    under the per-crop budget), ``image`` keeps the image's K = sum of k by logit over all its crops and
    ``grid`` the same K over its high-resolution grid crops only (the base crop -- the whole image squeezed
    into one crop, a low-resolution duplicate of the grid crops -- keeps nothing when the image has grid
    crops);
    ``calibration`` (:func:`calibrated`) makes logits comparable across crops first. Under the threshold
    budget it keeps the tokens whose keep probability (the Gumbel head's own decision) passes the
    threshold, between the floor and the cap, over the whole image (``allocation=grid``: over its grid
    crops; ``calibration`` does not apply: probabilities are compared as the head gives them).

    On a family without crops (Qwen-VL) ``per-crop`` means the whole image: a dynamic-grid selector scores
    the image's L merged tokens (1, L) from its pre-merger groups and its (rows, cols) grid."""
    return _selector_batch([req])[0]
