"""Token-reduction strategies behind one interface: what of an image the LLM gets to see.

Every strategy maps one image's tower features ``(crops, L, C)`` (plus what it
needs, in a :class:`Context`) to a :class:`Selection`: a boolean ``mask``
``(crops, L)`` of the encoder tokens it keeps and, for strategies that build new
tokens, ``extra`` ``(E, C)`` tokens in the same tower space that are not a subset
of the image's (VisionZip's merged contextual tokens). ``none`` returns None (no
image at all). Kept tokens go to the LLM in raster order, row newlines follow the
kept rows, and the extra tokens come after them (``pipeline.prune``).

**Budgets count every token the LLM sees** (besides row newlines): at retention r
every strategy sends ``mask.sum() + len(extra)`` = the same K tokens as
``random``. K counts valid tokens only. A grid crop of an image whose aspect
ratio does not fit its AnyRes canvas holds padding rows or columns that
LLaVA-NeXT's unpadding drops before the LLM; ``valid`` ``(crops, L)`` marks the
tokens that survive (``pipeline.prune.valid_tokens``, from the model's own
``pack_image_features``; the base crop has no padding). Only valid tokens are
ever candidates:

* ``per-crop`` (default): k_c = round(r * valid tokens of crop c) in every crop
  (at least 1 where the crop has any), the base crop included; K = sum of k_c;
* ``global``: K = round(r * valid tokens of the image).

Strategies whose paper distributes the budget itself (``hired``, ``divprune``,
``cdpruner``) take the image's K and spread it their way. Without ``valid``
every token counts.

Strategies (each function's docstring says what is faithful to the reference and
what differs):

* ``full``: every valid token; ``none``: no image (the prompt carries no image tokens);
* ``random``: uniform among valid tokens, seeded;
* ``selector``: the paper's trained selector, top-k by keep-logit;
* ``attention``: the simple variant of VisionZip: its dominant tokens only;
* ``diversity``: the simple variant of DivPrune: max-min on the tower features, crop by crop;
* ``visionzip``: VisionZip (Yang et al., CVPR 2025): dominant plus merged contextual tokens;
* ``hired``: HiRED (Arif et al., AAAI 2025): attention-guided budget split across crops;
* ``divprune``: DivPrune (Alvar et al., CVPR 2025): max-min diversity on the projected tokens;
* ``cdpruner``: CDPruner (Zhang et al., 2025): conditional DPP, greedy MAP, on the projected tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .config import STRATEGIES, ConfigError

PEERS = ("visionzip", "hired", "divprune", "cdpruner")  # the published pruners, as their papers run them
PROJECTED = ("divprune", "cdpruner")  # strategies that choose on the projector's output (Context.projected)
TOWER_SCORES = ("attention", "visionzip", "hired")  # strategies that need the tower's CLS attention
BUDGETS = ("per-crop", "global")

# Bumped when a strategy's choice changes, so cached eval results of the old one are not reused
# (part of the eval keys of these strategies only; the others' keys are fixed by EVAL_VERSION).
STRATEGY_VERSIONS = {"visionzip": "2", "hired": "1", "divprune": "1", "cdpruner": "1"}
VISIONZIP_SPLIT = (540, 100)  # VisionZip's dominant:contextual split for LLaVA-NeXT (640 tokens)
VISIONZIP_CLS = True  # send each crop's CLS as a dominant token, as VisionZip does (False: the ablation)
VISIONZIP_MERGE = "reference"  # contextual token: "reference" target + mean(merged); ablations: "average", "target"
HIRED_ALPHA = 0.5             # HiRED's share of the budget for the base (full-image) crop


@dataclass
class Context:
    """What strategies may need beyond the features (all per image)."""

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    selector: Any = None  # a TokenSelector (pipeline.selector)
    cls_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of the feature layer
    early_attention: torch.Tensor | None = None  # (crops, L) CLS -> token attention of encoder layer 0
    keys: torch.Tensor | None = None  # (crops, L, d) feature layer's attention keys, mean over heads
    regions: torch.Tensor | None = None  # (L,) the grid crop (1..) each base-crop token lies in, 0 for none
    projected: torch.Tensor | None = None  # (crops, L, D) the projector's output: LLM-space tokens
    relevance: torch.Tensor | None = None  # (crops, L) relevance of each token to the question (cdpruner)
    cls_tokens: torch.Tensor | None = None  # (crops, C) the feature layer's CLS token per crop (visionzip)


@dataclass
class Selection:
    """What one image sends the LLM: ``mask`` (crops, L) of kept encoder tokens and ``extra`` (E, C)
    new tokens in tower space (None: none), which go after the kept ones."""

    mask: torch.Tensor
    extra: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        """Encoder-side tokens sent (kept + extra; row newlines not counted)."""
        return int(self.mask.sum()) + (0 if self.extra is None else int(self.extra.shape[0]))


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    return budget


@torch.no_grad()
def select(strategy: str, features: torch.Tensor, retention: float, budget: str = "per-crop",
           context: Context | None = None, valid: torch.Tensor | None = None) -> Selection | None:
    """What ``strategy`` sends the LLM of one image ``(crops, L, C)``; None for ``none``."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    crops, tokens = features.shape[:2]
    valid = _valid(valid, crops, tokens, features.device)
    if strategy == "none":
        return None
    if strategy == "full":
        return Selection(valid.clone())
    if strategy == "diversity":
        return Selection(diversity(features, retention, budget, valid))
    if strategy == "visionzip":
        return visionzip(features, _need(context, "cls_attention", strategy, crops, tokens),
                         _need(context, "keys", strategy, crops, tokens), retention, budget, valid,
                         cls_tokens=context.cls_tokens if VISIONZIP_CLS else None)
    if strategy == "hired":
        return Selection(hired(_need(context, "cls_attention", strategy, crops, tokens),
                               _need(context, "early_attention", strategy, crops, tokens), context.regions,
                               retention, budget, valid))
    if strategy == "divprune":
        return Selection(divprune(_need(context, "projected", strategy, crops, tokens), retention, budget, valid))
    if strategy == "cdpruner":
        return Selection(cdpruner(_need(context, "projected", strategy, crops, tokens), context.relevance,
                                  retention, budget, valid))
    return Selection(_top(_scores(strategy, features, context), retention, budget, valid))


def keep_mask(strategy: str, features: torch.Tensor, retention: float, budget: str = "per-crop",
              context: Context | None = None, valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """(crops, L) bool mask of the encoder tokens ``strategy`` keeps (its extra tokens aside); None for ``none``."""
    sel = select(strategy, features, retention, budget, context, valid)
    return None if sel is None else sel.mask


def selections(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: str = "per-crop",
               context: Context | None = None, valid: Sequence[torch.Tensor | None] | None = None,
               per_image: Sequence[dict[str, Any]] | None = None) -> list[Selection | None]:
    """:func:`select` for a batch of images, each ``(crops_i, L, C)``; one Selection (or None) per image.

    ``per_image[i]`` overrides Context fields for image i (``cls_attention``, ``projected``, ...).
    ``selector`` runs once on all crops of all images (``(sum crops_i, L, C)``): it attends
    within each crop, so this gives every image the mask it gets alone. The other
    strategies run image by image in order (``random`` draws from the generator in the
    same order as one call per image)."""
    check_strategy(strategy)
    check_budget(budget)
    context = context or Context()
    valid = list(valid) if valid is not None else [None] * len(features)
    if strategy != "selector" or not features:
        extra = list(per_image) if per_image is not None else [{}] * len(features)
        return [select(strategy, f, retention, budget, replace(context, **e), v)
                for f, e, v in zip(features, extra, valid, strict=True)]
    counts = [f.shape[0] for f in features]
    logits = _scores(strategy, torch.cat(list(features)), context)
    return [Selection(_top(s, retention, budget, _valid(v, s.shape[0], s.shape[1], s.device)))
            for s, v in zip(torch.split(logits, counts), valid, strict=True)]


def keep_masks(strategy: str, features: Sequence[torch.Tensor], retention: float, budget: str = "per-crop",
               context: Context | None = None,
               cls_attention: Sequence[torch.Tensor | None] | None = None,
               valid: Sequence[torch.Tensor | None] | None = None,
               projected: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
    """The masks of :func:`selections` (``cls_attention[i]``, ``projected[i]`` are image i's)."""
    n = len(features)
    per_image = [{**({"cls_attention": cls_attention[i]} if cls_attention is not None else {}),
                  **({"projected": projected[i]} if projected is not None else {})} for i in range(n)]
    return [None if s is None else s.mask for s in selections(strategy, features, retention, budget, context, valid,
                                                                 per_image)]


def _need(context: Context, name: str, strategy: str, crops: int, tokens: int) -> torch.Tensor:
    value = getattr(context, name)
    if value is None:
        what = {"cls_attention": "the tower's CLS attention", "early_attention": "the tower's layer-0 CLS attention",
                "keys": "the feature layer's attention keys"}.get(name)
        how = f"{what} (encode with attention=True)" if what else "the projected tokens (crops, L, D) of the same image"
        raise ValueError(f"strategy {strategy!r} needs {how}")
    if tuple(value.shape[:2]) != (crops, tokens):
        raise ValueError(f"{name} shape {tuple(value.shape)} does not match features {(crops, tokens)}")
    return value


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


def image_budget(valid: torch.Tensor, retention: float, budget: str) -> int:
    """K, every token the LLM sees of one image (row newlines aside): the sum of :func:`budget_counts`."""
    return int(budget_counts(valid, retention, budget).sum())


def _scores(strategy: str, features: torch.Tensor, context: Context) -> torch.Tensor:
    crops, tokens = features.shape[:2]
    if strategy == "random":
        return torch.rand(crops, tokens, generator=context.generator).to(features.device)
    if strategy == "selector":
        if context.selector is None:
            raise ConfigError("strategy 'selector' needs a selector checkpoint (--selector)")
        with torch.no_grad():
            return context.selector.keep_logits(features.float())
    return attention(_need(context, "cls_attention", strategy, crops, tokens))


def attention(cls_attention: torch.Tensor) -> torch.Tensor:
    """``attention``, the simple variant of VisionZip: the scores of its dominant tokens alone.

    Each token's score is the attention the CLS token pays it in the feature layer
    (``vision_feature_layer``, -2 for LLaVA-NeXT), mean over heads (the same order as
    VisionZip's sum); the top k valid tokens of each crop are kept. What differs from
    VisionZip: no contextual tokens, the whole budget goes to dominant ones."""
    return cls_attention


def _top(scores: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """The top-k valid tokens by score, k from :func:`budget_counts` (per crop, or over the image)."""
    return _top_k(scores, budget_counts(valid, retention, budget), valid, per_crop=budget == "per-crop")


def _top_k(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, per_crop: bool) -> torch.Tensor:
    """(crops, L) mask of the k[c] highest-scoring valid tokens of each crop (``per_crop``), or of the
    k[0] highest over the whole image; ties go to the lower index."""
    crops, tokens = scores.shape
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if not per_crop:
        masked = masked.reshape(1, crops * tokens)
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return (ranks < k.to(ranks.device)[:, None]).reshape(crops, tokens)


# ---------------------------------------------------------------- diversity (DivPrune)

def diversity(features: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """``diversity``, the simple variant of DivPrune: greedy max-min diversity on cosine distance between
    the *tower* features (the projector's input), within each crop's budget (``--budget global``: over the
    image). What differs from DivPrune: the space (tower, not projected) and the per-crop split."""
    crops, tokens = features.shape[:2]
    k = budget_counts(valid, retention, budget)
    if budget == "per-crop":
        return _max_min(features.float(), k, valid)  # all crops at once
    return _max_min(features.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


def divprune(projected: torch.Tensor, retention: float, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """``divprune``: DivPrune as its paper and reference code run it (vbdi/divprune, ``DivPrune`` on the
    output of ``mm_projector``).

    Faithful: greedy max-min on cosine distance over the *projected* (LLM-space) tokens of the whole
    image, as one set: the first token is the one farthest from its nearest neighbour, then repeatedly
    the token farthest from everything kept. K (the image's budget, :func:`image_budget`) falls wherever
    diversity puts it. What differs: only valid tokens are candidates (the reference runs before
    LLaVA-NeXT's unpadding), and row newlines follow the kept rows as for every strategy (the
    reference prunes after packing, newlines included)."""
    crops, tokens = projected.shape[:2]
    k = torch.tensor([image_budget(valid, retention, budget)], device=projected.device)
    return _max_min(projected.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


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


# ---------------------------------------------------------------- VisionZip

def visionzip_split(k: int, split: tuple[int, int] = VISIONZIP_SPLIT) -> tuple[int, int]:
    """(dominant, contextual) of a budget of k tokens, in VisionZip's NeXT proportion 540:100
    (k=640 -> 540 + 100; 128 -> 108 + 20; 64 -> 54 + 10, their LLaVA-1.5 split)."""
    dom, ctx = split
    contextual = int(math.floor(k * ctx / (dom + ctx) + 0.5))
    return k - contextual, contextual


def visionzip(features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, retention: float,
              budget: str, valid: torch.Tensor, split: tuple[int, int] = VISIONZIP_SPLIT,
              merge: str | None = None, cls_tokens: torch.Tensor | None = None) -> Selection:
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
      ``--budget global`` runs the same over the whole image (VisionZip itself is per crop)."""
    crops, tokens = features.shape[:2]
    per_crop = budget == "per-crop"
    k = budget_counts(valid, retention, budget)
    split = [visionzip_split(int(v), split) for v in k]
    with_cls = cls_tokens is not None
    if with_cls and tuple(cls_tokens.shape[:1]) != (crops,):
        raise ValueError(f"cls_tokens shape {tuple(cls_tokens.shape)} does not match {crops} crops")
    dominant_k = torch.tensor([max(0, d - with_cls) for d, _ in split], device=features.device)
    mask = _top_k(cls_attention, dominant_k, valid, per_crop)
    if per_crop:
        groups = [(features[c], keys[c], valid[c] & ~mask[c], split[c][1]) for c in range(crops)]
    else:
        groups = [(features.reshape(crops * tokens, -1), keys.reshape(crops * tokens, -1),
                   (valid & ~mask).reshape(-1), split[0][1])]
    merge = merge or VISIONZIP_MERGE
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
    if merge not in ("reference", "average", "target"):
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


# ---------------------------------------------------------------- HiRED

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
    (the excess goes on to the others); (c) heads are averaged, not summed (the same ranking)."""
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
    return _top_k(cls_attention, k.to(cls_attention.device), valid, per_crop=True)


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


# ---------------------------------------------------------------- CDPruner

def cdpruner(projected: torch.Tensor, relevance: torch.Tensor | None, retention: float, budget: str,
             valid: torch.Tensor) -> torch.Tensor:
    """``cdpruner``: CDPruner's conditional DPP (Theia-4869/CDPruner, ``llava_arch.py``).

    Faithful: the kernel is over the projected (``mm_projector``, LLM-space) tokens: S = cosine
    similarity of the L2-normalized tokens, L = diag(q) S diag(q) with q each token's relevance to the
    question (``pipeline.relevance``: their CLIP text-image similarity, negated and min-max normalized
    over the whole image); the kept tokens are the greedy MAP of the DPP with incremental Cholesky
    updates (:func:`dpp_greedy`, their fast greedy). As in their LLaVA-NeXT code the DPP runs per crop
    (B = crops) with each crop's budget; ``--budget global`` runs one DPP over the whole image with
    K (:func:`image_budget`). ``relevance=None`` is the unconditioned DPP (their DPPruner ablation):
    L = S. What differs: only valid tokens are candidates and newlines follow the kept rows (their
    NeXT code turns off unpadding and newlines: fixed 672x672, ``_unpad`` stripped)."""
    crops, tokens = projected.shape[:2]
    if relevance is not None and tuple(relevance.shape) != (crops, tokens):
        raise ValueError(f"relevance shape {tuple(relevance.shape)} does not match features {(crops, tokens)}")
    x = torch.nn.functional.normalize(projected.float(), dim=-1)
    q = None if relevance is None else relevance.float().to(x.device)
    mask = torch.zeros(crops, tokens, dtype=torch.bool, device=projected.device)
    if budget == "per-crop":
        groups = [(c, int(n)) for c, n in enumerate(budget_counts(valid, retention, budget))]
    else:
        x, mask, valid = x.reshape(1, crops * tokens, -1), mask.view(1, -1), valid.reshape(1, -1)
        q = None if q is None else q.reshape(1, -1)
        groups = [(0, image_budget(valid, retention, budget))]
    for g, k in groups:
        idx = valid[g].nonzero().flatten()
        if k == 0 or idx.numel() == 0:
            continue
        xi = x[g][idx]
        kernel = xi @ xi.T
        if q is not None:
            kernel = q[g][idx][:, None] * kernel * q[g][idx][None, :]
        mask[g][idx[dpp_greedy(kernel, k)]] = True
    return mask.view(crops, tokens)


def dpp_greedy(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """Indices of the k items the greedy MAP of a DPP with kernel ``kernel`` (N, N) picks, in pick order.

    Incremental Cholesky (Chen, Zhang and Zhou, NeurIPS 2018; CDPruner's fast greedy): d_i^2 starts as
    L_ii; after picking j, e_i = (L_ji - <c_j, c_i>) / d_j is appended to every c_i and d_i^2 -= e_i^2;
    the next pick is the largest d_i^2. Ties go to the lower index. When no item adds volume any more
    (every d_i^2 <= eps * max L_ii: the kernel's rank is spent, e.g. more picks than the tokens'
    width), the reference would divide by zero; here the rest are taken by their diagonal L_ii (their
    relevance), largest first, so exactly k distinct items come back."""
    n = kernel.shape[0]
    k = min(int(k), n)
    kernel = kernel.double()
    diag = torch.diagonal(kernel).clone()
    floor = eps * max(float(diag.max()), 0.0) if n else 0.0
    cis = kernel.new_zeros(k, n)
    di2 = diag.clone()
    picked = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    out = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        open_ = di2.masked_fill(picked, float("-inf"))
        j = int(open_.argmax())
        if float(open_[j]) <= floor:  # rank spent: the rest by relevance
            rest = diag.masked_fill(picked, float("-inf")).argsort(descending=True, stable=True)[:k - i]
            out[i:] = rest
            break
        out[i] = j
        picked[j] = True
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(di2[j]))
        cis[i] = e
        di2 = di2 - e * e
    return out


__all__ = ["STRATEGIES", "STRATEGY_VERSIONS", "PEERS", "PROJECTED", "TOWER_SCORES", "BUDGETS", "VISIONZIP_SPLIT", "HIRED_ALPHA", "Context",
           "Selection", "select", "keep_mask", "selections", "keep_masks", "budget_counts", "image_budget",
           "check_strategy", "check_budget", "attention", "diversity", "divprune", "visionzip", "visionzip_split",
           "hired", "cdpruner", "dpp_greedy"]
