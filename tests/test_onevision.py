"""LLaVA-OneVision through the family layer: loading, packing against HF's own code, interpolation,
the CLS-free scores, geometry, and the real 7B's shapes on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pipeline.families import LLAVA_NEXT, LLAVA_ONEVISION, family_of
from pipeline.families.base import InterpolatedGridError, UnknownFamilyError
from pipeline.prune import encode_images, stock_visual_tokens, visual_embeddings

SIZES = [(100, 60), (190, 190), (50, 50), (64, 180)]  # (width, height): 190x190 lands on a 3x3 grid


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    from pipeline.builders import save_tiny
    from pipeline.presets import PRESETS

    out = tmp_path_factory.mktemp("tiny-ov")
    save_tiny(PRESETS["tiny-ov"], out)
    return out


@pytest.fixture
def ov(ov_dir):
    """A fresh load of tiny-ov each test (tests change its interpolation setting)."""
    from pipeline.loading import load_model

    return load_model(ov_dir)


def _images():
    return [Image.new("RGB", s, c) for s, c in zip(SIZES, ["red", "blue", "green", "white"])]


def test_a_saved_onevision_dir_loads_offline_in_the_stock_layout(ov_dir, ov):
    model, processor = ov
    files = {p.name for p in ov_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= files
    config = json.loads((ov_dir / "config.json").read_text())
    assert config["model_type"] == "llava_onevision" and config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "qwen2" and config["vision_feature_select_strategy"] == "full"
    assert json.loads((ov_dir / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert family_of(model) is LLAVA_ONEVISION and not hasattr(processor, "video_processor")
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "hi?"}]}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user <image>\nhi?<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_model_type_names_the_supported_families():
    from transformers import CLIPVisionConfig

    with pytest.raises(UnknownFamilyError) as err:
        family_of(CLIPVisionConfig())
    line = str(err.value)
    assert "\n" not in line and "'clip_vision_model'" in line and "llava_next" in line and "llava_onevision" in line


@pytest.mark.parametrize("interpolation", [True, False])
def test_full_image_matches_hf_get_image_features(ov, interpolation):
    """Unpruned visual tokens equal OneVision's own get_image_features, interpolation on (stock) or off."""
    model, processor = ov
    LLAVA_ONEVISION.set_interpolation(model, processor, interpolation)
    for image, f in zip(_images(), encode_images(model, processor, _images())):
        enc = processor.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            ref = model.model.get_image_features(enc["pixel_values"], enc["image_sizes"], vision_feature_layer=-1,
                                                 vision_feature_select_strategy="full",
                                                 vision_aspect_ratio=model.config.vision_aspect_ratio).pooler_output[0]
        torch.testing.assert_close(visual_embeddings(model, f), ref)
        # the stock count is the processor's own placeholder count (HF's _get_number_of_features)
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        ids = processor(images=[image], text=[text], return_tensors="pt")["input_ids"]
        stock = stock_visual_tokens(model, f.crops, f.tokens_per_crop, f.image_size)
        if interpolation:
            assert int((ids == model.config.image_token_id).sum()) == stock == ref.shape[0]
    LLAVA_ONEVISION.set_interpolation(model, processor, False)
    assert model.config.vision_aspect_ratio == "anyres_max_9"  # 3 x 3 = 9 grid crops at most: never shrinks


def test_a_keep_mask_is_refused_through_an_interpolated_grid(ov):
    model, processor = ov
    LLAVA_ONEVISION.set_interpolation(model, processor, True)
    f = encode_images(model, processor, [Image.new("RGB", (190, 190), "blue")])[0]
    assert f.crops == 10
    pruned = f.valid.clone()
    pruned[1, 0] = False
    with pytest.raises(InterpolatedGridError) as err:
        visual_embeddings(model, f, pruned)
    line = str(err.value)
    assert "\n" not in line and "interpolation" in line and "--interpolation off" in line and "anyres_max_9" in line
    # every valid token (the full image) goes through the model's own shrinking packing instead
    assert visual_embeddings(model, f, f.valid).shape[0] == visual_embeddings(model, f).shape[0] == 49 + 14 * 15
    LLAVA_ONEVISION.set_interpolation(model, processor, False)
    stock = stock_visual_tokens(model, f.crops, f.tokens_per_crop, f.image_size, {"vision_aspect_ratio": "anyres_max_4"})
    off = visual_embeddings(model, f, f.valid).shape[0]
    # base 49 + the 21 x 21 grid with 21 newlines off; shrunk to 14 x 14 (+14) by anyres_max_4
    assert (off, stock) == (49 + 21 * 22, 49 + 14 * 15)


def test_mean_received_attention_is_the_cls_free_score(ov):
    """SigLIP has no CLS: the score is the column mean of the feature layer's attention matrix, checked
    against HF's own eager attention weights."""
    model, processor = ov
    image = Image.new("RGB", (100, 60), "red")
    f = encode_images(model, processor, [image], attention=True)[0]
    assert f.cls_tokens is None and f.cls_attention.shape == (f.crops, 49)
    torch.testing.assert_close(f.cls_attention.sum(-1), torch.ones(f.crops))
    model.set_attn_implementation("eager")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0][:f.crops]
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, return_dict=True)
    model.set_attn_implementation("sdpa")
    last = out.attentions[-1].mean(dim=1)  # (crops, T, T), the feature layer is the last (-1)
    torch.testing.assert_close(f.cls_attention, last.mean(dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(f.early_attention, out.attentions[0].mean(dim=1).mean(dim=1), atol=1e-5, rtol=1e-4)


def test_every_strategy_runs_on_onevision_at_the_budget_of_random(ov):
    from pipeline.benchmarks import EvalItem
    from pipeline.strategies import pruners
    from eval_helpers import evaluate_chunk
    from pipeline.synthetic import generate_samples

    model, processor = ov
    LLAVA_ONEVISION.set_interpolation(model, processor, False)
    samples = generate_samples("synthetic-scene", "test", 4, seed=0)
    items = [EvalItem(f"s{i}", s.image, s.question, s.answers, {}) for i, s in enumerate(samples)]
    tokens = {}
    for strategy in [p for p in pruners() if p not in ("selector", "visionselector")]:  # trained for other models
        r = evaluate_chunk(model, processor, "synthetic-scene", items, strategy, 0.25)
        tokens[strategy] = r.mean_visual_tokens
        assert r.stock_visual_tokens is not None and r.stock_visual_tokens > r.mean_visual_tokens
    for strategy, n in tokens.items():
        assert abs(n - tokens["random"]) <= 10, tokens  # equal budgets, up to newline tokens


def test_siglip_geometry_the_grid_covers_378_of_384_pixels():
    from pipeline.extract import token_boxes
    from pipeline.builders import on_meta
    from pipeline.presets import PRESETS, SIZED_PRESETS

    meta = on_meta(SIZED_PRESETS["bench-ov-7b"])
    cfg = meta.config
    assert family_of(cfg) is LLAVA_ONEVISION
    assert LLAVA_ONEVISION.side(cfg) == 27 and LLAVA_ONEVISION.tokens_per_crop(cfg) == 729
    assert LLAVA_ONEVISION.covered(cfg) == pytest.approx(378 / 384)
    boxes = token_boxes((0, 0, 384, 384), 27, LLAVA_ONEVISION.covered(cfg))
    assert boxes[-1].tolist() == pytest.approx([364, 364, 378, 378])
    assert family_of(PRESETS["tiny-ov"].family.model_type) is LLAVA_ONEVISION
    assert LLAVA_NEXT.tokens_per_crop(on_meta(SIZED_PRESETS["bench-vicuna-7b"]).config) == 576


def test_bench_ov_7b_has_the_real_checkpoint_dimensions():
    from pipeline.flops import vision_tower_flops
    from pipeline.builders import on_meta
    from pipeline.presets import SIZED_PRESETS

    model = on_meta(SIZED_PRESETS["bench-ov-7b"])
    n = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < n < 8.1e9  # llava-onevision-qwen2-7b-ov: 8.03 B
    cfg = model.config
    assert (cfg.text_config.hidden_size, cfg.text_config.num_key_value_heads, cfg.vision_config.num_hidden_layers) \
        == (3584, 4, 26)
    assert len(cfg.image_grid_pinpoints) == 36 and cfg.vision_aspect_ratio == "anyres_max_9"
    assert LLAVA_ONEVISION.interpolation(cfg)  # 36 grid crops > 9: large grids are shrunk
    dims = LLAVA_ONEVISION.flops_dims(cfg)
    assert dims.vision.tokens == 729 and dims.lm.kv_heads == 4  # no CLS on SigLIP
    assert vision_tower_flops(dims.vision, 1) > 0


def test_a_selector_of_the_other_family_is_refused_naming_both(tmp_path):
    """tiny-trained and tiny-ov-trained share L = 16 and C = 64: the family recorded with the checkpoint
    tells their selectors apart."""
    from pipeline.selector import SelectorConfig, TokenSelector
    from pipeline.train import selector_tensors
    from storage.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

    sel = TokenSelector(SelectorConfig(n_heads=4, steps=1), 16, 64)
    path = save_checkpoint(tmp_path / "next.safetensors", selector_tensors(sel), {
        "tokens": 16, "channels": 64, "config": sel.cfg.to_dict(), "encoder": {"family": "llava-next"}})
    load_checkpoint(path, 64, 16, "llava-next")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, 64, 16, "llava-onevision")
    line = str(err.value)
    assert "\n" not in line and "llava-next features of shape (L, C) = (16, 64)" in line
    assert "this model is llava-onevision with (16, 64)" in line


def test_atr_eval_on_onevision_refuses_interpolation_and_warns_when_a_pruned_context_exceeds_stock(cli_env):
    from conftest import assert_one_line_errors, atr_in_process

    base = ["eval", "--model", "tiny-ov-trained", "--benchmark", "synthetic-scene", "--limit", "4",
            "--shard-size", "4", "--seeds", "1"]
    assert_one_line_errors([
        ([*base, "--strategies", "full,random", "--interpolation", "on"],
         "random cannot prune LLaVA-OneVision with interpolation on: vision_aspect_ratio='anyres_max_4'"),
    ], cli_env)
    proc = atr_in_process([*base, "--strategies", "full,random", "--retentions", "0.25,0.9"], cli_env)
    assert proc.returncode == 0, proc.stderr
    # no fixed threshold: the warning names the retention whose pruned contexts exceed the stock model's
    warned = [line for line in proc.stderr.splitlines() if "than the stock model would" in line]
    assert warned == ["warning: synthetic-scene at retention 0.9 (per-crop budget): random sent more visual tokens "
                      "than the stock model would on 2 of 4 images (mean context up to 1.30x stock); compare at "
                      "equal cost with --budget stock"], proc.stderr
    stock = atr_in_process([*base, "--strategies", "full,none", "--interpolation", "on"], cli_env)
    assert stock.returncode == 0, stock.stderr  # the stock baseline runs with interpolation on


def test_the_llava_hf_folder_layout_registers_offline(ov_dir, tmp_path):
    """The llava-hf/llava-onevision-* layout: preprocessor_config.json beside processor_config.json,
    chat_template.json and a video_preprocessor_config.json (unused: images only, no torchvision)."""
    import shutil

    from flows.stages.prepare_model import prepare_model
    from pipeline.loading import load_model
    from storage.home import Home

    model, processor = load_model(ov_dir)
    real = tmp_path / "llava-onevision-tiny-hf"
    real.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copy2(ov_dir / name, real / name)
    processor.image_processor.save_pretrained(real)  # preprocessor_config.json
    settings = {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
                "num_image_tokens": 49, "vision_feature_select_strategy": "full",
                "vision_aspect_ratio": "anyres_max_4"}
    (real / "processor_config.json").write_text(json.dumps(settings))
    (real / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    (real / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 64, "width": 64}}))
    assert (real / "preprocessor_config.json").is_file()
    stage = prepare_model(Home.resolve(tmp_path / "home"), str(real))
    assert stage.manifest["describe"]["family"] == "llava-onevision"
    assert stage.manifest["describe"]["tokens_per_crop"] == 49 and stage.manifest["describe"]["interpolates"]
    again, proc = load_model(real)
    assert proc.vision_aspect_ratio == "anyres_max_4" and proc.num_image_tokens == 49
    assert proc.image_processor.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    image = Image.new("RGB", (100, 60), "red")
    torch.testing.assert_close(visual_embeddings(again, encode_images(again, proc, [image])[0]),
                               visual_embeddings(model, encode_images(model, processor, [image])[0]))
