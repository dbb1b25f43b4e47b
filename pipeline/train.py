"""Training loop for the token selector: AdamW, linear warm-up then cosine decay,
callbacks for logging and checkpoints, NaN guard, exact resume from a state dict.

Pure torch/numpy: data arrives as an iterator of (B, L, C) arrays (for a dynamic-grid
selector, Qwen-VL's: ``(padded (B, max L, C), grids (B, 2))`` pairs, :func:`grid_batched`),
logging and checkpoint writing are callbacks supplied by the caller (``flows/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import torch

from .config import EVAL_RETENTIONS, Config, ConfigError, canonical_json, check, check_compute, content_hash
from .errors import UserError
from .selector import SelectorConfig, TokenSelector, check_retention_range, omit_unset_range

# The embedded default (tiny presets on 2 CPUs) shortens the paper-scale schedule, SelectorConfig's
# defaults (lr 1e-4, 2000 steps, batch 64; the paper's Sec. 4.4, Training, gives no schedule),
# so training fits in about 2 minutes.
# It applies when the features come from a tiny preset and the user set none of these.
TINY_SCHEDULE = {"steps": 2000, "batch_size": 32, "lr": 4e-3, "warmup_steps": 50}


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN/inf; ``str(exc)`` says at which step and what to try."""


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """The train stage: one selector per retention in ``retentions`` plus held-out evaluation.

    eval_mode records how the held-out comparison uses the selectors: with one
    retention, that selector's top-k is taken at every eval retention (the
    paper's evaluation); with several, each eval retention uses the selector
    trained at the nearest p ("per-retention", the paper's x-axis).

    retention_range (min, max) trains one more selector beside the per-p ones, on the whole range
    (p drawn per batch from [min, max]; ``selector_for_range``). It is left out of ``to_dict()`` when
    None, so the stage keys of configs without it are the ones they were before it existed."""

    kind: ClassVar[str] = "train"

    selector: SelectorConfig = SelectorConfig()
    retentions: tuple = (0.25,)
    held_out_percent: int = 10
    shuffle_buffer: int = 2048
    loader_workers: int = 2          # DataLoader worker processes reading shards (0: in the training process)
    checkpoint_every: int = 250
    log_every: int = 10
    eval_retentions: tuple = (*EVAL_RETENTIONS, 1.0)  # 1.0: every token kept (the reconstruction floor)
    eval_seeds: int = 3
    device: str = "auto"             # where the selector trains and is evaluated (auto: CUDA when present)
    autocast: str = "none"           # "bf16": bfloat16 autocast on CUDA
    retention_range: tuple | None = None  # (min, max): one more selector, trained on the whole range

    def validate(self) -> None:
        check(len(self.retentions) > 0, "give at least one --retention")
        if self.retention_range is not None:
            check_retention_range(self.retention_range)
        check(self.selector.retention_range is None,
              f"set the range as [train] retention_range (atr train --retention-range), not in the selector "
              f"section (got selector retention_range {self.selector.retention_range!r})")
        for r in (*self.retentions, *self.eval_retentions):
            check(isinstance(r, (int, float)) and 0.0 < r <= 1.0, f"retention must be in (0, 1], got {r!r}")
        check(len(set(self.retentions)) == len(self.retentions), f"duplicate retentions {self.retentions!r}")
        check(0 < self.held_out_percent < 100, f"held_out_percent must be in 1..99, got {self.held_out_percent!r}")
        check(isinstance(self.loader_workers, int) and self.loader_workers >= 0,
              f"loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        check(self.shuffle_buffer > 0 and self.checkpoint_every > 0 and self.log_every > 0,
              "shuffle_buffer, checkpoint_every and log_every must be positive")
        check(self.eval_seeds > 0, "eval_seeds must be positive")
        check_compute(self.device, "auto")
        check(self.autocast in ("none", "bf16"), f"--autocast must be none or bf16, got {self.autocast!r}")

    @property
    def eval_mode(self) -> str:
        return "single-selector-top-k" if len(self.retentions) == 1 else "per-retention"

    def selector_for(self, retention: float) -> SelectorConfig:
        return dataclasses.replace(self.selector, retention=float(retention), retention_range=None)

    def selector_for_range(self) -> SelectorConfig:
        """The range selector's config (``retention`` keeps the selector section's value; unused)."""
        lo, hi = check_retention_range(self.retention_range)
        return dataclasses.replace(self.selector, retention_range=(lo, hi))

    def to_dict(self) -> dict:
        """As Config.to_dict, without ``retention_range`` (here and in ``selector``) when it is None."""
        d = omit_unset_range(super().to_dict())
        d["selector"] = self.selector.to_dict()
        return d

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    def hash(self) -> str:
        return content_hash({"kind": self.kind, "config": self.to_dict()})


def split_bucket(image_id: str) -> int:
    """0..99 from a hash of the image id: buckets below the held-out percent are held out."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) % 100


def is_held_out(image_id: str, percent: int) -> bool:
    """Deterministic split by a hash of the image id: no image is in both splits."""
    return split_bucket(image_id) < percent


def statistics_from_sums(sums: np.ndarray, held_out_percent: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std of the train split from per-bucket sums (100, 1 + 2C) accumulated
    during extraction: [token count, sum x, sum x^2] per split bucket, in float64."""
    train = np.asarray(sums, dtype=np.float64)[held_out_percent:].sum(axis=0)
    total = int(train[0])
    if not total:
        raise ConfigError("no training features: the train split is empty")
    c = (train.shape[0] - 1) // 2
    mean = train[1:1 + c] / total
    std = np.sqrt(np.maximum(train[1 + c:] / total - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float(), total


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def channel_statistics(batches: Iterable[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std over every token of (B, L, C) batches (float64 sums)."""
    total, s1, s2 = 0, None, None
    for batch in batches:
        x = np.asarray(batch, dtype=np.float64).reshape(-1, batch.shape[-1])
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
        total += x.shape[0]
    if not total:
        raise ConfigError("no training features: the train split is empty")
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float(), total


class Callback:
    """Hooks the loop calls; override what you need."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, trainer: "Trainer") -> None: ...

    def on_end(self, step: int, trainer: "Trainer") -> None: ...


class Trainer:
    """Owns model, optimizer and schedule for one selector; ``state()``/``load_state()`` round-trip
    everything needed to resume (weights, AdamW moments, step, and the python, numpy, torch and CUDA
    RNG states). ``autocast="bf16"`` runs the forward under bfloat16 autocast on CUDA (``self.autocast``;
    the CPU's autocast runs the same code when it is set by hand, as a test does)."""

    def __init__(self, cfg: SelectorConfig, tokens: int | None, channels: int, device: str = "cpu",
                 autocast: str = "none"):
        torch.manual_seed(cfg.seed)  # seeds every CUDA device too
        self.cfg, self.device = cfg, device
        self.autocast = autocast == "bf16" and torch.device(device).type == "cuda"
        self.model = TokenSelector(cfg, tokens, channels).to(device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "pos" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas))
        self.step = 0

    def to_device(self, batch) -> torch.Tensor:
        """A (B, L, C) batch (numpy or torch, fp16 as the loader reads it, or float32) as float32 on the
        training device. It moves in its own dtype (half the bytes of float32 for fp16 features; from
        pinned memory the copy is asynchronous) and is widened there, which is exact for fp16."""
        x = torch.as_tensor(batch)
        pinned = torch.device(self.device).type == "cuda" and x.is_pinned()
        return x.to(self.device, non_blocking=pinned).to(torch.float32)

    def batch_retention(self, step: int | None = None) -> float | None:
        """The target ratio p of the batch at ``step`` (default: the next one) for a range selector:
        uniform on [min, max] from a generator seeded by (seed, step), so it is a function of the seed
        and the step alone (a resumed run draws the same p, and no global RNG is touched); None for a
        single-p selector."""
        if self.cfg.retention_range is None:
            return None
        lo, hi = self.cfg.retention_range
        step = self.step if step is None else step
        return float(np.random.default_rng([self.cfg.seed, step, 0x9E3779B9]).uniform(lo, hi))

    def _set_lr(self) -> float:
        lr = self.cfg.lr * lr_factor(self.step, self.cfg.warmup_steps, self.cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def fit(self, batches: Iterator[np.ndarray], callbacks: Iterable[Callback] = (),
            checkpoint_every: int = 250, log_every: int = 10) -> TokenSelector:
        """Train until ``cfg.steps``; raises ``TrainingDiverged`` on a non-finite loss."""
        callbacks = list(callbacks)
        self.model.train()
        window: list[dict[str, float]] = []
        t0 = time.perf_counter()
        while self.step < self.cfg.steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise ConfigError("the feature stream ended before training finished") from None
            grid = None
            if isinstance(batch, (tuple, list)):  # a dynamic-grid batch: (padded features, (B, 2) grids)
                batch, grid = batch
                grid = torch.as_tensor(grid).to(self.device)
            x = self.to_device(batch)
            lr = self._set_lr()
            p = self.batch_retention()
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.autocast):
                # the backward below runs outside autocast, in the forward's dtypes
                out = self.model(x, p) if grid is None else self.model(x, p, grid)
            loss = out["loss"]
            if not torch.isfinite(loss):
                what = f"retention {self.cfg.retention}" if p is None else f"retention range, p {p:.3f}"
                raise TrainingDiverged(
                    f"training stopped: loss became {loss.item()} at step {self.step} "
                    f"({what}, lr {lr:.2e}); lower --lr or check the features")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            row = {"loss": loss.item(), "mse": out["mse"].item(), "keep": out["keep"].item()}
            if p is not None:  # a range selector: the drawn p and how far the kept fraction is from it
                row.update(p=p, keep_gap=row["keep"] - p)
            window.append(row)
            if self.step % log_every == 0 or self.step == self.cfg.steps:
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                metrics.update(lr=lr, seconds=time.perf_counter() - t0)
                window = []
                for cb in callbacks:
                    cb.on_step(self.step, metrics)
            if self.step % checkpoint_every == 0 and self.step < self.cfg.steps:
                for cb in callbacks:
                    cb.on_checkpoint(self.step, self)
        self.model.eval()
        for cb in callbacks:
            cb.on_end(self.step, self)
        return self.model

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, json-able meta) holding everything needed to resume."""
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, slot in opt["state"].items():
            for name, value in slot.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        version, internal, gauss_next = random.getstate()
        meta = {"step": self.step, "param_groups": [{k: v for k, v in g.items() if k != "params"} | {
            "params": g["params"]} for g in opt["param_groups"]], "config": self.cfg.to_dict(),
            "rng": {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                    "python": [version, list(internal), gauss_next]}}
        return tensors, meta

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]})
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
        rng = meta.get("rng") or {}
        if "rng.numpy" in tensors and "numpy" in rng:
            kind, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        if "python" in rng:
            version, internal, gauss_next = rng["python"]
            random.setstate((version, tuple(internal), gauss_next))
        self.step = int(meta["step"])


def selector_tensors(model: TokenSelector) -> dict[str, torch.Tensor]:
    """The weights of a trained selector, for a safetensors checkpoint."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def selector_from_tensors(cfg: SelectorConfig, tokens: int | None, channels: int,
                          tensors: Mapping[str, torch.Tensor]) -> TokenSelector:
    model = TokenSelector(cfg, tokens, channels)
    model.load_state_dict(dict(tensors))
    return model.eval()


def selector_from_checkpoint(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> TokenSelector:
    """The selector a checkpoint's tensors and meta (config, tokens, channels) describe, in eval mode
    (``tokens`` null: a dynamic-grid selector, Qwen-VL's).

    Raises KeyError, TypeError, ValueError or RuntimeError when they do not fit;
    ``storage.selectors.load_selector`` turns that into one line naming the file."""
    model = selector_from_tensors(SelectorConfig.from_dict(meta["config"]), meta["tokens"], meta["channels"], tensors)
    if model.dynamic:  # which Qwen-VL features it reads: pre-merger groups (default) or the merger's output
        model.feature_kind = meta.get("qwen_features") or (meta.get("encoder") or {}).get("qwen_features", "premerger")
    return model


def tiny_schedule(cfg: TrainConfig, model: str | None, user_set: set[str], tower_width: int | None = None
                  ) -> TrainConfig:
    """``cfg`` with :data:`TINY_SCHEDULE` for features of a tiny preset ``model`` (keys in ``user_set`` stay).

    ``tower_width`` (dynamic-grid features: Qwen-VL's) sets the selector's width ``d_model`` to the vision
    tower's width unless the user set one, for every model: those features are 4 x the tower width (the 2 x 2
    pre-merger patch states side by side) or the LLM's width (the merger's output), and d = C' would make a
    7B's selector 1.9 B parameters (and a tiny one's step ~10 s here). The paper's d = C on CLIP-L is its tower
    width too."""
    from .presets import PRESETS, TRAINED_PRESETS

    changes: dict[str, Any] = {}
    if model in PRESETS or model in TRAINED_PRESETS:
        changes.update(TINY_SCHEDULE)
    if tower_width is not None and cfg.selector.d_model is None:
        changes["d_model"] = int(tower_width)
    changes = {k: v for k, v in changes.items() if k not in user_set}
    return dataclasses.replace(cfg, selector=dataclasses.replace(cfg.selector, **changes)) if changes else cfg


def grid_batched(items: Iterable[tuple[np.ndarray, Any]], batch_size: int,
                 drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Dynamic-grid batches: consecutive ``(features (L_i, C), grid (rows, cols))`` items, L_i varying, as
    ((B, max L_i, C) float32 zero-padded, (B, 2) int64 grids): what ``Trainer.fit`` takes for a
    dynamic-grid selector (the grids give its positions and key-padding mask)."""
    buf: list[tuple[np.ndarray, Any]] = []

    def stack():
        length = max(f.shape[0] for f, _ in buf)
        out = np.zeros((len(buf), length, buf[0][0].shape[-1]), dtype=np.float32)
        for i, (f, _) in enumerate(buf):
            out[i, :f.shape[0]] = f
        return out, np.asarray([list(g) for _, g in buf], dtype=np.int64)

    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield stack()
            buf = []
    if buf and not drop_last:
        yield stack()


def batched(items: Iterable[np.ndarray], batch_size: int, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Stack consecutive (L, C) arrays into (B, L, C) float32 batches; the short tail is
    dropped unless ``drop_last`` is False."""
    buf: list[np.ndarray] = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield np.stack(buf).astype(np.float32)
            buf = []
    if buf and not drop_last:
        yield np.stack(buf).astype(np.float32)
