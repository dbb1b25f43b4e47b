"""Feature shards read in torch DataLoader workers, so decoding overlaps training.

``FeatureCrops`` is an ``IterableDataset`` of per-crop features ``(L, C)`` (fp16, as
stored) from an extract stage. Worker ``w`` of ``W`` owns the shards ``w, w+W, ...``
of the manifest and streams them through ``storage.shards.stream_crops`` (the same
validating, pickle-free reader and seeded shuffle buffer the single-process path
uses), with its own seed. ``feature_loader`` wraps it in a ``DataLoader`` that
stacks ``(B, L, C)`` fp16 batches; the model casts them to float32 on its device.

With ``workers=0`` everything runs in the calling process. The batch order is
deterministic for a fixed number of workers (the DataLoader takes batches from
the workers in turn), but it differs from the single-process stream: each
worker shuffles only its own shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError, stream_crops


def _every_image(image_id: str) -> bool:
    return True


class FeatureCrops(IterableDataset):
    """Per-crop ``(L, C)`` feature tensors of an extract stage, split over DataLoader workers by shard.

    ``keep_image(image_id) -> bool`` selects a split (e.g. not held out); with ``repeat`` the
    stream cycles forever (pass p shuffles with seed + p), else it ends after one pass."""

    def __init__(self, stage_dir: str | Path, manifest: dict[str, Any],
                 keep_image: Callable[[str], bool] = _every_image, seed: int = 0, buffer_size: int = 2048,
                 repeat: bool = True):
        super().__init__()
        self.stage_dir, self.manifest = Path(stage_dir), manifest
        self.keep_image, self.seed, self.buffer_size, self.repeat = keep_image, seed, buffer_size, repeat

    def shards_for(self, worker: int, workers: int) -> list[dict[str, Any]]:
        return list(self.manifest.get("shards") or [])[worker::workers]

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards_for(worker, workers)
        if not mine:  # more workers than shards: this one has nothing to read
            return
        buffer = max(1, self.buffer_size // workers)
        stream = stream_crops(self.stage_dir, {**self.manifest, "shards": mine}, self.keep_image,
                              seed=self.seed + 1_000_003 * worker, buffer_size=buffer, repeat=self.repeat)
        for features, _glyphs in stream:
            yield torch.from_numpy(features)


def _worker_init(_worker_id: int) -> None:
    # Workers decode and shuffle; the training process owns the cores' torch threads.
    torch.set_num_threads(1)


def unwrapped(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Iterate ``loader``; a bad shard met in a worker process ends in the reader's own one-line
    ShardError, not in the DataLoader's multi-line "Caught ShardError in DataLoader worker" text.

    The worker processes stop when this generator ends (exhausted, closed, or on an error). An
    error's traceback holds the DataLoader's iterator in a reference cycle: left to the garbage
    collector, its shutdown waited 5 s (the workers' status-check interval) at some later, unrelated
    point of the process (measured in tests/test_reliability_inputs.py)."""
    batches = iter(loader)
    try:
        yield from batches
    except ShardError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = f"{ShardError.__module__}.{ShardError.__name__}: "
        for p in (prefix, f"{ShardError.__name__}: "):
            if last.startswith(p):
                last = last[len(p):]
        raise ShardError(last or str(exc)) from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()


def feature_loader(stage_dir: str | Path, manifest: dict[str, Any], batch_size: int,
                   keep_image: Callable[[str], bool] = _every_image, seed: int = 0, buffer_size: int = 2048,
                   workers: int = 2, repeat: bool = True, drop_last: bool = True) -> DataLoader:
    """A DataLoader of ``(batch_size, L, C)`` fp16 feature batches read by ``workers`` processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    dataset = FeatureCrops(stage_dir, manifest, keep_image, seed=seed, buffer_size=buffer_size, repeat=repeat)
    # Its own generator: creating the iterator must not draw from torch's global RNG, which the
    # training loop owns (a resumed run must draw exactly what an uninterrupted one does).
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                      worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


__all__ = ["FeatureCrops", "feature_loader", "unwrapped"]
