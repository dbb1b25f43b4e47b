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
* ``global``: K = round(r * valid tokens of the image);
* ``stock``: K = round(r * the tokens the stock model sends of the image), spread as ``global``;
* ``threshold`` (adaptive strategies: the selector): the tokens whose keep probability reaches a
  threshold, between a floor and a cap (r), so K follows the image's content.

Strategies whose paper distributes the budget itself (the peers HiRED, DivPrune
and CDPruner) take the image's K and spread it their way. Without ``valid``
every token counts.

Each strategy is declared once, beside its function, with
:func:`~pipeline.strategies.core.strategy` (``core`` holds the registry, the
budgets and the one selection path :func:`select`). One module per group: ``basic``
(``full``, ``none``, ``random`` and the paper's ``selector``) and one module per
published peer (VisionZip, HiRED, DivPrune, CDPruner), beside its simple variant
where there is one (``attention``, ``diversity``). Each function's docstring says
what is faithful to the reference and what differs; ``atr eval --help`` lists them.

Another installed package adds strategies through the entry-point group
``atr.strategies`` (``docs/strategies.md``); :func:`names` lists them all.
"""

from __future__ import annotations

from .core import (
    BUDGETS,
    ENTRY_POINT_GROUP,
    FIXED_BUDGETS,
    NEEDS,
    Batch,
    Context,
    Request,
    Selection,
    Strategy,
    Threshold,
    TowerOutputs,
    adaptive_keep,
    budget_counts,
    check_budget,
    check_strategy,
    get,
    image_budget,
    keep_mask,
    keep_masks,
    label,
    load,
    load_plugins,
    names,
    peers,
    pruners,
    prunes,
    register,
    seeded,
    seeded_generator,
    select,
    selections,
    strategy,
    style,
    top_k,
    tower_outputs,
    unavailable,
    unregister,
    variant_text,
)

__all__ = ["BUDGETS", "FIXED_BUDGETS", "Threshold", "adaptive_keep", "variant_text", "ENTRY_POINT_GROUP", "NEEDS", "Batch", "Context", "Request", "Selection", "Strategy",
           "TowerOutputs", "budget_counts", "check_budget", "check_strategy", "get", "image_budget", "keep_mask",
           "keep_masks", "label", "load", "load_plugins", "names", "peers", "pruners", "prunes", "register",
           "seeded", "seeded_generator", "select", "selections", "strategy", "style", "top_k", "tower_outputs",
           "unavailable", "unregister"]
