"""Selector training streams its feature shards: peak RSS does not hold the dataset.

A feature set of 384 real-shape crops (CLIP ViT-L/14-336: 576 tokens x 1024 channels, fp16, 1.18 MB
each; 453 MB in all, 192x the batch) is written as real WebDataset shards by the project's own shard
writer, then read by the training loader (``storage.loader.feature_loader`` in its 2 worker
processes, as the train stage reads it) and trained on for more than one pass by the training loop
(``pipeline.train.Trainer``) in a fresh interpreter. Its peak RSS above the RSS it had before the
first batch is the same as for a feature set of 32 crops, and it and each loader worker's stay well
below the dataset's bytes: what is in memory is the shuffle buffer, the batches in flight and one
step's tensors, not the feature set.

The selector is narrow (d = 32, one layer each) so the steps are cheap; the features keep their
real shape, which is what the loader holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

TOKENS, CHANNELS = 576, 1024
SMALL, CROPS, PER_SHARD, BATCH, BUFFER = 32, 384, 16, 2, 16

TRAIN = r"""
import json, resource, sys
from pathlib import Path

import torch

from pipeline.selector import SelectorConfig
from pipeline.train import Trainer
from storage.loader import feature_loader, unwrapped


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


stage, steps, batch, buffer = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
manifest = json.loads((stage / "_manifest.json").read_text())
features = manifest["features"]
cfg = SelectorConfig(d_model=32, n_heads=4, selector_layers=1, reconstructor_layers=1, steps=steps,
                     batch_size=batch, warmup_steps=2, lr=1e-3)
trainer = Trainer(cfg, features["tokens_per_crop"], features["feature_dim"])
seen = []


def counted(batches):
    for b in batches:
        seen.append(int(b.shape[0]))
        yield b


baseline = status("VmRSS")
batches = unwrapped(feature_loader(stage, manifest, batch, seed=0, buffer_size=buffer, workers=2))
try:
    trainer.fit(counted(batches), log_every=10)
finally:
    batches.close()
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "crops_trained": sum(seen),
                  "workers_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "step": trainer.step}))
"""


def _write_feature_stage(stage, crops: int) -> int:
    """Real shards of ``crops`` one-crop samples (fp16, 576 x 1024) and a manifest; the bytes written."""
    from storage.shards import shard_name, write_shard

    stage.mkdir()
    rng = np.random.default_rng(0)
    shards = []
    for s in range(crops // PER_SHARD):
        samples = []
        for i in range(PER_SHARD):
            feats = rng.standard_normal((1, TOKENS, CHANNELS), dtype=np.float32).astype(np.float16)
            samples.append((f"s{s:03d}x{i:02d}", feats, {"image_id": f"coco-{s}-{i}", "crops": 1}))
        shards.append(write_shard(stage / shard_name(s), samples))
    manifest = {"shards": shards, "config": {"crops": "base"},
                "features": {"dtype": "float16", "tokens_per_crop": TOKENS, "feature_dim": CHANNELS}}
    (stage / "_manifest.json").write_text(json.dumps(manifest))
    return sum(s["bytes"] for s in shards)


def _train(stage, crops: int) -> dict:
    """Train 1.25 passes over ``crops`` crops in a fresh interpreter; its RSS figures (bytes)."""
    steps = crops // BATCH + crops // (4 * BATCH)
    out = subprocess.run([sys.executable, "-c", TRAIN, str(stage), str(steps), str(BATCH), str(BUFFER)],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step"] == steps and got["crops_trained"] == steps * BATCH > crops  # every crop, then more
    return got


@pytest.mark.slow
def test_training_streams_shards_without_holding_the_feature_set(tmp_path):
    """Peak RSS does not grow with the feature set: 32 crops (38 MB) and 384 crops (453 MB, 192x the batch)
    take the same memory, well below the larger set's bytes."""
    small, large = SMALL, CROPS
    assert large >= 10 * BATCH
    bytes_small = _write_feature_stage(tmp_path / "small", small)
    got_small = _train(tmp_path / "small", small)
    dataset = _write_feature_stage(tmp_path / "large", large)
    assert dataset > 400e6
    got = _train(tmp_path / "large", large)
    growth, growth_small = got["peak"] - got["baseline"], got_small["peak"] - got_small["baseline"]
    mb = 1e6
    print(f"\ntraining process, RSS before the first batch -> peak (batch {BATCH}, shuffle buffer {BUFFER}, "
          f"2 loader workers, 1.25 passes): {small} crops ({bytes_small / mb:.0f} MB): "
          f"{got_small['baseline'] / mb:.0f} -> {got_small['peak'] / mb:.0f} MB (+{growth_small / mb:.0f}); "
          f"{large} crops ({dataset / mb:.0f} MB): {got['baseline'] / mb:.0f} -> {got['peak'] / mb:.0f} MB "
          f"(+{growth / mb:.0f}); largest loader worker peak {got_small['workers_peak'] / mb:.0f} / "
          f"{got['workers_peak'] / mb:.0f} MB")
    # Holding the feature set would add its bytes to the training process, or half of them to each worker.
    assert growth < 0.4 * dataset, (growth, dataset)
    assert abs(growth - growth_small) < 0.15 * dataset, (growth, growth_small, dataset)
    assert got["workers_peak"] < got["baseline"] + 0.2 * dataset, (got["workers_peak"], got["baseline"], dataset)
