"""``atr mask``'s figure at real sizes: a real photo in LLaVA-NeXT's (CLIP-336, 24 x 24 tokens) and
OneVision's (SigLIP-384, 27 x 27) real AnyRes geometry. No two titles overlap, each stays inside its
column, and the heading stays inside the figure (text extents after drawing)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from flows.present.plots import draw_mask, fit_title, mask_figure
from pipeline.extract import crop_layout, token_boxes

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json
OV_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]    # llava-onevision anyres_max_9


def _photo(size: tuple[int, int]) -> Image.Image:
    """Grace Hopper's portrait (matplotlib's sample photo), resized to ``size``."""
    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize(size)


def _res(image: Image.Image, crop: int, side: int, pinpoints, retention: float = 0.25) -> dict:
    """What ``pipeline.masks.kept_tokens`` returns, in the model's real geometry: grid-crop tokens whose
    centre falls outside the image are padding; k = round(retention * valid); seeded picks."""
    layout = crop_layout(*image.size, crop, pinpoints)
    rng = np.random.default_rng(0)
    w, h = image.size
    valid_indices, k, picks = [], [], {"selector": [], "random": []}
    for box in layout.boxes:
        b = token_boxes(box, side)
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        valid = np.flatnonzero((cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)).tolist()
        valid_indices.append(valid)
        k.append(max(1, round(retention * len(valid))))
        for name in picks:
            picks[name].append(sorted(rng.choice(valid, k[-1], replace=False).tolist()))
    return {"layout": layout, "boxes": layout.boxes, "side": side, "tokens": side * side, "cls_offset": 0,
            "k": k, "valid": [len(v) for v in valid_indices], "valid_indices": valid_indices, **picks,
            "checkpoint": Path("selectors/shape-ov-qwen2-p0.25-d1152-h16-l3-steps2000.safetensors"),
            "trained_retention": 0.25}


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


CASES = {"next-photo": ((1024, 1200), 336, 24, NEXT_PINPOINTS),
         "ov-page": ((1700, 2200), 384, 27, OV_PINPOINTS)}


@pytest.mark.parametrize("case", ["next-photo", pytest.param("ov-page", marks=pytest.mark.slow)])  # 31 rows: slow
def test_mask_titles_never_collide(case):
    size, crop, side, pinpoints = CASES[case]
    image = _photo(size)
    res = _res(image, crop, side, pinpoints)
    assert any(len(v) < side * side for v in res["valid_indices"])  # some crop has padding: the longest titles
    fig = mask_figure(res, image, 0.25, 0, "grace_hopper_portrait_real_size.jpg")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    titles = [ax.title for ax in fig.axes]
    assert len(titles) == 2 * len(res["boxes"])
    boxes = [t.get_window_extent(renderer) for t in titles] + [fig._suptitle.get_window_extent(renderer)]
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlap(a, b), (a, b)
    for box in boxes:  # inside the figure
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for ax, box in zip(fig.axes, boxes):  # a title stays over its own column, clear of every panel
        column = ax.get_position().transformed(fig.transFigure)
        mid = frame.x0 + frame.width / 2
        assert (box.x1 <= mid) if column.x1 <= mid else (box.x0 >= mid)
        for other in fig.axes:
            assert not _overlap(box, other.get_window_extent(renderer))
    assert "random (seed 0)" in titles[1].get_text() and "(grey: padding)" in "".join(t.get_text() for t in titles)


def test_draw_mask_writes_the_png(tmp_path):
    image = _photo((1024, 1200))
    out = draw_mask(_res(image, 336, 24, NEXT_PINPOINTS), image, 0.25, 0, tmp_path / "mask.png", "photo.jpg")
    with Image.open(out) as png:
        assert png.size[0] == 600 and png.size[1] > 5 * 300  # two 3-inch columns at 100 dpi, five rows
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_fit_title_wraps_each_part_at_words_to_the_width():
    text = fit_title(["random (seed 0)", "182/729 valid kept (grey: padding)", "grid crop r3 c4"], 1.5, 9)
    lines = text.split("\n")
    assert lines[0] == "random (seed 0)" and lines[-1] == "grid crop r3 c4"
    assert all(len(line) <= int(1.5 * 72 / (9 * 0.62)) for line in lines) and len(lines) == 4
