"""The extract stage: vision-encoder features of an image source in WebDataset shards.

Output ``stages/extract/<key>/feats-NNNNNN.tar``: per image ``feat.npy`` (fp16,
crops x L x C: the tensor LLaVA-NeXT feeds its projector) and a ``json`` (image
id, size, crop grid and boxes, glyph mask for synthetic documents). A family without
crops (Qwen-VL) stores 1 x L x C' per image, L varying, with its merged-token grid
(rows, cols) in the json (``pipeline.extract.GridFeatureExtractor``; the manifest's
``features.grid`` is ``dynamic`` and it names no fixed L). The key
hashes the model stage, the image source's fingerprint, the cache-relevant
config and where it ran (CUDA fp16 features differ from CPU fp32 ones).

The work unit is one shard (:func:`extract_shard`); the stage maps the missing
ones through its ``mapper``. Each process loads the model's vision tower alone,
once (``pipeline.loading.cached_tower``): no LM or projector weight is read. A
finished shard has a resume record (``storage.shards.shard_record``), so an
interrupted run recomputes only the rest.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ConfigError, ExtractConfig
from pipeline.loading import cached_tower
from storage.home import Home
from storage.shards import (drop_shard_records, merge_channel_sums, shard_name, shard_record, write_shard,
                            write_shard_record, write_shard_sums)
from storage.stages import StageDir, StageResult, code_version, run_stage, stage_key

from ..present import progress
from . import Mapper, serial

EXTRACT_VERSION = "1"


@dataclass(frozen=True)
class ExtractPlan:
    """Everything an extract run needs, derivable from (model stage, config)."""

    key: str
    model_key: str
    model_dir: str
    source_fingerprint: str
    config: ExtractConfig
    n_items: int
    device: str = "cpu"              # resolved --device and --dtype the tower runs in
    dtype: str = "float32"

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_items // self.config.shard_size))

    def shard_items(self, index: int) -> tuple[int, int]:
        size = self.config.shard_size
        return index * size, min((index + 1) * size, self.n_items)


def plan_extract(model_stage: StageResult, config: ExtractConfig, source=None) -> ExtractPlan:
    """The plan of an extraction; ``source`` (an open ImageSource of ``config.images``) saves a rescan."""
    from pipeline.device import compute
    from pipeline.images import open_source

    source = source or open_source(config.images, seed=config.seed)
    items = source.items(config.limit)
    if not items:
        raise ConfigError(f"image source {config.images!r} yields no images")
    fingerprint = source.fingerprint(limit=config.limit)
    device, dtype = compute(config.device, config.model_dtype)
    # Features computed on CUDA in bf16 differ from CPU fp32 ones, so where they ran is an input.
    key = stage_key("extract", EXTRACT_VERSION, config.cache_relevant(),
                    {"model": model_stage.key, "images": fingerprint, "compute": f"{device}-{dtype}"})
    return ExtractPlan(key, model_stage.key, str(model_stage.model_dir), fingerprint, config, len(items),
                       device, dtype)


def extract_shard(home: str | Home, plan: ExtractPlan, index: int, items: list | None = None,
                  on_images: Callable[[int], None] | None = progress.advance) -> dict[str, Any]:
    """Compute and write one shard into the stage's work dir; return its record.

    ``items`` are the shard's ImageItems (the stage passes them so a folder is
    scanned once; without them they are listed again). The shard record
    (``_shards/NNNNNN.json``: counts, skipped files, sha256) is written after the
    tar and the shard's channel sums; a shard with all three is done and is
    returned without model work when an interrupted run resumes."""
    from pipeline.extract import ChannelSums, feature_extractor
    from pipeline.images import BadImage, open_source

    home = Home.resolve(home)
    work = StageDir(home, "extract", plan.key).tmp
    done = shard_record(work, index)
    if done is not None:
        return done
    t0 = time.perf_counter()
    cfg = plan.config
    lo, hi = plan.shard_items(index)
    if items is None:
        items = open_source(cfg.images, seed=cfg.seed).items(cfg.limit)[lo:hi]
    tower, processor = cached_tower(plan.model_dir, plan.device, plan.dtype)  # the vision tower alone: no LM read
    fx = feature_extractor(tower, processor, crops=cfg.crops, qwen_features=cfg.qwen_features)
    dynamic = getattr(fx, "grid_kind", None) == "dynamic"
    sums = ChannelSums(fx.feature_dim)  # so the train stage needs no second pass over the shards
    samples: list[tuple[str, Any, dict[str, Any]]] = []
    skipped: list[dict[str, str]] = []
    tower_seconds = 0.0
    for start in range(0, len(items), cfg.batch_size):
        batch, loaded = items[start:start + cfg.batch_size], []
        for item in batch:
            try:
                loaded.append((item, item.load()))
            except BadImage as exc:
                skipped.append({"image_id": item.image_id, "reason": str(exc)})
                _warn(f"skipped {exc}")
        if loaded:
            t1 = time.perf_counter()
            feats = fx.encode([li.image for _, li in loaded]) if dynamic else fx([li.image for _, li in loaded])
            tower_seconds += time.perf_counter() - t1
            for (item, li), feat in zip(loaded, feats):
                meta = _grid_meta(item, li, feat) if dynamic else _crop_meta(fx, item, li, feat)
                stored = (feat.features if dynamic else feat).astype(cfg.dtype)
                samples.append((f"s{item.index:09d}", stored, meta))
                sums.add(str(item.image_id), stored)
        if on_images:
            on_images(len(batch))
    info = {"index": index, "images": len(items), "samples": len(samples), "skipped": skipped,
            "tower_seconds": tower_seconds, "seconds": 0.0, "device": str(next(tower.parameters()).device),
            "tokens_per_crop": fx.tokens_per_crop, "feature_dim": fx.feature_dim}
    if dynamic:  # L follows each image: the record says so instead of a fixed tokens_per_crop
        info.update(grid="dynamic", qwen_features=fx.features)
    # The tar lands first, its record second; a shard counts as done only with both.
    written = write_shard(work / shard_name(index), samples)
    info.update(sha256=written["sha256"], bytes=written["bytes"], name=written["name"],
                channel_sums=write_shard_sums(work, index, sums.array), seconds=time.perf_counter() - t0)
    write_shard_record(work, index, info)
    return info


def _crop_meta(fx, item, li, feat) -> dict[str, Any]:
    """A fixed-crop family's sample json: image size, AnyRes crop grid and boxes, per-crop glyph mask."""
    from pipeline.extract import glyph_mask

    w, h = li.image.size
    layout = fx.layout(w, h)
    boxes = layout.boxes[:feat.shape[0]]
    return {"image_id": item.image_id, "index": item.index, "source": item.source,
            "size": [w, h], "grid": list(layout.grid), "crops": int(feat.shape[0]),
            "boxes": [[round(v, 3) for v in b] for b in boxes],
            "glyph_mask": None if li.glyph_boxes is None else
            glyph_mask(boxes, fx.side, li.glyph_boxes, fx.span).astype(int).tolist(),
            "n_glyphs": None if li.glyph_boxes is None else len(li.glyph_boxes)}


def _grid_meta(item, li, feat) -> dict[str, Any]:
    """A dynamic-grid family's sample json (Qwen-VL): ``grid`` the (rows, cols) of merged tokens in raster order
    (L = rows * cols), ``thw`` the tower's patch grid, one crop: the whole image, and the per-token glyph mask."""
    from pipeline.extract import grid_glyph_mask

    w, h = li.image.size
    rows, cols = feat.grid
    return {"image_id": item.image_id, "index": item.index, "source": item.source,
            "size": [w, h], "grid": [rows, cols], "thw": list(feat.thw), "crops": 1, "tokens": rows * cols,
            "boxes": [[0.0, 0.0, float(w), float(h)]],
            "glyph_mask": None if li.glyph_boxes is None else
            grid_glyph_mask(w, h, rows, cols, li.glyph_boxes).astype(int).tolist(),
            "n_glyphs": None if li.glyph_boxes is None else len(li.glyph_boxes)}


def extract(home: Home, config: ExtractConfig, model_stage: StageResult, *, force: bool = False,
            mapper: Mapper = serial) -> StageResult:
    """Features of ``config.images`` under the model of ``model_stage``, one unit per missing shard.

    ``force`` recomputes every shard (``atr run --from extract``)."""
    from pipeline.images import open_source

    t0 = time.perf_counter()
    source = open_source(config.images, seed=config.seed)
    plan = plan_extract(model_stage, config, source)

    def build(work: Path) -> dict[str, Any]:
        items = source.items(config.limit)  # the scan plan_extract made, not a new one
        done = [shard_record(work, i) is not None for i in range(plan.n_shards)]
        remote = getattr(mapper, "remote", False)  # units in other processes advance no bar here
        with progress.bar(f"extract {config.images}", total=plan.n_items) as bar:
            def images(i: int) -> int:
                lo, hi = plan.shard_items(i)
                return hi - lo

            bar.advance(sum(images(i) for i in range(plan.n_shards) if done[i]))

            def advance(i: int, _record: dict) -> None:
                if remote and not done[i]:  # in-process units advance the bar per batch themselves
                    bar.advance(images(i))

            calls = [{"home": str(home.root), "plan": plan, "index": i, "items": items[slice(*plan.shard_items(i))]}
                     for i in range(plan.n_shards)]
            records = mapper(extract_shard, calls, [shard_key(plan, i) for i in range(plan.n_shards)], advance)
        return extract_manifest(work, plan, records, time.perf_counter() - t0, resumed_shards=sum(done))

    return run_stage(home, "extract", plan.key, build, force=force)


def shard_key(plan: ExtractPlan, index: int) -> str:
    """The cache key of one shard (its Prefect task's key)."""
    return f"{plan.key}-{index:06d}"


def extract_figures(result: StageResult) -> dict[str, float | None]:
    """MLflow figures of an extract stage (images/s only when it computed)."""
    m = result.manifest
    return {"images_per_second": m.get("images_per_second") if not result.cached else None,
            "samples": m["counts"]["samples"], "skipped": m["counts"]["skipped"]}


def extract_manifest(work: Path, plan: ExtractPlan, records: list[dict[str, Any]], seconds: float,
                     resumed_shards: int = 0) -> dict[str, Any]:
    """The manifest of a finished extraction; drops the shard resume records from ``work``.

    Every image skipped: nothing is left behind and the error names the source."""
    records = sorted(records, key=lambda r: r["index"])
    samples = sum(r["samples"] for r in records)
    if samples == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise ConfigError(f"extraction of {plan.config.images!r} produced no samples: every image was skipped")
    skipped = [s for r in records for s in r["skipped"]]
    images = sum(r["images"] for r in records)
    tower = sum(r["tower_seconds"] for r in records)
    work_seconds = sum(r["seconds"] for r in records)
    manifest = {
        "config": plan.config.to_dict(),
        "inputs": {"model": plan.model_key, "images": plan.source_fingerprint},
        "model_dir": plan.model_dir,
        "code_version": code_version(),
        "stage_version": EXTRACT_VERSION,
        "counts": {"images": images, "samples": samples, "skipped": len(skipped), "shards": len(records)},
        "skipped": skipped,
        "features": _features_entry(plan, records[0]),
        "shards": [{"name": r["name"], "count": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                   for r in records],
        "seconds": seconds,
        "resumed_shards": resumed_shards,
        "shard_seconds": work_seconds,
        "tower_seconds": tower,
        "images_per_second": images / work_seconds if work_seconds > 0 else None,
        "device": records[0].get("device"),
        "compute": {"device": plan.device, "dtype": plan.dtype},
        "channel_sums": merge_channel_sums(work, records),
    }
    drop_shard_records(work)
    return manifest


def _features_entry(plan: ExtractPlan, record: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``features``: dtype, L and C for fixed crops; for a dynamic-grid family (Qwen-VL) no
    ``tokens_per_crop`` (so the reader checks no fixed L), ``grid`` dynamic and which features were taken."""
    if record.get("grid") == "dynamic":
        return {"dtype": plan.config.dtype, "feature_dim": record["feature_dim"], "grid": "dynamic",
                "qwen_features": record["qwen_features"],
                "layout": "1 x L x feature_dim per image, L = rows x cols of its json's grid (raster order)"}
    return {"dtype": plan.config.dtype, "tokens_per_crop": record["tokens_per_crop"],
            "feature_dim": record["feature_dim"], "layout": "crops x tokens_per_crop x feature_dim"}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
