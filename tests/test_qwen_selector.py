"""The selector on Qwen-VL: dynamic-grid features, padded batches, family refusal; LLaVA selectors unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.selector import SelectorConfig, TokenSelector, grid_indices_rect, grid_layout, pad_grids
from pipeline.train import Trainer, grid_batched

SIZES = [(64, 64), (100, 150), (208, 90), (48, 200)]  # PIL (width, height)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- extraction

def test_extraction_gives_premerger_groups_per_image_with_the_stock_token_count(qwen_stage, qwen_model):
    """The tower-only load (what the extract stage uses) gives (1, L, 4C) per image, L = the stock processor's
    merged tokens (rows x cols), equal to the whole model's encode_images; merged = the merger on them."""
    from pipeline.extract import GridFeatureExtractor, feature_extractor
    from pipeline.families._qwen import merged_grid
    from pipeline.loading import VisionTower, load_processor, load_vision_tower
    from pipeline.prune import encode_images, project

    model, processor = qwen_model
    tower, tproc = load_vision_tower(qwen_stage.model_dir), load_processor(qwen_stage.model_dir)
    assert isinstance(tower, VisionTower)
    fx = feature_extractor(tower, tproc)
    assert isinstance(fx, GridFeatureExtractor) and fx.feature_dim == 4 * model.config.vision_config.hidden_size
    images = _images()
    got = fx.encode(images)
    whole = encode_images(model, processor, images)
    stock = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    for g, w, img, thw in zip(got, whole, images, stock.tolist()):
        rows, cols = merged_grid(img.size[1], img.size[0], 8, 2, 32 * 32, 224 * 224)
        assert g.grid == (rows, cols) == (thw[1] // 2, thw[2] // 2)
        assert g.features.shape == (1, rows * cols, 256)
        np.testing.assert_allclose(g.features, w.features.numpy(), rtol=1e-5, atol=1e-5)
    assert sorted({g.features.shape[1] for g in got}) == [16, 36, 54, 78]  # L varies per image (48 x 200: 3 x 12)
    merged = feature_extractor(tower, tproc, qwen_features="merged").encode(images[:2])
    for m, w in zip(merged, whole[:2]):
        with torch.no_grad():
            want = project(model, w.features).numpy()
        assert m.features.shape == (1, w.features.shape[1], model.config.vision_config.out_hidden_size)
        np.testing.assert_allclose(m.features, want, rtol=1e-5, atol=1e-5)


def test_extract_stage_stores_grids_and_keeps_llava_keys(session_home, qwen_stage):
    from flows.stages.extract import extract
    from pipeline.config import ConfigError, ExtractConfig
    from storage.shards import iter_features

    cfg = ExtractConfig(limit=6, qwen_features="premerger", device="cpu", shard_size=4)
    assert "qwen_features" not in cfg.to_dict()
    assert cfg.hash() == ExtractConfig(limit=6, device="cpu", shard_size=4).hash()
    assert ExtractConfig(qwen_features="merged").to_dict()["qwen_features"] == "merged"
    with pytest.raises(ConfigError, match="premerger or merged"):
        ExtractConfig(qwen_features="tokens")
    result = extract(session_home, cfg, qwen_stage)
    f = result.manifest["features"]
    assert f["grid"] == "dynamic" and f["feature_dim"] == 256 and "tokens_per_crop" not in f
    samples = list(iter_features(result.path, result.manifest))
    assert len(samples) == 6 and result.manifest["counts"]["shards"] == 2
    for s in samples:
        rows, cols = s.meta["grid"]
        assert s.features.shape == (1, rows * cols, 256) and s.features.dtype == np.float16
        assert s.meta["crops"] == 1 and len(s.meta["glyph_mask"][0]) == rows * cols
        assert s.meta["thw"] == [1, 2 * rows, 2 * cols]
    assert sum(sum(s.meta["glyph_mask"][0]) for s in samples) > 0  # synthetic:docs glyphs land on tokens


# ---------------------------------------------------------------- the dynamic-grid selector

def _cfg(**kw):
    return SelectorConfig(**{"n_heads": 4, "d_model": None, "steps": 6, "batch_size": 3, "lr": 3e-3,
                             "warmup_steps": 1, **kw})


def test_selector_trains_on_mixed_grid_batches():
    rng = np.random.default_rng(0)
    grids = [(4, 4), (9, 6), (6, 13), (3, 5)]
    items = [(rng.standard_normal((r * c, 32)).astype(np.float32), (r, c)) for r, c in grids]

    def stream():
        while True:
            yield from items

    batches = grid_batched(stream(), 3)
    x, g = next(grid_batched(iter(items), 3))
    assert x.shape == (3, 78, 32) and g.tolist() == [[4, 4], [9, 6], [6, 13]] and not x[0, 16:].any()
    trainer = Trainer(_cfg(), None, 32)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rows = []

    class Log:
        def on_step(self, step, metrics):
            rows.append(metrics)

        def on_checkpoint(self, step, trainer):
            pass

        def on_end(self, step, trainer):
            pass

    model = trainer.fit(batches, [Log()], log_every=1)
    assert trainer.step == 6 and len(rows) == 6
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["keep"] <= 1.0 for r in rows)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "selector.blocks.0.attn.qkv.weight" in changed and "head.weight" in changed
    assert not any(k.endswith(".pos") for k in model.state_dict())  # no fixed-L table: any grid fits


def test_padding_does_not_change_an_images_logits_or_reconstruction():
    torch.manual_seed(0)
    model = TokenSelector(_cfg(), None, 32).eval()
    grids = [(4, 4), (9, 6), (6, 13)]
    feats = [torch.randn(r * c, 32) for r, c in grids]
    x, lengths = pad_grids(feats)
    x[0, 16:] = 1e3  # whatever the padding holds
    grid = torch.tensor(grids)
    batch = model.keep_logits(x, grid)
    for i, (f, g) in enumerate(zip(feats, grids)):
        alone = model.keep_logits(f[None], torch.tensor([g]))
        n = int(lengths[i])
        torch.testing.assert_close(batch[i, :n], alone[0], rtol=0, atol=1e-5)
        assert torch.equal(batch[i, :n].argsort(), alone[0].argsort())
        assert torch.isinf(batch[i, n:]).all()
    kept = batch > 0
    err_batch = model.reconstruction_error(x, grid=grid, kept=kept)
    for i, (f, g) in enumerate(zip(feats, grids)):
        n = int(lengths[i])
        alone = model.reconstruction_error(f[None], grid=torch.tensor([g]), kept=kept[i:i + 1, :n])
        torch.testing.assert_close(err_batch[i], alone[0], rtol=1e-5, atol=1e-6)
    # positions: row-major over (rows, cols), one row per image; the padding is masked out
    pos, valid = grid_layout(torch.tensor([[2, 3]]), 8, 8)
    assert valid.tolist() == [[True] * 6 + [False] * 2] and not pos[0, 6:].any()
    # token 1 is (row 0, col 1), token 4 (row 1, col 1): the column half is shared, the row half is not
    assert torch.equal(pos[0, 1, 4:], pos[0, 4, 4:]) and not torch.equal(pos[0, 1, :4], pos[0, 4, :4])


def test_selector_strategy_on_qwen_grids_is_per_image_and_batch_invariant():
    from pipeline.strategies import Batch, Context, select, selections

    torch.manual_seed(0)
    model = TokenSelector(_cfg(), None, 32).eval()
    grids = [(4, 4), (9, 6), (6, 13)]
    feats = [torch.randn(1, r * c, 32) for r, c in grids]
    got = selections("selector", feats, 0.25, "per-crop", Context(selector=model),
                     Batch(per_image=[{"grid": g} for g in grids]))
    for f, g, sel in zip(feats, grids, got):
        assert sel.mask.shape == (1, g[0] * g[1]) and int(sel.mask.sum()) == round(0.25 * g[0] * g[1])
        alone = select("selector", f, 0.25, "per-crop", Context(selector=model, grid=g))
        assert torch.equal(alone.mask, sel.mask)
        top = model.keep_logits(f, torch.tensor([g]))[0].topk(int(sel.mask.sum())).indices
        assert sorted(top.tolist()) == sel.mask[0].nonzero()[:, 0].tolist()
    # the threshold budget: the image's tokens whose keep probability passes, capped at the retention
    from pipeline.strategies import Threshold

    adaptive = selections("selector", feats, 0.5, Threshold(0.5, 0.0), Context(selector=model),
                          Batch(per_image=[{"grid": g} for g in grids]))
    for f, g, sel in zip(feats, grids, adaptive):
        prob = model.keep_probability(f, grid=torch.tensor([g]))[0]
        want = min(int((prob > 0.5).sum()), round(0.5 * g[0] * g[1]))
        assert int(sel.mask.sum()) == want and bool(sel.mask[0][prob.argmax()]) == (want > 0)
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="token grid"):
        select("selector", feats[0], 0.25, "per-crop", Context(selector=model))


def test_eval_gives_the_selector_each_qwen_images_grid(qwen_model):
    """Eval's per-image inputs (``strategy_inputs``) carry the merged (rows, cols) of each encoded image; a
    premerger selector reads the (1, L, 4C) groups, a merged one the merger's output (``projected``)."""
    from pipeline.evaluate import strategy_inputs
    from pipeline.prune import encode_images, project
    from pipeline.strategies import Batch, Context, selections

    model, processor = qwen_model
    images = _images()[:3]
    feats = encode_images(model, processor, images)
    extras = [strategy_inputs(model, "selector", f) for f in feats]
    assert [e["grid"] for e in extras] == [(4, 4), (9, 6), (6, 13)]
    for kind, channels in (("premerger", 256), ("merged", model.config.vision_config.out_hidden_size)):
        torch.manual_seed(0)
        sel = TokenSelector(_cfg(), None, channels).eval()
        sel.feature_kind = kind
        per_image = [dict(e, projected=project(model, f.features)) if kind == "merged" else e
                     for e, f in zip(extras, feats)]
        got = selections("selector", [f.features for f in feats], 0.1, "per-crop", Context(selector=sel),
                         Batch([f.valid for f in feats], per_image))
        assert [int(g.mask.sum()) for g in got] == [2, 5, 8]  # round(0.1 * L) of 16, 54, 78: per-crop = the image
        if kind == "merged":  # features extracted as merged (the train stage's held-out images) need no projected
            again = selections("selector", [e["projected"] for e in per_image], 0.1, "per-crop",
                               Context(selector=sel), Batch(per_image=extras))
            assert all(torch.equal(a.mask, g.mask) for a, g in zip(again, got))


def test_uniform_grid_of_a_rectangle_spreads_over_rows_and_cols():
    kept = grid_indices_rect(6, 13, 0.25)
    assert len(kept) == round(0.25 * 78)
    rows, cols = (kept // 13).tolist(), (kept % 13).tolist()
    assert len(set(rows)) >= 3 and len(set(cols)) >= 6 and max(rows) >= 4 and max(cols) >= 11


# ---------------------------------------------------------------- LLaVA selectors unchanged

@pytest.mark.parametrize("rng, state, logits, loss", [
    (None, "6a31233b04eeca63", [0.23270930349826813, -0.23030942678451538, -0.24676036834716797], 1.5639798641204834),
    ((0.05, 0.5), "4597cede3f3dbdce", [-0.13721084594726562, 0.120147705078125, 0.15742890536785126],
     1.2564356327056885),
])
def test_llava_selectors_are_bit_identical(rng, state, logits, loss):
    """Golden figures of the fixed-grid selector from before dynamic grids existed (commit 328b6c6): the same
    parameters (names and values at seed 0), logits and loss; so every LLaVA checkpoint loads as it did."""
    torch.manual_seed(0)
    model = TokenSelector(SelectorConfig(retention_range=rng), 64, 64).eval()
    assert _digest(model) == state and not model.dynamic
    assert [k for k in model.state_dict() if "pos" in k] == ["selector.pos", "reconstructor.pos"]
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.keep_logits(x)[0, :3], torch.tensor(logits), rtol=0, atol=1e-6)
        torch.manual_seed(2)
        assert model(x, 0.2 if rng else None)["loss"].item() == pytest.approx(loss, abs=1e-6)
    assert "positions" not in SelectorConfig().to_dict() and "grid" not in SelectorConfig().to_dict()


# ---------------------------------------------------------------- family refusal

def _save(path, model, family, grid):
    from pipeline.train import selector_tensors
    from storage.checkpoints import save_checkpoint

    meta = {"name": "selector-p0.25", "retention": 0.25, "trained_on": "p", "config": model.cfg.to_dict(),
            "tokens": model.tokens, "channels": model.channels,
            "encoder": {"family": family, "tokens": model.tokens, "channels": model.channels,
                        **({"grid": "dynamic", "qwen_features": "premerger", "tower_width": 8} if grid else {})}}
    if grid:
        meta.update(family=family, grid="dynamic", qwen_features="premerger")
    save_checkpoint(path, selector_tensors(model), meta)
    return path


@pytest.mark.parametrize("trained, used", [("llava-next", "qwen2.5-vl"), ("qwen2.5-vl", "qwen3-vl"),
                                           ("qwen2.5-vl", "llava-next")])
def test_a_selector_of_another_family_is_refused_in_one_line(tmp_path, trained, used):
    from pipeline.train import selector_from_checkpoint
    from storage.checkpoints import CheckpointError
    from storage.selectors import load_selector

    dynamic = trained.startswith("qwen")
    model = TokenSelector(_cfg(), None if dynamic else 16, 32)
    path = _save(tmp_path / "selector-p0.25.safetensors", model, trained, dynamic)
    with pytest.raises(CheckpointError) as err:
        load_selector(path, selector_from_checkpoint, expect_channels=8, expect_family=used)
    msg = str(err.value)
    assert "\n" not in msg and trained in msg and used in msg and str(path) in msg
    if dynamic:  # its own family loads, with its grid kind and features recorded
        got = load_selector(path, selector_from_checkpoint, expect_channels=8, expect_family=trained)
        assert got.selector.dynamic and got.selector.feature_kind == "premerger"
        assert got.meta["grid"] == "dynamic" and got.meta["family"] == trained and got.meta["tokens"] is None
        with pytest.raises(CheckpointError, match="width 8, this model's is 16"):
            load_selector(path, selector_from_checkpoint, expect_channels=16, expect_family=trained)
