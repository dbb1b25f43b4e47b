"""Reduction strategies: budgets, determinism, and what each one keeps."""

from __future__ import annotations

import pytest
import torch

from pipeline.selector import SelectorConfig, TokenSelector
from pipeline.strategies import STRATEGIES, Context, keep_mask


def _features(crops=3, tokens=16, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(crops, tokens, dim, generator=g)


@pytest.mark.parametrize("strategy", ["random", "attention", "diversity", "selector"])
def test_per_crop_budget_keeps_k_in_every_crop(strategy):
    f = _features()
    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=16, channels=8)
    ctx = Context(selector=sel, cls_attention=torch.rand(3, 16))
    for r, k in ((0.1, 2), (0.25, 4), (0.5, 8), (1.0, 16)):
        keep = keep_mask(strategy, f, r, "per-crop", ctx)
        assert keep.dtype == torch.bool and keep.shape == (3, 16)
        assert keep.sum(1).tolist() == [k, k, k], (strategy, r)


@pytest.mark.parametrize("strategy", ["random", "attention", "diversity", "selector"])
def test_global_budget_spreads_k_over_the_image(strategy):
    f = _features()
    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=16, channels=8)
    att = torch.zeros(3, 16)
    att[1] = torch.linspace(1, 2, 16)  # all attention mass in crop 1
    keep = keep_mask(strategy, f, 0.25, "global", Context(selector=sel, cls_attention=att))
    assert int(keep.sum()) == 12  # round(0.25 * 48)
    if strategy == "attention":
        assert keep.sum(1).tolist() == [0, 12, 0]  # a global budget may empty a crop
        assert keep[1, 4:].all()  # the 12 highest-attention tokens


def test_full_none_and_errors():
    f = _features()
    assert keep_mask("full", f, 0.25).all()
    assert keep_mask("none", f, 0.25) is None
    with pytest.raises(ValueError, match="valid: " + ", ".join(STRATEGIES)):
        keep_mask("fastv", f, 0.25)
    with pytest.raises(ValueError, match="valid: per-crop, global"):
        keep_mask("random", f, 0.25, "per-image")
    with pytest.raises(ValueError, match="needs a selector"):
        keep_mask("selector", f, 0.25)
    with pytest.raises(ValueError, match="CLS attention"):
        keep_mask("attention", f, 0.25)
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        keep_mask("random", f, 1.5)


def test_random_is_seeded():
    f = _features()
    a = keep_mask("random", f, 0.25, context=Context(generator=torch.Generator().manual_seed(3)))
    b = keep_mask("random", f, 0.25, context=Context(generator=torch.Generator().manual_seed(3)))
    c = keep_mask("random", f, 0.25, context=Context(generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_selector_keeps_its_top_logits():
    f = _features()
    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=16, channels=8)
    keep = keep_mask("selector", f, 0.25, context=Context(selector=sel))
    with torch.no_grad():
        top = sel.keep_logits(f).topk(4, dim=1).indices
    expect = torch.zeros(3, 16, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(keep, expect)


def test_diversity_keeps_outliers_and_spreads():
    # 14 near-identical blank tokens and two distinct ones: max-min diversity picks the distinct ones
    f = torch.ones(1, 16, 4) + 0.01 * _features(1, 16, 4)
    f[0, 5] = torch.tensor([-1.0, -1.0, 1.0, 1.0])  # orthogonal to blank
    f[0, 11] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # orthogonal to blank, opposite to 5
    keep = keep_mask("diversity", f, 0.125)  # k = 2
    assert keep[0].nonzero().flatten().tolist() == [5, 11]
    # batched over crops equals crop by crop
    g = _features(4, 16, 8, seed=1)
    batched = keep_mask("diversity", g, 0.25)
    single = torch.cat([keep_mask("diversity", g[i:i + 1], 0.25) for i in range(4)])
    assert torch.equal(batched, single)
