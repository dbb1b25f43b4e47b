"""The published pruners (VisionZip, HiRED, DivPrune, CDPruner): each on small fixed tensors with the
answer worked out by hand from its paper's algorithm, and every strategy at the same budget."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.strategies import Context, image_budget, names, select
from pipeline.strategies.cdpruner import cdpruner, dpp_greedy
from pipeline.strategies.divprune import divprune
from pipeline.strategies.hired import hired
from pipeline.strategies.visionzip import visionzip, visionzip_split

# ---------------------------------------------------------------- VisionZip


def test_visionzip_split_is_540_to_100():
    assert visionzip_split(640) == (540, 100)
    assert visionzip_split(128) == (108, 20)  # 640 over LLaVA-NeXT's 5 crops
    assert visionzip_split(64) == (54, 10)    # their LLaVA-1.5 example
    assert visionzip_split(3) == (3, 0)       # too small for a contextual token
    assert visionzip_split(7) == (6, 1)


def test_visionzip_dominant_then_contextual_by_hand():
    # 8 tokens; CLS attention picks dominant tokens 1 (0.30) and 4 (0.25). The rest, in index order,
    # are [0, 2, 3, 5, 6, 7]: m = 6, 2 targets, step = 3 -> targets at positions 0 and 3 = tokens 0, 5.
    # Keys: 2 and 6 point like token 0's, 3 and 7 like token 5's, so
    #   contextual(0) = h0 + mean(h2, h6),   contextual(5) = h5 + mean(h3, h7).
    attn = torch.tensor([[0.05, 0.30, 0.02, 0.03, 0.25, 0.05, 0.10, 0.20]])
    keys = torch.tensor([[[1, 0], [0, 0], [0.9, 0.1], [0.2, 0.8], [0, 0], [0, 1], [1, 0.2], [0.1, 1]]])
    h = torch.tensor([[[float(i), 1.0] for i in range(8)]])
    sel = visionzip(h, attn, keys, 0.5, "per-crop", torch.ones(1, 8, dtype=torch.bool), options={"split": (1, 1)})
    assert sel.mask[0].nonzero().flatten().tolist() == [1, 4]
    torch.testing.assert_close(sel.extra, torch.tensor([[0 + 4.0, 1 + 1.0], [5 + 5.0, 1 + 1.0]]))
    assert sel.tokens == 4  # k = round(0.5 * 8): 2 dominant + 2 contextual


def test_visionzip_sends_each_crops_cls_as_a_dominant_token():
    # As VisionZip does: its dominant count includes CLS. k = 4 per crop, split (1, 1): 2 dominant =
    # the CLS + 1 patch token (the top by attention), then 2 contextual; the CLS tokens lead the extras.
    attn = torch.tensor([[0.05, 0.30, 0.02, 0.03, 0.25, 0.05, 0.10, 0.20]] * 2)
    keys = torch.tensor([[[1, 0], [0, 0], [0.9, 0.1], [0.2, 0.8], [0, 0], [0, 1], [1, 0.2], [0.1, 1]]] * 2)
    h = torch.tensor([[[float(i), 1.0] for i in range(8)]] * 2)
    cls = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    sel = visionzip(h, attn, keys, 0.5, "per-crop", torch.ones(2, 8, dtype=torch.bool), cls, {"split": (1, 1)})
    assert sel.mask.sum(1).tolist() == [1, 1] and sel.mask[:, 1].all()
    assert sel.tokens == 8 and sel.extra.shape == (6, 2)
    torch.testing.assert_close(sel.extra[:2], cls)
    # a budget of 1 per crop is the CLS alone
    one = visionzip(h, attn, keys, 1 / 8, "per-crop", torch.ones(2, 8, dtype=torch.bool), cls)
    assert not one.mask.any() and one.tokens == 2
    torch.testing.assert_close(one.extra, cls)


def test_visionzip_never_keeps_or_merges_padding():
    attn = torch.tensor([[0.9, 0.8, 0.01, 0.02, 0.03, 0.04]])
    valid = torch.tensor([[False, True, True, True, True, True]])  # token 0 is canvas padding
    h = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0], [5.0]]])
    keys = torch.ones(1, 6, 2)
    sel = visionzip(h, attn, keys, 0.6, "per-crop", valid, options={"split": (1, 1)})  # k = 3: 1 dominant, 2 contextual
    assert sel.mask[0].nonzero().flatten().tolist() == [1]  # not the padding token 0, whatever its attention
    # remaining valid: 2, 3, 4, 5 (m = 4, step 2): targets 2 and 4; equal keys send 3 and 5 to the first
    torch.testing.assert_close(sel.extra, torch.tensor([[2.0 + 4.0], [4.0]]))


# ---------------------------------------------------------------- HiRED


def test_hired_splits_the_budget_by_layer0_attention_by_hand():
    # base + 2 grid crops of 4 tokens, r = 0.5: K = 2 + 2 + 2 = 6. The base gets int(0.5 * 6) = 3.
    # The base's top int(4 * 0.5) = 2 tokens by layer-0 attention are tokens 0 and 1, both in grid
    # crop 1, so crop 1 gets all 3 of the rest and crop 2 none. Then top-k by feature-layer attention.
    cls = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], [0.9, 0.8, 0.7, 0.6]])
    early = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.0] * 4, [0.0] * 4])
    regions = torch.tensor([1, 1, 2, 2])
    keep = hired(cls, early, regions, 0.5, "per-crop", torch.ones(3, 4, dtype=torch.bool))
    assert keep.sum(1).tolist() == [3, 3, 0]
    assert keep[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 2]


def test_hired_caps_a_crop_at_its_valid_tokens():
    cls = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    early = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.0] * 4, [0.0] * 4])
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, 2:] = False  # crop 1 has 2 valid tokens: per-crop K = 2 + 1 + 2 = 5, base int(2.5) = 2
    keep = hired(cls, early, torch.tensor([1, 1, 2, 2]), 0.5, "per-crop", valid)
    assert keep.sum(1).tolist() == [2, 2, 1]  # crop 1 is full at 2; the third goes to crop 2
    assert not (keep & ~valid).any()


def test_hired_splits_evenly_between_equal_regions():
    cls = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    early = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.0] * 4, [0.0] * 4])  # top 2: tokens 0 (crop 1), 2 (crop 2)
    keep = hired(cls, early, torch.tensor([1, 1, 2, 2]), 0.5, "per-crop", torch.ones(3, 4, dtype=torch.bool))
    assert keep.sum(1).tolist() == [3, 2, 1]  # 3 left, 1.5 each: the tie's extra one to the lower crop


# ---------------------------------------------------------------- DivPrune


def test_divprune_max_min_over_the_whole_image_by_hand():
    # crop 0 = [t0, t3], crop 1 = [t1, t2] with t0 = (1, 0), t1 = (0.99, 0.14), t2 = (0, 1), t3 = (-1, 0).
    # Nearest-neighbour cosine distances: t0 ~0.01, t1 ~0.01, t2 0.86, t3 1.0 -> first t3. Then the token
    # farthest from {t3}: t0 (2.0). K = 2 (per-crop 1 + 1), both in crop 0: the budget is the image's.
    t0, t1, t2, t3 = [1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]
    proj = torch.tensor([[t0, t3], [t1, t2]])
    keep = divprune(proj, 0.5, "per-crop", torch.ones(2, 2, dtype=torch.bool))
    assert keep.tolist() == [[True, True], [False, False]]
    keep3 = divprune(proj, 0.75, "global", torch.ones(2, 2, dtype=torch.bool))  # K = 3: then t2 (1.0 > 0.01)
    assert keep3.tolist() == [[True, True], [False, True]]


# ---------------------------------------------------------------- CDPruner


def test_dpp_greedy_map_by_hand():
    # L = [[1, .9, 0], [.9, 1, 0], [0, 0, .5]]: d^2 = (1, 1, .5) -> pick 0; e = L[0] / 1 = (1, .9, 0),
    # d^2 -= e^2 -> (0, .19, .5) -> pick 2 (not the near-duplicate 1, though its diagonal is larger).
    kernel = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    assert dpp_greedy(kernel, 2).tolist() == [0, 2]
    assert dpp_greedy(kernel, 3).tolist() == [0, 2, 1]
    torch.testing.assert_close(torch.tensor(1 - 0.81), torch.tensor(0.19))


def test_cdpruner_relevance_conditions_the_choice_by_hand():
    # S = cosine similarity of t0 = (1, 0), t1 = (.9, sqrt(.19)), t2 = (0, 1): S01 = .9, S02 = 0.
    # Unconditioned (L = S, every diagonal 1): one of the near-duplicates t0, t1, then t2.
    # q = (1, .9, .9): L = (1, .81, .81) on the diagonal, L01 = .81 -> t0; d^2 = (0, .81 - .81^2, .81) -> t2.
    # q = (1, .95, .3): L = (1, .9025, .09), L01 = .855 -> t0; d^2 = (0, .9025 - .855^2 = .1715, .09) -> t1.
    proj = torch.tensor([[[1.0, 0.0], [0.9, math.sqrt(0.19)], [0.0, 1.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    plain = cdpruner(proj, None, 2 / 3, "per-crop", valid)[0].tolist()
    assert plain[2] and plain[0] != plain[1]
    assert cdpruner(proj, torch.tensor([[1.0, 0.9, 0.9]]), 2 / 3, "per-crop", valid)[0].tolist() == [True, False, True]
    assert cdpruner(proj, torch.tensor([[1.0, 0.95, 0.3]]), 2 / 3, "per-crop", valid)[0].tolist() == [True, True, False]


def test_cdpruner_runs_per_crop_with_each_crops_budget():
    proj = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[2, 5:] = False
    keep = cdpruner(proj, None, 0.5, "per-crop", valid)
    assert keep.sum(1).tolist() == [4, 4, 2] and not (keep & ~valid).any()
    assert int(cdpruner(proj, None, 0.5, "global", valid).sum()) == 10  # round(0.5 * 21)


# ---------------------------------------------------------------- one budget for all


def _context(crops, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randint(1, crops, (tokens,), generator=g) if crops > 1 else torch.zeros(tokens, dtype=torch.long)
    return Context(generator=torch.Generator().manual_seed(seed), cls_attention=torch.rand(crops, tokens, generator=g),
                   early_attention=torch.rand(crops, tokens, generator=g), keys=torch.randn(crops, tokens, 4, generator=g),
                   regions=regions, projected=torch.randn(crops, tokens, 6, generator=g),
                   relevance=torch.rand(crops, tokens, generator=g), cls_tokens=torch.randn(crops, 8, generator=g))


@pytest.mark.parametrize("budget", ["per-crop", "global"])
def test_every_strategy_sends_as_many_tokens_as_random(budget):
    from pipeline.selector import SelectorConfig, TokenSelector

    sel = TokenSelector(SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=2), tokens=40, channels=8)
    for crops, seed in ((1, 0), (3, 1), (5, 2)):
        feats = torch.randn(crops, 40, 8, generator=torch.Generator().manual_seed(seed))
        valid = torch.ones(crops, 40, dtype=torch.bool)
        if crops > 1:
            valid[-1, 25:] = False  # an unpadded grid crop
        ctx = _context(crops, 40, seed)
        ctx.selector = sel
        for r in (0.1, 0.25, 0.5, 1.0):
            want = select("random", feats, r, budget, ctx, valid).tokens
            assert want == image_budget(valid, r, budget)
            for s in names():
                if s in ("none", "full", "visionselector"):  # visionselector: a checkpoint trained for the model
                    continue                                  # (its budgets: tests/test_visionselector.py)
                got = select(s, feats, r, budget, ctx, valid)
                assert got.tokens == want, (s, crops, r, budget)
                assert not (got.mask & ~valid).any(), s


def test_strategies_refuse_missing_inputs_in_one_line():
    f = torch.randn(2, 4, 3)
    for s, what in (("visionzip", "CLS attention"), ("hired", "CLS attention"), ("divprune", "projected tokens"),
                    ("cdpruner", "projected tokens")):
        with pytest.raises(ValueError, match=what):
            select(s, f, 0.5)
    with pytest.raises(ConfigError, match="valid: full, none, random, selector, attention, diversity, visionzip, hired, "
                                          "divprune, cdpruner"):
        select("fastv", f, 0.5)


def test_visionzip_merge_ablations_by_hand():
    attn = torch.tensor([[0.05, 0.30, 0.02, 0.03, 0.25, 0.05, 0.10, 0.20]])
    keys = torch.tensor([[[1, 0], [0, 0], [0.9, 0.1], [0.2, 0.8], [0, 0], [0, 1], [1, 0.2], [0.1, 1]]])
    h = torch.tensor([[[float(i), 1.0] for i in range(8)]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    avg = visionzip(h, attn, keys, 0.5, "per-crop", valid, options={"split": (1, 1), "merge": "average"})
    torch.testing.assert_close(avg.extra, torch.tensor([[(0 + 2 + 6) / 3, 1.0], [(5 + 3 + 7) / 3, 1.0]]))
    alone = visionzip(h, attn, keys, 0.5, "per-crop", valid, options={"split": (1, 1), "merge": "target"})
    torch.testing.assert_close(alone.extra, torch.tensor([[0.0, 1.0], [5.0, 1.0]]))


def attention_profile(model, processor, images, top_share: float = 0.02) -> dict[str, float]:
    """Does the tower's CLS attention sit on a few high-norm tokens, as in real CLIP towers (Darcet et
    al., "Vision Transformers Need Registers")? Over every crop of ``images``:

    ``top_mass``: the share of CLS attention on the top ``top_share`` of tokens (at least one token;
    ``uniform``: that share under uniform attention);
    ``norm_ratio``: max / median token norm of the feature layer (Darcet's artifacts: about 10x);
    ``top_attention_norm_rank``: the mean norm percentile of each crop's most attended token
    (1.0: it is the highest-norm token); ``norm_attention_corr``: Pearson correlation of norm and attention."""
    from pipeline.prune import encode_images

    top_mass, ratio, rank, corr, uniform = [], [], [], [], []
    for f in encode_images(model, processor, list(images), attention=True):
        a, norms = f.cls_attention.float(), f.features.float().norm(dim=-1)
        k = max(1, round(top_share * a.shape[1]))
        top_mass.append((a.topk(k, dim=1).values.sum(1) / a.sum(1)).mean())
        uniform.append(torch.tensor(k / a.shape[1]))
        ratio.append((norms.max(1).values / norms.median(1).values).mean())
        best = a.argmax(1)
        pct = (norms <= norms.gather(1, best[:, None])).float().mean(1)
        rank.append(pct.mean())
        x, y = norms - norms.mean(1, keepdim=True), a - a.mean(1, keepdim=True)
        corr.append(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-12)).mean())
    mean = lambda v: float(torch.stack(v).mean())  # noqa: E731
    return {"images": len(top_mass), "top_share": top_share, "top_mass": mean(top_mass), "uniform": mean(uniform),
            "norm_ratio": mean(ratio),
            "top_attention_norm_rank": mean(rank), "norm_attention_corr": mean(corr)}


@pytest.mark.slow
def test_why_visionzip_trails_on_tiny_scenes(trained_model, session_home):
    """The measured explanation in docs/peers.md: CLS attention misses the big shape on scenes, the tiny
    crops leave no room for contextual tokens, and the merge does not help this LM; and the tiny tower has
    no high-norm artifact tokens (Darcet et al.)."""
    from eval_helpers import benchmark_items
    from flows.stages.eval import data_files
    from pipeline.evaluate import Pruning, encode_shard, evaluate_features
    from pipeline.strategies import TowerOutputs
    from pipeline.synthetic import generate_samples

    model, processor = trained_model
    bench = "synthetic-scene"
    items = benchmark_items(bench, data_files(bench, {}, session_home, 300), 300)
    shard = encode_shard(model, processor, items, TowerOutputs(attention=True))
    small = {s.question_id: {p.rstrip("0123456789,-") for p in s.content_key.split(":")[-1].split(";")}
             for s in generate_samples(bench, "test", 300)}
    score = {}
    for strategy, r in (("random", 0.25), ("attention", 0.25), ("attention", 0.1), ("visionzip", 0.1),
                        ("visionzip", 0.25)):
        res = evaluate_features(model, processor, bench, shard, Pruning(strategy, r, seed=0))
        wrong = [x for x in res.samples if x["score"] < 1]
        distract = sum(x["prediction"].strip().lower() in small[x["sample_id"]] for x in wrong)
        score[(strategy, r)] = res.score
        print(f"{strategy}@{r}: {res.score:.3f}, {len(wrong)} wrong, {distract} name a distractor's colour")
    no_cls = {"cls": False}  # the ablation: the CLS slot goes to a patch token
    for r in (0.1, 0.25):
        score[("no-cls", r)] = evaluate_features(model, processor, bench, shard,
                                                 Pruning("visionzip", r, options=no_cls)).score
        print(f"visionzip@{r} without CLS: {score[('no-cls', r)]:.3f}")
    for merge in ("average", "target"):
        score[(merge, 0.25)] = evaluate_features(model, processor, bench, shard,
                                                 Pruning("visionzip", 0.25, options={**no_cls, "merge": merge})).score
        print(f"visionzip@0.25 without CLS, merge={merge}: {score[(merge, 0.25)]:.3f}")
    assert score[("visionzip", 0.25)] < score[("no-cls", 0.25)]  # the CLS tokens are what hurts most
    assert score[("attention", 0.25)] < score[("random", 0.25)]  # CLS attention misses the big shape
    assert score[("no-cls", 0.1)] == score[("attention", 0.1)]  # k <= 2 per crop: no contextual token
    assert max(score[("average", 0.25)], score[("target", 0.25)]) < 0.9  # no merge variant reaches 0.9x
    for b in ("synthetic-scene", "synthetic-ocr"):
        images = [it.image for it in benchmark_items(b, data_files(b, {}, session_home, 300), 100)]
        prof = attention_profile(model, processor, images)
        print(b, {k: round(v, 3) if isinstance(v, float) else v for k, v in prof.items()})
        assert prof["norm_ratio"] < 2.0  # Darcet's artifact tokens are ~10x the median norm: none here
        assert prof["uniform"] < prof["top_mass"] < 0.5
