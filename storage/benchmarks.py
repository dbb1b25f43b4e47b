"""Benchmark parquet files in the lmms-lab layout.

The synthetic benchmarks are written with the columns lmms-lab's DocVQA-style
sets use -- ``question_id`` (str), ``question`` (str), ``answers`` (list[str]),
``image`` (struct ``{bytes: binary, path: str}``, as ``datasets`` stores an
Image feature) -- plus ``answer`` (str), so one parquet reader serves these and
the real benchmarks. Files are written to a temp name and renamed: a crash
never leaves a half-written parquet under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

SYNTHETIC_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("answer", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
])


class BenchmarkFileError(UserError, ValueError):
    """A benchmark parquet that is missing or malformed; ``str(exc)`` is one line naming it."""


def write_parquet(rows: Iterable[dict[str, Any]], path: Path, schema: pa.Schema = SYNTHETIC_SCHEMA) -> Path:
    """Write ``rows`` (dicts with the schema's columns) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def parquet_columns(path: Path) -> list[str]:
    """Column names of one parquet file (one clear line when it is not parquet)."""
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise BenchmarkFileError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def parquet_rows(files: Sequence[Path]) -> int:
    """Total row count from the parquet footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def benchmark_files(benchmark: str, path: str | os.PathLike) -> list[Path]:
    """The parquet file(s) ``--data`` names for ``benchmark``: a file, or every ``*.parquet`` under a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BenchmarkFileError(f"--data for {benchmark}: {path} does not exist")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise BenchmarkFileError(f"--data for {benchmark}: no *.parquet files under {path}")
    return files


def files_fingerprint(files: Sequence[Path]) -> str:
    """Hash of (resolved path, size, mtime) of each file: the data input of an eval cache key."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


GQA_QUESTION_COLUMNS = ("id", "imageId", "question", "answer")
BATCH_ROWS = 32  # rows per record batch when streaming a benchmark


def iter_rows(files: Sequence[Path], required: Sequence[str], start: int = 0, stop: int | None = None,
              columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, Any]]:
    """Rows ``start`` to ``stop`` (exclusive; None: to the end) of ``files`` read as one table, streamed.

    Whole row groups before ``start`` are skipped from the footer without reading
    them, and the rest is read in record batches of ``batch_rows``: memory is bounded
    by one row group's batch, not by the benchmark. A missing file or column is one
    :class:`BenchmarkFileError` line naming the file and the expected columns."""
    offset = 0
    for f in files:
        if stop is not None and offset >= stop:
            return
        pf = _open(Path(f), required)
        names = pf.schema_arrow.names
        want = None if columns is None else [c for c in columns if c in names]
        meta = pf.metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if offset + n <= start:
                offset += n
                continue
            if stop is not None and offset >= stop:
                return
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=want):
                    rows = batch.to_pylist()
                    lo, hi = max(0, start - offset), len(rows) if stop is None else min(len(rows), stop - offset)
                    yield from rows[lo:hi]
                    offset += len(rows)
                    if stop is not None and offset >= stop:
                        return
            except (OSError, pa.ArrowException) as exc:
                raise BenchmarkFileError(f"{f}: cannot read ({str(exc).splitlines()[0]})") from None


def _open(f: Path, required: Sequence[str]) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as exc:
        raise BenchmarkFileError(f"{f}: not a readable parquet file ({str(exc).splitlines()[0]}); "
                                 f"expected columns {', '.join(required)}") from None
    names = pf.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise BenchmarkFileError(f"{f}: missing column(s) {', '.join(missing)}; expected columns "
                                 f"{', '.join(required)} (has {', '.join(names)})")
    return pf


def benchmark_size(benchmark: str, files: Sequence[Path]) -> int:
    """Questions in a benchmark's files, from the footers (GQA: its questions table)."""
    if benchmark == "gqa":
        files = [f for f in files if "question" in parquet_columns(f)]
    return parquet_rows(files)


def load_benchmark_rows(benchmark: str, files: Sequence[Path], limit: int,
                        required: Sequence[str], start: int = 0) -> list[dict[str, Any]]:
    """Rows ``start`` to ``limit`` (exclusive) of a benchmark's parquet files, each with the ``required``
    columns, streamed (:func:`iter_rows`): only those rows are ever held.

    GQA ships questions and images as two tables (``testdev_balanced_instructions``
    and ``testdev_balanced_images``): its questions are joined to their images by
    ``imageId``, keeping from the streamed images table only the images asked about."""
    if benchmark != "gqa":
        return list(iter_rows(files, required, start, limit))
    question_files = [f for f in files if "question" in parquet_columns(f)]
    image_files = [f for f in files if f not in question_files]
    if not question_files or not image_files:
        raise BenchmarkFileError("gqa needs both testdev_balanced_instructions (columns id, imageId, question, "
                                 "answer) and testdev_balanced_images (columns id, image) parquet files in --data")
    rows = list(iter_rows(question_files, GQA_QUESTION_COLUMNS, start, limit))
    wanted = {r["imageId"] for r in rows}
    images = {r["id"]: r["image"] for r in iter_rows(image_files, ("id", "image")) if r["id"] in wanted}
    missing = sorted(wanted - set(images))
    if missing:
        raise BenchmarkFileError(f"gqa: imageId {missing[0]} (and {len(missing) - 1} more) not in the images "
                                 "parquet")
    return [{**r, "image": images[r["imageId"]]} for r in rows]


__all__ = ["write_parquet", "parquet_columns", "parquet_rows", "BenchmarkFileError", "SYNTHETIC_SCHEMA",
           "benchmark_files", "files_fingerprint", "load_benchmark_rows", "iter_rows", "benchmark_size"]
