"""The train stage: selector(s) trained on feature shards, then held-out evaluation.

Output ``stages/train/<key>/``:
  selector-p0.25.safetensors + .json   one checkpoint per retention p
  curves-p0.25.json                    logged training metrics
  selector_metrics.json / .png         held-out selector vs random vs uniform grid
  _manifest.json
While running, ``last-p0.25.safetensors`` (+ .json) holds the latest resumable
state (weights, AdamW moments, step, RNG); a killed run resumes from it.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from prefect import flow, task

from pipeline.config import ConfigError, ExtractConfig
from pipeline.selector_eval import evaluate
from pipeline.train import (Callback, TrainConfig, Trainer, TrainingDiverged, batched, channel_statistics, is_held_out,
                            selector_from_tensors, selector_tensors)
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.home import Home
from storage.loader import feature_loader
from storage.shards import ShardError, iter_features
from storage.stages import StageDir, code_version, find_stage, read_manifest, stage_key, write_json_atomic

from . import progress
from .extract import _key_from_params, _result, _result_dict, run_extract, run_prepare_model
from .records import RunRecorder
from .stages import StageResult

TRAIN_VERSION = "2"  # 2: crops read through DataLoader workers (another crop order)
EVAL_MAX_CROPS = 2048

# The embedded default (tiny preset on 2 CPUs) shortens the paper-scale schedule of
# DESIGN.md (lr 1e-4, 2000 steps, batch 64) so training fits in about 2 minutes.
# It applies when the features come from a tiny preset and the user set none of these.
TINY_SCHEDULE = {"steps": 700, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50}


def checkpoint_name(retention: float) -> str:
    return f"selector-p{retention:g}"


def train_key(features: StageResult, cfg: TrainConfig) -> str:
    return stage_key("train", TRAIN_VERSION, cfg, {"features": features.key})


class _Progress(Callback):
    def __init__(self, label: str):
        self.label = label

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        progress.describe(f"{self.label} loss {metrics['loss']:.4f} mse {metrics['mse']:.4f} "
                          f"keep {metrics['keep']:.2f}")


class _Curves(Callback):
    def __init__(self, path: Path):
        self.path, self.rows = path, (json.loads(path.read_text()) if path.is_file() else [])

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})

    def on_checkpoint(self, step: int, trainer: Trainer) -> None:
        write_json_atomic(self.path, self.rows)

    def on_end(self, step: int, trainer: Trainer) -> None:
        write_json_atomic(self.path, self.rows)


class _Resumable(Callback):
    """Periodic resumable state in the stage's work dir."""

    def __init__(self, path: Path):
        self.path = path

    def on_checkpoint(self, step: int, trainer: Trainer) -> None:
        tensors, meta = trainer.state()
        save_checkpoint(self.path, tensors, meta)


class MlflowCurves(Callback):
    """Training curves to an MLflow run (attached here in flows/, never in pipeline/)."""

    def __init__(self, tracker, run_id: str, prefix: str):
        self.tracker, self.run_id, self.prefix = tracker, run_id, prefix

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step)


def _in_train_split(percent: int, image_id: str) -> bool:
    return not is_held_out(image_id, percent)


def _split_crops(stage_dir: Path, manifest: dict, held_out: bool, percent: int, limit: int | None = None):
    n = 0
    for sample in iter_features(stage_dir, manifest):
        if is_held_out(str(sample.meta.get("image_id")), percent) != held_out:
            continue
        glyphs = sample.meta.get("glyph_mask")
        for c in range(sample.features.shape[0]):
            yield sample.features[c], None if glyphs is None else np.asarray(glyphs[c], dtype=bool)
            n += 1
            if limit is not None and n >= limit:
                return


def run_train(home: Home, features: StageResult, cfg: TrainConfig,
              extra_callbacks: Callable[[float], list[Callback]] = lambda p: [], force: bool = False) -> StageResult:
    """Train one selector per retention on the train split, evaluate on held-out crops.

    ``force`` retrains from scratch even when the stage is complete (``atr run --from train``)."""
    t0 = time.perf_counter()
    key = train_key(features, cfg)
    sd = StageDir(home, "train", key)
    if sd.is_complete() and not force:
        return StageResult("train", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    fm = features.manifest
    tokens, channels = fm["features"]["tokens_per_crop"], fm["features"]["feature_dim"]
    with sd.lock():
        if sd.is_complete() and not force:
            return StageResult("train", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin(fresh=force)
        try:
            fdir = Path(features.path)
            pct = cfg.held_out_percent
            mean, std, n_tokens = channel_statistics(
                batched((f for f, _ in _split_crops(fdir, fm, False, pct)), 256, drop_last=False))
            encoder = {"model_key": fm["inputs"]["model"], "model_dir": fm.get("model_dir"),
                       "features_key": features.key, "tokens": tokens, "channels": channels}
            selectors, timings = {}, {}
            for p in cfg.retentions:
                scfg = cfg.selector_for(p)
                name = checkpoint_name(p)
                final = work / f"{name}.safetensors"
                if final.is_file():
                    tensors, _ = load_checkpoint(final, channels, tokens)
                    selectors[float(p)] = selector_from_tensors(scfg, tokens, channels, tensors)
                    continue
                t1 = time.perf_counter()
                trainer = Trainer(scfg, tokens, channels)
                trainer.model.set_statistics(mean, std)
                last = work / f"last-p{p:g}.safetensors"
                if last.is_file():
                    tensors, meta = load_checkpoint(last)
                    trainer.load_state(tensors, meta)
                # Shards are decoded in DataLoader worker processes while this one trains.
                batches = iter(feature_loader(fdir, fm, scfg.batch_size,
                                              keep_image=functools.partial(_in_train_split, pct),
                                              seed=scfg.seed + trainer.step, buffer_size=cfg.shuffle_buffer,
                                              workers=cfg.loader_workers))
                callbacks = [_Progress(f"train p={p:g}"), _Curves(work / f"curves-p{p:g}.json"), _Resumable(last),
                             *extra_callbacks(p)]
                with progress.bar(f"train p={p:g}", total=scfg.steps, unit="steps") as bar:
                    bar.advance(trainer.step)
                    callbacks.append(_Advance(bar, trainer.step))
                    try:
                        model = trainer.fit(batches, callbacks, checkpoint_every=cfg.checkpoint_every,
                                            log_every=cfg.log_every)
                    finally:
                        del batches  # stops the loader's worker processes
                save_checkpoint(final, selector_tensors(model), {
                    "name": name, "retention": float(p), "config": scfg.to_dict(), "tokens": tokens,
                    "channels": channels, "encoder": encoder, "steps": trainer.step, "code_version": code_version()})
                last.unlink(missing_ok=True)
                last.with_suffix(".json").unlink(missing_ok=True)
                selectors[float(p)] = model
                timings[f"{p:g}"] = time.perf_counter() - t1
            held = list(_split_crops(fdir, fm, True, pct, limit=EVAL_MAX_CROPS))
            if not held:
                raise ConfigError(f"no held-out crops in {fdir} ({pct}% split): extract more images")
            rows = evaluate(selectors, held, cfg.eval_retentions, seeds=cfg.eval_seeds)
            write_json_atomic(work / "selector_metrics.json", rows)
            from .plots import plot_selector_metrics

            plot_selector_metrics(rows, work / "selector_metrics.png",
                                  title=f"held-out selector metrics ({len(held)} crops, L={tokens}, C={channels})")
            curves = {f"{p:g}": json.loads((work / f"curves-p{p:g}.json").read_text())
                      for p in cfg.retentions if (work / f"curves-p{p:g}.json").is_file()}
            manifest = {
                "config": cfg.to_dict(), "inputs": {"features": features.key}, "encoder": encoder,
                "code_version": code_version(), "stage_version": TRAIN_VERSION, "eval_mode": cfg.eval_mode,
                "checkpoints": {f"{p:g}": f"{checkpoint_name(p)}.safetensors" for p in cfg.retentions},
                "statistics_tokens": n_tokens, "held_out_crops": len(held),
                "counts": {"selectors": len(cfg.retentions), "held_out_crops": len(held)},
                "train_seconds": timings, "final_loss": {p: (c[-1]["loss"] if c else None) for p, c in curves.items()},
                "selector_metrics": rows, "seconds": time.perf_counter() - t0,
            }
        except (ConfigError, TrainingDiverged):
            shutil.rmtree(work, ignore_errors=True)  # user-fixable input: leave nothing half-written
            raise
        except ShardError:
            # A bad shard: keep resumable training state if there is any, else leave nothing behind.
            if not any(work.glob("last-*.safetensors")) and not any(work.glob("selector-*.safetensors")):
                shutil.rmtree(work, ignore_errors=True)
            raise
        path = sd.commit(manifest)
    return StageResult("train", key, path, False, time.perf_counter() - t0, read_manifest(path))


class _Advance(Callback):
    def __init__(self, bar, start: int):
        self.bar, self.last = bar, start

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.advance(step - self.last)
        self.last = step


@task(name="train", cache_key_fn=_key_from_params, persist_result=True, result_serializer="json")
def train_task(home: str, features_key: str, config: dict[str, Any], cache_key: str,
               mlflow_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    h = Home.resolve(home)
    features = _features_result(h, features_key)
    cfg = TrainConfig.from_dict(config)
    extra = (lambda p: []) if mlflow_run_id is None else (lambda p: [MlflowCurves(_tracker(h), mlflow_run_id,
                                                                                   f"p{p:g}")])
    return _result_dict(run_train(h, features, cfg, extra, force=force))


def _tracker(home: Home):
    from storage.tracking import Tracker

    return Tracker(home.root)


def _features_result(home: Home, ref: str) -> StageResult:
    sd = find_stage(home, "extract", ref)
    return StageResult("extract", sd.key, sd.path, True, 0.0, read_manifest(sd.path))


def apply_tiny_schedule(cfg: TrainConfig, features: StageResult, user_set: set[str]) -> TrainConfig:
    """Shorten the paper-scale schedule for features of a tiny preset (see TINY_SCHEDULE)."""
    import dataclasses

    from pipeline.presets import PRESETS, TRAINED_PRESETS

    model = str(features.manifest.get("model") or "")
    if model not in PRESETS and model not in TRAINED_PRESETS:
        return cfg
    changes = {k: v for k, v in TINY_SCHEDULE.items() if k not in user_set}
    return dataclasses.replace(cfg, selector=dataclasses.replace(cfg.selector, **changes)) if changes else cfg


@flow(name="train")
def train_flow(home: str, config: dict[str, Any], features: str | None = None, model: str = "tiny",
               extract: dict[str, Any] | None = None, user_set: list[str] | None = None) -> dict[str, Any]:
    """[prepare-model -> extract ->] train + held-out evaluation, recorded in DuckDB and MLflow."""
    h = Home.resolve(home)
    cfg = TrainConfig.from_dict(config)
    recorder = RunRecorder(h, "train", {"features": features, "model": model, "extract": extract,
                                        "train": cfg.to_dict()})
    try:
        if features is not None:
            feat = _features_result(h, features)
            feat.manifest.setdefault("model", _model_name(h, feat))
        else:
            model_stage = run_prepare_model(h, model)
            recorder.stage(model_stage)
            feat = run_extract(h, model_stage, ExtractConfig.from_dict(extract or {}))
            recorder.stage(feat)
            feat.manifest["model"] = model
        cfg = apply_tiny_schedule(cfg, feat, set(user_set or []))
        result, report = train_stage(h, recorder, feat, cfg)
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "key": result.key,
            "path": str(result.path), "cached": result.cached, "seconds": result.seconds,
            "manifest": result.manifest, "report": str(report)}


def train_stage(h: Home, recorder: RunRecorder, feat: StageResult, cfg: TrainConfig,
                force: bool = False) -> tuple[StageResult, Path]:
    """Run (or reuse) the train stage as a Prefect task and record it: selector_metrics rows, an
    MLflow child run with live curves, figures and the checkpoints, and reports/train-<key>/."""
    key = train_key(feat, cfg)
    complete = StageDir(h, "train", key).is_complete() and not force
    child = recorder.begin_stage("train")
    t0 = time.perf_counter()
    # refresh_cache=True: Prefect's result store is written, never read (see flows/extract.py).
    out = train_task.with_options(refresh_cache=True)(str(h.root), feat.key, cfg.to_dict(), key,
                                                      mlflow_run_id=child, force=force)
    result = _result(out)
    # A cache hit reports the lookup time, not the original training time.
    if complete:
        result.cached, result.seconds = True, time.perf_counter() - t0
    rows = result.manifest["selector_metrics"]
    _record_selector_metrics(recorder, result, rows)
    at = {r["strategy"]: r for r in rows if abs(r["retention"] - 0.25) < 1e-9}
    metrics = {f"{s}/{m}_at_0.25": at[s][m] for s in at for m in ("recon_mse", "glyph_coverage")
               if at[s][m] == at[s][m]}
    arts = [result.path / "selector_metrics.png", result.path / "selector_metrics.json",
            *[result.path / c for c in result.manifest["checkpoints"].values()],
            *[(result.path / c).with_suffix(".json") for c in result.manifest["checkpoints"].values()]]
    recorder.stage(result, metrics=metrics, child=child, artifacts=tuple(arts))
    report = h.reports / f"train-{result.key}"
    report.mkdir(parents=True, exist_ok=True)
    shutil.copy2(result.path / "selector_metrics.png", report / "selector_metrics.png")
    return result, report


def _model_name(home: Home, features: StageResult) -> str | None:
    """The --model string the features were extracted with (from the prepare-model manifest)."""
    try:
        sd = find_stage(home, "prepare-model", features.manifest["inputs"]["model"])
        return read_manifest(sd.path).get("model")
    except Exception:  # noqa: BLE001 - features from another home: unknown model
        return None


def _record_selector_metrics(recorder: RunRecorder, result: StageResult, rows: list[dict]) -> None:
    ckpts = result.manifest["checkpoints"]
    recorder.store.insert_rows("selector_metrics", [
        {"run_id": recorder.run_id, "checkpoint": str(result.path / ckpts[f"{r['selector_retention']:g}"]),
         "split": "held-out", "strategy": r["strategy"], "retention": r["retention"],
         "recon_mse": r["recon_mse"],
         "glyph_coverage": None if r["glyph_coverage"] != r["glyph_coverage"] else r["glyph_coverage"]}
        for r in rows])
