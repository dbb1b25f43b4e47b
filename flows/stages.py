"""Stage implementations: content-hashed, resumable, recorded. Plain functions;
``flows.extract`` wraps them as Prefect tasks and flows.

Each stage returns a ``StageResult`` (key, output dir, cached flag, seconds,
manifest). Only paths and hashes cross task boundaries, never tensors.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.config import ConfigError, ExtractConfig, first_line
from pipeline.presets import (PRESETS, ModelLoadError, TinyPreset, is_hub_id, load_model,
                              resolve_hub_snapshot, save_tiny, unknown_model_message)
from storage.home import Home
from storage.shards import shard_name, write_shard
from storage.stages import StageDir, code_version, read_manifest, stage_key

PREPARE_VERSION = "1"
EXTRACT_VERSION = "1"


@dataclass
class StageResult:
    stage: str
    key: str
    path: Path
    cached: bool
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        """For prepare-model: where ``from_pretrained`` reads (the stage dir, or the user's dir)."""
        return Path(self.manifest.get("model_dir") or self.path)


# ---------------------------------------------------------------- prepare-model

def model_spec(model: str) -> tuple[str, dict[str, Any]]:
    """(kind, identity) for a --model string; identity is what the stage key hashes.

    kind is "preset", "local" or "hub". A hub id is resolved to its cached
    snapshot here (one clear line when offline and not cached)."""
    if model in PRESETS:
        return "preset", {"preset": PRESETS[model].to_dict()}
    path = Path(model).expanduser()
    if path.is_dir():
        return "local", {"dir": str(path.resolve()), "files": _dir_fingerprint(path)}
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"cannot load model from {model}: not a directory with config.json")
    if is_hub_id(model):
        snapshot, commit = resolve_hub_snapshot(model)
        return "hub", {"hub_id": model, "commit": commit, "dir": str(snapshot)}
    raise ModelLoadError(unknown_model_message(model))


def _dir_fingerprint(path: Path) -> str:
    """Hash of a model dir: config bytes plus (name, size, mtime) of the weight files."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {path}: no config.json there")
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != "_manifest.json":
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_model_key(model: str) -> tuple[str, str, dict[str, Any]]:
    kind, identity = model_spec(model)
    return stage_key("prepare-model", PREPARE_VERSION, identity, {}), kind, identity


def prepare_model(home: Home, model: str) -> StageResult:
    """Build (preset) or register (local dir / hub snapshot) a model; cached by content hash."""
    t0 = time.perf_counter()
    key, kind, identity = prepare_model_key(model)
    sd = StageDir(home, "prepare-model", key)
    if sd.is_complete():
        return StageResult("prepare-model", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete():
            return StageResult("prepare-model", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin()
        manifest: dict[str, Any] = {"model": model, "kind": kind, "identity": identity,
                                    "code_version": code_version(), "stage_version": PREPARE_VERSION}
        from pipeline.presets import describe, load_config

        if kind == "preset":
            preset = TinyPreset.from_dict(identity["preset"])
            save_tiny(preset, work)
            manifest["model_dir"] = None  # the stage dir itself
            loaded, _ = load_model(work)  # proves from_pretrained reads what we saved
            manifest["describe"] = describe(loaded)
        else:
            # A user's model (7B on a GPU box): check config + processor load, not the weights.
            from transformers import AutoProcessor

            manifest["model_dir"] = identity["dir"]
            manifest["describe"] = describe(load_config(identity["dir"]))
            try:
                AutoProcessor.from_pretrained(identity["dir"], backend="pil")
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot load the processor of {model}: {first_line(exc)}") from None
        manifest["seconds"] = time.perf_counter() - t0
        path = sd.commit(manifest)
    return StageResult("prepare-model", key, path, False, time.perf_counter() - t0, read_manifest(path))


# ---------------------------------------------------------------- extract

_MODEL_CACHE: dict[str, tuple[Any, Any]] = {}


def cached_model(model_dir: str):
    """Load each model once per process (shard tasks share it), on CUDA in fp16 when available."""
    if model_dir not in _MODEL_CACHE:
        from pipeline.presets import default_device

        _MODEL_CACHE.clear()
        device, dtype = default_device()
        _MODEL_CACHE[model_dir] = load_model(model_dir, dtype=dtype, device=device)
    return _MODEL_CACHE[model_dir]


@dataclass(frozen=True)
class ExtractPlan:
    """Everything an extract run needs, derivable from (model stage, config)."""

    key: str
    model_key: str
    model_dir: str
    source_fingerprint: str
    config: ExtractConfig
    n_items: int

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_items // self.config.shard_size))

    def shard_items(self, index: int) -> tuple[int, int]:
        size = self.config.shard_size
        return index * size, min((index + 1) * size, self.n_items)


def plan_extract(model_stage: StageResult, config: ExtractConfig) -> ExtractPlan:
    from pipeline.images import open_source

    source = open_source(config.images, seed=config.seed)
    items = source.items(config.limit)
    if not items:
        raise ConfigError(f"image source {config.images!r} yields no images")
    fingerprint = source.fingerprint(limit=config.limit)
    from pipeline.presets import default_device

    # Features computed on CUDA in fp16 differ from CPU fp32 ones, so where they ran is an input.
    key = stage_key("extract", EXTRACT_VERSION, config.cache_relevant(),
                    {"model": model_stage.key, "images": fingerprint, "compute": "-".join(default_device())})
    return ExtractPlan(key, model_stage.key, str(model_stage.model_dir), fingerprint, config, len(items))


def shard_done(work: Path, index: int) -> bool:
    return (work / shard_name(index)).is_file() and (work / "_shards" / f"{index:06d}.json").is_file()


def extract_shard(home: Home, plan: ExtractPlan, index: int,
                  on_images: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compute and write one shard into the stage's work dir; return its record.

    The shard record (``_shards/NNNNNN.json``: counts, skipped files, sha256) is
    written after the tar; a shard with both is done and is returned without
    model work when an interrupted run resumes."""
    from pipeline.extract import FeatureExtractor, glyph_mask
    from pipeline.images import BadImage, open_source

    sd = StageDir(home, "extract", plan.key)
    work = sd.tmp
    record_path = work / "_shards" / f"{index:06d}.json"
    if shard_done(work, index):
        return json.loads(record_path.read_text())
    t0 = time.perf_counter()
    cfg = plan.config
    lo, hi = plan.shard_items(index)
    items = open_source(cfg.images, seed=cfg.seed).items(cfg.limit)[lo:hi]
    model, processor = cached_model(plan.model_dir)
    fx = FeatureExtractor(model, processor, crops=cfg.crops)
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
            feats = fx([li.image for _, li in loaded])
            tower_seconds += time.perf_counter() - t1
            for (item, li), feat in zip(loaded, feats):
                w, h = li.image.size
                layout = fx.layout(w, h)
                boxes = layout.boxes[:feat.shape[0]]
                meta = {"image_id": item.image_id, "index": item.index, "source": item.source,
                        "size": [w, h], "grid": list(layout.grid), "crops": int(feat.shape[0]),
                        "boxes": [[round(v, 3) for v in b] for b in boxes],
                        "glyph_mask": None if li.glyph_boxes is None else
                        glyph_mask(boxes, fx.side, li.glyph_boxes).astype(int).tolist(),
                        "n_glyphs": None if li.glyph_boxes is None else len(li.glyph_boxes)}
                samples.append((f"s{item.index:09d}", feat.astype(cfg.dtype), meta))
        if on_images:
            on_images(len(batch))
    info = {"index": index, "images": len(items), "samples": len(samples), "skipped": skipped,
            "tower_seconds": tower_seconds, "seconds": 0.0, "device": str(next(model.parameters()).device),
            "tokens_per_crop": fx.tokens_per_crop, "feature_dim": fx.feature_dim}
    # The tar lands first, its record second; a shard counts as done only with both.
    (work / "_shards").mkdir(parents=True, exist_ok=True)
    written = write_shard(work / shard_name(index), samples)
    info.update(sha256=written["sha256"], bytes=written["bytes"], name=written["name"],
                seconds=time.perf_counter() - t0)
    tmp_record = record_path.with_name(record_path.name + ".tmp")
    tmp_record.write_text(json.dumps(info, sort_keys=True))
    tmp_record.replace(record_path)
    return info


def finish_extract(home: Home, plan: ExtractPlan, records: list[dict[str, Any]], seconds: float,
                   resumed_shards: int = 0) -> StageResult:
    """Write the manifest (last) and move the stage into place."""
    import shutil

    sd = StageDir(home, "extract", plan.key)
    records = sorted(records, key=lambda r: r["index"])
    samples = sum(r["samples"] for r in records)
    if samples == 0:
        shutil.rmtree(sd.tmp, ignore_errors=True)
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
        "features": {"dtype": plan.config.dtype, "tokens_per_crop": records[0]["tokens_per_crop"],
                     "feature_dim": records[0]["feature_dim"], "layout": "crops x tokens_per_crop x feature_dim"},
        "shards": [{"name": r["name"], "count": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                   for r in records],
        "seconds": seconds,
        "resumed_shards": resumed_shards,
        "shard_seconds": work_seconds,
        "tower_seconds": tower,
        "images_per_second": images / work_seconds if work_seconds > 0 else None,
        "device": records[0].get("device"),
    }
    shutil.rmtree(sd.tmp / "_shards", ignore_errors=True)
    for leftover in sd.tmp.glob("*.tmp"):
        leftover.unlink()
    path = sd.commit(manifest)
    return StageResult("extract", plan.key, path, False, seconds, read_manifest(path))


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)
