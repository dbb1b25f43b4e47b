"""Pruned evaluation on Qwen-VL (tiny-qwen25, random weights: the plumbing is under test, not accuracy):
`atr eval` end to end with the peers at every fixed budget, budgets counted in merged tokens, the peers'
masks, HiRED refused in one line, `atr mask` on the whole image, the lmms-eval plugin's serving path, and
the processor's pixel limits in the eval keys."""

from __future__ import annotations

import argparse
import json

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_errors

SIZES = [(64, 64), (100, 150), (208, 90), (77, 131)]  # (height, width): 16, 54, 78, 40 merged tokens
MERGED = 16  # tiny-qwen25: 8-px patches, 2 x 2 merge


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shard(qwen_model):
    """Four questions on images of four aspect ratios, encoded once with attention (VisionZip's score)."""
    from pipeline.benchmarks import EvalItem
    from pipeline.evaluate import encode_shard
    from pipeline.strategies import tower_outputs

    model, processor = qwen_model
    items = [EvalItem(f"q{i}", _image(h, w, i), "what is written in the image ?", ["a"])
             for i, (h, w) in enumerate(SIZES)]
    outputs = tower_outputs(["full", "random", "visionzip", "divprune", "cdpruner"])
    return encode_shard(model, processor, items, outputs=outputs, batch_size=4)


def test_qwen_features_are_merged_tokens_of_the_resized_image(qwen_model, shard):
    model, _ = qwen_model
    for f, (h, w) in zip(shard.features, SIZES):
        t, gh, gw = f.grid
        rows, cols = gh // 2, gw // 2
        assert (rows * MERGED, cols * MERGED) == (round(h / MERGED) * MERGED, round(w / MERGED) * MERGED)
        assert f.features.shape == (1, rows * cols, 4 * model.config.vision_config.hidden_size)
        assert f.valid.shape == (1, rows * cols) and bool(f.valid.all())
        assert f.cls_attention.shape == (1, rows * cols) and f.keys.shape[:2] == (1, rows * cols)
    assert [f.tokens_per_crop for f in shard.features] == [16, 54, 78, 40]


@pytest.mark.parametrize("budget", ["per-crop", "global", "stock"])
@pytest.mark.parametrize("strategy", ["random", "visionzip", "divprune", "cdpruner", "attention", "diversity"])
def test_peers_keep_round_r_times_the_merged_tokens(qwen_model, shard, strategy, budget):
    """Every strategy sends round(0.25 * L) merged tokens of each image under every fixed budget (per-crop is
    the whole image: Qwen has one "crop"; stock is the same grid, the processor never shrinks it further)."""
    from pipeline.evaluate import Inputs, Pruning, _select_units
    from pipeline.prune import visual_embeddings

    model, _ = qwen_model
    units = [(i, 0) for i in range(len(shard.items))]
    masks = _select_units(model, shard, units, Pruning(strategy, 0.25, 0, budget), Inputs())
    for (i, _), f in zip(units, shard.features):
        sel, n = masks[i, 0], f.tokens_per_crop
        assert sel.mask.shape == (1, n) and sel.mask.dtype == torch.bool
        assert sel.tokens == round(0.25 * n), (strategy, budget, n)
        kept = visual_embeddings(model, f, sel.mask, sel.extra)
        assert kept.shape == (round(0.25 * n), model.config.text_config.hidden_size)
        assert torch.equal(kept.kept_indices, sel.mask[0].nonzero()[:, 0])
        if strategy == "visionzip":  # 540:100 dominant:contextual; the contextual ones ride in ``extra``
            contextual = int(np.floor(round(0.25 * n) * 100 / 640 + 0.5))
            assert int(sel.mask.sum()) == round(0.25 * n) - contextual
            assert (0 if sel.extra is None else sel.extra.shape[0]) == contextual


def test_divprune_and_cdpruner_read_the_merged_llm_width_tokens(qwen_model, shard):
    """'projected' on Qwen is the merger's output: the tokens the LLM sees, at the LLM's width, in raster
    order -- the tower's own pooled output for the image."""
    from pipeline.evaluate import strategy_inputs

    model, processor = qwen_model
    f = shard.features[1]  # 100 x 150, seed 1
    enc = processor.image_processor(images=[_image(100, 150, 1)], return_tensors="pt")
    stock = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
    for s in ("divprune", "cdpruner"):
        got = strategy_inputs(model, s, f)["projected"]
        assert got.shape == (1, 54, model.config.text_config.hidden_size)
        assert torch.allclose(got[0], stock, atol=1e-5)


def test_visionzip_dominant_tokens_are_the_most_attended(qwen_model, shard):
    from pipeline.evaluate import Inputs, Pruning, _select_units

    model, _ = qwen_model
    masks = _select_units(model, shard, [(2, 0)], Pruning("visionzip", 0.5, 0, "per-crop"), Inputs())
    sel, f = masks[2, 0], shard.features[2]
    dominant = int(sel.mask.sum())
    top = f.cls_attention[0].argsort(descending=True)[:dominant]
    assert set(top.tolist()) == set(sel.mask[0].nonzero()[:, 0].tolist())


def test_visionzip_score_is_attention_received_over_the_whole_image(qwen_model, shard):
    """The CLS-free score comes from a full-attention block (Qwen2.5-VL: its last ``fullatt_block_indexes``
    block): every query's softmax spans the whole image, so the mean attention received sums to 1 over the
    image's patches, 1/4 over its merged tokens (the mean of four patches). A windowed block would give 1 per
    window: 6 windows of 8 x 8 patches on this 96 x 144 image."""
    from pipeline.families import family_of

    model, _ = qwen_model
    vis = model.config.vision_config
    assert family_of(model).attention_block(model.config) == vis.fullatt_block_indexes[-1] == vis.depth - 1
    for f in shard.features:
        assert float(f.cls_attention.sum()) == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("strategy", ["visionzip", "divprune", "cdpruner", "random"])
def test_qwen3_peers_generate_with_deepstack(session_home, strategy):
    """tiny-qwen3 (DeepStack): the peers' kept tokens carry their DeepStack features (VisionZip's contextual
    tokens zeros), generation runs, and the LLM sees round(0.25 * L) merged tokens per image."""
    from flows.stages.prepare_model import prepare_model
    from pipeline.benchmarks import EvalItem
    from pipeline.evaluate import Batching, Inputs, Pruning, encode_shard, predict_features
    from pipeline.loading import load_model
    from pipeline.prune import visual_embeddings
    from pipeline.strategies import tower_outputs

    model, processor = load_model(prepare_model(session_home, "tiny-qwen3").model_dir)
    items = [EvalItem(f"q{i}", _image(h, w, i), "which colour is the large shape ?", ["a"])
             for i, (h, w) in enumerate(SIZES[:3])]
    shard = encode_shard(model, processor, items, outputs=tower_outputs([strategy]), batch_size=3)
    got = predict_features(model, processor, shard, Pruning(strategy, 0.25), Inputs(), Batching(3, max_new_tokens=3))
    lengths = [f.tokens_per_crop for f in shard.features]
    assert got.visual_tokens == [round(0.25 * n) for n in lengths] and len(got.texts) == 3
    f = shard.features[1]
    kept = visual_embeddings(model, f, None)
    assert f.deepstack is not None and len(kept.deepstack) == len(f.deepstack)
    assert all(d.shape == (lengths[1], model.config.text_config.hidden_size) for d in kept.deepstack)


def test_hired_is_refused_in_one_line_before_any_work(qwen_model, qwen_stage, shard):
    from flows.stages.eval import check_crops
    from pipeline.config import ConfigError
    from pipeline.evaluate import EvalConfig, Inputs, Pruning, _select_units, default_strategies
    from pipeline.families import family_of

    model, _ = qwen_model
    with pytest.raises(ConfigError, match=r"strategy 'hired' needs AnyRes crops .* Qwen2.5-VL has none") as e:
        check_crops(qwen_stage, EvalConfig(strategies=("full", "hired")))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs AnyRes crops"):
        _select_units(model, shard, [(0, 0)], Pruning("hired", 0.25), Inputs())
    assert "hired" not in default_strategies(False, family_of(model))
    assert "hired" in default_strategies(False)


def test_hired_on_qwen_is_one_cli_line(cli_env, tmp_path):
    img = tmp_path / "a.png"
    _image(100, 150, 0).save(img)
    assert_one_line_errors([
        (["eval", "--model", "tiny-qwen25", "--strategies", "full,hired", "--limit", "4"], "needs AnyRes crops"),
        (["mask", "--model", "tiny-qwen25", "--strategy", "hired", "--image", str(img), "--retentions", "0.25"],
         "needs AnyRes crops"),
    ], cli_env)


def test_eval_flow_on_qwen_counts_merged_tokens(prefect_api_url, session_home, qwen_stage):
    from flows.orchestration.flows import eval_flow
    from flows.stages.eval import model_pixels
    from pipeline.evaluate import EvalConfig

    cfg = EvalConfig(benchmarks=("synthetic-ocr",), strategies=("full", "none", "random", "visionzip", "divprune",
                                                                 "cdpruner"),
                     retentions=(0.25,), budget="per-crop,global,stock", seeds=1, limit=6, batch_size=6)
    out = eval_flow(str(session_home.root), "tiny-qwen25", cfg.to_dict())
    by = {(r["strategy"], r["budget"]): r for r in out["summary"]}
    assert set(by) == {("full", "per-crop"), ("none", "per-crop")} | {
        (s, b) for s in ("random", "visionzip", "divprune", "cdpruner") for b in ("per-crop", "global", "stock")}
    assert by["none", "per-crop"]["mean_visual_tokens"] == 0
    with duckdb.connect(str(session_home.results_db), read_only=True) as con:
        rows = con.execute("SELECT strategy, budget, sample_id, visual_tokens, stock_visual_tokens FROM eval_samples "
                           "WHERE run_id = ?", [out["run_id"]]).fetchall()
    full = {sid: (v, st) for s, b, sid, v, st in rows if s == "full"}
    assert len(full) == 6 and all(v == st and v > 0 for v, st in full.values())  # full sends what stock sends
    for s, b, sid, v, _ in rows:
        if s not in ("full", "none"):
            assert v == round(0.25 * full[sid][0]), (s, b, sid, v, full[sid][0])
    assert model_pixels(qwen_stage) == {"max_pixels": 224 * 224, "min_pixels": 32 * 32}


def test_eval_keys_hold_the_pixel_limits(qwen_stage, session_home):
    """min/max pixels decide every image's grid: a dynamic-resolution family's eval keys hold them (LLaVA's
    keys are unchanged: no pixels input)."""
    from flows.stages.eval import ResultKey, model_pixels
    from pipeline.evaluate import Pruning
    from storage.stages import StageResult

    pixels = model_pixels(qwen_stage)
    assert pixels == {"max_pixels": 50176, "min_pixels": 1024}
    base = ResultKey("synthetic-ocr", Pruning("random", 0.25), 300, "m" * 16, "d" * 16)
    one = ResultKey("synthetic-ocr", Pruning("random", 0.25), 300, "m" * 16, "d" * 16, pixels=pixels)
    other = ResultKey("synthetic-ocr", Pruning("random", 0.25), 300, "m" * 16, "d" * 16,
                      pixels={**pixels, "max_pixels": 112 * 112})
    assert len({base.chunk_key(100), one.chunk_key(100), other.chunk_key(100)}) == 3
    assert one.inputs()["pixels"] == pixels and "pixels" not in base.inputs()
    # a folder whose manifest does not record them: read from the processor saved with it
    bare = StageResult(qwen_stage.stage, qwen_stage.key, qwen_stage.path, True, 0.0,
                       {**qwen_stage.manifest, "describe": {**qwen_stage.manifest["describe"], "pixels": {}}})
    assert model_pixels(bare) == pixels
    llava = StageResult("prepare-model", "k", qwen_stage.path, True, 0.0, {"describe": {"model_type": "llava_next"}})
    assert model_pixels(llava) is None


def _mask_parser():
    from flows.cli.mask import mask_parser

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="atr", parents=[common])
    mask_parser(parser.add_subparsers(dest="command", required=True), common)
    return parser


@pytest.mark.parametrize("strategy", ["random", "visionzip", "divprune"])
def test_atr_mask_json_is_one_entry_for_the_whole_image(session_home, qwen_stage, tmp_path, capsys, strategy):
    from flows.cli.mask import cmd_mask
    from storage.home import Home

    img = tmp_path / "wide.png"
    _image(100, 150, 3).save(img)
    png = tmp_path / "m.png"
    args = _mask_parser().parse_args(["mask", "--home", str(session_home.root), "--model", "tiny-qwen25",
                                      "--strategy", strategy, "--image", str(img), "--retentions", "0.25",
                                      "--json", "--out", str(png)])
    assert cmd_mask(Home.resolve(args.home), args) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"crops", "random", "retention", "k"}
    assert len(got["crops"]) == 1 and len(got["random"]) == 1
    crop = got["crops"][0]
    assert crop["box"] == [0, 0, 150, 100] and crop["grid"] == [6, 9]  # 96 x 144 resized: 6 x 9 merged tokens
    assert crop["valid"] == 54 and crop["k"] == got["k"][0] == 14 and got["retention"] == 0.25
    assert all(0 <= t < 54 for t in crop["kept"]) and crop["kept"] == sorted(crop["kept"])
    # visionzip draws its dominant tokens (12); its 2 contextual tokens are merges with no cell of their own
    assert len(crop["kept"]) == (12 if strategy == "visionzip" else 14)
    assert len(got["random"][0]["kept"]) == 14
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lmms_serving_path_runs_qwen(session_home, qwen_stage):
    """The lmms-eval plugin's serving (``flows.lmms.pruned.PrunedServer``, which ``atr_llava`` wraps) on a Qwen
    model: the same predict_features path as ``atr eval``. The lmms-eval wrapper itself needs the [lmms] venv."""
    from flows.lmms.pruned import PrunedServer
    from pipeline.benchmarks import EvalItem
    from pipeline.config import ConfigError

    server = PrunedServer(pretrained="tiny-qwen25", strategy="visionzip", retention=0.25, batch_size=2,
                          home=str(session_home.root), device="cpu")
    items = [EvalItem(f"t/{i}", _image(h, w, i), "what is written in the image ?", []) for i, (h, w) in
             enumerate(SIZES[:3])]
    texts = server.answer(items, [4, 4, 2])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert sorted(server.visual_tokens) == sorted([round(0.25 * n) for n in (16, 54, 78)])
    with pytest.raises(ConfigError, match="needs AnyRes crops"):
        PrunedServer(pretrained="tiny-qwen25", strategy="hired", retention=0.25, home=str(session_home.root))


def test_lmms_plugin_wraps_the_serving_path_on_qwen(session_home, qwen_stage):
    """The lmms-eval model class itself; skipped outside the [lmms] venv (tests/test_lmms.py runs the plugin
    under lmms-eval there)."""
    pytest.importorskip("lmms_eval", reason="the atr_llava wrapper needs lmms-eval (the [lmms] venv)")
    from flows.lmms.model import AtrLlava

    model = AtrLlava(pretrained="tiny-qwen25", strategy="random", retention=0.25, home=str(session_home.root))
    assert type(model.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and model.pruning.retention == 0.25
