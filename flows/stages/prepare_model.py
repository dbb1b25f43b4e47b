"""The prepare-model stage: build a preset, train (or copy the shipped) tiny-trained, or register a user's model.

Output ``stages/prepare-model/<key>/``: the ``save_pretrained`` files of a preset
or a trained preset (with ``provenance.json``), or just a manifest pointing at a
user's local directory or hub snapshot (``model_dir``). The key hashes the
model's identity: a preset's config, tiny-trained's whole training config, a
local directory's fingerprint, a hub id and commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pipeline
from pipeline.config import ConfigError
from pipeline.builders import save_shape, save_sized, save_tiny
from pipeline.loading import ModelLoadError, is_hub_id, load_model, resolve_hub_snapshot
from pipeline.presets import PRESETS, SHAPE_PRESETS, SIZED_PRESETS, TRAINED_PRESETS, unknown_model_message
from storage.home import Home
from storage.stages import StageResult, code_version, run_stage, stage_key

PREPARE_VERSION = "1"
# Checkpoints shipped with the package (pipeline/assets/<name>/: save_pretrained files + provenance.json).
SHIPPED_MODELS = Path(pipeline.__file__).resolve().parent / "assets"
PROVENANCE = "provenance.json"
SHIPPED_LIMIT_BYTES = 10 * 1024 * 1024


def model_spec(model: str, tiny_world: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(kind, identity) for a --model string; identity is what the stage key hashes.

    kind is "trained" (a preset trained in-project, e.g. tiny-trained; its
    identity is the full training config, so a changed config retrains),
    "preset", "sized" (real dimensions, config only), "shape" (real shapes, one LM layer, saved
    weights), "local" or "hub". A hub id is resolved to its cached snapshot here
    (one clear line when offline and not cached)."""
    if tiny_world is not None and model not in TRAINED_PRESETS:
        raise ConfigError(f"training options (--retrain, --seed, --steps) apply only to "
                          f"{', '.join(TRAINED_PRESETS)}, not to {model!r}")
    if model in TRAINED_PRESETS:
        from pipeline.synthetic import generator_fingerprint
        from pipeline.tinyworld import TRAINED_CONFIGS

        config = TRAINED_CONFIGS[model]
        cfg = config.from_dict(tiny_world) if tiny_world is not None else config()
        # the training data also depends on the renderer and its DejaVu font files
        return "trained", {"tiny_world": cfg.to_dict(), "data": generator_fingerprint()}
    if model in PRESETS:
        return "preset", {"preset": PRESETS[model].to_dict()}
    if model in SIZED_PRESETS:
        return "sized", {"sized": SIZED_PRESETS[model].to_dict()}
    if model in SHAPE_PRESETS:
        return "shape", {"shape": SHAPE_PRESETS[model].to_dict()}
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


def prepare_model(home: Home, model: str, tiny_world: dict[str, Any] | None = None, *, retrain: bool = False,
                  force: bool = False, on_progress: Callable[[str, int, int, dict], None] | None = None) -> StageResult:
    """Build (preset), train (tiny-trained) or register (local dir / hub snapshot) ``model``.

    The config is ``model`` plus, for tiny-trained, its training config ``tiny_world``
    (None: the default). ``retrain`` rebuilds a trained preset from scratch even when
    the stage or a shipped checkpoint exists. ``force`` (``atr run --from
    prepare-model``) redoes the stage but still copies a matching shipped checkpoint."""
    t0 = time.perf_counter()
    key, kind, identity = prepare_model_key(model, tiny_world)

    def build(work: Path) -> dict[str, Any]:
        manifest: dict[str, Any] = {"model": model, "kind": kind, "identity": identity,
                                    "code_version": code_version(), "stage_version": PREPARE_VERSION}
        from pipeline.loading import check_processor, describe, load_model_config

        if kind == "trained":
            for f in work.iterdir():  # nothing from an interrupted run is reused: training is one piece
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            manifest.update(_trained_model(model, identity, work, retrain, on_progress))
            manifest["model_dir"] = None
            loaded, _ = load_model(work)
            manifest["describe"] = describe(loaded)
        elif kind == "preset":
            preset = type(PRESETS[model]).from_dict(identity["preset"])  # its family's preset class
            save_tiny(preset, work)
            manifest["model_dir"] = None  # the stage dir itself
            loaded, _ = load_model(work)  # proves from_pretrained reads what we saved
            manifest["describe"] = describe(loaded)
        elif kind == "shape":
            # Real shapes, one LM layer, random weights saved in the llava-hf layout: a local checkpoint.
            for f in work.iterdir():  # a half-written shard of an interrupted run is never reused
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            save_shape(type(SHAPE_PRESETS[model]).from_dict(identity["shape"]), work)
            manifest["model_dir"] = None
            manifest["describe"] = describe(load_model_config(work))
            manifest["weights_bytes"] = sum(f.stat().st_size for f in work.glob("*.safetensors"))
            check_processor(work, model)
        elif kind == "sized":
            # Real dimensions, random weights: config + processor only, materialized where it runs.
            save_sized(type(SIZED_PRESETS[model]).from_dict(identity["sized"]), work)
            manifest["model_dir"] = None
            manifest["describe"] = describe(load_model_config(work))
            check_processor(work, model)
        else:
            # A user's model (7B on a GPU box): check config + processor load, not the weights.
            manifest["model_dir"] = identity["dir"]
            manifest["describe"] = describe(load_model_config(identity["dir"]))
            check_processor(identity["dir"], model)
        manifest["seconds"] = time.perf_counter() - t0
        return manifest

    # A forced or retrained run resumes nothing (fresh=False keeps the old behaviour: training clears
    # the work dir itself; a preset overwrites its files).
    return run_stage(home, "prepare-model", key, build, force=retrain or force, fresh=False)


def model_stage(home: Home, key: str) -> StageResult:
    """The complete prepare-model stage ``key`` (what a task on another process receives)."""
    from storage.stages import StageDir

    sd = StageDir(home, "prepare-model", key)
    return StageResult("prepare-model", key, sd.path, True, 0.0, sd.manifest())


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
    from pipeline.tinyworld import TRAINED_CONFIGS, code_hash, quality_card, restore_stock, train_tiny_world

    cfg = TRAINED_CONFIGS[model].from_dict(identity["tiny_world"])
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
    from pipeline.device import torch_facts

    trained, processor, metrics = train_tiny_world(cfg, progress=on_progress)
    t_eval = time.perf_counter()
    card = quality_card(trained, processor, n=cfg.eval_samples, data_seed=cfg.data_seed,
                        random_seeds=cfg.eval_seeds, progress=on_progress)
    metrics["eval_seconds"] = time.perf_counter() - t_eval
    restore_stock(trained, processor)  # OneVision trains and is carded with interpolation off; ships stock
    trained.save_pretrained(work)
    processor.save_pretrained(work)
    prov = {"model": model, "config": cfg.to_dict(), "config_hash": cfg.hash(), "code_hash": now_code,
            "data": identity.get("data"), "metrics": metrics, "quality": card, **torch_facts(), "code_version": code_version()}
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
