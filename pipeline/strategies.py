"""Token-reduction strategies behind one interface: which encoder tokens of an image to keep.

Every strategy maps one image's tower features ``(crops, L, C)`` (plus what it
needs: a selector, the tower's CLS attention, a seeded generator) to a boolean
``keep_mask`` ``(crops, L)``; ``none`` returns ``None`` (no image at all). Kept
tokens always go to the LLM in raster order (``pipeline.prune``).

Budgets count valid tokens only. A grid crop of an image whose aspect ratio does
not fit its AnyRes canvas holds padding rows or columns that LLaVA-NeXT's
unpadding drops before the LLM; ``valid`` ``(crops, L)`` marks the tokens that
survive (``pipeline.prune.valid_tokens``, from the model's own
``pack_image_features``; the base crop has no padding). Every strategy chooses
only among valid tokens:

* ``per-crop`` (default): k = round(r * valid tokens of that crop) in every crop
  (at least 1 where the crop has any), the base crop included;
* ``global``: K = round(r * valid tokens of the image) over all crops, wherever
  the strategy's scores put them.

Without ``valid`` every token counts (features that fit their canvas exactly).

Strategies:

* ``full``: every valid token; ``none``: no image (the prompt carries no image tokens);
* ``random``: uniform among valid tokens, seeded;
* ``selector``: the paper's trained selector, top-k by keep-logit;
* ``attention``: VisionZip's dominant tokens, top-k by the attention the CLS token
  pays them in the feature layer (mean over heads);
* ``diversity``: the simple variant of DivPrune: greedy max-min diversity on
  cosine distance between *tower* features, within each crop's budget (first the
  token farthest from its nearest neighbour, then repeatedly the token farthest
  from everything kept);
* ``divprune``: DivPrune as its paper and reference code run it (vbdi/divprune,
  ``DivPrune(visual_feature_vectors, ...)`` on the output of ``mm_projector``):
  the same greedy max-min on cosine distance, but over the *projected*
  (LLM-space) tokens of the whole image, so K = round(r * the image's valid
  tokens) falls wherever diversity puts it (``--budget`` does not apply). What
  differs: only valid tokens are candidates (the reference runs before
  LLaVA-NeXT's unpadding), and row newlines follow the kept rows as for every
  strategy (the reference prunes after packing, newlines included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .config import ConfigError

STRATEGIES = ("full", "none", "random", "selector", "attention", "diversity", "divprune")
PROJECTED = ("divprune",)  # strategies that choose on the projector's output (Context.projected)
BUDGETS = ("per-crop", "global")


@dataclass
class Context:
    """What strategies may need beyond the features."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    selector: Any = None  # a TokenSelector (pipeline.selector)
    cls_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of the feature layer
    projected: torch.Tensor | None = None  # (crops, L, D) the projector's output: LLM-space tokens


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    return budget


def keep_mask(strategy: str, features: torch.Tensor, retention: float, budget: str = "per-crop",
              context: Context | None = None, valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """(crops, L) bool mask of the tokens ``strategy`` keeps, all of them valid; None for ``none``."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    crops, tokens = features.shape[:2]
    valid = _valid(valid, crops, tokens, features.device)
    if strategy == "none":
        return None
    if strategy == "full":
        return valid.clone()
    if strategy == "diversity":
        return _diversity(features, retention, budget, valid)
    if strategy == "divprune":
        if context.projected is None or tuple(context.projected.shape[:2]) != (crops, tokens):
            raise ValueError("strategy 'divprune' needs the projected tokens (crops, L, D) of the same image")
        return _diversity(context.projected, retention, "global", valid)
    scores = _scores(strategy, features, context)
    return _top(scores, retention, budget, valid)


def keep_masks(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: str = "per-crop",
               context: Context | None = None,
               cls_attention: Sequence[torch.Tensor | None] | None = None,
               valid: Sequence[torch.Tensor | None] | None = None,
               projected: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
    """:func:`keep_mask` for a batch of images, each ``(crops_i, L, C)``; one mask (or None) per image.

    ``selector`` runs once on all crops of all images (``(sum crops_i, L, C)``): it attends
    within each crop, so this gives every image the mask it gets alone. The other
    strategies run image by image in order (``random`` draws from the generator in the
    same order as one call per image); ``cls_attention[i]`` and ``valid[i]`` are image i's (crops_i, L)."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    valid = list(valid) if valid is not None else [None] * len(features)
    if strategy != "selector" or not features:
        attn = list(cls_attention) if cls_attention is not None else [context.cls_attention] * len(features)
        proj = list(projected) if projected is not None else [context.projected] * len(features)
        return [keep_mask(strategy, f, retention, budget, replace(context, cls_attention=a, projected=p), v)
                for f, a, v, p in zip(features, attn, valid, proj, strict=True)]
    counts = [f.shape[0] for f in features]
    logits = _scores(strategy, torch.cat(list(features)), context)
    return [_top(s, retention, budget, _valid(v, s.shape[0], s.shape[1], s.device))
            for s, v in zip(torch.split(logits, counts), valid, strict=True)]


def _valid(valid: torch.Tensor | None, crops: int, tokens: int, device) -> torch.Tensor:
    if valid is None:
        return torch.ones(crops, tokens, dtype=torch.bool, device=device)
    if tuple(valid.shape) != (crops, tokens):
        raise ValueError(f"valid-token mask shape {tuple(valid.shape)} does not match features {(crops, tokens)}")
    return valid.to(device=device, dtype=torch.bool)


def budget_counts(valid: torch.Tensor, retention: float, budget: str) -> torch.Tensor:
    """Tokens to keep: (crops,) per crop for ``per-crop``, a 1-element tensor for ``global``.

    round(retention * valid tokens), at least 1 where there is any valid token."""
    if not 0.0 < retention <= 1.0:  # also refuses nan
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    n = valid.sum(dim=1) if budget == "per-crop" else valid.sum().reshape(1)
    k = torch.round(retention * n.double()).long()
    return torch.where(n > 0, k.clamp(min=1), torch.zeros_like(k)).minimum(n)


def _scores(strategy: str, features: torch.Tensor, context: Context) -> torch.Tensor:
    crops, tokens = features.shape[:2]
    if strategy == "random":
        return torch.rand(crops, tokens, generator=context.generator).to(features.device)
    if strategy == "selector":
        if context.selector is None:
            raise ConfigError("strategy 'selector' needs a selector checkpoint (--selector)")
        with torch.no_grad():
            return context.selector.keep_logits(features.float())
    if context.cls_attention is None:
        raise ValueError("strategy 'attention' needs the tower's CLS attention (encode with attention=True)")
    if context.cls_attention.shape != (crops, tokens):
        raise ValueError(f"CLS attention shape {tuple(context.cls_attention.shape)} does not match "
                         f"features {(crops, tokens)}")
    return context.cls_attention


def _top(scores: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """The top-k valid tokens by score, k from :func:`budget_counts` (per crop, or over the image)."""
    crops, tokens = scores.shape
    k = budget_counts(valid, retention, budget)
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if budget != "per-crop":
        masked = masked.reshape(1, crops * tokens)
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (ranks < k[:, None]).reshape(crops, tokens)


def _diversity(features: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    crops, tokens = features.shape[:2]
    k = budget_counts(valid, retention, budget)
    if budget == "per-crop":
        return _max_min(features.float(), k, valid)  # all crops at once
    return _max_min(features.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


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


__all__ = ["STRATEGIES", "PROJECTED", "BUDGETS", "Context", "keep_mask", "keep_masks", "budget_counts", "check_strategy",
           "check_budget"]
