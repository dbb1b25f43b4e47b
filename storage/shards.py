"""WebDataset feature shards: a reproducible writer and a validating, pickle-free reader.

A shard ``feats-%06d.tar`` holds, per sample, ``<key>.feat.npy`` (fp16 array of
shape crops x L x C) and ``<key>.json`` (image id, size, crop grid, crop boxes,
glyph mask). Writing goes to ``<name>.tmp`` and is renamed into place; the tar
headers use a fixed mtime, user and mode, so equal samples give equal bytes.

The reader never unpickles: it accepts only regular-file members named
``<key>.feat.npy`` / ``<key>.json`` (no ``..``, no absolute paths), loads arrays
with ``allow_pickle=False``, and checks dtype, shape and finiteness against the
stage manifest. Every other extension is refused, so pickle-based ones
(``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``, ``.npz``, ``.bin``, ...) never reach
a decoder. When the manifest lists a shard's size and sha256 they are checked
too (the digest while streaming, no second read). Anything else is a
``ShardError`` naming the shard and member.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from pipeline.errors import UserError

from .stages import write_json_atomic

SHARD_PATTERN = "feats-%06d.tar"
ALLOWED_EXTENSIONS = ("feat.npy", "json")
TAR_MTIME = 0  # fixed, so the bytes do not depend on when a shard was written


class ShardError(UserError, ValueError):
    """A shard or member that fails validation (one line: shard, member, reason)."""


@dataclass(frozen=True)
class FeatureSample:
    key: str
    features: np.ndarray          # (crops, L, C), the manifest's dtype
    meta: dict[str, Any]


def shard_name(index: int) -> str:
    return SHARD_PATTERN % index


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_shard(path: Path, samples: list[tuple[str, np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
    """Write samples to ``path`` atomically; return ``{"name", "count", "bytes", "sha256"}``."""
    path = Path(path)
    for key, _, _ in samples:  # refuse bad keys before any byte is written
        _check_key(key, path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, user="atr", group="atr", mode=0o444, encoder=False, mtime=TAR_MTIME)
            for key, features, meta in samples:
                writer.write({"__key__": key, "feat.npy": encode_npy(features), "json": encode_json(meta)})
            writer.close()
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written shard behind
        raise
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return {"name": path.name, "count": len(samples), "bytes": size, "sha256": digest}


def _check_key(key: str, shard: Path) -> None:
    if not isinstance(key, str) or not key or "/" in key or "\\" in key or ".." in key or "." in key:
        raise ShardError(f"{shard}: sample key {key!r} must not contain '.', '/' or '..'")


def _split_member(name: str, shard: Path) -> tuple[str, str]:
    if name.startswith("/") or ".." in name.split("/") or "/" in name or "\\" in name:
        raise ShardError(f"{shard}: member {name!r} has an unsafe path")
    key, dot, ext = name.partition(".")
    if not key:
        raise ShardError(f"{shard}: member {name!r} has an empty sample key")
    if not dot or ext not in ALLOWED_EXTENSIONS:
        raise ShardError(f"{shard}: member {name!r} has extension {ext or '(none)'!r}; "
                         f"only {', '.join('.' + e for e in ALLOWED_EXTENSIONS)} are read (never pickle)")
    return key, ext


def _decode_npy(data: bytes, shard: Path, member: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ShardError(f"{shard}: member {member!r} is not a plain numeric .npy ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any malformed npy header
        raise ShardError(f"{shard}: member {member!r} is not a valid .npy ({type(exc).__name__})") from None
    if not isinstance(array, np.ndarray):  # np.load returns an NpzFile for zip data
        if hasattr(array, "close"):
            array.close()
        raise ShardError(f"{shard}: member {member!r} is not a .npy array ({type(array).__name__})")
    if array.dtype.kind not in "fiub":
        raise ShardError(f"{shard}: member {member!r} has dtype {array.dtype}, expected a numeric array")
    return array


class _HashingReader:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, fh):
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def iter_shard(path: Path, expect: dict[str, Any] | None = None,
               record: dict[str, Any] | None = None) -> Iterator[FeatureSample]:
    """Yield validated samples from one shard.

    ``expect`` (from the manifest) may hold ``dtype``, ``tokens_per_crop`` (L),
    ``feature_dim`` (C) and ``crops`` ("base" means exactly one crop).
    ``record`` (the manifest's entry for this shard) may hold ``bytes`` and
    ``sha256``, checked after the last member (so a cut or bad member is named first).
    """
    path = Path(path)
    expect = expect or {}
    record = record or {}
    current: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    reading, last = "", ""  # the member being read / the last one read whole, named when the tar breaks off
    try:
        with open(path, "rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    reading = member.name
                    if not member.isfile():
                        raise ShardError(f"{path}: member {member.name!r} is not a regular file")
                    key, ext = _split_member(member.name, path)
                    if key != current:
                        if members:
                            raise ShardError(f"{path}: sample {current!r} is missing a member")
                        if key in seen:
                            raise ShardError(f"{path}: member {member.name!r} repeats sample {key!r}")
                        seen.add(key)
                        current = key
                    if ext in members:
                        raise ShardError(f"{path}: member {member.name!r} appears twice")
                    fh = tar.extractfile(member)
                    members[ext] = fh.read() if fh is not None else b""
                    reading, last = "", member.name
                    if len(members) == len(ALLOWED_EXTENSIONS):
                        yield _decode_sample(path, key, members, expect)
                        members = {}
                end = tar.offset
            while reader.read(1 << 16):
                pass  # the end-of-archive blocks and the padding count towards the digest
    except (tarfile.TarError, EOFError) as exc:
        at = f"in member {reading!r}" if reading else f"after member {last!r}" if last else "at its first member"
        raise ShardError(f"{path}: truncated or corrupt tar {at} ({exc or type(exc).__name__})") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
    if members:
        raise ShardError(f"{path}: sample {current!r} is missing a member (truncated shard?)")
    _check_end_marker(path, end)
    _check_size(path, record.get("bytes"))
    want = record.get("sha256")
    if isinstance(want, str) and reader.digest.hexdigest() != want:
        raise ShardError(f"{path}: sha256 {reader.digest.hexdigest()[:12]}... differs from the manifest's "
                         f"{want[:12]}... (corrupt or replaced shard)")


def _check_size(path: Path, want: Any) -> None:
    if not isinstance(want, int):
        return
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
    if size != want:
        raise ShardError(f"{path}: {size} bytes, manifest says {want} (truncated or replaced shard)")


def _check_end_marker(path: Path, end: int) -> None:
    """``tarfile`` silently stops at a missing or garbled header, so a shard cut at a
    member boundary would read as a shorter valid one. Require the zero block that
    ends every tar we write."""
    try:
        with open(path, "rb") as fh:
            fh.seek(end)
            block = fh.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        raise ShardError(f"{path}: truncated or corrupt tar (no end-of-archive marker at offset {end})")


def _decode_sample(path: Path, key: str, members: dict[str, bytes], expect: dict[str, Any]) -> FeatureSample:
    feat_member = f"{key}.feat.npy"
    features = _decode_npy(members["feat.npy"], path, feat_member)
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"{path}: member {key + '.json'!r} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: member {key + '.json'!r} holds {type(meta).__name__}, expected an object")
    if "dtype" in expect and str(features.dtype) != expect["dtype"]:
        raise ShardError(f"{path}: member {feat_member!r} has dtype {features.dtype}, manifest says {expect['dtype']}")
    if features.ndim != 3:
        raise ShardError(f"{path}: member {feat_member!r} has shape {features.shape}, expected (crops, L, C)")
    for axis, name in ((1, "tokens_per_crop"), (2, "feature_dim")):
        if name in expect and features.shape[axis] != expect[name]:
            raise ShardError(f"{path}: member {feat_member!r} has shape {features.shape}, "
                             f"manifest says {name}={expect[name]}")
    if expect.get("crops") == "base" and features.shape[0] != 1:
        raise ShardError(f"{path}: member {feat_member!r} has {features.shape[0]} crops, manifest says base only")
    if "crops" in meta and meta["crops"] != features.shape[0]:
        raise ShardError(f"{path}: member {feat_member!r} has {features.shape[0]} crops, its json says {meta['crops']}")
    if not np.isfinite(features).all():
        raise ShardError(f"{path}: member {feat_member!r} holds NaN or inf values")
    return FeatureSample(key=key, features=features, meta=meta)


def manifest_expectations(manifest: dict[str, Any]) -> dict[str, Any]:
    """The per-sample checks a reader applies, taken from an extract manifest."""
    shapes = manifest.get("features") or {}
    config = manifest.get("config") or {}
    return {k: shapes[k] for k in ("dtype", "tokens_per_crop", "feature_dim") if k in shapes} | (
        {"crops": config["crops"]} if "crops" in config else {})


def iter_features(stage_dir: Path, manifest: dict[str, Any]) -> Iterator[FeatureSample]:
    """Every sample of an extract stage, shard by shard, validated against its manifest."""
    stage_dir = Path(stage_dir)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{stage_dir}: manifest lists no shards")
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            raise ShardError(f"{stage_dir}: manifest shard entry {s!r} does not name a file in the stage")
    missing = [s["name"] for s in shards if not (stage_dir / s["name"]).is_file()]
    if missing:
        raise ShardError(f"{stage_dir}: manifest lists shards that are absent: {', '.join(missing[:5])}")
    expect = manifest_expectations(manifest)
    for shard in shards:
        path, count = stage_dir / shard["name"], 0
        for sample in iter_shard(path, expect, shard):
            count += 1
            yield sample
        if isinstance(shard.get("count"), int) and count != shard["count"]:
            raise ShardError(f"{path}: holds {count} samples, manifest says {shard['count']}")


def stream_crops(stage_dir: Path, manifest: dict[str, Any], keep_image: "Callable[[str], bool]",
                 seed: int, buffer_size: int, repeat: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Per-crop ``(features (L, C), glyph_mask (L,) or None)`` from the shards, shuffled
    (:func:`stream_samples`: every crop of a sample is one item)."""

    def crops(sample):
        glyphs = sample.meta.get("glyph_mask")
        for c in range(sample.features.shape[0]):
            yield sample.features[c], None if glyphs is None else np.asarray(glyphs[c], dtype=bool)

    return stream_samples(stage_dir, manifest, keep_image, seed, buffer_size, crops, repeat)


def stream_samples(stage_dir: Path, manifest: dict[str, Any], keep_image: "Callable[[str], bool]", seed: int,
                   buffer_size: int, items: "Callable[[Any], Iterable[Any]]", repeat: bool = True) -> Iterator[Any]:
    """``items(sample)`` of every sample whose image id passes ``keep_image``, shuffled.

    Shards are visited in a seeded random order each pass, every item enters a shuffle buffer of
    ``buffer_size``, and a random buffer entry is emitted for each one added. With ``repeat`` the
    stream cycles forever (pass p uses seed + p), so a resumed run skips exactly the items it used."""
    import random

    shards = list(manifest.get("shards") or [])
    epoch = 0
    while True:
        rng = random.Random(seed + epoch)
        order = shards[:]
        rng.shuffle(order)
        buffer: list[Any] = []
        emitted = 0
        for shard in order:
            for sample in iter_features(stage_dir, {**manifest, "shards": [shard]}):
                if not keep_image(str(sample.meta.get("image_id"))):
                    continue
                for item in items(sample):
                    if len(buffer) < buffer_size:
                        buffer.append(item)
                        continue
                    i = rng.randrange(buffer_size)
                    yield buffer[i]
                    emitted += 1
                    buffer[i] = item
        rng.shuffle(buffer)
        emitted += len(buffer)
        yield from buffer
        if not repeat:
            return
        if emitted == 0:
            raise ShardError(f"{stage_dir}: no samples pass the split filter")
        epoch += 1


# ---------------------------------------------------------------- resume records

SHARD_RECORDS = "_shards"  # in an extract stage's work dir: one NNNNNN.json per finished shard


def _record_path(work: Path, index: int) -> Path:
    return Path(work) / SHARD_RECORDS / f"{index:06d}.json"


def shard_record(work: Path, index: int) -> dict[str, Any] | None:
    """The record of a finished shard in an interrupted extract's work dir, or None.

    A shard counts as done only when its tar and its record both exist and agree
    (the record parses, names the tar and gives its exact size). Anything else (a
    tar without a record, a record of another tar, a cut file) is recomputed. The
    sha256 in the record is checked whenever the shards are read."""
    tar, record_path = Path(work) / shard_name(index), _record_path(work, index)
    try:
        record = json.loads(record_path.read_text())
        size = tar.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("name") != tar.name or record.get("bytes") != size \
            or record.get("index") != index:
        return None
    if record.get("channel_sums") and not (Path(work) / SHARD_RECORDS / record["channel_sums"]).is_file():
        return None
    return record


def write_shard_record(work: Path, index: int, record: dict[str, Any]) -> None:
    """Write a shard's record after its tar (fsynced, so a record never outlives its tar's bytes)."""
    path = _record_path(work, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


CHANNEL_SUMS = "channel_sums.npy"  # in a finished extract stage: per split bucket [count, sum x, sum x^2]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard_sums(work: Path, index: int, sums: np.ndarray) -> str:
    """Save one shard's channel sums next to its record (before the record); returns the file name."""
    name = f"{index:06d}.sums.npy"
    (Path(work) / SHARD_RECORDS).mkdir(parents=True, exist_ok=True)
    _save_npy(Path(work) / SHARD_RECORDS / name, sums)
    return name


def merge_channel_sums(work: Path, records: list[dict[str, Any]]) -> str | None:
    """Sum the shards' channel sums into ``CHANNEL_SUMS`` in the work dir (None if a shard has none)."""
    names = [r.get("channel_sums") for r in records]
    if not names or not all(names):
        return None
    total = sum(np.load(Path(work) / SHARD_RECORDS / n, allow_pickle=False) for n in names)
    _save_npy(Path(work) / CHANNEL_SUMS, total)
    return CHANNEL_SUMS


def read_channel_sums(stage_dir: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The per-bucket channel sums an extract stage recorded, or None (stages from before them)."""
    name = manifest.get("channel_sums")
    if not name:
        return None
    path = Path(stage_dir) / name
    try:
        sums = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable channel sums ({exc})") from None
    if sums.ndim != 2 or sums.shape[0] != 100 or sums.dtype != np.float64:
        raise ShardError(f"{path}: channel sums of shape {sums.shape} ({sums.dtype}), expected (100, 1 + 2C) float64")
    return sums


def drop_shard_records(work: Path) -> None:
    """Remove the resume records and any half-written ``*.tmp`` file before the stage commits."""
    import shutil

    shutil.rmtree(Path(work) / SHARD_RECORDS, ignore_errors=True)
    for leftover in Path(work).glob("*.tmp"):
        leftover.unlink()
