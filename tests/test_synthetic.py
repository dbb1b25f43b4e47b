"""The synthetic benchmarks: deterministic, disjoint splits, sane contents, lmms-lab parquet."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import (BENCHMARKS, CELL, COLOURS, GLYPHS, OCR_SIZES, chance_accuracy, generate_samples,
                                split_of)


def _digest(sample) -> str:
    return hashlib.sha256(sample.image.tobytes()).hexdigest()


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_generation_is_deterministic_and_seeded(bench):
    a = generate_samples(bench, "test", 40)
    b = generate_samples(bench, "test", 40)
    assert [s.question_id for s in a] == [s.question_id for s in b]
    assert [(s.answer, s.content_key, _digest(s)) for s in a] == [(s.answer, s.content_key, _digest(s)) for s in b]
    # a prefix is stable: asking for fewer gives the first ones
    assert [s.content_key for s in generate_samples(bench, "test", 10)] == [s.content_key for s in a[:10]]
    other = generate_samples(bench, "test", 40, seed=1)
    assert len({s.content_key for s in other} & {s.content_key for s in a}) < 10


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_splits_are_disjoint_by_content_and_pixels(bench):
    splits = {split: generate_samples(bench, split, n) for split, n in (("train", 1500), ("val", 200), ("test", 300))}
    for split, samples in splits.items():
        assert len(samples) == {"train": 1500, "val": 200, "test": 300}[split]
        assert all(split_of(f"{bench}:{s.content_key}") == split for s in samples)
        assert len({s.content_key for s in samples}) == len(samples)  # no duplicates inside a split
    keys = {split: {s.content_key for s in samples} for split, samples in splits.items()}
    pixels = {split: {_digest(s) for s in samples} for split, samples in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[a] & keys[b], f"{a}/{b} share content"
        assert not pixels[a] & pixels[b], f"{a}/{b} share an image"


def test_ocr_glyphs_sit_in_one_cell_each_and_spell_the_answer():
    for s in generate_samples("synthetic-ocr", "val", 200):
        w, h = s.image.size
        assert (h, w) in OCR_SIZES
        assert 1 <= len(s.answer) <= 3 and set(s.answer) <= set(GLYPHS)
        assert "".join(g[4] for g in s.glyph_boxes) == s.answer
        cells = []
        for x0, y0, x1, y1, _ in s.glyph_boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            cell = (int(x0 // CELL), int(y0 // CELL))
            assert cell == (int((x1 - 1) // CELL), int((y1 - 1) // CELL)), "glyph crosses a cell border"
            cells.append(cell)
        assert [c[0] for c in cells] == list(range(cells[0][0], cells[0][0] + len(cells)))  # left to right
        ink = (np.asarray(s.image).min(axis=-1) < 120).mean()
        assert 0 < ink < 0.06  # mostly blank


def test_most_images_fit_no_pinpoint_so_unpadding_drops_tokens(trained_model):
    """Real geometry: most synthetic images are padded onto their AnyRes canvas, as real photos and pages are."""
    from pipeline.images import open_source
    from pipeline.masks import padding_share

    model, _ = trained_model
    shares = {b: padding_share(model, [s.image.size for s in generate_samples(b, "test", 300)]) for b in BENCHMARKS}
    shares["docs"] = padding_share(model, [i.load().image.size for i in open_source("synthetic:docs").items(300)])
    for name, share in shares.items():
        assert share["padded_images"] > 0.6, (name, share)
        assert 0.1 < share["padding_tokens"] < 0.4, (name, share)
    fitting = [s for s in generate_samples("synthetic-ocr", "test", 100) if (s.image.height, s.image.width)
               in ((64, 128), (128, 64), (128, 128))]
    assert fitting and padding_share(model, [s.image.size for s in fitting])["padding_tokens"] == 0


def test_ocr_uses_several_dejavu_faces_and_sizes():
    from pipeline.synthetic import OCR_FACES, OCR_FONT_SIZES

    heights = {round(g[3] - g[1]) for s in generate_samples("synthetic-ocr", "val", 300) for g in s.glyph_boxes}
    assert len(OCR_FACES) >= 3 and len(OCR_FONT_SIZES) >= 3
    assert min(heights) <= 9 and max(heights) >= 11, heights


def test_scene_answer_is_the_dominant_colour():
    names = list(COLOURS)
    ref = np.asarray([COLOURS[n] for n in names], dtype=float)
    for s in generate_samples("synthetic-scene", "val", 100):
        px = np.asarray(s.image, dtype=float).reshape(-1, 3)
        dist = np.linalg.norm(px[:, None, :] - ref[None], axis=-1)
        near = dist.min(axis=1) < 40
        counts = np.bincount(dist.argmin(axis=1)[near], minlength=len(names))
        assert names[int(counts.argmax())] == s.answer
        assert counts.max() >= 0.1 * px.shape[0]  # large: a triangle over half the width and height is 1/8


def test_chance_and_bad_arguments():
    assert chance_accuracy("synthetic-scene") == pytest.approx(1 / 8)
    assert chance_accuracy("synthetic-ocr") < 0.02
    with pytest.raises(ValueError, match="synthetic-ocr, synthetic-scene"):
        generate_samples("synthetic-docs", "test", 1)
    with pytest.raises(ValueError, match="train, val, test"):
        generate_samples("synthetic-ocr", "dev", 1)


def read_parquet(path, required, columns=None, limit=None) -> list[dict]:
    """Rows of one parquet file (or every ``*.parquet`` in a directory, sorted by name), at most ``limit``,
    through ``storage.benchmarks.iter_rows``. A missing path, an unreadable file or a missing column ends
    in one ``BenchmarkFileError`` line that names the file and the expected columns."""
    from pathlib import Path

    from storage.benchmarks import BenchmarkFileError, iter_rows

    path = Path(path)
    if not path.exists():
        raise BenchmarkFileError(f"benchmark data {path} does not exist (expected a parquet file or a directory "
                                 f"of them with columns {', '.join(required)})")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkFileError(f"no *.parquet files in {path} (expected columns {', '.join(required)})")
    return list(iter_rows(files, required, 0, limit, columns))


def test_parquet_stage_writes_the_lmms_lab_layout(session_home):
    import pyarrow.parquet as pq

    from flows.stages.benchmark import synthetic_benchmark

    path = synthetic_benchmark(session_home, "synthetic-ocr", "test", 25)
    assert path.name == "synthetic-ocr-test.parquet"
    schema = pq.read_schema(path)
    assert schema.names == ["question_id", "question", "answers", "answer", "image"]
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    rows = read_parquet(path, required=["question_id", "question", "answers", "image"])
    samples = generate_samples("synthetic-ocr", "test", 25)
    assert [r["question_id"] for r in rows] == [s.question_id for s in samples]
    assert [r["answers"] for r in rows] == [[s.answer] for s in samples]
    for r, s in zip(rows, samples):
        decoded = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(s.image))
    mtime = path.stat().st_mtime_ns
    assert synthetic_benchmark(session_home, "synthetic-ocr", "test", 25) == path  # cached
    assert path.stat().st_mtime_ns == mtime


def test_parquet_errors_name_file_and_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.benchmarks import BenchmarkFileError

    required = ["question_id", "question", "answers", "image"]
    with pytest.raises(BenchmarkFileError, match="does not exist.*question_id, question, answers, image"):
        read_parquet(tmp_path / "nope.parquet", required)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"], "answers": [["a"]]}), bad)
    with pytest.raises(BenchmarkFileError, match=r"bad.parquet: missing column\(s\) question_id, image"):
        read_parquet(bad, required)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(BenchmarkFileError, match="junk.parquet: not a readable parquet file"):
        read_parquet(junk, required)
    assert not list(tmp_path.glob("*.tmp"))
