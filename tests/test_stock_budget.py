"""Budgets against the stock model (issue 29, item 4): the stock token count from geometry, checked
against the models' own packing and processors; the ``stock`` budget; the pruned context against stock,
printed, warned about and recorded per result and per sample; budgets side by side in one run."""

from __future__ import annotations

import random

import duckdb
import pytest
import torch
from PIL import Image

from pipeline.families import LLAVA_NEXT, LLAVA_ONEVISION, family_of
from pipeline.families.base import VisualTokens

# (height, width): odd shapes, the pinpoints' own shapes, tall and wide extremes, one-pixel-short sizes
SIZES = [(60, 100), (190, 190), (50, 50), (180, 64), (128, 192), (191, 127), (33, 400), (400, 33), (64, 64),
         (129, 129)] + [(random.Random(i).randint(16, 420), random.Random(-i).randint(16, 420)) for i in range(30)]


def _packed(model, hw, aspect=None) -> VisualTokens:
    """The model's own ``pack_image_features`` on token indices for an image of ``hw``: (features, newlines)."""
    from pipeline.extract import select_best_resolution

    cfg = model.config
    family = family_of(cfg)
    crop = cfg.vision_config.image_size
    best_h, best_w = select_best_resolution(hw, cfg.image_grid_pinpoints)
    crops = 1 + (best_h // crop) * (best_w // crop)
    tokens = family.tokens_per_crop(cfg)
    index = torch.arange(crops * tokens, dtype=torch.float64).view(crops, tokens, 1)
    packed = family.pack(model.model, [index], torch.tensor([list(hw)]), torch.tensor([-1.0], dtype=torch.float64),
                         cfg, aspect=aspect)[0][:, 0]
    newlines = int((packed < 0).sum())
    return VisualTokens(packed.numel() - newlines, newlines)


@pytest.fixture(scope="module", params=["tiny", "tiny-ov"])
def tiny(request):
    from pipeline.builders import build_tiny
    from pipeline.presets import PRESETS

    return build_tiny(PRESETS[request.param])


def test_the_stock_count_from_geometry_is_the_stock_models_own(tiny):
    """``Family.stock_tokens`` (arithmetic only) equals the stock model's ``pack_image_features`` and its
    processor's ``<image>`` placeholder count, for 40 image shapes; ``visual_tokens`` with interpolation
    off equals the packing that pruned runs use."""
    model, processor = tiny
    family = family_of(model)
    cfg = model.config
    stock = family.stock_config(model, processor)
    off = family.off_value(cfg)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    shrunk = 0
    for hw in SIZES:
        got = family.stock_tokens(cfg, hw, stock)
        assert got == _packed(model, hw, stock.get("vision_aspect_ratio")), hw
        ids = processor(images=[Image.new("RGB", hw[::-1], "red")], text=[text], return_tensors="pt")["input_ids"]
        assert int((ids == cfg.image_token_id).sum()) == got.total, hw
        if off is not None:
            unshrunk = family.visual_tokens(cfg, hw, off)
            assert unshrunk == _packed(model, hw, off), hw
            shrunk += unshrunk.total > got.total
    if family is LLAVA_ONEVISION:  # anyres_max_4 shrinks the larger grids of the 3 x 3 pinpoints
        assert cfg.vision_aspect_ratio == "anyres_max_4" and shrunk >= 10
    else:
        assert family is LLAVA_NEXT and off is None


# The docs/onevision.md table: llava-onevision-qwen2-7b-ov (SigLIP-384/14, 36 pinpoints, anyres_max_9).
REAL_PAGES = {"DocVQA page 1700x2200": ((2200, 1700), 21141, 7353, 10642, 3792, 0.342),
              "COCO photo 640x480": ((480, 640), 2929, 2929, 1484, 1484, 1.0),
              "chart 1024x768": ((768, 1024), 4725, 4725, 2386, 2390, 1.0)}


def test_what_interpolation_off_costs_on_real_pages():
    """The figures of docs/onevision.md, from geometry on the real config (meta device): full with
    interpolation off, the stock model, the per-crop and stock budgets at 0.5 (every row newline kept),
    and the largest per-crop retention whose context stays within stock."""
    from pipeline.builders import on_meta
    from pipeline.extract import select_best_resolution
    from pipeline.presets import SIZED_PRESETS
    from pipeline.prune import valid_tokens
    from pipeline.strategies.core import budget_counts, stock_budget

    model = on_meta(SIZED_PRESETS["bench-ov-7b"])
    cfg = model.config
    family = family_of(cfg)
    off = family.off_value(cfg)
    assert off == "anyres_max_36"
    for name, (hw, full, stock, half, stock_half, even) in REAL_PAGES.items():
        unshrunk, st = family.visual_tokens(cfg, hw, off), family.stock_tokens(cfg, hw)
        assert (unshrunk, st) == (_packed(model, hw, off), _packed(model, hw)), name  # the model's own packing
        best_h, best_w = select_best_resolution(hw, cfg.image_grid_pinpoints)
        crops = 1 + (best_h // 384) * (best_w // 384)
        valid = valid_tokens(model, crops, 729, hw)
        assert int(valid.sum()) == unshrunk.features

        def per_crop(r):
            return int(budget_counts(valid, r, "per-crop").sum()) + unshrunk.newlines

        assert (unshrunk.total, st.total) == (full, stock), name
        assert per_crop(0.5) == half and stock_budget(valid, 0.5, st.features) + unshrunk.newlines == stock_half
        assert max(x / 1000 for x in range(1, 1001) if per_crop(x / 1000) <= st.total) == even, name
        if name.startswith("DocVQA"):  # the page at each retention
            retentions = (0.1, 0.25, 0.35, 0.5, 0.75, 1.0)
            assert [per_crop(r) for r in retentions] == [2257, 5396, 7503, 10642, 15907, 21141]
            assert [stock_budget(valid, r, st.features) + unshrunk.newlines for r in retentions] == \
                [888, 1977, 2703, 3792, 5608, 7423]
            glob = [int(budget_counts(valid, r, "global").sum()) + unshrunk.newlines for r in retentions]
            assert max(abs(g - per_crop(r)) for g, r in zip(glob, retentions)) == 11


def test_the_stock_budget_keeps_r_times_the_stock_models_tokens():
    """K = round(r x stock encoder tokens), spread over the image as global spreads it; with the stock count
    equal to the valid tokens (a family that never shrinks) it is the global budget, mask for mask."""
    from pipeline.config import ConfigError
    from pipeline.strategies import Context, select
    from pipeline.strategies.core import budget_counts, stock_budget

    torch.manual_seed(0)
    features = torch.randn(5, 49, 8)
    valid = torch.ones(5, 49, dtype=torch.bool)
    valid[1:, 42:] = False  # grid crops lose their last row to unpadding
    n = int(valid.sum())
    for strategy in ("random", "diversity"):
        for r, stock in ((0.25, 120), (0.1, 120), (0.5, 77), (1.0, 120), (0.01, 30)):
            sel = select(strategy, features, r, "stock", Context(), valid, stock=stock)
            assert sel.tokens == stock_budget(valid, r, stock) == max(1, round(r * stock)), (strategy, r)
            assert not (sel.mask & ~valid).any()
        same = [select(strategy, features, 0.3, b, Context(generator=torch.Generator().manual_seed(1)), valid,
                       stock=n if b == "stock" else None).mask for b in ("stock", "global")]
        assert torch.equal(*same)
    with pytest.raises(ConfigError) as err:
        select("random", features, 0.25, "stock", Context(), valid)
    assert "\n" not in str(err.value) and "stock budget needs the stock model's token count" in str(err.value)
    with pytest.raises(ConfigError):
        budget_counts(valid, 0.25, "stock")


def test_every_strategy_sends_the_stock_budget_on_onevision():
    """On tiny-ov with interpolation off, every pruner (the peers that split K their own way included) sends
    K = round(r x the stock model's encoder tokens) of each image, through the one selection path."""
    from pipeline.builders import build_tiny
    from pipeline.evaluate import strategy_inputs
    from pipeline.presets import PRESETS
    from pipeline.prune import encode_images
    from pipeline.strategies import Batch, Context, pruners, selections, tower_outputs
    from pipeline.strategies.core import stock_budget

    model, processor = build_tiny(PRESETS["tiny-ov"])
    family = family_of(model)
    stock_cfg = family.stock_config(model, processor)
    family.set_interpolation(model, processor, False)
    names = [p for p in pruners() if p not in ("selector", "visionselector")]  # visionselector: test_visionselector.py
    images = [Image.new("RGB", (w, h), c) for (h, w), c in zip(((190, 190), (60, 100), (129, 129), (180, 64)),
                                                               ("red", "blue", "green", "white"))]
    feats = encode_images(model, processor, images, attention=tower_outputs(names).attention)
    stock = [family.stock_tokens(model.config, f.image_size, stock_cfg) for f in feats]
    assert any(s.features < int(f.valid.sum()) for s, f in zip(stock, feats))  # some grids shrink in stock
    for name in names:
        per_image = [strategy_inputs(model, name, f) for f in feats]
        for r in (0.1, 0.25, 0.5):
            got = selections(name, [f.features for f in feats], r, "stock", Context(),
                             Batch([f.valid for f in feats], per_image, [s.features for s in stock]))
            assert [g.tokens for g in got] == [stock_budget(f.valid, r, s.features) for f, s in zip(feats, stock)], \
                (name, r)


def test_several_budgets_in_one_eval_config():
    from pipeline.config import ConfigError
    from pipeline.evaluate import EvalConfig

    cfg = EvalConfig(strategies=("full", "random"), retentions=(0.25,), seeds=1, budget="per-crop,stock")
    assert cfg.budgets == ("per-crop", "stock")
    assert [(p.strategy, p.budget) for p in cfg.chunks()] == [("full", "per-crop"), ("random", "per-crop"),
                                                              ("random", "stock")]
    assert EvalConfig.from_dict({"budget": ["global", "stock"]}).budgets == ("global", "stock")
    for bad, needle in (("per-crop,banana", "unknown budget 'banana'"), ("global,global", "distinct budgets")):
        with pytest.raises(ConfigError) as err:
            EvalConfig(budget=bad)
        assert needle in str(err.value) and "\n" not in str(err.value)


def _sample_geometry(home, limit):
    """Each synthetic-scene test sample's image size (height, width), by sample id."""
    from flows.stages.eval import data_files, shard_items

    items, _, _ = shard_items("synthetic-scene", data_files("synthetic-scene", {}, home, limit), 0, limit)
    return {it.sample_id: (it.images[0].height, it.images[0].width) for it in items}


def test_budgets_side_by_side_against_stock_through_atr_eval(cli_env):
    """A real tiny-ov-trained eval through `atr eval` with three budgets in one run: per-crop, global and
    stock rows of the same strategy and retention come back labelled from SQL; every result records its
    context against stock (scores and samples); the stock budget's counts are r x the stock model's; the
    table prints `vs stock`; and a pruned context above stock is warned about at whatever retention."""
    from conftest import atr_in_process
    from flows.stages.prepare_model import model_stage
    from storage.home import Home

    limit = 8
    argv = ["eval", "--model", "tiny-ov-trained", "--benchmark", "synthetic-scene", "--limit", limit,
            "--shard-size", limit, "--seeds", "1", "--strategies", "full,none,random,diversity",
            "--retentions", "0.25,0.9", "--budget", "per-crop,global,stock"]
    proc = atr_in_process(argv, cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "vs stock" in proc.stdout and "Rel. (mean over benchmarks of pruned/full): diversity[global]@0.25" \
        in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "than the stock model would" in line]
    # at 0.9 the per-crop and global contexts of the big scenes exceed the shrunk stock grid; at 0.25 none does,
    # and the stock budget never does
    assert {w.split(" (")[1].split(" budget")[0] for w in warnings} == {"per-crop", "global"}, proc.stderr
    assert all("synthetic-scene at retention 0.9 " in w and "random, diversity" in w and "--budget stock" in w
               for w in warnings), warnings

    home = Home.resolve(cli_env["ATR_HOME"])
    with duckdb.connect(str(home.results_db), read_only=True) as con:
        scores = con.execute("SELECT strategy, budget, retention, mean_visual_tokens, stock_visual_tokens, "
                             "tokens_vs_stock FROM eval_scores ORDER BY strategy, budget, retention").fetchall()
        samples = con.execute("SELECT sample_id, strategy, budget, retention, visual_tokens, stock_visual_tokens "
                              "FROM eval_samples").fetchall()
        model_key = con.execute("SELECT cache_key FROM stage_runs WHERE stage = 'prepare-model'").fetchone()[0]
    by = {(s, b, r): (mean, stock, ratio) for s, b, r, mean, stock, ratio in scores}
    assert len(scores) == 2 + 2 * 3 * 2 and {b for s, b, r in by if s == "random"} == {"per-crop", "global", "stock"}
    stock_mean = by["full", "per-crop", 1.0][1]
    assert by["none", "per-crop", 0.0][1:] == (None, None)  # no image sent: nothing to compare
    for (s, b, r), (mean, stock, ratio) in by.items():
        if s != "none":
            assert stock == pytest.approx(stock_mean) and ratio == pytest.approx(mean / stock)
    assert by["full", "per-crop", 1.0][2] > 1.1  # interpolation off: full costs more than the stock model
    assert by["random", "per-crop", 0.9][2] > 1 and by["random", "stock", 0.9][2] < 1

    # the queries of docs/results-store.md's "Budgets and cost against the stock model", on this real store
    from storage.results import query

    (c1, equal), (_, sides), (_, above) = [query(home.results_db, q) for q in _documented_stock_queries()]
    assert c1[:3] == ["model", "benchmark", "vs_stock"] and len(equal) == 2 * 3 * 2
    cost = {(r[3], r[4], r[5]): r[2] for r in equal}
    assert cost["random", "stock", 0.9] < 1 < cost["random", "per-crop", 0.9]
    assert [r[2:4] for r in sides] == [("diversity", 0.25), ("diversity", 0.9), ("random", 0.25), ("random", 0.9)]
    assert {(r[2], r[3], r[4]) for r in above} == {(s, b, 0.9) for s in ("diversity", "random")
                                                   for b in ("global", "per-crop")}
    assert all(0 < r[6] <= r[5] == limit and r[7] > 0 for r in above)

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_stage(home, model_key).model_dir)
    family = family_of(cfg)
    off = family.off_value(cfg)
    sizes = _sample_geometry(home, limit)
    assert len(samples) == len(scores) * limit
    for sid, s, b, r, sent, stock in samples:
        st, unshrunk = family.stock_tokens(cfg, sizes[sid]), family.visual_tokens(cfg, sizes[sid], off)
        if s == "none":
            assert (sent, stock) == (0, None)
            continue
        assert stock == st.total  # the stock model's own count, per sample
        if s == "full":
            assert sent == unshrunk.total
        elif b == "stock":  # K = round(r x the stock model's encoder tokens), plus the row newlines kept
            k = max(1, round(r * st.features))
            assert k < sent <= k + unshrunk.newlines, (sid, s, r)



def _documented_stock_queries() -> list[str]:
    import re

    from conftest import REPO

    text = (REPO / "docs" / "results-store.md").read_text()
    section = text.split("## Budgets and cost against the stock model", 1)[1].split("\n## ", 1)[0]
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", section, re.S)]
