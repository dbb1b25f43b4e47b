"""A training run killed at a checkpoint and resumed equals an uninterrupted run, bit for bit (CPU).

The resumable state holds the weights, the AdamW moments, the step and every RNG
(python, numpy, torch, CUDA), and the crop order is a function of the seed alone:
the resumed run skips the batches it already trained on.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ExtractConfig
from pipeline.selector import SelectorConfig
from pipeline.train import Callback, TrainConfig


class Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint was written."""


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(self, step: int, trainer) -> None:
        if step == self.step:
            raise Killed(f"killed at step {step}")


@pytest.fixture(scope="module")
def features(session_home, tiny_stage):
    from flows.stages.extract import extract

    cfg = ExtractConfig(images="synthetic:docs", limit=96, seed=5, crops="base", shard_size=32, batch_size=16)
    return extract(session_home, cfg, tiny_stage)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_equals_an_uninterrupted_one(features, tmp_path, workers):
    from flows.stages.train import train
    from storage.checkpoints import load_checkpoint
    from storage.home import Home

    cfg = TrainConfig(selector=SelectorConfig(steps=30, batch_size=8, warmup_steps=5, lr=1e-3, seed=3),
                      checkpoint_every=10, loader_workers=workers, device="cpu")
    whole = train(Home.resolve(tmp_path / "whole").ensure(), cfg, features)
    home = Home.resolve(tmp_path / "resumed").ensure()
    with pytest.raises(Killed):
        train(home, cfg, features, callbacks=lambda p: [KillAt(20)])
    work = next((home.stages / "train").glob("*.tmp"))
    _, meta = load_checkpoint(work / "last-p0.25.safetensors")
    assert meta["step"] == 20 and {"numpy", "python"} <= set(meta["rng"])
    resumed = train(home, cfg, features)
    assert resumed.key == whole.key and not resumed.cached
    a, _ = load_checkpoint(whole.path / "selector-p0.25.safetensors")
    b, _ = load_checkpoint(resumed.path / "selector-p0.25.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert whole.manifest["selector_metrics"] == resumed.manifest["selector_metrics"]
