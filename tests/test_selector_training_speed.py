"""Selector training throughput (``pipeline.speed.selector_training_timings``) and the training step's
bf16 autocast path, run here on the CPU's autocast (the CUDA run is in ``tests/test_gpu.py``).

No test asserts a wall-clock time: the figures must agree with each other and with the FLOPs model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.flops import CLIP_L_SELECTOR, SelectorDims, selector_parameters, selector_training_flops
from pipeline.selector import SelectorConfig
from pipeline.speed import selector_training_projection, selector_training_timings
from pipeline.train import Callback, Trainer


def test_training_throughput_figures_agree_with_the_flops_model():
    dims = SelectorDims(tokens=16, channels=48, d_model=32, layers=2, reconstructor_layers=1)
    out = selector_training_timings(dims, batch_size=4, steps=3, device="cpu")
    assert len(out["step_times"]) == 3 and out["seconds_per_step"] == pytest.approx(np.median(out["step_times"]))
    assert out["parameters"] == out["parameters_model"] == selector_parameters(dims)
    assert out["heads"] == 16 and out["d_model"] == 32  # the paper's 16 heads where d allows
    assert out["flops_per_step"] == selector_training_flops(dims, 4) == 4 * out["flops_per_crop"]
    assert out["crops_per_second"] == pytest.approx(4 / out["seconds_per_step"])
    assert out["flops_per_second"] == pytest.approx(out["flops_per_step"] / out["seconds_per_step"])
    assert out["autocast"] is False and out["peak_bytes"] is None and out["threads"] == torch.get_num_threads()
    # bf16 autocast applies on CUDA only: asked for on the CPU, the run says it did not apply.
    assert selector_training_timings(dims, 2, 1, "cpu", autocast="bf16")["autocast"] is False
    with pytest.raises(ValueError):
        selector_training_timings(dims, 0, 1, "cpu")

    proj = selector_training_projection(dims, out["flops_per_second"], steps=2000, batch_size=64)
    assert proj["crops"] == 128_000 and proj["passes"] == 1.28 and proj["dataset_crops"] == 100_000
    assert proj["seconds_measured"] == pytest.approx(128_000 / out["crops_per_second"])
    assert proj["seconds_gpu"] == pytest.approx(selector_training_flops(dims, 128_000) / (0.4 * 989e12))


class _Dtypes(Callback):
    def __init__(self):
        self.metrics = []

    def on_step(self, step, metrics):
        self.metrics.append(metrics)


def test_the_bf16_autocast_training_step_runs_on_the_cpu_autocast():
    """The CUDA path of ``atr train --autocast bf16`` (``Trainer.fit`` under bf16 autocast, backward outside
    it), run under the CPU's autocast: linear layers and attention in bf16, the loss, the Gumbel mask and
    the keep ratio in float32, float32 master weights and gradients, the loss going down."""
    cfg = SelectorConfig(n_heads=4, steps=30, batch_size=8, lr=2e-3, warmup_steps=2, retention=0.25)
    trainer = Trainer(cfg, tokens=16, channels=32, device="cpu", autocast="bf16")
    assert trainer.autocast is False  # not on the CPU unless set by hand
    trainer.autocast = True
    seen = {}

    def dtype_of(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # returns None: the output is kept
        return hook

    hooks = [trainer.model.selector.blocks[0].mlp[0].register_forward_hook(dtype_of("linear")),
             trainer.model.head.register_forward_hook(dtype_of("head"))]
    rng = np.random.default_rng(0)
    data = rng.standard_normal((8, 16, 32)).astype(np.float16)  # one batch, as the loader gives it

    def batches():
        while True:
            yield torch.from_numpy(data)

    curve = _Dtypes()
    model = trainer.fit(batches(), [curve], log_every=1)
    for h in hooks:
        h.remove()
    assert seen == {"linear": torch.bfloat16, "head": torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(np.isfinite(m["loss"]) for m in curve.metrics)
    assert curve.metrics[-1]["mse"] < 0.9 * curve.metrics[0]["mse"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(torch.from_numpy(data).float())
    assert out["loss"].dtype == out["keep"].dtype == out["logits"].dtype == torch.float32
    # the keep ratio is exact: a multiple of 1 / (8 * 16) tokens
    assert float(out["keep"]) * 128 == pytest.approx(round(float(out["keep"]) * 128), abs=1e-6)


def test_a_batch_moves_in_its_own_dtype_and_is_widened_on_the_device():
    trainer = Trainer(SelectorConfig(n_heads=4, steps=1, batch_size=2), tokens=4, channels=8)
    half = np.arange(64, dtype=np.float16).reshape(2, 4, 8) / 7
    x = trainer.to_device(half)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(half.astype(np.float32)))
    assert trainer.to_device(torch.from_numpy(half)).dtype == torch.float32
    f32 = half.astype(np.float32)
    assert torch.equal(trainer.to_device(f32), torch.from_numpy(f32))


@pytest.mark.slow
def test_selector_training_at_the_real_clip_l_dims_on_the_cpu():
    """One step of batch 1 at 576 x 1024 after a warm-up step: 77.8 M parameters, 289 GFLOP per crop."""
    out = selector_training_timings(CLIP_L_SELECTOR, batch_size=1, steps=1, device="cpu")
    assert out["parameters"] == 77_812_737 and out["flops_per_crop"] == 289_007_861_760
    proj = selector_training_projection(CLIP_L_SELECTOR, out["flops_per_second"], 2000, 64)
    print(f"\nselector training at 576 x 1024 on the CPU ({out['threads']} threads): {out['crops_per_second']:.3f} "
          f"crops/s, {out['flops_per_second'] / 1e9:.0f} GFLOP/s; the default schedule (128,000 crops) "
          f"{proj['seconds_measured'] / 86400:.1f} days here, {proj['seconds_gpu']:.0f} s on an H100 at 40 %")
    assert out["crops_per_second"] > 0
