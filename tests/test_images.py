"""Tests for pipeline.images: synthetic renderers, directory sources and strict decoding."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import images
from pipeline.images import BadImage, ImageItem, LoadedImage, open_source

REPO = Path(__file__).resolve().parents[1]


def _pixels(loaded: LoadedImage) -> np.ndarray:
    return np.asarray(loaded.image)


def _background(pixels: np.ndarray) -> np.ndarray:
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind", images.SYNTHETIC_KINDS)
def test_synthetic_is_deterministic_and_independent_of_limit(kind):
    a = open_source(f"synthetic:{kind}", seed=7).items(6)
    b = open_source(f"synthetic:{kind}", seed=7).items(3)
    assert [i.image_id for i in a[:3]] == [f"{kind}-{n:06d}" for n in range(3)]
    assert [i.index for i in a] == list(range(6))
    assert all(i.path is None and i.source == f"synthetic:{kind}" for i in a)
    for x, y in zip(a[:3], b):
        lx, ly = x.load(), y.load()
        assert lx.image.mode == "RGB"
        assert lx.image.tobytes() == ly.image.tobytes()
        assert lx.glyph_boxes == ly.glyph_boxes and lx.text == ly.text


def test_synthetic_is_identical_in_another_process():
    item = open_source("synthetic:docs", seed=3).items(6)[5]
    code = (
        "import hashlib; from pipeline.images import open_source; "
        "l = open_source('synthetic:docs', seed=3).items(6)[5].load(); "
        "print(hashlib.sha256(l.image.tobytes() + repr(l.glyph_boxes).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    loaded = item.load()
    assert out.stdout.strip() == hashlib.sha256(loaded.image.tobytes() + repr(loaded.glyph_boxes).encode()).hexdigest()


@pytest.mark.parametrize("kind", images.SYNTHETIC_KINDS)
def test_different_seeds_differ(kind):
    a = [i.load().image.tobytes() for i in open_source(f"synthetic:{kind}", seed=0).items(4)]
    b = [i.load().image.tobytes() for i in open_source(f"synthetic:{kind}", seed=1).items(4)]
    assert all(x != y for x, y in zip(a, b))


@pytest.mark.parametrize("kind", images.SYNTHETIC_KINDS)
def test_synthetic_sizes_and_aspect_ratios_vary(kind):
    sizes = [i.load().image.size for i in open_source(f"synthetic:{kind}").items(32)]
    assert len(set(sizes)) >= 4
    assert any(h > w for w, h in sizes) and any(w > h for w, h in sizes)
    assert all(1 / 3 <= w / h <= 3 for w, h in sizes)


def test_docs_glyph_boxes_are_tight_dark_and_leave_blank_space():
    for item in open_source("synthetic:docs", seed=5).items(32):
        loaded = item.load()
        pixels = _pixels(loaded).astype(int)
        h, w, _ = pixels.shape
        bg = _background(pixels)
        assert bg.min() >= 200, "background is white or a light tint"
        assert loaded.text and len(loaded.glyph_boxes) == len("".join(loaded.text.split()))
        in_glyph = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in loaded.glyph_boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            in_glyph[int(y0):int(y1), int(x0):int(x1)] = True
        ink = np.abs(pixels - bg).sum(axis=-1) > 0
        assert not (ink & ~in_glyph).any(), "every drawn pixel lies in some glyph box"
        assert pixels[in_glyph].sum(-1).mean() < bg.sum() - 60, "glyph boxes are darker than the background"
        assert (~ink).mean() > 0.6 and in_glyph.mean() < 0.4, "documents are mostly blank"


def test_docs_use_several_font_sizes():
    heights = {
        round(y1 - y0)
        for item in open_source("synthetic:docs").items(16)
        for _, y0, _, y1 in item.load().glyph_boxes
    }
    assert min(heights) <= 7 and max(heights) >= 11


def test_scenes_have_two_to_four_shapes_and_no_glyphs():
    shape_counts = set()
    for item in open_source("synthetic:scenes", seed=2).items(24):
        loaded = item.load()
        assert loaded.glyph_boxes == () and loaded.text is None
        pixels = _pixels(loaded)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        big = counts >= 0.03 * pixels.shape[0] * pixels.shape[1]
        assert big.sum() == len(colours), "shapes are flat-coloured and sizable"
        shape_counts.add(len(colours) - 1)  # minus the background
    assert shape_counts <= {2, 3, 4} and len(shape_counts) >= 2


def test_synthetic_needs_a_limit():
    source = open_source("synthetic:docs")
    with pytest.raises(ValueError, match="--limit"):
        source.items()
    with pytest.raises(ValueError, match="--limit"):
        source.fingerprint()


def test_synthetic_fingerprint():
    fp = open_source("synthetic:docs", seed=0).fingerprint(10)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == open_source("synthetic:docs", seed=0).fingerprint(limit=10)
    others = {
        open_source("synthetic:docs", seed=1).fingerprint(10),
        open_source("synthetic:docs", seed=0).fingerprint(11),
        open_source("synthetic:scenes", seed=0).fingerprint(10),
    }
    assert fp not in others and len(others) == 3


def test_synthetic_fingerprint_tracks_generator_version(monkeypatch):
    before = open_source("synthetic:scenes").fingerprint(4)
    monkeypatch.setattr(images, "GENERATOR_VERSION", images.GENERATOR_VERSION + "-next")
    assert open_source("synthetic:scenes").fingerprint(4) != before


# ----------------------------------------------------------------------- open_source


@pytest.mark.parametrize("spec", ["synthetic:faces", "s3://bucket/train2017", "", "dir:"])
def test_unknown_spec_lists_valid_forms(spec):
    with pytest.raises(ValueError) as info:
        open_source(spec)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message
    assert "synthetic:docs" in message and "synthetic:scenes" in message and "dir:" in message


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(f"dir:{missing}")


def test_directory_without_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=tmp_path.name):
        open_source(str(tmp_path))


# ----------------------------------------------------------------------- directories


def test_directory_discovers_nested_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    (tmp_path / ".cache").mkdir()
    _noise_image(8, 6).save(tmp_path / "a" / "b" / "x.JPG")
    _noise_image(8, 6).save(tmp_path / "c.png")
    _noise_image(8, 6).save(tmp_path / "d" / "e.webp")
    _noise_image(8, 6).save(tmp_path / "d" / "f.jpeg")
    _noise_image(8, 6).save(tmp_path / ".cache" / "hidden.png")
    (tmp_path / "d" / "readme.txt").write_text("not an image")

    for spec in (str(tmp_path), f"dir:{tmp_path}"):
        items = open_source(spec).items()
        assert [i.image_id for i in items] == ["a/b/x.JPG", "c.png", "d/e.webp", "d/f.jpeg"]
        assert [i.index for i in items] == [0, 1, 2, 3]
        assert all(i.source == spec and Path(i.path).is_absolute() for i in items)
        assert Path(items[2].path) == (tmp_path / "d" / "e.webp").resolve()
        for item in items:
            loaded = item.load()
            assert loaded.image.mode == "RGB" and loaded.image.size == (8, 6)
            assert loaded.glyph_boxes is None and loaded.text is None


def test_directory_sampling_is_deterministic_and_sorted(tmp_path):
    for n in range(30):
        (tmp_path / f"{n % 3}").mkdir(exist_ok=True)
        _noise_image(4, 4, n).save(tmp_path / f"{n % 3}" / f"img{n:02d}.png")
    everything = [i.image_id for i in open_source(str(tmp_path)).items()]
    assert everything == sorted(everything) and len(everything) == 30
    assert [i.image_id for i in open_source(str(tmp_path)).items(100)] == everything

    picks = [i.image_id for i in open_source(str(tmp_path), seed=1).items(10)]
    again = open_source(str(tmp_path), seed=1).items(10)
    assert picks == [i.image_id for i in again] == sorted(picks)
    assert [i.index for i in again] == list(range(10))
    assert len(set(picks)) == 10 and set(picks) <= set(everything)
    assert picks != [i.image_id for i in open_source(str(tmp_path), seed=2).items(10)]
    assert picks != everything[:10]


def test_directory_fingerprint_tracks_paths_sizes_and_mtimes(tmp_path):
    for n in range(5):
        _noise_image(4, 4, n).save(tmp_path / f"img{n}.png")

    def fp(limit=None, seed=0):
        return open_source(str(tmp_path), seed=seed).fingerprint(limit)

    first = fp()
    assert first == fp() and len(first) == 64
    assert fp(limit=3) != first and fp(limit=3, seed=1) != fp(limit=3)

    target = tmp_path / "img2.png"
    stat = target.stat()
    target.write_bytes(target.read_bytes() + b"\0")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, new size
    resized = fp()
    assert resized != first

    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = fp()
    assert touched != resized

    _noise_image(4, 4).save(tmp_path / "img9.png")
    assert fp() != touched


# ----------------------------------------------------------------------- bad files


def _bad_zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _bad_truncated_jpeg(path: Path) -> None:
    _noise_image(64, 64).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_text_as_jpeg(path: Path) -> None:
    path.write_text("this is not a JPEG\n")


def _bad_png_crc(path: Path) -> None:
    _noise_image(16, 16).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start:start + 4], "big")
    data[start + 8 + length] ^= 0xFF  # first byte of the IDAT CRC; the pixel data is intact
    path.write_bytes(bytes(data))


def _bad_one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (9, 9, 9)).save(path)


def _bad_one_row(path: Path) -> None:
    Image.new("RGB", (40, 1), (9, 9, 9)).save(path)


@pytest.mark.parametrize(
    "name, write",
    [
        ("empty.jpg", _bad_zero_byte),
        ("truncated.jpg", _bad_truncated_jpeg),
        ("text.jpg", _bad_text_as_jpeg),
        ("bad_crc.png", _bad_png_crc),
        ("tiny.png", _bad_one_pixel),
        ("row.png", _bad_one_row),
    ],
)
def test_bad_files_raise_bad_image_naming_the_file(tmp_path, monkeypatch, name, write):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # load() must switch it back off
    write(tmp_path / name)
    (item,) = open_source(str(tmp_path)).items()
    with pytest.raises(BadImage) as info:
        item.load()
    message = str(info.value)
    assert message.startswith(f"{item.path}: ") and len(message) > len(item.path) + 4
    assert "\n" not in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_is_enforced_through_pil(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    Image.new("RGB", (100, 100)).save(tmp_path / "at_limit.png")
    Image.new("RGB", (150, 100)).save(tmp_path / "over.png")  # PIL only warns between 1x and 2x
    Image.new("RGB", (300, 300)).save(tmp_path / "far_over.png")  # PIL raises above 2x
    items = {i.image_id: i for i in open_source(str(tmp_path)).items()}

    assert items["at_limit.png"].load().image.size == (100, 100)
    for name in ("over.png", "far_over.png"):
        with pytest.raises(BadImage, match=r"DecompressionBomb\w+: .*exceeds limit of (10000|20000) pixels"):
            items[name].load()
    assert Image.MAX_IMAGE_PIXELS == 10_000


# ----------------------------------------------------------------------- odd but good files


def _load_one(tmp_path: Path) -> Image.Image:
    (item,) = open_source(str(tmp_path)).items()
    image = item.load().image
    assert image.mode == "RGB"
    return image


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = _load_one(tmp_path)
    assert image.size == (16, 8)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 25 and b < 25


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _noise_image(40, 20).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rotated.jpg").size == (40, 20)
    assert _load_one(tmp_path).size == (20, 40)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 1000]] * 3, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = np.asarray(_load_one(tmp_path))
    assert pixels.shape == (3, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 255, 100, 4]
    assert (pixels == pixels[..., :1]).all()


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(_load_one(tmp_path)).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in pixels[0, 2])


@pytest.mark.parametrize("mode", ["P", "LA", "L", "1"])
def test_other_modes_load_as_rgb(tmp_path, mode):
    image = _noise_image(6, 5).convert(mode)
    image.save(tmp_path / "odd.png", **({"transparency": 0} if mode == "P" else {}))
    loaded = _load_one(tmp_path)
    assert loaded.size == (6, 5)


def test_items_are_plain_values():
    item = ImageItem("docs-000001", "synthetic:docs", 1, None)
    assert item == open_source("synthetic:docs").items(2)[1]
    assert item.load().image.tobytes() == open_source("synthetic:docs").items(2)[1].load().image.tobytes()
