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

from pipeline.config import ConfigError
from pipeline.selector_eval import held_out_metrics
from pipeline.train import (Callback, TrainConfig, Trainer, TrainingDiverged, batched, channel_statistics, is_held_out,
                            selector_from_tensors, selector_tensors, statistics_from_sums)
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.home import Home
from storage.loader import feature_loader, unwrapped
from storage.shards import ShardError, iter_features, read_channel_sums
from storage.stages import (StageError, StageResult, code_version, find_stage, read_manifest, run_stage, stage_key,
                            write_json_atomic)

from ..present import progress
from ..present.plots import plot_selector_metrics

TRAIN_VERSION = "3"  # 2: crops read through DataLoader workers; 3: the reconstructor ends in a projection
EVAL_MAX_CROPS = 2048


def checkpoint_name(retention: float) -> str:
    return f"selector-p{retention:g}"


def train_key(features: StageResult, cfg: TrainConfig) -> str:
    """The stage key: the config (``device`` as resolved, an input) and the features' key."""
    from pipeline.device import resolve_device

    config = {k: v for k, v in cfg.to_dict().items() if k != "device"}
    return stage_key("train", TRAIN_VERSION, config, {"features": features.key, "device": resolve_device(cfg.device)})


class _Progress(Callback):
    def __init__(self, label: str):
        self.label = label

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        progress.set_description(f"{self.label} loss {metrics['loss']:.4f} mse {metrics['mse']:.4f} "
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


def _features_family(home: Home, fm: dict) -> str | None:
    """The model family the features come from (recorded with every selector checkpoint)."""
    from storage.stages import StageDir

    try:
        return StageDir(home, "prepare-model", fm["inputs"]["model"]).manifest()["describe"].get("family", "llava-next")
    except (KeyError, OSError, ValueError, TypeError, StageError):
        return None


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


def train(home: Home, config: TrainConfig, features: StageResult, *, force: bool = False,
          callbacks: Callable[[float], list[Callback]] = lambda p: []) -> StageResult:
    """Train one selector per retention on the train split of ``features``, evaluate on held-out crops.

    ``callbacks(p)`` adds training callbacks for the selector at p (the orchestration
    layer attaches MLflow curves). ``force`` retrains from scratch even when the stage
    is complete (``atr run --from train``)."""
    from pipeline.device import resolve_device

    t0 = time.perf_counter()
    cfg = config
    key = train_key(features, cfg)
    device = resolve_device(cfg.device)
    fm = features.manifest
    tokens, channels = fm["features"]["tokens_per_crop"], fm["features"]["feature_dim"]

    def build(work: Path) -> dict[str, Any]:
        try:
            fdir = Path(features.path)
            pct = cfg.held_out_percent
            sums = read_channel_sums(fdir, fm)
            if sums is not None and sums.shape[1] == 1 + 2 * channels:  # accumulated during extraction
                mean, std, n_tokens = statistics_from_sums(sums, pct)
            else:  # extracted before the sums existed, or sums that do not fit the manifest: one pass
                mean, std, n_tokens = channel_statistics(
                    batched((f for f, _ in _split_crops(fdir, fm, False, pct)), 256, drop_last=False))
            encoder = {"model_key": fm["inputs"]["model"], "model_dir": fm.get("model_dir"),
                       "features_key": features.key, "tokens": tokens, "channels": channels,
                       "family": _features_family(home, fm)}
            selectors, timings = {}, {}
            for p in cfg.retentions:
                scfg = cfg.selector_for(p)
                name = checkpoint_name(p)
                final = work / f"{name}.safetensors"
                if final.is_file():
                    tensors, _ = load_checkpoint(final, channels, tokens)
                    selectors[float(p)] = selector_from_tensors(scfg, tokens, channels, tensors).to(device)
                    continue
                t1 = time.perf_counter()
                trainer = Trainer(scfg, tokens, channels, device=device, autocast=cfg.autocast)
                trainer.model.set_statistics(mean.to(device), std.to(device))
                last = work / f"last-p{p:g}.safetensors"
                if last.is_file():
                    tensors, meta = load_checkpoint(last)
                    trainer.load_state({k: v.to(device) if k.startswith("model.") else v for k, v in tensors.items()},
                                       meta)
                # Shards are decoded in DataLoader worker processes while this one trains. The crop
                # order is a function of the seed alone: a resumed run skips the batches already used.
                batches = unwrapped(feature_loader(fdir, fm, scfg.batch_size,
                                                   keep_image=functools.partial(_in_train_split, pct),
                                                   seed=scfg.seed, buffer_size=cfg.shuffle_buffer,
                                                   workers=cfg.loader_workers))
                for _ in range(trainer.step):
                    next(batches)
                attached = [_Progress(f"train p={p:g}"), _Curves(work / f"curves-p{p:g}.json"), _Resumable(last),
                            *callbacks(p)]
                with progress.bar(f"train p={p:g}", total=scfg.steps, unit="steps") as bar:
                    bar.advance(trainer.step)
                    attached.append(_Advance(bar, trainer.step))
                    try:
                        model = trainer.fit(batches, attached, checkpoint_every=cfg.checkpoint_every,
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
            rows = held_out_metrics(selectors, held, cfg.eval_retentions, seeds=cfg.eval_seeds)
            write_json_atomic(work / "selector_metrics.json", rows)

            plot_selector_metrics(rows, work / "selector_metrics.png",
                                  title=f"held-out selector metrics ({len(held)} crops, L={tokens}, C={channels})")
            curves = {f"{p:g}": json.loads((work / f"curves-p{p:g}.json").read_text())
                      for p in cfg.retentions if (work / f"curves-p{p:g}.json").is_file()}
            return {
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

    return run_stage(home, "train", key, build, force=force)


class _Advance(Callback):
    def __init__(self, bar, start: int):
        self.bar, self.last = bar, start

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.advance(step - self.last)
        self.last = step


def features_model_name(home: Home, features: StageResult) -> str | None:
    """The --model string the features were extracted with (from the prepare-model manifest)."""
    try:
        sd = find_stage(home, "prepare-model", features.manifest["inputs"]["model"])
        return read_manifest(sd.path).get("model")
    except (StageError, KeyError, TypeError, OSError):  # features from another home: unknown model
        return None


def train_figures(result: StageResult) -> dict[str, float]:
    """MLflow figures of a train stage: each strategy's held-out MSE and glyph coverage at 0.25."""
    rows = result.manifest["selector_metrics"]
    at = {r["strategy"]: r for r in rows if abs(r["retention"] - 0.25) < 1e-9}
    return {f"{s}/{m}_at_0.25": at[s][m] for s in at for m in ("recon_mse", "glyph_coverage")
            if at[s][m] == at[s][m]}


def train_artifacts(result: StageResult) -> tuple[Path, ...]:
    """The files of a train stage logged to MLflow: the plot, the metrics and every checkpoint with its sidecar."""
    ckpts = result.manifest["checkpoints"].values()
    return (result.path / "selector_metrics.png", result.path / "selector_metrics.json",
            *[result.path / c for c in ckpts], *[(result.path / c).with_suffix(".json") for c in ckpts])
