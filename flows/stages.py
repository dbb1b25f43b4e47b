"""Stage implementations: content-hashed, resumable, recorded. Plain functions;
``flows.extract`` wraps them as Prefect tasks and flows.

Each stage returns a ``StageResult`` (key, output dir, cached flag, seconds,
manifest). Only paths and hashes cross task boundaries, never tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pipeline
from pipeline.config import ConfigError, ExtractConfig, first_line
from pipeline.presets import (PRESETS, TRAINED_PRESETS, ModelLoadError, TinyPreset, is_hub_id, load_model,
                              resolve_hub_snapshot, save_tiny, unknown_model_message)
from storage.home import Home
from storage.shards import shard_name, write_shard
from storage.stages import StageDir, code_version, read_manifest, stage_key, write_json_atomic

PREPARE_VERSION = "1"
# Checkpoints shipped with the package (pipeline/assets/<name>/: save_pretrained files + provenance.json).
SHIPPED_MODELS = Path(pipeline.__file__).resolve().parent / "assets"
PROVENANCE = "provenance.json"
SHIPPED_LIMIT_BYTES = 10 * 1024 * 1024
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

def model_spec(model: str, tiny_world: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, identity) for a --model string; identity is what the stage key hashes.

    kind is "trained" (a preset trained in-project, e.g. tiny-trained; its
    identity is the full training config, so a changed config retrains),
    "preset", "local" or "hub". A hub id is resolved to its cached snapshot here
    (one clear line when offline and not cached)."""
    if tiny_world is not None and model not in TRAINED_PRESETS:
        raise ConfigError(f"training options (--retrain, --seed, --steps) apply only to "
                          f"{', '.join(TRAINED_PRESETS)}, not to {model!r}")
    if model in TRAINED_PRESETS:
        from pipeline.tinyworld import TinyWorldConfig

        cfg = TinyWorldConfig.from_dict(tiny_world) if tiny_world is not None else TinyWorldConfig()
        return "trained", {"tiny_world": cfg.to_dict()}
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


def prepare_model_key(model: str, tiny_world: dict[str, Any] | None = None) -> tuple[str, str, dict[str, Any]]:
    kind, identity = model_spec(model, tiny_world)
    return stage_key("prepare-model", PREPARE_VERSION, identity, {}), kind, identity


def prepare_model(home: Home, model: str, tiny_world: dict[str, Any] | None = None, retrain: bool = False,
                  on_progress: Callable[[str, int, int, dict], None] | None = None,
                  force: bool = False) -> StageResult:
    """Build (preset), train (tiny-trained) or register (local dir / hub snapshot) a model.

    Cached by content hash. ``retrain`` rebuilds a trained preset from scratch even
    when the stage or a shipped checkpoint exists. ``force`` (``atr run --from
    prepare-model``) redoes the stage but still copies a matching shipped checkpoint."""
    t0 = time.perf_counter()
    key, kind, identity = prepare_model_key(model, tiny_world)
    sd = StageDir(home, "prepare-model", key)
    if sd.is_complete() and not (retrain or force):
        return StageResult("prepare-model", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete() and not (retrain or force):
            return StageResult("prepare-model", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin()
        manifest: dict[str, Any] = {"model": model, "kind": kind, "identity": identity,
                                    "code_version": code_version(), "stage_version": PREPARE_VERSION}
        from pipeline.presets import describe, load_config

        if kind == "trained":
            for f in work.iterdir():  # nothing from an interrupted run is reused: training is one piece
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            manifest.update(_trained_model(model, identity, work, retrain, on_progress))
            manifest["model_dir"] = None
            loaded, _ = load_model(work)
            manifest["describe"] = describe(loaded)
        elif kind == "preset":
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


def shipped_model_dir(model: str) -> Path:
    return SHIPPED_MODELS / model


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None


def _trained_model(model: str, identity: dict[str, Any], work: Path, retrain: bool,
                   on_progress: Callable[[str, int, int, dict], None] | None) -> dict[str, Any]:
    """Copy the shipped checkpoint when its training config matches; else train and evaluate."""
    from pipeline.tinyworld import TinyWorldConfig, code_hash, quality_card, train_tiny_world

    cfg = TinyWorldConfig.from_dict(identity["tiny_world"])
    shipped = shipped_model_dir(model)
    prov = read_provenance(shipped)
    now_code = code_hash()
    if not retrain and prov is not None and prov.get("config_hash") == cfg.hash():
        for f in sorted(shipped.iterdir()):
            if f.is_file():
                shutil.copy2(f, work / f.name)
        # The config hash decides (a changed config retrains). The code hash is recorded, not
        # enforced: an edited comment changes it too; TINYWORLD_VERSION is bumped for real changes.
        return {"source": "shipped", "shipped_from": str(shipped), "provenance": prov,
                "quality": prov.get("quality", []), "code_hash_now": now_code,
                "code_hash_matches": prov.get("code_hash") == now_code}
    import torch

    trained, processor, metrics = train_tiny_world(cfg, progress=on_progress)
    t_eval = time.perf_counter()
    card = quality_card(trained, processor, n=cfg.eval_samples, data_seed=cfg.data_seed,
                        random_seeds=cfg.eval_seeds, progress=on_progress)
    metrics["eval_seconds"] = time.perf_counter() - t_eval
    trained.save_pretrained(work)
    processor.save_pretrained(work)
    prov = {"model": model, "config": cfg.to_dict(), "config_hash": cfg.hash(), "code_hash": now_code,
            "metrics": metrics, "quality": card, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "code_version": code_version()}
    (work / PROVENANCE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    out = {"source": "trained", "provenance": prov, "quality": card, "metrics": metrics}
    old = read_provenance(shipped)
    if old is not None and old.get("config_hash") == cfg.hash():
        same = _same_weights(shipped, work)
        out["matches_shipped"] = same
    return out


def _same_weights(a: Path, b: Path) -> bool:
    """Byte-equal safetensors weights (the retrain-reproduces-the-shipped-checkpoint check)."""
    files = sorted(p.name for p in Path(a).glob("*.safetensors"))
    return bool(files) and all((Path(a) / f).read_bytes() == (Path(b) / f).read_bytes() for f in files) and \
        files == sorted(p.name for p in Path(b).glob("*.safetensors"))


def export_model(model_dir: Path, out: Path) -> Path:
    """Copy a trained model dir (weights, processor, provenance) to ``out`` for shipping.

    Refuses a model without provenance or over the 10 MB shipping limit; writes
    ``out.tmp`` and renames, so ``out`` is never half-written."""
    model_dir, out = Path(model_dir), Path(out)
    if read_provenance(model_dir) is None:
        raise ConfigError(f"{model_dir} has no {PROVENANCE}: only a trained preset can be exported")
    files = [f for f in sorted(model_dir.iterdir()) if f.is_file() and f.name != "_manifest.json"]
    size = sum(f.stat().st_size for f in files)
    if size > SHIPPED_LIMIT_BYTES:
        raise ConfigError(f"{model_dir} holds {size / 2**20:.1f} MiB; the shipping limit is "
                          f"{SHIPPED_LIMIT_BYTES / 2**20:.0f} MiB")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- synthetic benchmarks

BENCHMARK_VERSION = "1"


def synthetic_benchmark(home: Home, name: str, split: str, n: int, seed: int = 0) -> Path:
    """``<name>-<split>.parquet`` (lmms-lab layout) in a content-hashed stage dir; cached."""
    from pipeline.synthetic import BENCHMARKS, GENERATOR_VERSION, SPLITS, generate
    from storage.benchmarks import write_parquet

    if name not in BENCHMARKS:
        raise ConfigError(f"unknown synthetic benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    config = {"benchmark": name, "split": split, "n": n, "seed": seed, "generator": GENERATOR_VERSION}
    key = stage_key("benchmark", BENCHMARK_VERSION, config, {})
    sd = StageDir(home, "benchmark", key)
    filename = f"{name}-{split}.parquet"
    if not sd.is_complete():
        with sd.lock():
            if not sd.is_complete():
                t0 = time.perf_counter()
                work = sd.begin()
                write_parquet((s.row() for s in generate(name, split, n, seed=seed)), work / filename)
                sd.commit({"config": config, "file": filename, "rows": n, "code_version": code_version(),
                           "seconds": time.perf_counter() - t0})
    return sd.path / filename


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
    """A shard of an interrupted run counts as done only when its tar and its record
    both exist and agree (the record parses, names the tar and gives its exact size).
    Anything else (a tar without a record, a record of another tar, a cut file) is
    recomputed. The sha256 in the record is checked whenever the shards are read."""
    return _shard_record(work, index) is not None


def _shard_record(work: Path, index: int) -> dict[str, Any] | None:
    tar, record_path = work / shard_name(index), work / "_shards" / f"{index:06d}.json"
    try:
        record = json.loads(record_path.read_text())
        size = tar.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("name") != tar.name or record.get("bytes") != size \
            or record.get("index") != index:
        return None
    return record


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
    done = _shard_record(work, index)
    if done is not None:
        return done
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
    write_json_atomic(record_path, info)  # fsynced, so a record never outlives its tar's bytes
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
