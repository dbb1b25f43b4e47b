"""The synthetic benchmarks of the tiny world: ``synthetic-ocr`` and ``synthetic-scene``.

Both are generated deterministically from ``(seed, split, index)`` and reproduce
the paper's two regimes on a model small enough to train on 2 CPUs:

* ``synthetic-ocr``: a mostly white image of one of ten sizes (``OCR_SIZES``; so
  AnyRes picks different crop grids) holding one short dark code of 1-3 glyphs
  (A-Z, 0-9) in a DejaVu face (sans, bold, serif or mono; ``pipeline.fonts``) at
  11-15 px, each glyph inside one 16-pixel cell. "What is written in the image?"
  The answer lives in 1-3 of the image's tokens per crop, so *which* tokens are
  kept decides the answer.
* ``synthetic-scene``: one large coloured shape (50-85 % of the width and height
  of the image) and one to three small shapes of other colours on a pale
  background, at any size from 48 to 208 px a side (aspect at most 3:1).
  "What colour is the large shape?" The answer is spread over many tokens, so
  keeping a random quarter of them is nearly as good as keeping all.

**Real geometry.** Most images fit no AnyRes pinpoint, so their canvas is padded
and LLaVA-NeXT's unpadding drops rows or columns of grid tokens, as on real
photos and pages (``pipeline.masks.padding_share`` measures it). Seven of the
ten OCR sizes are a pinpoint less whole 32-px strips (64x96 lands on 64x128 at
scale 1): the padding is centred in whole 16-px patches, so every glyph cell
stays one token, which a 2-layer tower can read. Scenes take any size, so they
are also resized by arbitrary factors.

Splits are disjoint by construction: every sample has a *content key* (size,
layout, answer; not the pixel jitter) and a key belongs to exactly one split by
its hash (80 % train, 10 % val, 10 % test). The generator draws candidates and
keeps those whose key hashes into the requested split.

Rows carry the lmms-lab columns (``question_id``, ``question``, ``answers``,
``image``) plus ``answer``; ``storage.benchmarks`` writes them as parquet.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image, ImageDraw

from .config import ConfigError
from .fonts import font
from .images import SHAPES, draw_shape, random_sides

GENERATOR_VERSION = "2"  # bump when a renderer changes: it changes every sample
BENCHMARKS = ("synthetic-ocr", "synthetic-scene")
SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}  # percent ranges of the key hash
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
CELL = 16  # pixels: one tiny-trained patch
# (height, width). The first seven fit no pinpoint (padded by whole 32-px strips); the last three do.
OCR_SIZES = ((64, 64), (64, 96), (96, 64), (64, 160), (160, 64), (96, 128), (128, 96),
             (64, 128), (128, 64), (128, 128))
OCR_FACES = ("sans", "sans-bold", "serif", "mono")
OCR_FONT_SIZES = (11, 12, 13, 14, 15)
SCENE_SIDES = (48, 208)  # scene widths and heights are any integer in this range (aspect <= 3:1)
CODE_LENGTHS = (1, 2, 3)
CODE_WEIGHTS = (0.6, 0.25, 0.15)
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "orange": (245, 125, 15), "purple": (135, 45, 170), "cyan": (30, 200, 215), "black": (25, 25, 25),
}
OCR_QUESTION = "What is written in the image?"
SCENE_QUESTION = "What colour is the large shape?"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One benchmark question. ``glyph_boxes`` are (x0, y0, x1, y1, glyph) in image pixels."""

    benchmark: str
    split: str
    question_id: str
    image: Image.Image = field(repr=False, compare=False)
    question: str
    answer: str
    content_key: str
    glyph_boxes: tuple = ()

    @property
    def answers(self) -> list[str]:
        return [self.answer]

    def row(self) -> dict:
        """The lmms-lab style parquet row (image as ``{"bytes": PNG, "path": None}``)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=False)
        return {"question_id": self.question_id, "question": self.question, "answers": self.answers,
                "answer": self.answer, "image": {"bytes": buf.getvalue(), "path": f"{self.question_id}.png"}}


def chance_accuracy(benchmark: str) -> float:
    """Exact-match accuracy of the best answer-blind guess (the most likely answer)."""
    if benchmark == "synthetic-ocr":
        return CODE_WEIGHTS[0] / len(GLYPHS)
    if benchmark == "synthetic-scene":
        return 1 / len(COLOURS)
    raise ConfigError(f"unknown synthetic benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")


def split_of(content_key: str) -> str:
    bucket = int(hashlib.sha256(content_key.encode()).hexdigest()[:8], 16) % 100
    return next(s for s, (lo, hi) in SPLIT_SHARES.items() if lo <= bucket < hi)


def generate_samples(benchmark: str, split: str, n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``benchmark``/``split``: the same list in every process."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown synthetic benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if n < 0:
        raise ConfigError(f"sample count must be >= 0, got {n}")
    out: list[Sample] = []
    for sample in _candidates(benchmark, split, seed):
        if len(out) == n:
            break
        out.append(sample)
    return out


def _candidates(benchmark: str, split: str, seed: int) -> Iterator[Sample]:
    render = _render_ocr if benchmark == "synthetic-ocr" else _render_scene
    short = "ocr" if benchmark == "synthetic-ocr" else "scene"
    seen: set[str] = set()
    draw = 0
    while True:
        # A str seed is hashed with sha512 by random.Random: independent of PYTHONHASHSEED.
        rng = random.Random(f"{GENERATOR_VERSION}:{benchmark}:{seed}:{split}:{draw}")
        draw += 1
        key, make = render(rng)
        if split_of(f"{benchmark}:{key}") != split or key in seen:
            continue
        seen.add(key)
        image, question, answer, boxes = make()
        yield Sample(benchmark, split, f"{short}-{split}-{len(seen) - 1:06d}", image, question, answer,
                     key, tuple(boxes))


def _render_ocr(rng: random.Random):
    """Layout first (cheap, gives the content key); pixels only when the key is kept."""
    h, w = rng.choice(OCR_SIZES)
    n = rng.choices(CODE_LENGTHS, weights=CODE_WEIGHTS)[0]
    code = "".join(rng.choice(GLYPHS) for _ in range(n))
    row, col = rng.randrange(h // CELL), rng.randrange(w // CELL - n + 1)
    face, size = rng.choice(OCR_FACES), rng.choice(OCR_FONT_SIZES)
    jitter = [(rng.randint(-1, 1), rng.randint(-1, 1)) for _ in range(n)]
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    paper = tuple(rng.randint(240, 255) for _ in range(3))
    key = f"{h}x{w}:{row},{col}:{code}"

    def make():
        img = Image.new("RGB", (w, h), paper)
        d = ImageDraw.Draw(img)
        f = font(face, size)
        boxes = []
        for k, char in enumerate(code):
            x0, y0, x1, y1 = f.getbbox(char)
            gw, gh = x1 - x0, y1 - y0
            # centred in its cell, jittered by a pixel, never across the cell's border
            left = min(max((CELL - gw) // 2 + jitter[k][0], 0), CELL - gw)
            top = min(max((CELL - gh) // 2 + jitter[k][1], 0), CELL - gh)
            cx, cy = (col + k) * CELL + left - x0, row * CELL + top - y0
            d.text((cx, cy), char, font=f, fill=ink)
            boxes.append((float(cx + x0), float(cy + y0), float(cx + x1), float(cy + y1), char))
        return img, OCR_QUESTION, code, boxes

    return key, make


def _render_scene(rng: random.Random):
    h, w = random_sides(rng, *SCENE_SIDES)
    names = list(COLOURS)
    big = rng.choice(names)
    shape = rng.choice(SHAPES)
    bw, bh = round(rng.uniform(0.5, 0.85) * w), round(rng.uniform(0.5, 0.85) * h)
    bx, by = rng.randint(0, w - bw), rng.randint(0, h - bh)
    smalls = []
    for _ in range(rng.randint(1, 3)):
        sw, sh = rng.randint(6, 12), rng.randint(6, 12)
        smalls.append((rng.choice([c for c in names if c != big]), rng.choice(("rectangle", "ellipse")),
                       rng.randint(0, w - sw), rng.randint(0, h - sh), sw, sh))
    background = tuple(rng.randint(200, 245) for _ in range(3))
    shade = [rng.randint(-12, 12) for _ in range(3)]
    key = f"{h}x{w}:{big}:{shape}:{bx},{by},{bw},{bh}:" + ";".join(f"{s[0]}{s[2]},{s[3]}" for s in smalls)

    def make():
        img = Image.new("RGB", (w, h), background)
        d = ImageDraw.Draw(img)
        colour = tuple(min(255, max(0, c + s)) for c, s in zip(COLOURS[big], shade))
        draw_shape(d, shape, (bx, by, bx + bw - 1, by + bh - 1), colour)  # a triangle points up
        for name, kind, x, y, sw, sh in smalls:  # small shapes are drawn on top
            draw_shape(d, kind, (x, y, x + sw - 1, y + sh - 1), COLOURS[name])
        return img, SCENE_QUESTION, big, ()

    return key, make


def generator_fingerprint() -> str:
    """What the samples depend on besides (benchmark, split, n, seed): the renderer and its fonts."""
    from .fonts import fonts_fingerprint

    return f"{GENERATOR_VERSION}:{fonts_fingerprint()}"


__all__ = ["Sample", "generate_samples", "chance_accuracy", "split_of", "BENCHMARKS", "SPLITS", "COLOURS", "GLYPHS",
           "OCR_QUESTION", "SCENE_QUESTION", "GENERATOR_VERSION", "OCR_SIZES", "generator_fingerprint"]
