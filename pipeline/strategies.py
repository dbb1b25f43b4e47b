"""Token-reduction strategies behind one interface: which encoder tokens of an image to keep.

Every strategy maps one image's tower features ``(crops, L, C)`` (plus what it
needs: a selector, the tower's CLS attention, a seeded generator) to a boolean
keep mask ``(crops, L)``; ``none`` returns ``None`` (no image at all). Kept tokens
always go to the LLM in raster order (``pipeline.prune``).

Budgets (retention r counts encoder tokens only):

* ``per-crop`` (default): k = round(r * L) in every crop, the base crop included;
* ``global``: K = round(r * crops * L) over all crops of the image, wherever the
  strategy's scores put them.

Strategies:

* ``full``: everything; ``none``: no image (the prompt carries no image tokens);
* ``random``: uniform, seeded;
* ``selector``: the paper's trained selector, top-k by keep-logit;
* ``attention``: VisionZip's dominant tokens, top-k by the attention the CLS token
  pays them in the feature layer (mean over heads);
* ``diversity``: DivPrune, greedy max-min diversity on cosine distance between
  tower features (first the token farthest from its nearest neighbour, then
  repeatedly the token farthest from everything kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .config import ConfigError
from .selector import keep_count

STRATEGIES = ("full", "none", "random", "selector", "attention", "diversity")
BUDGETS = ("per-crop", "global")


@dataclass
class Context:
    """What strategies may need beyond the features."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    selector: Any = None  # a TokenSelector (pipeline.selector)
    cls_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of the feature layer


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    return budget


def keep_mask(strategy: str, features: torch.Tensor, retention: float, budget: str = "per-crop",
              context: Context | None = None) -> torch.Tensor | None:
    """(crops, L) bool mask of the tokens ``strategy`` keeps; None for ``none``."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    crops, tokens = features.shape[:2]
    if strategy == "none":
        return None
    if strategy == "full":
        return torch.ones(crops, tokens, dtype=torch.bool, device=features.device)
    if strategy == "diversity":
        return _diversity(features, retention, budget)
    scores = _scores(strategy, features, context)
    return _top(scores, retention, budget)


def keep_masks(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: str = "per-crop",
               context: Context | None = None,
               cls_attention: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
    """:func:`keep_mask` for a batch of images, each ``(crops_i, L, C)``; one mask (or None) per image.

    ``selector`` runs once on all crops of all images (``(sum crops_i, L, C)``): it attends
    within each crop, so this gives every image the mask it gets alone. The other
    strategies run image by image in order (``random`` draws from the generator in the
    same order as one call per image); ``cls_attention[i]`` is image i's (crops_i, L)."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    if strategy != "selector" or not features:
        attn = list(cls_attention) if cls_attention is not None else [context.cls_attention] * len(features)
        return [keep_mask(strategy, f, retention, budget, replace(context, cls_attention=a))
                for f, a in zip(features, attn, strict=True)]
    counts = [f.shape[0] for f in features]
    logits = _scores(strategy, torch.cat(list(features)), context)
    return [_top(s, retention, budget) for s in torch.split(logits, counts)]


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


def _top(scores: torch.Tensor, retention: float, budget: str) -> torch.Tensor:
    crops, tokens = scores.shape
    keep_mask = torch.zeros(crops, tokens, dtype=torch.bool, device=scores.device)
    if budget == "per-crop":
        keep_mask.scatter_(1, scores.topk(keep_count(retention, tokens), dim=1).indices, True)
    else:
        flat = keep_mask.view(-1)
        flat[scores.reshape(-1).topk(keep_count(retention, crops * tokens)).indices] = True
    return keep_mask


def _diversity(features: torch.Tensor, retention: float, budget: str) -> torch.Tensor:
    crops, tokens = features.shape[:2]
    if budget == "per-crop":
        k = keep_count(retention, tokens)
        chosen = _max_min(features.float(), k)  # (crops, k), all crops at once
        return torch.zeros(crops, tokens, dtype=torch.bool, device=features.device).scatter_(1, chosen, True)
    k = keep_count(retention, crops * tokens)
    chosen = _max_min(features.float().reshape(1, crops * tokens, -1), k)[0]
    keep_mask = torch.zeros(crops * tokens, dtype=torch.bool, device=features.device)
    keep_mask[chosen] = True
    return keep_mask.view(crops, tokens)


def _max_min(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, C) -> (B, k) indices: greedy max-min diversity on cosine distance, batched over B."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
    b, n = dist.shape[:2]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).min(dim=2).values  # distance to the nearest other token
    first = nearest.argmax(dim=1) if n > 1 else torch.zeros(b, dtype=torch.long, device=x.device)
    chosen = [first]
    to_set = dist[torch.arange(b), first]  # (B, N): distance of every token to the kept set
    taken = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    taken[torch.arange(b), first] = True
    for _ in range(k - 1):
        nxt = to_set.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(nxt)
        taken[torch.arange(b), nxt] = True
        to_set = torch.minimum(to_set, dist[torch.arange(b), nxt])
    return torch.stack(chosen, dim=1)


__all__ = ["STRATEGIES", "BUDGETS", "Context", "keep_mask", "keep_masks", "check_strategy", "check_budget"]
