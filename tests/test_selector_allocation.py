"""The selector's allocation across crops, its calibration, the threshold budget and variant labels."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.selector import SelectorConfig, TokenSelector
from pipeline.strategies import Context, Threshold, adaptive_keep, get, select, selections, variant_text
from pipeline.strategies.basic import calibrated


@pytest.fixture(scope="module")
def selector():
    torch.manual_seed(0)
    model = TokenSelector(SelectorConfig(n_heads=4), tokens=16, channels=8).eval()
    with torch.no_grad():  # a head with logits spread over about (-3, 3): a threshold sweep sees them all
        model.head.weight.mul_(100.0)
    return model


def _image(crops=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(crops, 16, 8, generator=g)


def test_image_allocation_is_the_global_top_k_of_the_same_logits(selector):
    x = _image()
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, 12:] = False  # a padded crop
    per_crop = select("selector", x, 0.25, "per-crop", Context(selector=selector), valid)
    image = select("selector", x, 0.25, "per-crop", Context(selector=selector), valid, options={"allocation": "image"})
    glob = select("selector", x, 0.25, "global", Context(selector=selector), valid)
    # the same K as the paper's k per crop (4 + 4 + 3), spread by logit over the whole image
    assert image.tokens == per_crop.tokens == 11
    logits = selector.keep_logits(x).masked_fill(~valid, float("-inf")).flatten()
    assert set(image.mask.flatten().nonzero().flatten().tolist()) == set(logits.topk(11).indices.tolist())
    assert not (image.mask & ~valid).any()
    # global's K = round(0.25 * 44) = 11 too: the same tokens
    assert torch.equal(glob.mask, image.mask)


def test_crop_z_calibration_removes_each_crops_offset_and_scale():
    valid = torch.ones(2, 4, dtype=torch.bool)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 12.0, 14.0, 16.0]])
    z = calibrated(logits, valid, "crop-z")
    torch.testing.assert_close(z[0], z[1])  # the same shape in both crops, once offset and scale are gone
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2))
    assert torch.equal(calibrated(logits, valid, "none"), logits)
    valid[1, 3] = False  # padding takes no part in a crop's statistics
    z = calibrated(logits, valid, "crop-z")
    assert z[1, 3] == 0 and abs(float(z[1, :3].mean())) < 1e-6


def test_threshold_budget_keeps_what_passes_between_floor_and_cap():
    valid = torch.ones(2, 10, dtype=torch.bool)
    prob = torch.zeros(2, 10)
    prob[0, :3] = 0.9  # three tokens pass 0.5
    assert int(adaptive_keep(prob, valid, 0.5, 0.0, 1.0).sum()) == 3
    assert adaptive_keep(prob, valid, 0.5, 0.0, 1.0)[0, :3].all()
    assert int(adaptive_keep(prob, valid, 0.5, 0.25, 1.0).sum()) == 5   # floor: round(0.25 * 20)
    assert int(adaptive_keep(prob, valid, 0.5, 0.0, 0.1).sum()) == 2    # cap: round(0.1 * 20)
    assert int(adaptive_keep(prob, valid, 0.95, 0.0, 1.0).sum()) == 1   # at least one token
    prob[1] = 0.8  # more content, more tokens
    assert int(adaptive_keep(prob, valid, 0.5, 0.0, 1.0).sum()) == 13


def test_threshold_budget_through_select_follows_the_selectors_probability(selector):
    x = _image()
    valid = torch.ones(3, 16, dtype=torch.bool)
    prob = torch.sigmoid(selector.keep_logits(x))
    for t in (0.3, 0.5, 0.7):
        got = select("selector", x, 0.75, Threshold(t, 0.02), Context(selector=selector), valid)
        want = int((prob >= t).sum())
        assert got.tokens == min(max(want, 1), 36)
        assert bool((prob[got.mask] >= prob[~got.mask].max()).all()) if got.tokens < 48 else True
    # the batch path gives every image the mask it gets alone
    images = [_image(seed=s) for s in (1, 2)]
    batch = selections("selector", images, 0.75, Threshold(0.5, 0.02), Context(selector=selector))
    alone = [select("selector", f, 0.75, Threshold(0.5, 0.02), Context(selector=selector))
             for f in images]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(batch, alone))


def test_threshold_budget_refusals_are_one_line(selector):
    x = _image()
    with pytest.raises(ConfigError, match="has no keep probability"):
        select("random", x, 0.5, Threshold(0.5))
    with pytest.raises(ConfigError, match="needs its threshold"):
        select("selector", x, 0.5, "threshold", Context(selector=selector))
    for bad in (1.0, 1.5, -0.5, float("nan")):
        with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\)"):
            select("selector", x, 0.5, Threshold(bad), Context(selector=selector))
    with pytest.raises(ConfigError, match="floor"):
        select("selector", x, 0.5, Threshold(0.5, 0.6), Context(selector=selector))


def test_selector_options_and_variant_labels():
    spec = get("selector")
    assert spec.adaptive and not get("divprune").adaptive
    assert spec.variant({}) == "" and spec.variant({"variant": "nearest"}) == ""
    assert spec.variant({"allocation": "image", "calibration": "crop-z"}) == "allocation=image,calibration=crop-z"
    assert spec.variant({"variant": "p0.25"}) == "variant=p0.25"
    assert variant_text({"cls": False, "merge": "average"}) == "cls=false,merge=average"
    for bad in ({"variant": "best"}, {"variant": "p2"}, {"allocation": "crops"}, {"calibration": "softmax"}):
        with pytest.raises(ConfigError) as err:
            spec.resolve_options(bad)
        assert "\n" not in str(err.value)


def test_grid_allocation_spends_the_images_k_on_the_grid_crops_only(selector):
    x = _image(crops=3)
    valid = torch.ones(3, 16, dtype=torch.bool)
    got = select("selector", x, 0.25, "per-crop", Context(selector=selector), valid, options={"allocation": "grid"})
    assert got.tokens == 12 and not got.mask[0].any()
    logits = selector.keep_logits(x)[1:].flatten()
    assert set((got.mask[1:].flatten().nonzero().flatten()).tolist()) == set(logits.topk(12).indices.tolist())
    # the same K under the global budget; a one-crop image keeps its own top-K
    assert select("selector", x, 0.25, "global", Context(selector=selector), valid,
                  options={"allocation": "grid"}).tokens == 12
    one = select("selector", x[:1], 0.25, "per-crop", Context(selector=selector), options={"allocation": "grid"})
    assert one.tokens == 4
    # grid crops with fewer valid tokens than K: the base crop fills in
    few = valid.clone()
    few[1:, 2:] = False
    got = select("selector", x, 0.5, "global", Context(selector=selector), few, options={"allocation": "grid"})
    assert got.tokens == 10 and got.mask[0].any()


def test_threshold_budget_with_grid_allocation_skips_the_base_crop(selector):
    x = _image(crops=3)
    got = select("selector", x, 0.75, Threshold(0.3, 0.02), Context(selector=selector), options={"allocation": "grid"})
    prob = torch.sigmoid(selector.keep_logits(x))[1:]
    assert not got.mask[0].any()
    assert got.tokens == min(max(int((prob >= 0.3).sum()), 1), 24)  # the cap: 0.75 of the grid's 32 tokens


def test_equal_cost_compares_every_result_with_the_selectors_envelope():
    from flows.present.frontier import at_cost, envelope, frontier_gaps
    from flows.present.report import equal_cost_lines

    def row(strategy, retention, score, tokens, variant="", budget="per-crop", threshold=0.0):
        return {"benchmark": "b", "strategy": strategy, "variant": variant, "budget": budget, "retention": retention,
                "threshold": threshold, "score": score, "visual_tokens": tokens}

    rows = [row("selector", 0.1, 0.70, 9.0), row("selector", 0.1, 0.95, 10.0, variant="allocation=grid"),
            row("selector", 0.75, 0.80, 4.0, budget="threshold", threshold=0.5), row("selector", 0.25, 0.97, 18.0),
            row("divprune", 0.1, 0.88, 8.0), row("divprune", 0.25, 0.97, 17.0), row("random", 0.05, 0.5, 3.0),
            row("full", 1.0, 1.0, 80.0)]
    env = envelope([(r["visual_tokens"], r["score"]) for r in rows if r["strategy"] == "selector"])
    assert env == [(4.0, 0.80), (10.0, 0.95), (18.0, 0.97)]  # the 9-token point is dominated
    assert at_cost(env, 8.0) == (pytest.approx(0.80 + 0.15 * 4 / 6), False)
    assert at_cost(env, 3.0) == (0.80, True) and at_cost(env, 99.0) == (0.97, False)
    gaps = {(g["strategy"], g["retention"]): g for g in frontier_gaps(rows)}
    assert set(gaps) == {("divprune", 0.1), ("divprune", 0.25), ("random", 0.05)}  # not full, not the selector
    assert gaps["divprune", 0.1]["gap"] == pytest.approx(0.88 - 0.90)
    assert gaps["divprune", 0.25]["gap"] == pytest.approx(0.97 - (0.95 + 0.02 * 7 / 8))
    lines = equal_cost_lines(rows)
    assert lines[1] == "## At equal cost" and lines[-1].startswith("None")
    worse = rows + [row("cdpruner", 0.1, 0.99, 9.5)]
    assert "| b | cdpruner | 0.1 | 9.5 | 0.990 | 0.938 | +0.052 |" in equal_cost_lines(worse)
