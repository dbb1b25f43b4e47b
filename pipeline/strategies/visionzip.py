"""VisionZip (Yang et al., CVPR 2025) and its simple variant ``attention``: tokens by CLS attention."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .core import Request, Selection, budget_counts, strategy, top_k

VISIONZIP_SPLIT = (540, 100)  # VisionZip's dominant:contextual split for LLaVA-NeXT (640 tokens)
MERGES = ("reference", "average", "target")


@strategy("attention", needs=("cls_attention",), style=("tab:purple", "^"), rank=4,
          help="the simple variant of VisionZip: its dominant tokens only")
def attention(req: Request) -> torch.Tensor:
    """``attention``, the simple variant of VisionZip: the scores of its dominant tokens alone.

    Each token's score is the attention the CLS token pays it in the feature layer
    (``vision_feature_layer``, -2 for LLaVA-NeXT), mean over heads (the same order as
    VisionZip's sum); the top k valid tokens of each crop are kept. What differs from
    VisionZip: no contextual tokens, the whole budget goes to dominant ones."""
    return req.top(req.need("cls_attention"))


# Ablation switches (docs/peers.md): cls=False gives each crop's CLS slot to a patch token; merge "average"
# or "target" replace the reference's target + mean(merged); split is the dominant:contextual proportion.
@strategy("visionzip", needs=("cls_attention", "keys"), uses=("cls_tokens",), version="2", label="VisionZip",
          peer="Yang et al., CVPR 2025", style=("tab:blue", "v"), rank=6,
          params={"cls": True, "merge": "reference", "split": VISIONZIP_SPLIT}, choices={"merge": MERGES},
          help="VisionZip: dominant tokens by CLS attention plus merged contextual tokens")
def _visionzip(req: Request) -> Selection:
    cls_tokens = req.context.cls_tokens if req.options["cls"] else None
    return visionzip(req.features, req.need("cls_attention"), req.need("keys"), req.retention, req.budget, req.valid,
                     cls_tokens, req.options)


def visionzip_split(k: int, split: tuple[int, int] = VISIONZIP_SPLIT) -> tuple[int, int]:
    """(dominant, contextual) of a budget of k tokens, in VisionZip's NeXT proportion 540:100
    (k=640 -> 540 + 100; 128 -> 108 + 20; 64 -> 54 + 10, their LLaVA-1.5 split)."""
    dom, ctx = split
    contextual = int(math.floor(k * ctx / (dom + ctx) + 0.5))
    return k - contextual, contextual


def visionzip(features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, retention: float,
              budget: str, valid: torch.Tensor, cls_tokens: torch.Tensor | None = None,
              options: Mapping[str, Any] | None = None) -> Selection:
    """``visionzip``: VisionZip's dominant and contextual tokens (dvlab-research/VisionZip).

    Per crop (VisionZip runs inside the CLIP encoder, one crop at a time: their issue #17), the crop's
    budget k splits into d dominant + c contextual tokens (:func:`visionzip_split`, 540:100 for NeXT):

    * dominant: the d tokens the CLS token attends most in the feature layer (-2), summed over heads;
    * contextual: of the m remaining tokens, c targets spaced evenly in index order
      (step = max(1, m // c), indices 0, step, 2*step, ...); every other remaining token goes to the
      target whose key (the feature layer's keys, mean over heads, L2-normalized) is most similar, and
      each contextual token is the target's hidden state plus the mean of the hidden states merged into
      it (their ``target_hidden + aggregated_hidden``).

    Faithful: the layer, the sum-over-heads CLS attention, the head-mean keys, the stride rule, the
    argmax assignment and ``target + mean``, the per-crop budget. What differs, and why:

    * CLS, as VisionZip does: its dominant set always holds the crop's CLS token (their
      ``dominant`` count includes it) and sends it through the projector, although LLaVA-NeXT's
      ``default`` feature select drops CLS. With ``cls_tokens`` (crops, C), the feature layer's CLS
      of each crop, every crop with a budget sends its CLS as one of its d dominant tokens (d - 1
      patch tokens), in ``extra`` before the contextual tokens, as their NeXT code appends the
      crops' CLS tokens before the contextual ones (``--budget global``: one CLS, the base crop's).
      CLS is never a target nor merged. Without ``cls_tokens`` all d dominant tokens are patch tokens.
    * Placement. Dominant tokens stay in place (raster order, with their row newlines and
      LLaVA-NeXT's unpadding); all contextual tokens (``extra``) follow them. VisionZip's NeXT code
      drops newlines and unpadding and puts the base crop's tokens first, then the grid's dominant
      tokens, CLS tokens and contextual tokens.
    * Split. Their repository states no NeXT split; 540:100 of 640 is the share of their LLaVA-1.5
      example (54:10 of 64), which their NeXT runs at 640 (108 + 20 per crop) also use.
    * Only valid tokens are candidates (padding the unpadding drops is neither kept nor merged);
      ``--budget global`` runs the same over the whole image (VisionZip itself is per crop).

    On Qwen2.5-VL / Qwen3-VL (no CLS, no crops; docs/peers.md, "The peers on Qwen"): ``cls_attention`` is
    the CLS-free score, the mean attention each merged token's four patches *receive* in one full-attention
    tower block (``Family.attention_block``: Qwen2.5-VL's last ``fullatt_block_indexes`` block, Qwen3-VL's
    last block), ``keys`` that block's keys (mean over heads and the four patches), ``cls_tokens`` None (all d
    dominant tokens are merged tokens), and the image is one crop, so per-crop and global agree. The
    contextual tokens are merged from the pre-merger features (each merged token's four patch states, the
    encoder output VisionZip merges) and go through the merger as the kept ones do; the LLM gets them after
    the kept tokens at the position of the image's last slot (``_qwen.generate_ids``), with no DeepStack
    feature of their own (zeros: Qwen3-VL adds nothing at their slots).

    ``options``: the ablation switches ``merge`` (see :func:`_contextual`) and ``split``."""
    options = dict(options or {})
    crops, tokens = features.shape[:2]
    per_crop = budget == "per-crop"
    k = budget_counts(valid, retention, budget)
    split = [visionzip_split(int(v), tuple(options.get("split", VISIONZIP_SPLIT))) for v in k]
    with_cls = cls_tokens is not None
    if with_cls and tuple(cls_tokens.shape[:1]) != (crops,):
        raise ValueError(f"cls_tokens shape {tuple(cls_tokens.shape)} does not match {crops} crops")
    dominant_k = torch.tensor([max(0, d - with_cls) for d, _ in split], device=features.device)
    mask = top_k(cls_attention, dominant_k, valid, per_crop)
    if per_crop:
        groups = [(features[c], keys[c], valid[c] & ~mask[c], split[c][1]) for c in range(crops)]
    else:
        groups = [(features.reshape(crops * tokens, -1), keys.reshape(crops * tokens, -1),
                   (valid & ~mask).reshape(-1), split[0][1])]
    merge = options.get("merge", "reference")
    extra = []
    if with_cls:  # one CLS per crop with a budget (per-crop), or the image's first crop's (global)
        has = [int(v) > 0 for v in k] if per_crop else [int(k[0]) > 0] + [False] * (crops - 1)
        extra.append(cls_tokens[torch.tensor(has, device=cls_tokens.device)].to(features.dtype))
    extra += [_contextual(f, kk, rest, c, merge) for f, kk, rest, c in groups if c > 0]
    extra = [e for e in extra if e.shape[0]]
    if not extra:
        return Selection(mask)
    return Selection(mask, torch.cat(extra))


def _contextual(hidden: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, count: int,
                merge: str = "reference") -> torch.Tensor:
    """(c, C) VisionZip contextual tokens from the ``remaining`` tokens of one group (a crop or the image).

    ``merge``: "reference", target + mean(merged) (their code); the ablations "average", the mean of
    target and merged together, and "target", the target alone (docs/peers.md)."""
    if merge not in MERGES:
        raise ValueError(f"unknown VisionZip merge {merge!r}; valid: reference, average, target")
    idx = remaining.nonzero().flatten()
    m = int(idx.numel())
    count = min(count, m)
    if count == 0:
        return hidden.new_zeros(0, hidden.shape[-1])
    h, metric = hidden[idx].float(), torch.nn.functional.normalize(keys[idx].float(), dim=-1)
    step = max(1, m // count)
    targets = torch.arange(0, m, step, device=hidden.device)[:count]
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    out = h[targets].clone()
    if others.numel() and merge != "target":
        assign = (metric[others] @ metric[targets].T).argmax(dim=1)  # (others,) -> target slot
        sums = torch.zeros_like(out).index_add_(0, assign, h[others])
        counts = torch.zeros(count, device=hidden.device).index_add_(0, assign, torch.ones_like(assign, dtype=torch.float))
        if merge == "reference":
            out = out + sums / counts.clamp(min=1)[:, None]
        else:
            out = (out + sums) / (counts + 1)[:, None]
    return out.to(hidden.dtype)
