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
import functools
import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps

from .config import ConfigError
from .errors import MissingFile, UserError

SYNTHETIC_KINDS = ("docs", "scenes")
GENERATOR_VERSION = "1"  # bump when the synthetic renderers change
MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as decompression bombs (PIL's limit is set to this)
MIN_SIDE = 2  # smaller images (1x1, 40x1) are refused: no crop can be made of them
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SIZES = (64, 96, 128, 160, 192, 256)  # synthetic widths and heights (aspect <= 3:1)

_VALID_FORMS = "synthetic:docs, synthetic:scenes, DIR or dir:DIR (a folder of .jpg/.jpeg/.png/.webp files)"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

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
        # Pillow's version is included because it ships the font the renderer draws with.
        return _sha256_json("synthetic", self.kind, GENERATOR_VERSION, PIL.__version__, self.seed, limit)

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


def _pick_size(rng: random.Random) -> tuple[int, int]:
    while True:
        w, h = rng.choice(SIZES), rng.choice(SIZES)
        if max(w, h) <= 3 * min(w, h):
            return w, h


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _render_doc(rng: random.Random) -> LoadedImage:
    """Lines of dark A-Z/0-9 words at random places and sizes on a light background."""
    w, h = _pick_size(rng)
    bg = (255, 255, 255) if rng.random() < 0.5 else tuple(rng.randint(232, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    target = rng.uniform(0.05, 0.30) * w * h  # area of line boxes to fill
    covered, lines = 0, []  # lines: (y0, y1, text, glyph boxes), vertically disjoint
    for _ in range(60):
        if covered >= target:
            break
        font = _font(rng.randint(7, 16))
        line_h = sum(font.getmetrics())
        text = _random_line(rng, font, max_width=rng.randint(w // 4, w - 2))
        line_w = ceil(font.getlength(text))
        x, y = rng.randint(1, w - 1 - line_w), rng.randint(0, h - line_h)
        if any(y <= y1 and y0 <= y + line_h for y0, y1, _, _ in lines):
            continue
        lines.append((y, y + line_h, text, _draw_line(draw, font, (x, y), text, ink)))
        covered += line_w * line_h
    lines.sort()  # reading order: glyph_boxes follow the characters of text
    boxes = tuple(_clip(box, w, h) for *_, line_boxes in lines for box in line_boxes)
    return LoadedImage(img, boxes, "\n".join(text for _, _, text, _ in lines))


def _random_line(rng: random.Random, font: ImageFont.FreeTypeFont, max_width: int) -> str:
    words: list[str] = []
    while True:
        word = "".join(rng.choices(_ALPHABET, k=rng.randint(1, 7)))
        if font.getlength(" ".join([*words, word])) > max_width:
            return " ".join(words) or word[0]
        words.append(word)


def _draw_line(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, xy: tuple[int, int],
               text: str, ink: tuple[int, ...]) -> list[Box]:
    """Draw ``text`` one character at a time; return each glyph's tight ink box."""
    x, y = xy
    boxes = []
    for k, char in enumerate(text):
        if char.isspace():
            continue
        cx = x + round(font.getlength(text[:k]))
        draw.text((cx, y), char, font=font, fill=ink)
        mask, (dx, dy) = font.getmask2(char, mode="L")  # the same mask draw.text pastes
        x0, y0, x1, y1 = mask.getbbox()
        boxes.append((cx + dx + x0, y + dy + y0, cx + dx + x1, y + dy + y1))
    return boxes


def _clip(box: Box, w: int, h: int) -> Box:
    x0, y0, x1, y1 = box
    return (float(max(x0, 0)), float(max(y0, 0)), float(min(x1, w)), float(min(y1, h)))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


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
            shape = rng.choice(("rectangle", "ellipse", "triangle"))
            if shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            elif shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                apex, base = (y0, y1) if rng.random() < 0.5 else (y1, y0)
                draw.polygon([(x0, base), (x1, base), (rng.randint(x0, x1), apex)], fill=colour)
        pixels = np.asarray(img)
        if all((pixels == c).all(axis=-1).sum() >= 0.05 * w * h for c in colours):
            return LoadedImage(img, glyph_boxes=())
    raise RuntimeError("could not place visible shapes")  # unreachable in practice
