"""Real TrueType fonts for the synthetic images: the DejaVu family that matplotlib ships.

matplotlib is a dependency of the project (plots), and its ``mpl-data/fonts/ttf``
folder holds the DejaVu Sans, Serif and Mono faces. They are found on disk
without importing matplotlib. Rendering depends on the font file, so
:func:`fonts_fingerprint` (a hash of every face used) is part of each synthetic
generator's fingerprint: a different DejaVu release gives different cache keys.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from PIL import ImageFont

from .errors import MissingFile

FACES = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "mono": "DejaVuSansMono.ttf",
}


@functools.lru_cache(maxsize=None)
def font_dir() -> Path:
    """matplotlib's ``mpl-data/fonts/ttf`` folder."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile("the synthetic images use matplotlib's DejaVu fonts, and matplotlib is not installed "
                          "(pip install matplotlib)")
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"


def font_path(face: str) -> Path:
    if face not in FACES:
        raise ValueError(f"unknown font face {face!r}; valid: {', '.join(FACES)}")
    path = font_dir() / FACES[face]
    if not path.is_file():
        raise MissingFile(f"{path}: font file missing from the matplotlib install (reinstall matplotlib)")
    return path


@functools.lru_cache(maxsize=None)
def font(face: str, size: int) -> ImageFont.FreeTypeFont:
    """DejaVu ``face`` at ``size`` pixels (the em size FreeType renders)."""
    return ImageFont.truetype(str(font_path(face)), size)


@functools.lru_cache(maxsize=None)
def fonts_fingerprint() -> str:
    """sha256 (16 hex) over every face's bytes: part of the synthetic generators' fingerprints."""
    h = hashlib.sha256()
    for face in sorted(FACES):
        h.update(face.encode())
        h.update(font_path(face).read_bytes())
    return h.hexdigest()[:16]


__all__ = ["FACES", "font", "font_dir", "font_path", "fonts_fingerprint"]
