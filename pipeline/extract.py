"""Vision-encoder features exactly as LLaVA-NeXT feeds them to its projector.

For each image, the model's own processor makes the AnyRes crops (the base
image squashed to one crop, then the grid crops of the padded, aspect-preserving
resize in raster order). The vision tower runs on every crop; the hidden state
of ``vision_feature_layer`` is taken and, for the ``default`` select strategy,
the CLS token dropped. The result per image is ``(crops, L, C)``.

The tower pass keeps only the hidden states that are used (:func:`tower_hidden_states`) and stops
after the last of them: LLaVA-NeXT's feature layer is -2, so its last encoder layer never runs here.
The extract stage gives the extractor the tower alone (``pipeline.loading.load_vision_tower``): no
LM or projector weight is read.

Geometry helpers map every crop and every token back to original-image pixels,
so synthetic images can mark which tokens hold glyphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import ConfigError
from .train import split_bucket

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels


@dataclass(frozen=True)
class CropLayout:
    """Where each AnyRes crop of one image lies in that image.

    grid: (rows, cols) of the high-resolution crops (the base crop is extra).
    boxes: one box per crop, base first, in original-image pixels. A grid crop
    that covers padding extends beyond the image bounds, so that token cells map
    linearly into the image: crop pixel (u, v) <-> (x0 + u*(x1-x0)/S, y0 + v*(y1-y0)/S).
    """

    grid: tuple[int, int]
    boxes: tuple[Box, ...]


def select_best_resolution(size_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas (height, width): most effective pixels, then least waste."""
    from transformers.image_processing_utils import select_best_resolution as hf_select

    return tuple(hf_select(tuple(size_hw), [list(p) for p in pinpoints]))  # type: ignore[return-value]


def crop_layout(width: int, height: int, crop_size: int, pinpoints: Sequence[Sequence[int]]) -> CropLayout:
    """The crops LLaVA-NeXT's image processor makes for a ``width`` x ``height`` image."""
    th, tw = select_best_resolution((height, width), pinpoints)
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:  # same rule as transformers' get_patch_output_size
        new_w, new_h = tw, min(math.ceil(height * scale_w), th)
    else:
        new_h, new_w = th, min(math.ceil(width * scale_h), tw)
    pad_x, pad_y = (tw - new_w) // 2, (th - new_h) // 2
    sx, sy = new_w / width, new_h / height  # original px -> resized px
    rows, cols = th // crop_size, tw // crop_size
    boxes: list[Box] = [(0.0, 0.0, float(width), float(height))]
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * crop_size - pad_x, r * crop_size - pad_y
            boxes.append((x0 / sx, y0 / sy, (x0 + crop_size) / sx, (y0 + crop_size) / sy))
    return CropLayout(grid=(rows, cols), boxes=tuple(boxes))


def token_boxes(box: Box, side: int, span: float = 1.0) -> np.ndarray:
    """(side*side, 4) pixel boxes of the tokens of one crop, raster order.

    ``span`` is the share of the crop side the token grid covers: 1 for CLIP-336/14, 378/384 for
    SigLIP-384/14, whose stride-14 convolution never sees the crop's last 6 pixels."""
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x0 + span * (x1 - x0), side + 1)
    ys = np.linspace(y0, y0 + span * (y1 - y0), side + 1)
    gx0, gy0 = np.meshgrid(xs[:-1], ys[:-1])
    gx1, gy1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([gx0, gy0, gx1, gy1], axis=-1).reshape(-1, 4)


def glyph_mask(boxes: Sequence[Box], side: int, glyph_boxes: Sequence[Box], span: float = 1.0) -> np.ndarray:
    """(crops, side*side) bool: token cell overlaps some glyph box with positive area."""
    out = np.zeros((len(boxes), side * side), dtype=bool)
    if not glyph_boxes:
        return out
    g = np.asarray(glyph_boxes, dtype=np.float64)  # (G, 4)
    for i, box in enumerate(boxes):
        t = token_boxes(box, side, span)[:, None, :]  # (L, 1, 4)
        w = np.minimum(t[..., 2], g[:, 2]) - np.maximum(t[..., 0], g[:, 0])
        h = np.minimum(t[..., 3], g[:, 3]) - np.maximum(t[..., 1], g[:, 1])
        out[i] = ((w > 0) & (h > 0)).any(axis=1)
    return out


class ChannelSums:
    """Per split bucket of the image id (``pipeline.train.split_bucket``): [tokens, sum x, sum x^2] of
    every channel, in float64, over the features as stored. ``array`` is (100, 1 + 2C); the train
    stage turns the train split's buckets into channel statistics (``statistics_from_sums``)."""

    def __init__(self, channels: int):
        self.array = np.zeros((100, 1 + 2 * channels), dtype=np.float64)

    def add(self, image_id: str, features: np.ndarray) -> None:
        """Add one image's features (crops, L, C)."""
        x = np.asarray(features).astype(np.float64).reshape(-1, features.shape[-1])
        row = self.array[split_bucket(image_id)]
        c = x.shape[1]
        row[0] += x.shape[0]
        row[1:1 + c] += x.sum(axis=0)
        row[1 + c:] += (x * x).sum(axis=0)


class FeatureExtractor:
    """Run a LLaVA-NeXT / LLaVA-OneVision model's processor + vision tower; return per-crop projector inputs.

    ``model`` is the whole model or its tower alone (``pipeline.loading.VisionTower``): only its
    ``config`` and vision tower are used. ``crops="base"`` keeps only the base crop of each image (and
    runs the tower on it alone); ``"all"`` keeps every crop.
    """

    def __init__(self, model, processor, crops: str = "all"):
        if crops not in ("all", "base"):
            raise ValueError(f"crops must be 'all' or 'base', got {crops!r}")
        from .families import family_of

        cfg = model.config
        self.model, self.processor, self.crops = model, processor, crops
        self.family = family_of(cfg)
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        self.crop_size = cfg.vision_config.image_size
        self.patch_size = cfg.vision_config.patch_size
        self.side = self.family.side(cfg)
        self.span = self.family.covered(cfg)  # share of the crop side the token grid covers
        self.pinpoints = cfg.image_grid_pinpoints
        self.tower = _vision_tower(model)
        if self.strategy not in ("default", "full"):
            raise ConfigError(f"unsupported vision_feature_select_strategy {self.strategy!r}")

    @property
    def tokens_per_crop(self) -> int:
        return self.family.tokens_per_crop(self.model.config)

    @property
    def feature_dim(self) -> int:
        width = self.model.config.vision_config.hidden_size
        return width * (len(self.layer) if isinstance(self.layer, (list, tuple)) else 1)

    def layout(self, width: int, height: int) -> CropLayout:
        return crop_layout(width, height, self.crop_size, self.pinpoints)

    def pixel_crops(self, images: Sequence[Any]) -> list[Any]:
        """Per image, the (crops, 3, S, S) pixel tensor the processor makes (unpadded). One image at a time:
        the same pixels as a batch call, without its padding to the batch's largest grid or its float
        copies of every image at once (0.17 GiB for 10 photos at CLIP-336's sizes, against 0.06)."""
        out = []
        for image in images:
            pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            n = 1 if self.crops == "base" else len(self.layout(*image.size).boxes)
            out.append(pixels[:n].clone() if n < len(pixels) else pixels)
        return out

    def __call__(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Features for a batch of RGB PIL images: a list of float32 (crops, L, C) arrays."""
        import torch

        crops = self.pixel_crops(images)
        counts = [c.shape[0] for c in crops]
        pixels = torch.cat(crops, dim=0)
        feats = np.empty((len(pixels), self.tokens_per_crop, self.feature_dim), dtype=np.float32)
        step = crops_per_pass(self.tower, _device(self.tower))
        with torch.inference_mode():
            for start in range(0, len(pixels), step):  # bounded activations, whatever the batch
                chunk = pixels[start:start + step].to(device=_device(self.tower), dtype=_dtype(self.tower))
                feats[start:start + step] = self.features(chunk).float().cpu().numpy()
        return [f for f in np.split(feats, np.cumsum(counts)[:-1], axis=0)]

    def features(self, pixels):
        """(N, L, C) projector inputs of a batch of crop pixels (on the tower's device and dtype), in one
        pass: the tower runs up to the feature layer and keeps only it."""
        hidden = tower_hidden_states(self.tower, pixels, feature_layers(self.layer))
        return projector_inputs(hidden, self.layer, self.strategy)


QWEN_FEATURES = ("premerger", "merged")  # what a dynamic-grid family's selector reads (docs/qwen.md)


@dataclass(frozen=True)
class GridFeatures:
    """One image's features on a dynamic-resolution family: ``features`` (1, L, C') float32, ``grid`` its
    (rows, cols) of merged tokens in raster order (L = rows * cols), ``thw`` the tower's (t, h, w) patch grid."""

    features: np.ndarray
    grid: tuple[int, int]
    thw: tuple[int, int, int]


def grid_token_boxes(width: int, height: int, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 4) pixel boxes of the merged tokens of a whole image resized (not padded) to a rows x
    cols token grid, raster order: Qwen-VL's ``smart_resize`` stretches the image over its grid."""
    xs, ys = np.linspace(0.0, width, cols + 1), np.linspace(0.0, height, rows + 1)
    gx0, gy0 = np.meshgrid(xs[:-1], ys[:-1])
    gx1, gy1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([gx0, gy0, gx1, gy1], axis=-1).reshape(-1, 4)


def grid_glyph_mask(width: int, height: int, rows: int, cols: int, glyph_boxes: Sequence[Box]) -> np.ndarray:
    """(1, rows * cols) bool: merged token cell overlaps some glyph box with positive area."""
    out = np.zeros((1, rows * cols), dtype=bool)
    if not glyph_boxes:
        return out
    g = np.asarray(glyph_boxes, dtype=np.float64)
    t = grid_token_boxes(width, height, rows, cols)[:, None, :]
    w = np.minimum(t[..., 2], g[:, 2]) - np.maximum(t[..., 0], g[:, 0])
    h = np.minimum(t[..., 3], g[:, 3]) - np.maximum(t[..., 1], g[:, 1])
    out[0] = ((w > 0) & (h > 0)).any(axis=1)
    return out


class GridFeatureExtractor:
    """Features of a dynamic-resolution family without crops (``Family.has_crops`` False: Qwen2.5-VL,
    Qwen3-VL), per image ``(1, L, C')`` with its merged-token grid (rows, cols), L = rows * cols varying.

    ``features="premerger"`` (the default): the tower's last hidden state before the merger, each merged
    token's 2 x 2 patch states side by side in raster order, C' = 4C (the family's ``encode_images``) --
    the paper's "encoder output before the projector", the merger being the projector. ``"merged"``: the
    merger's output, C' = D (the LLM width; the family's ``project``, the merger). ``model`` is the whole model or
    its tower alone (``pipeline.loading.VisionTower``). There are no crops: ``crops`` all and base both
    give the whole image as one crop."""

    grid_kind = "dynamic"

    def __init__(self, model, processor, crops: str = "all", features: str = "premerger"):
        from .families import family_of

        if crops not in ("all", "base"):
            raise ValueError(f"crops must be 'all' or 'base', got {crops!r}")
        if features not in QWEN_FEATURES:
            raise ConfigError(f"qwen_features must be one of {', '.join(QWEN_FEATURES)}, got {features!r}")
        self.model, self.processor, self.crops, self.features = model, processor, crops, features
        self.family = family_of(model.config)
        vis = model.config.vision_config
        self.merge = vis.spatial_merge_size
        self.feature_dim = vis.out_hidden_size if features == "merged" else vis.hidden_size * self.merge ** 2
        self.tokens_per_crop = None  # L follows each image's size

    def encode(self, images: Sequence[Any]) -> list[GridFeatures]:
        """Per image: (1, L, C') float32 features, its (rows, cols) and (t, h, w)."""
        import torch

        with torch.inference_mode():  # the family's own runtime: what pipeline.prune.encode_images dispatches to
            got = self.family.encode_images(self.model, self.processor, list(images))
            out = []
            for f in got:
                x = self.family.project(self.model, f.features) if self.features == "merged" else f.features
                t, h, w = f.grid
                rows, cols = h // self.merge, w // self.merge
                if x.shape[:2] != (1, rows * cols):
                    raise ValueError(f"features of shape {tuple(x.shape)} do not fit the grid {(rows, cols)}")
                out.append(GridFeatures(x.float().cpu().numpy(), (rows, cols), (t, h, w)))
        return out

    def __call__(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Features for a batch of RGB PIL images: a list of float32 (1, L, C') arrays."""
        return [g.features for g in self.encode(images)]


def feature_extractor(model, processor, crops: str = "all", qwen_features: str = "premerger"):
    """The extractor of ``model``'s family: :class:`FeatureExtractor` (fixed crops of L tokens: LLaVA) or,
    for a family without crops, :class:`GridFeatureExtractor` (one dynamic token grid per image). A
    ``qwen_features`` other than the default on a crop family is refused in one line."""
    from .families import family_of

    family = family_of(model.config)
    if family.has_crops:
        if qwen_features != "premerger":
            raise ConfigError(f"qwen_features={qwen_features!r} applies to families without crops (Qwen-VL); "
                              f"{family.label} features are its projector inputs")
        return FeatureExtractor(model, processor, crops=crops)
    return GridFeatureExtractor(model, processor, crops=crops, features=qwen_features)


def feature_layers(layer) -> list[int]:
    """The hidden-state indices ``vision_feature_layer`` names (one int, or a list of them)."""
    return list(layer) if isinstance(layer, (list, tuple)) else [layer]


def projector_inputs(hidden_states, layer, strategy: str):
    """What LLaVA feeds its projector: the ``layer`` hidden state (several layers
    concatenated on channels), CLS dropped for the ``default`` select strategy (CLIP;
    OneVision's SigLIP has no CLS and uses ``full``). ``hidden_states``: the tower's
    ``hidden_states`` tuple, or :class:`HiddenStates` holding at least these layers."""
    import torch

    feats = (torch.cat([hidden_states[i] for i in layer], dim=-1) if isinstance(layer, (list, tuple))
             else hidden_states[layer])
    return feats[:, 1:] if strategy == "default" else feats


class HiddenStates:
    """Some of a vision tower's hidden states, indexed as its ``output_hidden_states`` tuple would be:
    ``len`` is that tuple's length (encoder layers + 1), index 0 the encoder's input, index i the output
    of encoder layer i - 1, negative indices from the end. Only the indices in ``kept`` are held."""

    def __init__(self, count: int, kept: dict):
        self.count, self.kept = count, kept

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not -self.count <= index < self.count:
            raise IndexError(f"hidden state {index} of a tower with {self.count} hidden states")
        try:
            return self.kept[index % self.count]
        except KeyError:
            raise KeyError(f"hidden state {index} was not kept (kept: {sorted(self.kept)})") from None


# Tokens one tower pass takes on the CPU (4 CLIP-L crops of 577; 8x that on CUDA). Extraction and eval
# cut their crops into passes of this size, so one layer's activations stay bounded whatever the batch:
# CLIP-L's FFN on 4 crops holds 4 x 577 x 4096 values per temporary (38 MB in fp32); a pass of 4 crops
# grew the peak RSS by 0.23 GiB, one of 8 by 0.35 GiB. Passes are bit-identical to one pass over every
# crop (tests/test_tower_memory.py).
PASS_TOKENS = 4 * 577


def crops_per_pass(tower, device) -> int:
    """How many crops one tower pass takes on ``device`` (:data:`PASS_TOKENS`; at least one)."""
    cfg = tower.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    return max(1, PASS_TOKENS * (8 if str(device).startswith("cuda") else 1) // tokens)


class _Enough(Exception):
    """Raised inside the tower once the last wanted hidden state is in: the layers after it need not run."""


def encoder_layers(tower):
    """The encoder layers of a CLIP / SigLIP vision tower (transformers 5.x: ``tower.encoder``; 4.x nested
    it in ``tower.vision_model``)."""
    return getattr(tower, "vision_model", tower).encoder.layers


def tower_hidden_states(tower, pixels, indices) -> HiddenStates:
    """Run ``tower`` on ``pixels`` keeping only the hidden states ``indices`` name (as indices of its
    ``output_hidden_states`` tuple), and stop it once the last of them is computed.

    The tower's own forward runs; forward pre-hooks on the encoder layers take each wanted layer input
    (hidden state i is encoder layer i's input; the last one the last layer's output). At the last wanted
    one the hook raises, so later layers never run (LLaVA-NeXT's -2: the last layer is skipped) and no
    other hidden state is held. Same kernels, same inputs: the kept states are bit-identical to
    ``output_hidden_states=True``. The hooks live for this call only and act on this thread only."""
    import threading

    layers = encoder_layers(tower)
    count = len(layers) + 1
    for i in indices:
        if not -count <= i < count:
            raise IndexError(f"hidden state {i} of a tower with {count} hidden states")
    wanted = sorted({i % count for i in indices})
    kept: dict = {}
    owner = threading.get_ident()

    def first(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def before_layer(index: int):
        def hook(_module, args, kwargs):
            if threading.get_ident() == owner:
                kept[index] = first(args, kwargs)
                if index == wanted[-1]:
                    raise _Enough
        return hook

    def after_last(_module, _args, output):
        if threading.get_ident() == owner:
            kept[count - 1] = output[0] if isinstance(output, tuple) else output

    handles = [layers[i].register_forward_pre_hook(before_layer(i), with_kwargs=True) for i in wanted if i < count - 1]
    if wanted[-1] == count - 1:
        handles.append(layers[-1].register_forward_hook(after_last))
    try:
        tower(pixels, return_dict=True)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return HiddenStates(count, kept)


def _vision_tower(model):
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    if tower is None:
        raise TypeError(f"{type(model).__name__} has no vision_tower; expected a LlavaNext or LlavaOnevision model")
    return tower


def _device(module):
    return next(module.parameters()).device


def _dtype(module):
    return next(module.parameters()).dtype
