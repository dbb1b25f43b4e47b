"""Pruned LLaVA-NeXT / LLaVA-OneVision inference on stock HF transformers (no fork of the modeling code).

What differs between the families (packing call, CLS, geometry, interpolation)
comes from ``pipeline.families``; the description below holds for both.

Per image: the vision tower runs once on every AnyRes crop (one batched forward),
the projector maps the ``(crops, L, C)`` tower features to LM width, and the
model's own ``pack_image_features`` lays them out (base crop, then the unpadded
high-resolution grid with one row-newline token per row). A boolean ``keep_mask``
``(crops, L)`` is packed *the same way*, so geometry and unpadding can
never disagree between features and mask. The kept tokens, in raster order,
replace the single ``<image>`` placeholder in ``inputs_embeds``; ``generate_answers``
then runs greedy decoding. Batches are left-padded.

Row-newline rule (one rule for every strategy): a grid row's newline token is
kept iff that row keeps at least one encoder token; "full" therefore keeps every
newline, "none" sends no image at all. Retention counts encoder tokens only;
``visual_tokens`` reports what the LLM really saw (kept tokens + kept newlines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .extract import (crop_layout, crops_per_pass, encoder_layers, feature_layers, projector_inputs,
                      tower_hidden_states)
from .families import family_of
from .visual import ImageFeatures, prompt_segments
from .families.base import InterpolatedGridError


def _own(model):
    """The model's family where it brings its own pruned inference (``Family.own_runtime``: Qwen-VL), else None."""
    from .families import FAMILIES

    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    return family if family is not None and family.own_runtime else None  # unknown: _inner's one line


def _inner(model):
    """The LlavaNextModel / LlavaOnevisionModel inside, checked for the public pieces pruning relies on.

    These moved between transformers releases (4.4x kept them on the top-level
    class; 5.x on ``model.model``); a version without them fails here with one line."""
    from .loading import ModelLoadError

    inner = getattr(model, "model", None)
    missing = [name for name in ("pack_image_features", "multi_modal_projector", "image_newline", "vision_tower")
               if inner is None or not hasattr(inner, name)]
    if missing:
        import transformers

        raise ModelLoadError(f"{type(model).__name__} (transformers {transformers.__version__}) lacks "
                             f"model.{', model.'.join(missing)}; pruned inference needs a LlavaNext or LlavaOnevision "
                             f"model from transformers 5.x")
    return inner


# The hidden state whose post-norm tokens ``embeds=True`` returns (CDPruner's relevance input). None: the
# model's feature layer (``vision_feature_layer``; the last of several), as CDPruner's ``clip_encoder.py``
# takes ``post_layernorm(hidden_states[select_layer])`` -- layer -2 on LLaVA-NeXT, -1 on LLaVA-OneVision.
# Otherwise an index of the tower's ``output_hidden_states`` tuple.
EMBEDS_LAYER: int | None = None


@torch.no_grad()
def encode_images(model, processor, images: Sequence[Any], attention: bool = False,
                  embeds: bool = False, embeds_layer: int | None = EMBEDS_LAYER) -> list[ImageFeatures]:
    """Tower features of every crop of every image, in tower passes of a bounded number of crops (one pass
    with ``attention``).

    ``attention=True`` also gives each token the attention the CLS token pays it
    inside the feature layer (mean over heads) and inside encoder layer 0 -- on a tower
    without CLS (SigLIP, LLaVA-OneVision) the mean attention the token *receives* from
    every token instead (see :func:`_layer_attention`) -- and the
    feature layer's attention keys (mean over heads) and its CLS token, recomputed from each layer's
    input hidden state with the layer's own norm and q/k projections (SDPA kernels
    do not return attention weights). These are what VisionZip (dominance, key
    similarity) and HiRED (layer-0 budget split) score with. ``embeds=True`` also
    keeps the ``embeds_layer`` hidden state (default: the feature layer) after the tower's ``post_layernorm`` (CLS
    dropped): the input of a CLIP ``visual_projection`` (CDPruner's relevance).

    The tower keeps only the hidden states these need (the feature layer; with ``attention`` the
    feature layer's and layer 0's inputs; with ``embeds`` ``embeds_layer``) and stops after the last of
    them (``pipeline.extract.tower_hidden_states``): never every layer."""
    if (own := _own(model)) is not None:
        return own.encode_images(model, processor, images, attention, embeds, embeds_layer)
    cfg = model.config
    inner = _inner(model)
    crop = cfg.vision_config.image_size
    enc = processor.image_processor(images=list(images), return_tensors="pt")
    pixels, counts, sizes = [], [], []
    for px, image in zip(enc["pixel_values"], images):
        w, h = image.size
        n = len(crop_layout(w, h, crop, cfg.image_grid_pinpoints).boxes)
        pixels.append(px[:n])
        counts.append(n)
        sizes.append((h, w))
    tower = inner.vision_tower
    param = next(tower.parameters())
    layer = cfg.vision_feature_layer
    family = family_of(cfg)
    has_cls = family.has_cls(cfg)
    if attention and (isinstance(layer, (list, tuple)) or family.cls_in_features(cfg)):
        raise ValueError("attention scores need one vision_feature_layer and patch-only features "
                         "(the 'default' strategy on a CLIP tower)")
    if embeds_layer is None:
        embeds_layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
    index = layer % (len(encoder_layers(tower)) + 1) if attention else 0  # hidden state i: layer i - 1's output
    needed = feature_layers(layer) + ([index - 1, 0] if attention else []) + ([embeds_layer] if embeds else [])
    drop = has_cls and not family.cls_in_features(cfg)
    post = getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)

    def one_pass(chunk) -> dict[str, torch.Tensor]:
        hidden_states = tower_hidden_states(tower, chunk, needed)
        out = {"features": projector_inputs(hidden_states, layer, cfg.vision_feature_select_strategy)}
        if attention:
            out["cls_attention"], out["keys"] = _layer_attention(tower, hidden_states, index, has_cls)
            out["early_attention"] = _layer_attention(tower, hidden_states, 1, has_cls)[0]
            if has_cls:
                out["cls_tokens"] = hidden_states[layer][:, 0]
        if embeds:
            hidden = hidden_states[embeds_layer]
            hidden = post(hidden) if post is not None else hidden
            out["last_hidden"] = hidden[:, 1:] if drop else hidden
        return out

    # Passes over a bounded number of crops keep one layer's activations bounded whatever the batch (16
    # OneVision pages are ~500 crops), bit-identical to one pass over all. Not with attention scores: the
    # CLS query's projection is a GEMM with one row per crop, whose CPU kernel (and so its last bits)
    # changes with the row count; those keep today's single pass.
    pixels = torch.cat(pixels).to(param.device, param.dtype)
    step = len(pixels) if attention else crops_per_pass(tower, param.device)
    passes = [one_pass(pixels[i:i + step]) for i in range(0, len(pixels), step)]
    parts = {name: torch.split(passes[0][name] if len(passes) == 1 else torch.cat([p[name] for p in passes]), counts)
             for name in passes[0]}
    none = [None] * len(counts)
    result = []
    for i, (f, s) in enumerate(zip(parts["features"], sizes)):
        result.append(ImageFeatures(f, s, parts.get("cls_attention", none)[i],
                                    valid_tokens(model, f.shape[0], f.shape[1], s, f.device),
                                    parts.get("early_attention", none)[i], parts.get("keys", none)[i],
                                    parts.get("last_hidden", none)[i], parts.get("cls_tokens", none)[i]))
    return result


def _layer_attention(tower, hidden_states, index: int, cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Inside the encoder layer whose output is ``hidden_states[index]``: (N, L) attention scores of the
    patch tokens (mean over heads) and (N, L, head_dim) their keys (mean over heads). ``hidden_states``
    needs only index ``index - 1`` (that layer's input; ``pipeline.extract.HiddenStates``).

    With a CLS token (CLIP) the score is the attention CLS pays each patch token. Without one
    (SigLIP) it is the mean attention each token *receives* from all tokens, sum_i A[i, j] / T:
    the CLS-free score of VisionZip's community OneVision/Qwen ports (no official port exists),
    and on CLIP it correlates with the CLS row. It is computed in query chunks so a 729-token
    crop never holds more than one (chunk x T) block per head."""
    encoder = getattr(tower, "vision_model", tower).encoder
    block = encoder.layers[index - 1]
    attn = block.self_attn
    x = block.layer_norm1(hidden_states[index - 1])
    n, t, _ = x.shape
    k = attn.k_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    if cls:
        q = attn.q_proj(x[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # (N, heads, 1, T)
        return weights.mean(dim=1)[:, 0, 1:].float(), k.mean(dim=1)[:, 1:].float()
    q = attn.q_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    received = torch.zeros(n, t, dtype=torch.float32, device=x.device)
    for start in range(0, t, 256):
        w = torch.softmax((q[:, :, start:start + 256] @ k.transpose(-1, -2)) * attn.scale, dim=-1)
        received += w.float().mean(dim=1).sum(dim=1)
    return received / t, k.mean(dim=1).float()


def base_regions(model, crops: int, tokens: int, image_size: tuple[int, int]) -> torch.Tensor:
    """(L,) long: for each base-crop token, the grid crop (1-based crop index) that covers its centre in
    the original image, 0 where none does (a one-crop image: all 0). HiRED splits its budget by it."""
    if (own := _own(model)) is not None:
        return own.base_regions(model, crops, tokens, image_size)
    import numpy as np

    from .extract import token_boxes

    cfg = model.config
    family = family_of(cfg)
    h, w = image_size
    layout = crop_layout(w, h, cfg.vision_config.image_size, cfg.image_grid_pinpoints)
    side = family.side(cfg)
    out = torch.zeros(tokens, dtype=torch.long)
    if crops <= 1:
        return out
    cells = token_boxes(layout.boxes[0], side, family.covered(cfg))
    cx, cy = (cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2
    region = np.zeros(side * side, dtype=np.int64)
    for c, (x0, y0, x1, y1) in enumerate(layout.boxes[1:crops], start=1):
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1) & (region == 0)
        region[inside] = c
    out[tokens - side * side:] = torch.from_numpy(region)
    return out


_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, int, bool]] = {}


def _layout(model, crops: int, tokens: int, image_size: tuple[int, int], device=None, interpolate: bool = True,
            aspect: str | None = None):
    """(source, row, rows, interpolated) of :func:`packing_layout`; ``interpolated`` is True when the
    family shrank this grid (OneVision's ratio rule), and ``source`` is then meaningless.
    ``interpolate=False`` packs as if interpolation were off (what unpadding keeps); ``aspect`` packs
    with that ``vision_aspect_ratio`` instead of the config's (the stock count). Cached per geometry."""
    cfg = model.config
    family = family_of(cfg)
    current = getattr(cfg, "vision_aspect_ratio", None)
    if current is not None:
        aspect = aspect or (current if interpolate else family.off_value(cfg))
    key = (family.name, crops, tokens, tuple(image_size), cfg.vision_config.image_size, cfg.vision_config.patch_size,
           str(cfg.image_grid_pinpoints), cfg.vision_feature_select_strategy, aspect, str(device))
    if key not in _LAYOUTS:
        inner = _inner(model)
        index = torch.arange(crops * tokens, dtype=torch.float64).view(crops, tokens, 1)
        packed = family.pack(inner, [index], torch.tensor([list(image_size)]),
                             torch.tensor([-1.0], dtype=torch.float64), cfg, aspect=aspect)
        flat = packed[0][:, 0]
        source = flat.round().long()
        is_newline = source < 0
        real = source[~is_newline]
        # bilinear shrinking averages neighbours: indices stop being whole, or some are lost
        interpolated = bool((flat - flat.round()).abs().max() > 1e-6) or real.unique().numel() != real.numel()
        if aspect is not None and aspect != family.off_value(cfg) and not interpolated:  # lands on whole indices
            interpolated = source.numel() != _layout(model, crops, tokens, image_size, device, False)[0].numel()
        start = tokens if crops > 1 else 0  # base-crop tokens lead and have no newline
        grid_nl = is_newline[start:].long()
        grid_row = torch.cumsum(grid_nl, 0) - grid_nl
        rows = int(grid_nl.sum())
        row = torch.cat([torch.full((start,), rows, dtype=torch.long), grid_row])
        _LAYOUTS[key] = (source.to(device), row.to(device), rows, interpolated)
    return _LAYOUTS[key]


def packing_layout(model, crops: int, tokens: int, image_size: tuple[int, int], device=None):
    """Where the model puts every token of one image, computed once per geometry.

    Returns ``(source, row, rows)``: for each packed position, ``source`` is the
    flat index ``crop * L + token`` it comes from, or -1 for a row-newline; ``row``
    is the grid row it belongs to (``rows`` for base-crop tokens, which have no
    newline in NeXT; a one-crop OneVision image's trailing newline is row 0). It is found by
    running the model's own ``pack_image_features`` on token *indices*, so unpadding and
    newline placement are HF's, not a copy. A grid the model shrinks by interpolation
    (LLaVA-OneVision with ``vision_aspect_ratio`` on) has no such map: refused in one line."""
    if (own := _own(model)) is not None:
        return own.packing_layout(model, crops, tokens, image_size, device)
    source, row, rows, interpolated = _layout(model, crops, tokens, image_size, device)
    if interpolated:
        raise InterpolatedGridError(interpolation_message(model, image_size))
    return source, row, rows


def interpolation_message(model, image_size: tuple[int, int]) -> str:
    cfg = model.config
    family = family_of(cfg)
    return (f"{family.label} shrinks the token grid of this {image_size[1]}x{image_size[0]} image by interpolation "
            f"(vision_aspect_ratio={cfg.vision_aspect_ratio!r}), so a keep mask cannot be gathered through it; "
            f"turn interpolation off (atr: --interpolation off, the default; in code: "
            f"model.config.vision_aspect_ratio = {family.off_value(cfg)!r})")


def valid_tokens(model, crops: int, tokens: int, image_size: tuple[int, int], device=None) -> torch.Tensor:
    """(crops, L) bool: the tokens of each crop that survive the model's unpadding (the base crop: all).

    Read off the model's own ``pack_image_features`` with interpolation off (unpadding does
    not depend on it): a grid crop that covers canvas padding loses those rows or columns
    before the LLM."""
    if (own := _own(model)) is not None:
        return own.valid_tokens(model, crops, tokens, image_size, device)
    source, _, _, _ = _layout(model, crops, tokens, image_size, device, interpolate=False)
    valid = torch.zeros(crops * tokens, dtype=torch.bool, device=source.device)
    valid[source[source >= 0]] = True
    return valid.view(crops, tokens)


def stock_visual_tokens(model, crops: int, tokens: int, image_size: tuple[int, int], stock: dict | None = None) -> int:
    """How many visual tokens the unpruned model sends for this image with the checkpoint's own settings
    (``stock``: ``Family.stock_config``; OneVision's interpolation on), newlines included."""
    aspect = (stock or {}).get("vision_aspect_ratio")
    return int(_layout(model, crops, tokens, image_size, aspect=aspect)[0].numel())


def project(model, features: torch.Tensor) -> torch.Tensor:
    """(crops, L, D): the model's projector on tower features, the LLM-space tokens it would see."""
    if (own := _own(model)) is not None:
        return own.project(model, features)
    return _inner(model).multi_modal_projector(features)


def visual_embeddings(model, image: ImageFeatures, keep_mask: torch.Tensor | None = None,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
    """(visual_tokens, D) LM-width embeddings of the kept tokens in raster order, then ``extra``.

    ``keep_mask`` is a (crops, L) bool mask; None keeps everything. A row-newline is kept
    iff its row keeps a token. ``extra`` (E, C) are tower-space tokens that are not the
    image's own (VisionZip's contextual tokens): projected, they follow the kept ones. No Python loop over crops or tokens: one projector
    call and one gather through :func:`packing_layout`. Differentiable (the tiny
    world trains through it); wrap in ``torch.no_grad()`` for inference."""
    if (own := _own(model)) is not None:
        return own.visual_embeddings(model, image, keep_mask, extra)
    inner = _inner(model)
    feats = image.features
    crops, tokens = feats.shape[:2]
    if (extra is None or not extra.shape[0]) and _layout(model, crops, tokens, image.image_size, feats.device)[3] \
            and (keep_mask is None or bool(keep_mask.to(feats.device)[
                valid_tokens(model, crops, tokens, image.image_size, feats.device)].all())):
        # every token of the image (full) through a grid the model interpolates: the model's own packing
        packed = family_of(model.config).pack(inner, [project(model, feats)], torch.tensor([list(image.image_size)]),
                                              inner.image_newline, model.config)
        return packed[0]
    if keep_mask is None:
        keep_mask = torch.ones(crops, tokens, dtype=torch.bool, device=feats.device)
    if keep_mask.shape != feats.shape[:2]:
        raise ValueError(f"keep mask shape {tuple(keep_mask.shape)} does not match features {tuple(feats.shape[:2])}")
    source, row, rows = packing_layout(model, crops, tokens, image.image_size, feats.device)
    projected = project(model, feats).flatten(0, 1)
    table = torch.cat([projected, inner.image_newline.to(projected.dtype)[None]])
    is_newline = source < 0
    token_kept = keep_mask.to(feats.device).flatten()[source.clamp(min=0)] & ~is_newline
    kept_per_row = torch.zeros(rows + 1, dtype=torch.long, device=feats.device)
    kept_per_row.index_add_(0, row, token_kept.long())
    kept = torch.where(is_newline, kept_per_row[row] > 0, token_kept)
    gather = torch.where(is_newline, torch.full_like(source, crops * tokens), source)
    out = table[gather[kept]]
    if extra is not None and extra.shape[0]:
        out = torch.cat([out, project(model, extra.to(feats.device, feats.dtype)).to(out.dtype)])
    return out


def split_prompt(tokenizer, prompt: str, image_token_id: int):
    """(ids before, ids after) the single image placeholder of ``prompt`` (after is None without one)."""
    parts = prompt_segments(tokenizer, prompt, image_token_id)
    if len(parts) > 2:
        raise ValueError(f"prompt must contain at most one image placeholder, got {len(parts) - 1}: {prompt!r}")
    return (parts[0], None) if len(parts) == 1 else (parts[0], parts[1])


@torch.no_grad()
def generate_answers(model, processor, prompts: Sequence[str], visual: Sequence[torch.Tensor | None],
                     max_new_tokens: int = 16, streamer=None, stats: dict[str, int] | None = None) -> list[str]:
    """Greedy answers for prompts whose ``<image>`` placeholders are replaced by ``visual[i]``: one
    (visual_tokens, D) tensor, or a list of them, one per placeholder in order.

    ``visual[i] is None`` drops the placeholders: the prompt carries no image at all.
    Sequences are left-padded into one batch."""
    tok = processor.tokenizer
    out = generate_ids(model, processor, prompts, visual, max_new_tokens, streamer, stats)
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(model, processor, prompts: Sequence[str], visual: Sequence[torch.Tensor | None],
                 max_new_tokens: int = 16, streamer=None, stats: dict[str, int] | None = None) -> torch.Tensor:
    """(batch, new tokens) greedy token ids of :func:`generate_answers`, padded after EOS.

    ``stats`` (optional) accumulates ``padding`` (left-pad positions) and ``positions`` (batch x width)."""
    if (own := _own(model)) is not None:
        return own.generate_ids(model, processor, prompts, visual, max_new_tokens, streamer, stats)
    tok = processor.tokenizer
    embed = model.get_input_embeddings()
    image_token_id = model.config.image_token_id
    rows = []
    for prompt, vis in zip(prompts, visual, strict=True):
        segments = prompt_segments(tok, prompt, image_token_id)
        images = [] if vis is None else [vis] if isinstance(vis, torch.Tensor) else list(vis)
        if images and len(images) != len(segments) - 1:
            raise ValueError(f"{len(images)} images for a prompt with {len(segments) - 1} image placeholders: "
                             f"{prompt!r}")
        parts = [embed(segments[0].to(embed.weight.device))]
        for k, seg in enumerate(segments[1:]):
            if images:
                parts.append(images[k].to(embed.weight.dtype))
            parts.append(embed(seg.to(embed.weight.device)))
        rows.append(torch.cat(parts))
    width = max(r.shape[0] for r in rows)
    if stats is not None:
        stats["padding"] = stats.get("padding", 0) + sum(width - r.shape[0] for r in rows)
        stats["positions"] = stats.get("positions", 0) + width * len(rows)
    dim = rows[0].shape[1]
    batch = rows[0].new_zeros(len(rows), width, dim)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=batch.device)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return model.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          streamer=streamer)


__all__ = ["ImageFeatures", "encode_images", "base_regions", "project", "visual_embeddings", "packing_layout",
           "valid_tokens", "stock_visual_tokens", "interpolation_message", "InterpolatedGridError", "generate_answers", "generate_ids",
           "split_prompt", "prompt_segments"]
