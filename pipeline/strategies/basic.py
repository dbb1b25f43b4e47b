"""The paper's strategies and its baselines: ``full``, ``none``, ``random`` and ``selector``."""

from __future__ import annotations

import torch

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


def _selector_batch(reqs: list[Request]) -> list[torch.Tensor]:
    """One selector forward over all crops of all images (it attends within each crop, so every image
    gets the mask it gets alone)."""
    selector = reqs[0].need("selector")
    logits = selector.keep_logits(torch.cat([r.features for r in reqs]).float())
    out = []
    for r, s in zip(reqs, torch.split(logits, [r.features.shape[0] for r in reqs]), strict=True):
        out.append(top_k(s, r.counts(), r.valid, per_crop=r.per_crop))
    return out


@strategy("selector", needs=("selector",), batch=_selector_batch, style=("tab:red", "o"), rank=3,
          help="the paper's trained selector: top-k by keep-logit (needs --selector)")
def selector(req: Request) -> torch.Tensor:
    """The paper's trained selector: the top-k tokens by keep-logit."""
    return _selector_batch([req])[0]
