"""Vision-encoder features exactly as LLaVA-NeXT feeds them to its projector.

For each image, the model's own processor makes the AnyRes crops (the base
image squashed to one crop, then the grid crops of the padded, aspect-preserving
resize in raster order). The vision tower runs on every crop; the hidden state
of ``vision_feature_layer`` is taken and, for the ``default`` select strategy,
the CLS token dropped. The result per image is ``(crops, L, C)``.

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

    ``crops="base"`` keeps only the base crop of each image (and runs the tower on
    it alone); ``"all"`` keeps every crop.
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
        """Per image, the (crops, 3, S, S) pixel tensor the processor makes (unpadded)."""
        batch = self.processor.image_processor(images=list(images), return_tensors="pt")
        out = []
        for pixels, image in zip(batch["pixel_values"], images):
            n = 1 if self.crops == "base" else len(self.layout(*image.size).boxes)
            out.append(pixels[:n])
        return out

    def __call__(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Features for a batch of RGB PIL images: a list of float32 (crops, L, C) arrays."""
        import torch

        crops = self.pixel_crops(images)
        counts = [c.shape[0] for c in crops]
        pixels = torch.cat(crops, dim=0).to(device=_device(self.tower), dtype=_dtype(self.tower))
        with torch.inference_mode():
            out = self.tower(pixels, output_hidden_states=True, return_dict=True)
            feats = projector_inputs(out.hidden_states, self.layer, self.strategy)
        feats = feats.float().cpu().numpy()
        return [f for f in np.split(feats, np.cumsum(counts)[:-1], axis=0)]


def projector_inputs(hidden_states, layer, strategy: str):
    """What LLaVA feeds its projector: the ``layer`` hidden state (several layers
    concatenated on channels), CLS dropped for the ``default`` select strategy (CLIP;
    OneVision's SigLIP has no CLS and uses ``full``)."""
    import torch

    feats = (torch.cat([hidden_states[i] for i in layer], dim=-1) if isinstance(layer, (list, tuple))
             else hidden_states[layer])
    return feats[:, 1:] if strategy == "default" else feats


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
