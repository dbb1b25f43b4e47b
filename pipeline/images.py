"""Deterministic image sources addressed by a string spec.

``open_source("synthetic:docs")``, ``open_source("synthetic:scenes")`` or
``open_source("/data/coco/train2017")`` (also written ``"dir:/data/..."``) give an
:class:`ImageSource` whose ``items(limit)`` are the same on every call and in every
process.  Synthetic images are rendered from ``(seed, index)``; directory images are
decoded strictly (bad files raise :class:`BadImage`) and converted to RGB.

Decoding a file (``decode_image``) is strict and bounded:

* PIL's pixel limit is set explicitly to ``MAX_IMAGE_PIXELS`` (64 MP, e.g. 8000 x 8000)
  and enforced on the header, before any pixel is decoded: a larger image is a
  ``BadImage`` (a decompression bomb), not PIL's warning between 1x and 2x the limit.
* zero-byte, truncated (``LOAD_TRUNCATED_IMAGES`` off), bad-CRC PNG, non-image and
  smaller-than-2x2 files are ``BadImage``, one line naming the file and the reason;
* EXIF orientation is applied; CMYK, palette, grey and alpha images become RGB
  (alpha composited on white); 16-bit grey (``I;16``) becomes 8-bit as
  ``round(v / 257)``, i.e. 0..65535 scaled to 0..255, not clipped at 255.
  PIL's own warnings (e.g. a corrupt EXIF block) are dropped: the pixels decode.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps

from .config import ConfigError
from .errors import MissingFile, UserError
from .fonts import font, fonts_fingerprint

SYNTHETIC_KINDS = ("docs", "scenes")
GENERATOR_VERSION = "2"  # bump when the synthetic renderers change
MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs (PIL's limit is set to this)
MIN_SIDE = 2  # smaller images (1x1, 40x1) are refused: no crop can be made of them
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SIDES = (48, 240)  # synthetic scenes: any width and height in this range (aspect <= 3:1)

_VALID_FORMS = "synthetic:docs, synthetic:scenes, DIR or dir:DIR (a folder of .jpg/.jpeg/.png/.webp files)"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")

Box = tuple[float, float, float, float]


class BadImage(UserError):
    """An image file that cannot be decoded. str(exc) is one line naming the file and the reason."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image plus synthetic ground truth.

    ``glyph_boxes[k]`` is the tight (x0, y0, x1, y1) box (x1/y1 exclusive) of the k-th
    non-whitespace character of ``text`` for synthetic docs, ``()`` for scenes and
    ``None`` for files.
    """

    image: Image.Image
    glyph_boxes: tuple[Box, ...] | None
    text: str | None = None


@dataclass(frozen=True)
class ImageItem:
    """One image of a source; cheap to create and to pickle, decoded by ``load()``."""

    image_id: str
    source: str
    index: int
    path: str | None
    seed: int = 0  # synthetic items render from (seed, index)

    def load(self) -> LoadedImage:
        """Render or decode the image; raises BadImage for an undecodable file."""
        if self.path is None:
            return render_synthetic(self.source.removeprefix("synthetic:"), self.seed, self.index)
        return LoadedImage(decode_image(self.path), glyph_boxes=None)


class ImageSource:
    """A deterministic, addressable collection of images."""

    spec: str
    seed: int

    def items(self, limit: int | None = None) -> list[ImageItem]:
        """The first ``limit`` items (all for None), identical on every call."""
        raise NotImplementedError

    def fingerprint(self, limit: int | None = None) -> str:
        """Hex sha256 identifying exactly the content ``items(limit)`` yields."""
        raise NotImplementedError


def open_source(spec: str, seed: int = 0) -> ImageSource:
    """'synthetic:docs', 'synthetic:scenes', or a directory path (optionally written 'dir:PATH')."""
    if spec.startswith("synthetic:"):
        kind = spec.removeprefix("synthetic:")
        if kind not in SYNTHETIC_KINDS:
            raise ConfigError(f"unknown image source {spec!r}; valid forms: {_VALID_FORMS}")
        return SyntheticSource(spec, kind, seed)
    path = spec.removeprefix("dir:")
    if not path or (path == spec and _SCHEME.match(spec) and not os.path.exists(spec)):
        raise ConfigError(f"unknown image source {spec!r}; valid forms: {_VALID_FORMS}")
    root = Path(path).expanduser()
    if not root.exists():
        raise MissingFile(f"image directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise ConfigError(f"image source {str(root)!r} is not a directory; valid forms: {_VALID_FORMS}")
    source = DirectorySource(spec, root.resolve(), seed)
    if not source.relative_paths():
        raise ConfigError(f"image directory {str(root)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return source


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")


def _sha256_json(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class SyntheticSource(ImageSource):
    """An infinite stream of rendered images; item i depends only on (kind, seed, i)."""

    def __init__(self, spec: str, kind: str, seed: int):
        self.spec, self.kind, self.seed = spec, kind, seed

    def items(self, limit: int | None = None) -> list[ImageItem]:
        self._require_limit(limit)
        return [ImageItem(f"{self.kind}-{i:06d}", self.spec, i, None, self.seed) for i in range(limit)]

    def fingerprint(self, limit: int | None = None) -> str:
        self._require_limit(limit)
        # Pillow's version (its FreeType rasterizes the glyphs) and the DejaVu files are part of it.
        return _sha256_json("synthetic", self.kind, GENERATOR_VERSION, PIL.__version__, fonts_fingerprint(),
                            self.seed, limit)

    @staticmethod
    def _require_limit(limit: int | None) -> None:
        if limit is None:
            raise ConfigError("synthetic sources need --limit")
        _check_limit(limit)


class DirectorySource(ImageSource):
    """Image files under a folder, scanned recursively once per source object (hidden entries skipped).

    A stage opens one source and asks it for items and a fingerprint: the folder is
    walked once, not once per shard (100K COCO files take seconds to list)."""

    def __init__(self, spec: str, root: Path, seed: int):
        self.spec, self.root, self.seed = spec, root, seed
        self._paths: list[str] | None = None

    def relative_paths(self) -> list[str]:
        """All image files under the root as sorted '/'-separated relative paths (scanned on first use)."""
        if self._paths is None:
            self._paths = self._scan()
        return self._paths

    def _scan(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root)
            found += [
                (rel_dir / name).as_posix()
                for name in filenames
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            ]
        return sorted(found)

    def _select(self, limit: int | None) -> list[str]:
        _check_limit(limit)
        paths = self.relative_paths()
        if limit is None or limit >= len(paths):
            return paths
        return sorted(random.Random(self.seed).sample(paths, limit))

    def items(self, limit: int | None = None) -> list[ImageItem]:
        return [
            ImageItem(rel, self.spec, k, str(self.root / rel), self.seed)
            for k, rel in enumerate(self._select(limit))
        ]

    def fingerprint(self, limit: int | None = None) -> str:
        digest = hashlib.sha256(json.dumps(["dir", self.seed, limit]).encode())
        for rel in self._select(limit):
            st = os.stat(self.root / rel)
            digest.update(json.dumps([rel, st.st_size, st.st_mtime_ns]).encode())
        return digest.hexdigest()


# --------------------------------------------------------------------------- files

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode an image file to RGB with EXIF orientation applied, or raise BadImage."""
    path = os.fspath(path)
    try:
        img = _decode(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"{path}: DecompressionBombError: {_bomb_size(exc)} exceeds limit of {MAX_IMAGE_PIXELS} "
                       f"pixels (atr's MAX_IMAGE_PIXELS; a possible decompression bomb)") from None
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        reason = " ".join(str(exc).split()) or "no details"
        raise BadImage(f"{path}: {type(exc).__name__}: {reason}") from None
    if img.width < MIN_SIDE or img.height < MIN_SIDE:
        raise BadImage(f"{path}: {img.width}x{img.height} pixels is smaller than {MIN_SIDE}x{MIN_SIDE}")
    return img


def _bomb_size(exc: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"image size ({found.group(1)} pixels)" if found else "image size"


def _decode(path: str) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # set here too: the limit is global state other code could change
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not be padded
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels still decode
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.format == "PNG":  # load() skips the chunk CRCs; verify() checks them
                with Image.open(path) as check:
                    check.verify()
            img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):  # 16/32-bit grey: scale 0..65535 to 0..255 (convert() would clip)
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257
        img = Image.fromarray(np.round(grey).astype(np.uint8))
    if img.has_transparency_data:  # composite alpha / tRNS / palette transparency on white
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------- synthetic


def render_synthetic(kind: str, seed: int, index: int) -> LoadedImage:
    """Render image ``index`` of ``synthetic:<kind>``; the same in every process."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; valid: {', '.join(SYNTHETIC_KINDS)}")
    # A str seed is hashed with sha512 by random.Random, so it does not depend on PYTHONHASHSEED.
    rng = random.Random(f"{GENERATOR_VERSION}:{kind}:{seed}:{index}")
    return _render_doc(rng) if kind == "docs" else _render_scene(rng)


def random_sides(rng: random.Random, lo: int, hi: int, max_aspect: int = 3) -> tuple[int, int]:
    """Two sides drawn from ``[lo, hi]`` (in draw order) whose ratio is at most ``max_aspect``."""
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if max(a, b) <= max_aspect * min(a, b):
            return a, b


def _pick_size(rng: random.Random) -> tuple[int, int]:
    """A scene's (width, height): any integers in ``SIDES``, aspect at most 3:1."""
    return random_sides(rng, *SIDES)


# Document kinds: (name, weight, width range, height/width range). Real aspect ratios: A4/letter pages,
# receipts, slides and screenshots, labels; none is tied to the AnyRes pinpoints.
DOC_KINDS = (("page", 4, (96, 190), (1.25, 1.45)), ("receipt", 1, (64, 96), (2.0, 2.9)),
             ("slide", 2, (128, 256), (0.55, 0.78)), ("label", 1, (150, 256), (0.34, 0.5)))


def _page_size(rng: random.Random) -> tuple[int, int]:
    _, _, (w_lo, w_hi), (a_lo, a_hi) = rng.choices(DOC_KINDS, weights=[k[1] for k in DOC_KINDS])[0]
    w = rng.randint(w_lo, w_hi)
    h = min(256, max(48, round(w * rng.uniform(a_lo, a_hi))))
    return w, h


def _render_doc(rng: random.Random) -> LoadedImage:
    """A page of DejaVu text (matplotlib's fonts): an optional bold heading, then paragraphs,
    lists and mono tables at one body size (7-16 px, scaled to the page), left-aligned in
    margins, wrapped at word boundaries, filling a random share of the page."""
    w, h = _page_size(rng)
    bg = (255, 255, 255) if rng.random() < 0.5 else tuple(rng.randint(232, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    body_face = rng.choice(("sans", "serif", "sans", "mono"))
    size = min(16, max(7, round(min(w, 1.4 * h) * rng.uniform(0.045, 0.085))))
    margin = max(2, round(w * rng.uniform(0.04, 0.10)))
    bottom = margin + round((h - 2 * margin) * rng.uniform(0.35, 1.0))  # text fills this much of the page
    y, lines = margin, []  # lines: (text, glyph boxes), top to bottom
    blocks = 0
    while True:
        kind = "heading" if blocks == 0 and rng.random() < 0.6 else rng.choice(("paragraph", "paragraph", "list",
                                                                             "table"))
        blocks += 1
        if kind == "heading":
            f = font("sans-bold" if body_face != "serif" else "serif-bold", min(20, round(size * rng.uniform(1.3, 1.7))))
            texts = [_words(rng, rng.randint(1, 4), title=True)]
        elif kind == "table":
            f = font("mono", size)
            cols = rng.randint(2, 3)
            texts = ["  ".join(_cell(rng) for _ in range(cols)) for _ in range(rng.randint(2, 5))]
        else:
            f = font(body_face, size)
            items = rng.randint(2, 5) if kind == "list" else 1
            texts = []
            for _ in range(items):
                bullet = rng.choice(("- ", "* ", f"{len(texts) + 1}. ")) if kind == "list" else ""
                texts += _wrap(rng, f, bullet, rng.randint(6, 40), w - 2 * margin)
        ascent, descent = f.getmetrics()
        step = ascent + descent + max(0, round(size * rng.uniform(0.0, 0.35)))
        for text in texts:
            if y + ascent + descent > min(bottom, h - 1):
                return _document(img, w, h, lines)
            fitted = _fit(f, text, w - margin - 1)
            if fitted.strip():
                lines.append((fitted, _draw_line(draw, f, (margin, y), fitted, ink)))
            y += step
        y += round(size * rng.uniform(0.5, 1.5))  # the gap between blocks


def _document(img: Image.Image, w: int, h: int, lines) -> LoadedImage:
    boxes = tuple(_clip(box, w, h) for _, line_boxes in lines for box in line_boxes)
    return LoadedImage(img, boxes, "\n".join(text for text, _ in lines))


_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxyz", "aeiou"


def _word(rng: random.Random) -> str:
    """A pronounceable pseudo-word (1-4 syllables), sometimes a number."""
    if rng.random() < 0.1:
        return str(rng.randint(0, 2000))
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice(_CONSONANTS) if rng.random() < 0.3
                                                                      else "")
                   for _ in range(rng.randint(1, 4)))


def _words(rng: random.Random, n: int, title: bool = False) -> str:
    words = [_word(rng) for _ in range(n)]
    return " ".join(w.capitalize() for w in words) if title else " ".join(words)


def _cell(rng: random.Random) -> str:
    return rng.choice((_word(rng).capitalize(), f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}",
                       str(rng.randint(1, 99999))))


def _wrap(rng: random.Random, f: ImageFont.FreeTypeFont, lead: str, n_words: int, width: int) -> list[str]:
    """Sentences of ``n_words`` pseudo-words, wrapped at word boundaries into lines of at most ``width`` px."""
    words, sentence = [], 0
    for _ in range(n_words):
        word = _word(rng)
        words.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence > 3 and rng.random() < 0.2:
            words[-1] += rng.choice((".", ".", ",", ";", ":"))
            sentence = 0 if words[-1].endswith(".") else sentence
    words[-1] = words[-1].rstrip(",;:") + "."
    lines, line = [], lead
    for word in words:
        trial = f"{line} {word}" if line.strip() else line + word
        if line.strip() and f.getlength(trial) > width:
            lines.append(line)
            line = " " * len(lead) + word if lead else word
        else:
            line = trial
    return [*lines, line]


def _fit(f: ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """``text`` cut at the last character that still fits ``width`` px (one long word on a narrow page)."""
    while text and f.getlength(text) > width:
        text = text[:-1]
    return text.rstrip()


def _draw_line(draw: ImageDraw.ImageDraw, f: ImageFont.FreeTypeFont, xy: tuple[int, int],
               text: str, ink: tuple[int, ...]) -> list[Box]:
    """Draw ``text`` one character at a time; return each glyph's tight ink box."""
    x, y = xy
    boxes = []
    for k, char in enumerate(text):
        if char.isspace():
            continue
        cx = x + round(f.getlength(text[:k]))
        draw.text((cx, y), char, font=f, fill=ink)
        mask, (dx, dy) = f.getmask2(char, mode="L")  # the same mask draw.text pastes
        bbox = mask.getbbox()
        if bbox is None:  # a character without ink
            continue
        x0, y0, x1, y1 = bbox
        boxes.append((cx + dx + x0, y + dy + y0, cx + dx + x1, y + dy + y1))
    return boxes


def _clip(box: Box, w: int, h: int) -> Box:
    x0, y0, x1, y1 = box
    return (float(max(x0, 0)), float(max(y0, 0)), float(min(x1, w)), float(min(y1, h)))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


SHAPES = ("rectangle", "ellipse", "triangle")  # what draw_shape draws


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], colour,
               apex_x: int | None = None, up: bool = True) -> None:
    """A filled ``kind`` (one of :data:`SHAPES`) in the inclusive pixel ``box`` (x0, y0, x1, y1).

    A triangle's base is the box's bottom edge and its apex on the top edge (``up``), or the other
    way round; the apex sits at column ``apex_x`` (default: the box's centre column). The synthetic
    scenes of both ``synthetic:scenes`` and the ``synthetic-scene`` benchmark are drawn with it."""
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        draw.rectangle(box, fill=colour)
    elif kind == "ellipse":
        draw.ellipse(box, fill=colour)
    else:
        apex, base = (y0, y1) if up else (y1, y0)
        draw.polygon([(x0, base), (x1, base), ((x0 + x1) // 2 if apex_x is None else apex_x, apex)], fill=colour)


def _render_scene(rng: random.Random) -> LoadedImage:
    """2-4 large saturated shapes, each clearly visible, on a muted background."""
    w, h = _pick_size(rng)
    n = rng.randint(2, 4)
    for _ in range(100):  # redraw until no shape is mostly hidden by the others
        hue = rng.random()
        colours = [_hsv(hue + j / n + rng.uniform(-0.05, 0.05), rng.uniform(0.8, 1), rng.uniform(0.75, 1))
                   for j in range(n)]
        img = Image.new("RGB", (w, h), _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.95)))
        draw = ImageDraw.Draw(img)
        for colour in colours:
            sw, sh = round(rng.uniform(0.35, 0.8) * w), round(rng.uniform(0.35, 0.8) * h)
            x0, y0 = rng.randint(0, w - sw), rng.randint(0, h - sh)
            x1, y1 = x0 + sw - 1, y0 + sh - 1
            shape = rng.choice(SHAPES)
            up, apex_x = True, None
            if shape == "triangle":  # drawn in this order: which way it points, then where its apex is
                up = rng.random() < 0.5
                apex_x = rng.randint(x0, x1)
            draw_shape(draw, shape, (x0, y0, x1, y1), colour, apex_x=apex_x, up=up)
        pixels = np.asarray(img)
        if all((pixels == c).all(axis=-1).sum() >= 0.05 * w * h for c in colours):
            return LoadedImage(img, glyph_boxes=())
    raise RuntimeError("could not place visible shapes")  # unreachable in practice
