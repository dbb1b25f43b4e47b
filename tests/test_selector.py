"""The selector/reconstructor model, its loss, top-k inference, baselines and the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.selector import SelectorConfig, TokenSelector, grid_indices, grid_order, keep_count
from pipeline.selector_eval import kept_indices as mask_indices
from pipeline.strategies import Batch, Context, select, selections, seeded_generator
from pipeline.train import Callback, TrainConfig, Trainer, TrainingDiverged, is_held_out, lr_factor

L, C = 16, 32
CFG = SelectorConfig(retention=0.25, n_heads=4, steps=10, batch_size=8, lr=1e-3, warmup_steps=2)


def _model(cfg=CFG):
    torch.manual_seed(0)
    return TokenSelector(cfg, L, C)


class FixedMask(TokenSelector):
    """The real model with a given mask instead of a Gumbel sample (to check the loss formula)."""

    mask: torch.Tensor

    def sample_mask(self, logits):
        return self.mask


def test_shapes_and_binary_straight_through_mask():
    model = _model()
    x = torch.randn(5, L, C)
    assert model.keep_logits(x).shape == (5, L)
    out = model(x)
    mask = model.sample_mask(out["logits"])
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    out["loss"].backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0  # gradients reach S
    assert model.mask_embedding.grad.abs().sum() > 0


def test_loss_is_mse_plus_clamped_keep_rate_without_weight():
    torch.manual_seed(0)
    model = FixedMask(CFG, L, C)
    x = torch.randn(4, L, C)
    for keep_rate in (0.125, 0.5):  # below and above p = 0.25
        mask = torch.zeros(4, L)
        mask[:, : int(keep_rate * L)] = 1
        model.mask = mask
        out = model(x)
        xs = model.standardize(x)
        expected = torch.mean((model.reconstruct(xs, mask) - xs) ** 2) + max(keep_rate, 0.25)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert out["keep"].item() == pytest.approx(keep_rate)


def test_dropped_tokens_become_the_shared_mask_embedding_and_positions_tell_them_apart():
    model = _model()
    a, b = torch.randn(2, L, C), torch.randn(2, L, C)
    nothing = torch.zeros(2, L)
    ra, rb = model.reconstruct(a, nothing), model.reconstruct(b, nothing)
    torch.testing.assert_close(ra, rb)  # the input is invisible when every token is masked
    assert not torch.allclose(ra[0, 0], ra[0, 1])  # but positions differ


def test_the_selector_strategy_is_batched_top_k_in_raster_order():
    model = _model()
    x = torch.randn(6, L, C)
    logits = model.keep_logits(x)

    def kept(feats, r):
        return mask_indices(select("selector", feats, r, "per-crop", Context(selector=model)).mask)

    for r in (0.1, 0.25, 0.5, 1.0):
        idx = kept(x, r)
        k = keep_count(r, L)
        assert idx.shape == (6, k) and k == max(1, round(r * L))
        assert (idx[:, 1:] > idx[:, :-1]).all()
        for i in range(6):
            assert set(idx[i].tolist()) == set(logits[i].topk(k).indices.tolist())
        torch.testing.assert_close(kept(x[2:3], r), idx[2:3])  # batch-independent


def test_feature_shape_mismatch_is_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"L=16, C=32"):
        model.keep_logits(torch.randn(2, L, C + 1))
    with pytest.raises(ValueError, match="do not match"):
        model(torch.randn(2, L + 1, C))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_retention_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError):
        keep_count(bad, L)
    with pytest.raises(ConfigError):
        SelectorConfig(retention=bad)


def test_standardization_uses_training_statistics():
    model = _model()
    x = torch.randn(64, L, C) * 3 + 7
    flat = x.reshape(-1, C)
    model.set_statistics(flat.mean(0), flat.std(0, unbiased=False))
    z = model.standardize(x).reshape(-1, C)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_baselines_random_and_uniform_grid():
    crops = [torch.zeros(1, 64, 4)] * 100  # 100 one-crop images, each drawn as eval draws its rows
    per_image = [{"generator": seeded_generator(0, i)} for i in range(100)]
    idx = mask_indices(torch.cat([s.mask for s in selections("random", crops, 0.25, batch=Batch(per_image=per_image))]))
    assert idx.shape == (100, 16) and (idx[:, 1:] > idx[:, :-1]).all()
    counts = torch.bincount(idx.flatten(), minlength=64).float()
    assert counts.min() > 5  # every token gets picked sometimes
    grid = grid_indices(3, 64, 0.25)
    assert grid.shape == (3, 16) and torch.equal(grid[0], grid[2])
    rows, cols = grid[0] // 8, grid[0] % 8
    # 16 of 64 tokens: exactly one in every 2x2 block
    assert sorted(set(zip((rows // 2).tolist(), (cols // 2).tolist()))) == [(r, c) for r in range(4) for c in range(4)]
    assert sorted(grid_order(6).tolist()) == list(range(36))  # a permutation for non-power-of-two grids


def test_held_out_split_is_deterministic_and_sized():
    ids = [f"img-{i}" for i in range(4000)]
    held = [i for i in ids if is_held_out(i, 10)]
    assert held == [i for i in ids if is_held_out(i, 10)]
    assert 0.08 < len(held) / len(ids) < 0.12


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and lr_factor(100, 10, 100) == pytest.approx(0.0)


def _batches(seed=0, n=1000):
    """Low-rank token features (learnable structure), deterministic."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, C)).astype(np.float32)
    for _ in range(n):
        yield (rng.standard_normal((8, L, 4)).astype(np.float32) @ basis)


def test_training_reduces_loss_and_resume_is_exact():
    class Log(Callback):
        def __init__(self):
            self.rows = []

        def on_step(self, step, metrics):
            self.rows.append((step, metrics["loss"]))

    cfg = SelectorConfig(retention=0.25, n_heads=4, steps=40, batch_size=8, lr=3e-3, warmup_steps=2)
    full = Trainer(cfg, L, C)
    log = Log()
    full.fit(_batches(), [log], log_every=1)
    assert np.mean([v for _, v in log.rows[-5:]]) < 0.8 * np.mean([v for _, v in log.rows[:5]])

    half = Trainer(cfg, L, C)
    with pytest.raises(_Stop):
        half.fit(_batches(), [_StopAt(5)], log_every=1)
    tensors, meta = half.state()
    resumed = Trainer(cfg, L, C)
    resumed.load_state(tensors, meta)
    assert resumed.step == 5
    stream = _batches()
    for _ in range(5):
        next(stream)
    resumed.fit(stream, log_every=1)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


class _StopAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_step(self, step, metrics):
        if step == self.at:
            raise _Stop


class _Stop(Exception):
    pass


def test_nan_loss_stops_training_with_a_clear_message():
    def poisoned():
        yield np.full((8, L, C), np.nan, dtype=np.float32)

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 0"):
        Trainer(CFG, L, C).fit(poisoned())


def test_train_config_nested_and_validated():
    cfg = TrainConfig.from_dict({"selector": {"lr": 0.01}, "retentions": [0.1, 0.5]})
    assert cfg.selector.lr == 0.01 and cfg.retentions == (0.1, 0.5) and cfg.eval_mode == "per-retention"
    assert cfg.selector_for(0.5).retention == 0.5
    assert TrainConfig().eval_mode == "single-selector-top-k"
    with pytest.raises(ConfigError, match="did you mean 'retentions'"):
        TrainConfig.from_dict({"retention": [0.1]})
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        TrainConfig.from_dict({"selector": {"lrr": 1}})
    with pytest.raises(ConfigError):
        TrainConfig(retentions=(0.0,))
    assert not math.isnan(cfg.selector.temperature)
