"""Reduction strategies: budgets, determinism, and what each one keeps."""

from __future__ import annotations

import pytest
import torch

from pipeline.selector import SelectorConfig, TokenSelector
from pipeline.strategies import Context, keep_mask, names


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
    with pytest.raises(ValueError, match="valid: " + ", ".join(names())):
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


def _padded_valid(crops=3, tokens=16):
    """Crop 0 whole (the base crop), crop 1 half padding (its last 8 tokens), crop 2 a quarter."""
    valid = torch.ones(crops, tokens, dtype=torch.bool)
    valid[1, 8:] = False
    valid[2, 12:] = False
    return valid


@pytest.mark.parametrize("strategy", ["random", "attention", "diversity", "selector", "full"])
def test_budgets_count_valid_tokens_only_and_padding_is_never_kept(strategy):
    f = _features()
    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=16, channels=8)
    att = torch.rand(3, 16)
    att[:, 8:] += 10.0  # the padding looks most attended: it must still not be kept
    ctx = Context(selector=sel, cls_attention=att)
    valid = _padded_valid()
    for r in (0.1, 0.25, 0.5, 1.0):
        keep = keep_mask(strategy, f, r, "per-crop", ctx, valid)
        assert not (keep & ~valid).any(), (strategy, r)
        want = [16, 8, 12] if strategy == "full" else [max(1, round(r * n)) for n in (16, 8, 12)]
        assert keep.sum(1).tolist() == want, (strategy, r)
        glob = keep_mask(strategy, f, r, "global", ctx, valid)
        assert not (glob & ~valid).any() and int(glob.sum()) == (36 if strategy == "full" else max(1, round(r * 36)))


@pytest.mark.parametrize("strategy", ["random", "attention", "diversity", "selector"])
def test_an_all_valid_mask_changes_nothing(strategy):
    f = _features()
    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=16, channels=8)
    for budget in ("per-crop", "global"):
        a = keep_mask(strategy, f, 0.25, budget, Context(selector=sel, cls_attention=torch.rand(3, 16,
                      generator=torch.Generator().manual_seed(1)), generator=torch.Generator().manual_seed(2)))
        b = keep_mask(strategy, f, 0.25, budget, Context(selector=sel, cls_attention=torch.rand(3, 16,
                      generator=torch.Generator().manual_seed(1)), generator=torch.Generator().manual_seed(2)),
                      torch.ones(3, 16, dtype=torch.bool))
        assert torch.equal(a, b)


def test_valid_tokens_match_the_models_unpadding(tiny_model):
    """valid_tokens marks exactly the tokens pack_image_features keeps (a wide image pads its grid crops)."""
    from PIL import Image

    from pipeline.prune import encode_images, valid_tokens, visual_embeddings

    model, processor = tiny_model
    wide = Image.new("RGB", (160, 64), "white")  # canvas 64x192: 1x3 grid, outer crops partly padding
    feats = encode_images(model, processor, [wide])[0]
    valid = valid_tokens(model, feats.crops, feats.tokens_per_crop, feats.image_size)
    assert torch.equal(valid, feats.valid) and valid[0].all() and not valid.all()
    full = visual_embeddings(model, feats).shape[0]
    only_valid = visual_embeddings(model, feats, valid).shape[0]
    assert full == only_valid  # keeping padding adds nothing: unpadding drops it anyway
    rows = int((valid[1:].view(3, 8, 8).any(dim=2)).any(dim=0).sum())  # grid rows that keep a token: newlines
    assert full == int(valid.sum()) + rows


def _divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min as its paper states it, one token at a time: first the token farthest
    (cosine distance) from its nearest neighbour, then the one farthest from everything kept."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    dist = 1.0 - unit @ unit.T
    n = len(x)
    nearest = [min(float(dist[i, j]) for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: nearest[i])]
    while len(chosen) < k:
        chosen.append(max((i for i in range(n) if i not in chosen),
                          key=lambda i: min(float(dist[i, j]) for j in chosen)))
    return sorted(chosen)


def test_divprune_is_max_min_over_the_projected_tokens_of_the_whole_image():
    from pipeline.strategies import Context, keep_mask

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 16, 8, generator=g)  # tower features: divprune must not look at them
    projected = torch.randn(3, 16, 12, generator=g)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[1, 12:] = valid[2, :4] = False  # padding rows of two grid crops
    mask = keep_mask("divprune", feats, 0.25, "per-crop", Context(projected=projected), valid)
    assert int(mask.sum()) == round(0.25 * int(valid.sum())) and not (mask & ~valid).any()
    flat = projected.reshape(-1, 12)
    allowed = valid.flatten().nonzero().flatten()
    expect = [int(allowed[i]) for i in _divprune_reference(flat[allowed], int(mask.sum()))]
    assert mask.flatten().nonzero().flatten().tolist() == sorted(expect)
    with pytest.raises(ValueError, match="needs the projected tokens"):
        keep_mask("divprune", feats, 0.25, valid=valid)


def test_divprune_runs_through_evaluation_at_random_s_budget(trained_model):
    from pipeline.benchmarks import EvalItem
    from eval_helpers import evaluate_chunk
    from pipeline.synthetic import generate_samples

    model, processor = trained_model
    items = [EvalItem(s.question_id, s.image, s.question, [s.answer])
             for s in generate_samples("synthetic-scene", "test", 12)]
    div = evaluate_chunk(model, processor, "synthetic-scene", items, "divprune", 0.25, batch_size=6)
    rnd = evaluate_chunk(model, processor, "synthetic-scene", items, "random", 0.25, batch_size=6)
    kept = [r["visual_tokens"] for r in div.samples]
    assert all(v > 0 for v in kept)
    # global K = round(r * valid tokens) against random's per-crop round(r * valid): the same up to
    # rounding (a token per crop) and row newlines (up to a row per kept row)
    assert abs(div.mean_visual_tokens - rnd.mean_visual_tokens) <= 8, (div.mean_visual_tokens, rnd.mean_visual_tokens)
