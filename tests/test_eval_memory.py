"""Evaluation memory does not grow with the benchmark: 150 and 600 DocVQA-sized pages (1700 x 2200 PNG in
the lmms-lab layout) peak within 1.3x of each other, under 2 GB, with ``tiny``.

Slow: it writes two parquet files of real-sized pages and runs ``atr eval`` on each in its own process.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

PAGE = (1700, 2200)


def page_png(seed: int) -> bytes:
    """A DocVQA-sized scanned-looking page: DejaVu text lines on off-white paper."""
    import random

    from PIL import Image, ImageDraw

    from pipeline.fonts import font

    rng = random.Random(seed)
    img = Image.new("RGB", PAGE, (248, 247, 243))
    d = ImageDraw.Draw(img)
    d.text((120, 110), f"Memorandum {seed}", fill=(20, 20, 20), font=font("serif-bold", 64))
    body = font("serif", 30)
    y = 260
    while y < PAGE[1] - 150:
        words = " ".join(rng.choice(("report", "budget", "committee", "tobacco", "research", "1967", "total",
                                     "meeting", "department", "sales")) for _ in range(rng.randint(6, 14)))
        d.text((120, y), words, fill=(30, 30, 30), font=body)
        y += 44 if rng.random() > 0.1 else 90
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_docvqa(path, n: int, pages: list[bytes]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("questionId", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string())),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 50):  # row groups of 50, as datasets writes them
            rows = [{"questionId": str(i), "question": "What is the title of the memo?", "answers": ["Memorandum"],
                     "image": {"bytes": pages[i % len(pages)], "path": None}} for i in range(start, min(n, start + 50))]
            w.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path


def peak_rss_mb(args: list[str], env: dict) -> float:
    """Peak RSS of ``atr`` run in a fresh interpreter (so one run's peak never counts for the next)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def test_peak_memory_does_not_grow_with_the_benchmark(tmp_path, cli_env):
    pages = [page_png(s) for s in range(8)]
    peaks = {}
    for n in (150, 600):
        data = write_docvqa(tmp_path / f"docvqa-{n}.parquet", n, pages)
        peaks[n] = peak_rss_mb(["eval", "--home", str(tmp_path / f"home-{n}"), "--model", "tiny", "--benchmark",
                                "docvqa_val", "--data", str(data), "--limit", str(n), "--strategies", "full,random",
                                "--retentions", "0.25", "--seeds", "1"], cli_env)
    print(f"\npeak RSS, atr eval --model tiny on DocVQA-sized pages: 150 pages {peaks[150]:.0f} MB, "
          f"600 pages {peaks[600]:.0f} MB ({peaks[600] / peaks[150]:.2f}x)")
    assert peaks[600] <= 1.3 * peaks[150]
    assert peaks[600] < 2048
