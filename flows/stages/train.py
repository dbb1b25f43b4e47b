"""The train stage: selector(s) trained on feature shards, then held-out evaluation.

Output ``stages/train/<key>/``:
  selector-p0.25.safetensors + .json   one checkpoint per retention p (meta trained_on "p")
  selector-range.safetensors + .json   with TrainConfig.retention_range: one selector trained on the
                                       whole range (meta trained_on "range", retention_range [min, max])
  curves-p0.25.json, curves-range.json logged training metrics
  selector_metrics.json / .png         held-out selector vs random vs uniform grid
  _manifest.json
While running, ``last-p0.25.safetensors`` / ``last-range.safetensors`` (+ .json) holds the latest resumable
state (weights, AdamW moments, step, RNG); a killed run resumes from it.

Features of a family without crops (Qwen-VL: the manifest's ``features.grid`` is ``dynamic``) train a
dynamic-grid selector (``tokens`` null): images of different L in padded batches with their (rows, cols)
grids (:func:`grid_stream`, read in this process), held-out metrics per image
(``pipeline.selector_eval.held_out_grid_metrics``), and checkpoints that record ``family``, ``grid``
dynamic and ``qwen_features``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.config import ConfigError
from pipeline.families import DEFAULT_FAMILY
from pipeline.selector_eval import held_out_grid_metrics, held_out_metrics
from pipeline.train import (Callback, TrainConfig, Trainer, TrainingDiverged, batched, channel_statistics, grid_batched,
                            is_held_out, selector_from_tensors, selector_tensors, statistics_from_sums)
from storage.checkpoints import load_checkpoint, save_checkpoint
from storage.home import Home
from storage.loader import feature_loader, unwrapped
from storage.shards import ShardError, iter_features, read_channel_sums, stream_samples
from storage.stages import (StageError, StageResult, code_version, find_stage, read_manifest, run_stage, stage_key,
                            write_json_atomic)

from ..present import progress
from ..present.plots import plot_selector_metrics

TRAIN_VERSION = "4"  # 2: crops read through DataLoader workers; 3: the reconstructor ends in a projection;
# 4: the held-out metrics choose through strategies.select, random drawn as eval draws it (per crop)
EVAL_MAX_CROPS = 2048


RANGE = "range"  # the manifest's checkpoints key and the file tag of the range-trained selector


def checkpoint_name(retention: float | str) -> str:
    """selector-p0.25 for a per-p selector, selector-range for the range-trained one (``RANGE``)."""
    return f"selector-{RANGE}" if retention == RANGE else f"selector-p{retention:g}"


def _tag(retention: float | str) -> str:
    """The file tag of a selector: p0.25 or range (last-<tag>, curves-<tag>)."""
    return RANGE if retention == RANGE else f"p{retention:g}"


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


def _features_describe(home: Home, fm: dict) -> dict | None:
    """The prepare-model ``describe`` of the model the features come from, or None (features from another home)."""
    from storage.stages import StageDir

    try:
        return StageDir(home, "prepare-model", fm["inputs"]["model"]).manifest()["describe"]
    except (KeyError, OSError, ValueError, TypeError, StageError):
        return None


def _features_family(home: Home, fm: dict) -> str | None:
    """The model family the features come from (recorded with every selector checkpoint)."""
    describe = _features_describe(home, fm)
    return None if describe is None else describe.get("family", DEFAULT_FAMILY)


def is_dynamic(fm: dict) -> bool:
    """Are these features dynamic token grids (Qwen-VL: 1 x L x C' per image, L varying)?"""
    return (fm.get("features") or {}).get("grid") == "dynamic"


def dynamic_tower_width(home: Home, features) -> int | None:
    """Dynamic-grid features (Qwen-VL): the width of the vision tower they come from (its ``describe``; without
    it, a quarter of the pre-merger groups' width); None for fixed crops."""
    fm = features.manifest
    if not is_dynamic(fm):
        return None
    width = (_features_describe(home, fm) or {}).get("vision_hidden")
    return int(width) if width else int(fm["features"]["feature_dim"]) // 4


def _in_train_split(percent: int, image_id: str) -> bool:
    return not is_held_out(image_id, percent)


def _split_samples(stage_dir: Path, manifest: dict, held_out: bool, percent: int):
    """The stored samples of one split (held-out or train, by image id), each with its glyph mask rows or None."""
    for sample in iter_features(stage_dir, manifest):
        if is_held_out(str(sample.meta.get("image_id")), percent) == held_out:
            yield sample, sample.meta.get("glyph_mask")


def _glyph_row(glyphs, row: int) -> np.ndarray | None:
    return None if glyphs is None else np.asarray(glyphs[row], dtype=bool)


def _split_grids(stage_dir: Path, manifest: dict, held_out: bool, percent: int, limit: int | None = None):
    """Dynamic-grid features: per image of the split, ``(features (L, C), glyph mask (L,) or None, (rows, cols))``."""
    return itertools.islice(((sample.features[0], _glyph_row(glyphs, 0), tuple(int(v) for v in sample.meta["grid"]))
                             for sample, glyphs in _split_samples(stage_dir, manifest, held_out, percent)), limit)


def grid_stream(stage_dir: Path, manifest: dict, keep_image: Callable[[str], bool], seed: int,
                buffer_size: int) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """Dynamic-grid features of the images ``keep_image`` passes, ``(features (L, C), (rows, cols))`` each,
    shuffled and cycled forever as ``storage.shards.stream_crops`` does (``stream_samples``: shards in a seeded
    order per pass, a seeded shuffle buffer; pass p uses seed + p), so a resumed run skips exactly the batches
    it used."""
    return stream_samples(stage_dir, manifest, keep_image, seed, buffer_size,
                          lambda sample: [(sample.features[0], tuple(int(v) for v in sample.meta["grid"]))])


def _split_crops(stage_dir: Path, manifest: dict, held_out: bool, percent: int, limit: int | None = None):
    """Fixed-crop features: per crop of the split's images, ``(features (L, C), glyph mask (L,) or None)``."""
    return itertools.islice(((sample.features[c], _glyph_row(glyphs, c))
                             for sample, glyphs in _split_samples(stage_dir, manifest, held_out, percent)
                             for c in range(sample.features.shape[0])), limit)


def train(home: Home, config: TrainConfig, features: StageResult, *, force: bool = False,
          callbacks: Callable[[float | str], list[Callback]] = lambda p: []) -> StageResult:
    """Train one selector per retention on the train split of ``features`` (and one on
    ``config.retention_range`` when it is set), evaluate on held-out crops.

    ``callbacks(p)`` adds training callbacks for the selector at p ("range" for the range-trained one; the orchestration
    layer attaches MLflow curves). ``force`` retrains from scratch even when the stage
    is complete (``atr run --from train``)."""
    from pipeline.device import resolve_device

    t0 = time.perf_counter()
    cfg = config
    key = train_key(features, cfg)
    device = resolve_device(cfg.device)
    fm = features.manifest
    tokens, channels = fm["features"].get("tokens_per_crop"), fm["features"]["feature_dim"]

    def build(work: Path) -> dict[str, Any]:
        with _discard_on_failure(work):
            mean, std, n_tokens = _crop_statistics(features, channels, cfg.held_out_percent)
            encoder = _encoder(home, features, tokens, channels)
            selectors, timings = _selectors(work, cfg, features, encoder, (mean, std), device, callbacks)
            held, rows = _evaluate_held_out(work, cfg, features, selectors)
            return _train_manifest(work, cfg, features, encoder, n_tokens, held, timings, rows, t0)

    return run_stage(home, "train", key, build, force=force)


@contextlib.contextmanager
def _discard_on_failure(work: Path) -> Iterator[None]:
    """A failed build leaves nothing half-written in ``work``, except resumable training state after a bad shard."""
    try:
        yield
    except (ConfigError, TrainingDiverged):
        shutil.rmtree(work, ignore_errors=True)  # user-fixable input: leave nothing half-written
        raise
    except ShardError:
        # A bad shard: keep resumable training state if there is any, else leave nothing behind.
        if not any(work.glob("last-*.safetensors")) and not any(work.glob("selector-*.safetensors")):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _crop_statistics(features: StageResult, channels: int, percent: int):
    """Per-channel mean and std of the train split's tokens, and the number of tokens they count."""
    fdir, fm = Path(features.path), features.manifest
    sums = read_channel_sums(fdir, fm)
    if sums is not None and sums.shape[1] == 1 + 2 * channels:  # accumulated during extraction
        return statistics_from_sums(sums, percent)
    # extracted before the sums existed, or sums that do not fit the manifest: one pass
    if is_dynamic(fm):
        return channel_statistics(f[None] for f, _, _ in _split_grids(fdir, fm, False, percent))
    return channel_statistics(batched((f for f, _ in _split_crops(fdir, fm, False, percent)), 256, drop_last=False))


def _encoder(home: Home, features: StageResult, tokens: int, channels: int) -> dict[str, Any]:
    """What every selector checkpoint records about the encoder its features come from."""
    fm = features.manifest
    encoder = {"model_key": fm["inputs"]["model"], "model_dir": fm.get("model_dir"), "features_key": features.key,
               "tokens": tokens, "channels": channels, "family": _features_family(home, fm)}
    if is_dynamic(fm):  # Qwen-VL: which features, and the tower width eval checks against (storage.selectors)
        describe = _features_describe(home, fm) or {}
        encoder.update(grid="dynamic", qwen_features=fm["features"].get("qwen_features", "premerger"),
                       tower_width=describe.get("vision_hidden"))
    return encoder


def _selectors(work: Path, cfg: TrainConfig, features: StageResult, encoder: dict[str, Any], statistics,
               device: str, callbacks: Callable[[float], list[Callback]]):
    """One selector per retention, and the range-trained one when ``cfg.retention_range`` is set: each
    loaded when its checkpoint is in ``work``, else trained (resuming from its last state); the selectors
    by retention (float p, or ``RANGE``) and the seconds each training took."""
    tokens, channels = encoder["tokens"], encoder["channels"]
    selectors, timings = {}, {}
    wanted = [float(p) for p in cfg.retentions] + ([RANGE] if cfg.retention_range is not None else [])
    for p in wanted:
        scfg = cfg.selector_for_range() if p == RANGE else cfg.selector_for(p)
        final = work / f"{checkpoint_name(p)}.safetensors"
        if final.is_file():
            tensors, _ = load_checkpoint(final, channels, tokens)
            selectors[p] = selector_from_tensors(scfg, tokens, channels, tensors).to(device)
            continue
        t1 = time.perf_counter()
        selectors[p] = _fit_selector(work, cfg, p, features, encoder, statistics, device, callbacks)
        timings[RANGE if p == RANGE else f"{p:g}"] = time.perf_counter() - t1
    return selectors, timings


def _fit_selector(work: Path, cfg: TrainConfig, p: float | str, features: StageResult, encoder: dict[str, Any],
                  statistics, device: str, callbacks: Callable[[float], list[Callback]]):
    """Train the selector at retention ``p``, or on ``cfg.retention_range`` when ``p`` is ``RANGE`` (from
    ``last-<tag>.safetensors`` when a killed run left one), save its checkpoint and drop the resumable
    state; the trained model. ``callbacks`` is called with the float p of per-p selectors only (its
    callers label by ``f"p{p:g}"``); the range selector's curve is ``curves-range.json``."""
    is_range = p == RANGE
    scfg = cfg.selector_for_range() if is_range else cfg.selector_for(p)
    name, tag = checkpoint_name(p), _tag(p)
    tokens, channels = encoder["tokens"], encoder["channels"]
    mean, std = statistics
    trainer = Trainer(scfg, tokens, channels, device=device, autocast=cfg.autocast)
    trainer.model.set_statistics(mean.to(device), std.to(device))
    last = work / f"last-{tag}.safetensors"
    if last.is_file():
        tensors, meta = load_checkpoint(last)
        trainer.load_state({k: v.to(device) if k.startswith("model.") else v for k, v in tensors.items()}, meta)
    # Shards are decoded in DataLoader worker processes while this one trains. The crop
    # order is a function of the seed alone: a resumed run skips the batches already used.
    in_train = functools.partial(_in_train_split, cfg.held_out_percent)
    if is_dynamic(features.manifest):  # L varies per image: padded batches with their grids, read in this process
        batches = grid_batched(grid_stream(Path(features.path), features.manifest, in_train, scfg.seed,
                                           cfg.shuffle_buffer), scfg.batch_size)
    else:
        batches = unwrapped(feature_loader(Path(features.path), features.manifest, scfg.batch_size, keep_image=in_train,
                                           seed=scfg.seed, buffer_size=cfg.shuffle_buffer,
                                           workers=cfg.loader_workers))
    for _ in range(trainer.step):
        next(batches)
    label = f"train p in [{scfg.retention_range[0]:g}, {scfg.retention_range[1]:g}]" if is_range else f"train p={p:g}"
    attached = [_Progress(label), _Curves(work / f"curves-{tag}.json"), _Resumable(last),
                *callbacks("range" if is_range else p)]
    with progress.bar(label, total=scfg.steps, unit="steps") as bar:
        bar.advance(trainer.step)
        attached.append(_Advance(bar, trainer.step))
        try:
            model = trainer.fit(batches, attached, checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every)
        finally:
            batches.close()  # stops the loader's worker processes now: a failure's traceback still holds it
    trained = ({"retention": None, "retention_range": list(scfg.retention_range), "trained_on": RANGE} if is_range
               else {"retention": float(p), "trained_on": "p"})
    grid = ({"family": encoder.get("family"), "grid": "dynamic", "qwen_features": encoder.get("qwen_features")}
            if encoder.get("grid") == "dynamic" else {})  # a fixed-grid (LLaVA) checkpoint's meta is as it was
    save_checkpoint(work / f"{name}.safetensors", selector_tensors(model), {
        "name": name, **trained, "config": scfg.to_dict(), "tokens": tokens,
        "channels": channels, "encoder": encoder, "steps": trainer.step, "code_version": code_version(), **grid})
    last.unlink(missing_ok=True)
    last.with_suffix(".json").unlink(missing_ok=True)
    return model


def _evaluate_held_out(work: Path, cfg: TrainConfig, features: StageResult, selectors: dict) -> tuple[int, list[dict]]:
    """Selectors vs random vs the uniform grid on up to EVAL_MAX_CROPS held-out crops, written to
    ``selector_metrics.json`` / ``.png``; the number of crops and the metric rows."""
    fdir, fm, pct = Path(features.path), features.manifest, cfg.held_out_percent
    tokens, channels = fm["features"].get("tokens_per_crop"), fm["features"]["feature_dim"]
    dynamic = is_dynamic(fm)
    held = list((_split_grids if dynamic else _split_crops)(fdir, fm, True, pct, limit=EVAL_MAX_CROPS))
    if not held:
        raise ConfigError(f"no held-out crops in {fdir} ({pct}% split): extract more images")
    per_p = {p: m for p, m in selectors.items() if p != RANGE}
    variants = {}
    if len(per_p) > 1 and 0.25 in per_p:
        variants["selector-p0.25"] = (0.25, per_p[0.25])  # the single selector trained at 0.25, at every r
    if RANGE in selectors:
        variants["selector-range"] = (RANGE, selectors[RANGE])
    metrics = held_out_grid_metrics if dynamic else held_out_metrics
    rows = metrics(per_p, held, cfg.eval_retentions, seeds=cfg.eval_seeds, variants=variants)
    write_json_atomic(work / "selector_metrics.json", rows)

    what = (f"{len(held)} images, L per image, C={channels}" if dynamic
            else f"{len(held)} crops, L={tokens}, C={channels}")
    plot_selector_metrics(rows, work / "selector_metrics.png", title=f"held-out selector metrics ({what})")
    return len(held), rows


def _train_manifest(work: Path, cfg: TrainConfig, features: StageResult, encoder: dict[str, Any], n_tokens,
                    held: int, timings: dict[str, float], rows: list[dict], t0: float) -> dict[str, Any]:
    """The stage manifest, with each selector's logged curve's final loss."""
    keys = {f"{p:g}": f"p{p:g}" for p in cfg.retentions} | ({RANGE: RANGE} if cfg.retention_range is not None else {})
    curves = {k: json.loads((work / f"curves-{tag}.json").read_text())
              for k, tag in keys.items() if (work / f"curves-{tag}.json").is_file()}
    checkpoints = {f"{p:g}": f"{checkpoint_name(p)}.safetensors" for p in cfg.retentions}
    if cfg.retention_range is not None:
        checkpoints[RANGE] = f"{checkpoint_name(RANGE)}.safetensors"
    return {
        "config": cfg.to_dict(), "inputs": {"features": features.key}, "encoder": encoder,
        "code_version": code_version(), "stage_version": TRAIN_VERSION, "eval_mode": cfg.eval_mode,
        "checkpoints": checkpoints,
        "statistics_tokens": n_tokens, "held_out_crops": held,
        "counts": {"selectors": len(checkpoints), "held_out_crops": held},
        "train_seconds": timings, "final_loss": {p: (c[-1]["loss"] if c else None) for p, c in curves.items()},
        "selector_metrics": rows, "seconds": time.perf_counter() - t0,
    }


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
