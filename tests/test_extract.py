"""Feature extraction: the exact projector inputs, crop geometry and glyph masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extract import FeatureExtractor, crop_layout, glyph_mask, token_boxes
from pipeline.images import open_source


def test_features_are_exactly_what_llava_next_feeds_its_projector(tiny_model):
    """Capture the projector's input inside HF's own get_image_features and compare."""
    model, processor = tiny_model
    images = [Image.new("RGB", size, color) for size, color in
              [((200, 90), "red"), ((64, 64), "blue"), ((90, 250), "green"), ((160, 160), "white")]]
    ours = FeatureExtractor(model, processor)(images)
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        batch = processor.image_processor(images=images, return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    finally:
        hook.remove()
    reference = captured[0].numpy()
    assert reference.shape == (sum(f.shape[0] for f in ours), 64, 64)
    np.testing.assert_allclose(np.concatenate(ours), reference, rtol=1e-5, atol=1e-5)


def test_base_crops_only(tiny_model):
    model, processor = tiny_model
    images = [Image.new("RGB", (200, 90), "red"), Image.new("RGB", (90, 250), "blue")]
    full = FeatureExtractor(model, processor, crops="all")(images)
    base = FeatureExtractor(model, processor, crops="base")(images)
    assert [f.shape for f in base] == [(1, 64, 64), (1, 64, 64)]
    for f, b in zip(full, base):
        np.testing.assert_allclose(f[:1], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(200, 90), (64, 64), (90, 250), (160, 160), (300, 40), (256, 96)])
def test_crop_count_matches_hf(tiny_model, size):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, _ = tiny_model
    cfg = model.config
    layout = crop_layout(*size, 64, cfg.image_grid_pinpoints)
    n = image_size_to_num_patches(image_size=(size[1], size[0]), grid_pinpoints=cfg.image_grid_pinpoints,
                                  patch_size=64)
    assert len(layout.boxes) == n == 1 + layout.grid[0] * layout.grid[1]


def test_token_boxes_tile_the_crop():
    boxes = token_boxes((10.0, 20.0, 50.0, 60.0), 4)
    assert boxes.shape == (16, 4)
    np.testing.assert_allclose(boxes[0], [10, 20, 20, 30])
    np.testing.assert_allclose(boxes[-1], [40, 50, 50, 60])
    mask = glyph_mask([(0.0, 0.0, 40.0, 40.0)], 4, [(11.0, 1.0, 19.0, 9.0), (35.0, 35.0, 36.0, 36.0)])
    assert mask.shape == (1, 16) and sorted(np.flatnonzero(mask[0])) == [1, 15]


def _crop_pixels(processor, image, n):
    pv = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0][:n]
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    return ((pv * std + mean).mean(1) * 255).numpy()  # (crops, S, S) grey levels 0..255


def test_glyph_mask_marks_the_tokens_that_hold_ink(tiny_model):
    """Geometry check against the processor's real pixels: flagged tokens hold dark ink,
    tokens far from every glyph are blank background."""
    model, processor = tiny_model
    fx = FeatureExtractor(model, processor)
    hits = total = 0
    for item in open_source("synthetic:docs", seed=3).items(12):
        loaded = item.load()
        layout = fx.layout(*loaded.image.size)
        mask = glyph_mask(layout.boxes, fx.side, loaded.glyph_boxes)
        pixels = _crop_pixels(processor, loaded.image, len(layout.boxes))
        s, p = fx.side, fx.patch_size
        cells = pixels.reshape(len(layout.boxes), s, p, s, p).transpose(0, 1, 3, 2, 4).reshape(
            len(layout.boxes), s * s, p * p)
        background = np.median(pixels[0])
        darkness = background - cells.min(axis=2)  # (crops, L)
        # every flagged token holds something darker than the background
        total += int(mask.sum())
        hits += int((darkness[mask] > 25).sum())
        # tokens whose 3x3 neighbourhood holds no glyph are blank (allow resampling blur at the border)
        grid = mask.reshape(-1, s, s)
        padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)))
        near = np.zeros_like(grid)
        for dy in range(3):
            for dx in range(3):
                near |= padded[:, dy:dy + s, dx:dx + s]
        far = ~near.reshape(len(layout.boxes), -1)
        inside_image = _inside(layout, s, loaded.image.size)
        assert (darkness[far & inside_image] < 25).all()
    assert total > 50 and hits / total > 0.9, (hits, total)


def _inside(layout, side, size):
    w, h = size
    out = []
    for box in layout.boxes:
        t = token_boxes(box, side)
        out.append((t[:, 0] >= 0) & (t[:, 1] >= 0) & (t[:, 2] <= w) & (t[:, 3] <= h))
    return np.stack(out)


def test_slow_extraction_rates_stay_readable():
    """A real-size tower on a CPU runs at a fraction of an image per second: never "0.0 images/s"."""
    from flows.present.progress import rate_text

    assert rate_text(41.26) == "41.3 images/s"
    assert rate_text(0.123) == "0.12 images/s"
    assert rate_text(1 / 8.3) == "0.12 images/s"
    assert rate_text(0.04) == "25.0 s/image"
    assert rate_text(0.5, "steps") == "0.50 steps/s" and rate_text(0.01, "steps") == "100.0 s/step"
