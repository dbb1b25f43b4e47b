"""Budgets count real tokens: on a document pasted into a larger blank canvas, the selector's kept tokens
land on the document far more often than chance, and random's at chance.

The canvas's aspect ratio fits no AnyRes pinpoint, so its grid crops hold padding that LLaVA-NeXT's
unpadding drops; a budget spent there is lost. Slow: it trains a selector for each model through the
real stages (extract 2048 synthetic documents, the tiny schedule).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RETENTION = 0.25
RANDOM_SEEDS = 30


def render_page(width: int = 150, height: int = 200, seed: int = 0):
    """A document page: a title and paragraphs of DejaVu text (matplotlib's font) on white paper."""
    import random

    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = random.Random(seed)
    words = ("the token selector keeps informative patches while the reconstructor rebuilds every feature "
             "from them budget retention crop grid padding vision encoder language model prefill").split()
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    draw.text((8, 6), "Adaptive Token Reduction", fill="black", font=ImageFont.truetype(str(fonts / "DejaVuSans-Bold.ttf"), 11))
    body = ImageFont.truetype(str(fonts / "DejaVuSans.ttf"), 8)
    y = 26
    while y < height - 12:
        line = " ".join(rng.choice(words) for _ in range(8))
        draw.text((8, y), line[: width // 4], fill="black", font=body)
        y += 11 if rng.random() > 0.15 else 18  # paragraph breaks
    return page


CORNERS = ("top left", "top right", "bottom left", "bottom right")


def pasted(page, area_factor: float = 6.0, aspect: float = 1.5, corner: str = "top left"):
    """``page`` in a corner of a white canvas of ``area_factor`` times its area; (canvas, page box).

    A 3:2 canvas fits no tiny pinpoint: it lands on the 128 x 128 one, so about a
    third of the grid tokens are padding rows."""
    from PIL import Image

    w, h = page.size
    height = round((area_factor * w * h / aspect) ** 0.5)
    canvas = Image.new("RGB", (round(aspect * height), height), "white")
    x = 0 if "left" in corner else canvas.size[0] - w
    y = 0 if "top" in corner else canvas.size[1] - h
    canvas.paste(page, (x, y))
    return canvas, (float(x), float(y), float(x + w), float(y + h))


def document_share(kept: dict, doc_box: tuple[float, float, float, float]) -> dict[str, float]:
    """How much of the budget lands on a document pasted into a larger canvas (``kept``: from
    ``pipeline.masks.kept_tokens``).

    A token is on the document when its centre (original-image pixels) lies in
    ``doc_box``. Returns the document's share of the valid tokens, the share of
    the selector's and of random's kept tokens that fall on it, and each of those
    over the first (1.0 = no better than chance)."""
    import numpy as np

    from pipeline.extract import token_boxes

    x0, y0, x1, y1 = doc_box
    valid, chosen, rand = [], [], []
    for i, box in enumerate(kept["boxes"]):
        cells = token_boxes(box, kept["side"], kept.get("span", 1.0))
        cx, cy = (cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2
        inside = np.zeros(kept["tokens"], dtype=bool)
        inside[kept["cls_offset"]:] = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        for out, name in ((valid, "valid_indices"), (chosen, "selector"), (rand, "random")):
            out.append(inside[kept[name][i]])
    share = {name: float(np.concatenate(v).mean()) for name, v in
             (("doc_valid_share", valid), ("selector_share", chosen), ("random_share", rand))}
    share["selector_over_doc"] = share["selector_share"] / share["doc_valid_share"]
    share["random_over_doc"] = share["random_share"] / share["doc_valid_share"]
    return share


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from storage.home import Home

    return Home.resolve(tmp_path_factory.mktemp("padding")).ensure()


def _selector(home, model: str):
    from flows.stages.extract import extract
    from flows.stages.prepare_model import prepare_model
    from flows.stages.train import train
    from pipeline.config import ExtractConfig
    from pipeline.train import TrainConfig, selector_from_checkpoint, tiny_schedule
    from storage.checkpoints import load_checkpoint

    model_stage = prepare_model(home, model)
    features = extract(home, ExtractConfig(images="synthetic:docs", limit=2048, crops="base"), model_stage)
    result = train(home, tiny_schedule(TrainConfig(), model, set()), features)
    tensors, meta = load_checkpoint(result.path / result.manifest["checkpoints"]["0.25"])
    return model_stage, selector_from_checkpoint(tensors, meta)


@pytest.mark.parametrize("model", ["tiny", "tiny-trained"])
def test_the_selector_spends_its_budget_on_the_document(home, model, capsys):
    from pipeline.masks import kept_tokens
    from pipeline.loading import load_model

    model_stage, selector = _selector(home, model)
    llava, processor = load_model(model_stage.model_dir)
    # Four pages, one per corner: with 16 tokens a crop (tiny-trained) one token is a large step on one page.
    doc, sel, rnd = 0.0, 0.0, 0.0
    for i, corner in enumerate(CORNERS):
        canvas, box = pasted(render_page(seed=i), corner=corner)
        shares = [document_share(kept_tokens(llava, processor, selector, canvas, RETENTION, seed), box)
                  for seed in range(RANDOM_SEEDS)]
        doc += shares[0]["doc_valid_share"] / len(CORNERS)
        sel += shares[0]["selector_share"] / len(CORNERS)  # the selector is deterministic
        rnd += sum(s["random_share"] for s in shares) / len(shares) / len(CORNERS)
    with capsys.disabled():
        print(f"\n{model}: the page holds {doc:.3f} of the valid tokens (mean of {len(CORNERS)} pastes); at "
              f"{RETENTION} the selector puts {sel:.3f} of its tokens there ({sel / doc:.2f}x), random {rnd:.3f} "
              f"({rnd / doc:.2f}x, mean of {RANDOM_SEEDS} seeds)")
    assert sel / doc >= 1.5
    assert 0.85 <= rnd / doc <= 1.15
