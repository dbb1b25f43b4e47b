"""bench-vicuna-7b and bench-mistral-7b: the real checkpoints' dimensions, built on the meta device here,
materialized only where they run, refused on a CPU unless asked for."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.builders import SIZED_MARKER, on_meta
from pipeline.presets import SIZED_PRESETS


@pytest.mark.parametrize("name, params, kv_heads, ffn, lm_class", [
    ("bench-vicuna-7b", 7_063_431_168, 32, 11008, "LlamaModel"),
    ("bench-mistral-7b", 7_566_747_648, 8, 14336, "MistralModel"),
])
def test_the_meta_build_has_the_real_dimensions(name, params, kv_heads, ffn, lm_class):
    model = on_meta(SIZED_PRESETS[name])
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == params
    vis, text = model.config.vision_config, model.config.text_config
    assert (vis.hidden_size, vis.num_hidden_layers, vis.image_size, vis.patch_size) == (1024, 24, 336, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size, text.num_key_value_heads,
            text.vocab_size) == (4096, 32, ffn, kv_heads, 32064)
    assert type(model.model.language_model).__name__ == lm_class
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == 303_507_456  # CLIP ViT-L/14-336


def test_the_stage_saves_config_and_processor_only(session_home):
    from flows.stages.prepare_model import prepare_model
    from pipeline.loading import load_model_config

    result = prepare_model(session_home, "bench-vicuna-7b")
    files = {p.name for p in result.path.iterdir()}
    assert SIZED_MARKER in files and "config.json" in files and not any(f.endswith(".safetensors") for f in files)
    assert sum(p.stat().st_size for p in result.path.iterdir()) < 1_000_000
    d = result.manifest["describe"]
    assert (d["vision_hidden"], d["tokens_per_crop"], d["text_hidden"], d["text_layers"]) == (1024, 576, 4096, 32)
    assert load_model_config(result.path).text_config.num_hidden_layers == 32


def test_materialize_builds_on_the_target_device_in_its_dtype_seeded(tmp_path):
    """A shrunken sized preset (the 7B one: 14.1 GiB in bf16, 28.2 GiB in fp32): built in bf16, the same weights
    every load."""
    import torch

    from pipeline.builders import save_sized
    from pipeline.loading import load_model

    small = dataclasses.replace(SIZED_PRESETS["bench-mistral-7b"], name="small", text_hidden=64, text_layers=1,
                                text_heads=4, text_kv_heads=2, text_intermediate=128, vision_hidden=32,
                                vision_layers=2, vision_heads=2, vision_intermediate=64)
    save_sized(small, tmp_path)
    assert json.loads((tmp_path / SIZED_MARKER).read_text())["name"] == "small"
    a, processor = load_model(tmp_path, dtype="bfloat16", device="cpu", allow_cpu=True)
    b, _ = load_model(tmp_path, dtype="bfloat16", device="cpu", allow_cpu=True)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert a.config.text_config.hidden_size == 64 and type(a.model.language_model).__name__ == "MistralModel"
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert processor.image_processor.crop_size["height"] == 336
    with pytest.raises(Exception, match="for timing on a CUDA device; on the CPU pass --allow-cpu"):
        load_model(tmp_path, dtype="bfloat16", device="cpu")


def test_a_cpu_speed_run_is_refused_in_one_line(cli_env):
    from conftest import assert_one_line_errors

    assert_one_line_errors([
        (["speed", "--model", "bench-vicuna-7b", "--device", "cpu"], "bench-vicuna-7b has 7.1 B parameters"),
    ], cli_env)


# The published checkpoints' values (item 9 of issue 29). Sources, read 2026-12-07:
# - llava-hf/llava-v1.6-mistral-7b-hf config.json, as its quantized copies carry it verbatim
#   (zhenxuan/llava-v1.6-mistral-7b-awq and Ayush374/quantised_llava config.json, "_name_or_path" the llava-hf
#   snapshot): text_config {intermediate_size 14336, max_position_embeddings 32768, num_key_value_heads 8,
#   rms_norm_eps 1e-05, rope_theta 1000000.0, sliding_window null, vocab_size 32064}, image_token_index 32000,
#   tie_word_embeddings false, CLIP vision_config {1024, 336, 4096, 16 heads, 24 layers, patch 14,
#   projection_dim 768}; the rest are the Mistral-7B-Instruct-v0.2 / openai/clip-vit-large-patch14-336 values
#   transformers' convert_llava_next_weights_to_hf.py copies (hidden 4096, 32 heads, silu, quick_gelu, 1e-5).
# - llava-hf/llava-v1.6-vicuna-7b-hf config.json was not found verbatim; its text config is lmsys/vicuna-7b-v1.5's
#   (convert_llava_next_weights_to_hf.py), as llava-hf/llava-1.5-7b-hf's config.json carries it:
#   max_position_embeddings 4096, rms_norm_eps 1e-05, vocab_size 32064 (32000 + <image>, <pad>, padded to 64).
# - llava-hf/llava-onevision-qwen2-7b-ov-hf config.json: its copy mgoin/llava-onevision-qwen2-7b-ov-hf-bnb-full-4bit
#   (36 pinpoints 384..2304, image_token_index 151646); transformers' convert_llava_onevision_weights_to_hf.py
#   (SiglipVisionConfig 1152 / 384 / 4304 / 16 heads / 26 layers ("drop the last layer") / patch 14 / no head;
#   Qwen/Qwen2-7B-Instruct's text config, vocabulary resized to 152064 + 2 padded to 64 = 152128) and
#   Qwen2-7B-Instruct's config.json (rms_norm_eps 1e-06, rope_theta 1000000.0, max_position_embeddings 32768,
#   sliding_window 131072 with use_sliding_window false, tie_word_embeddings false).
# - preprocessor_config.json: LLaVA-NeXT's is openai/clip-vit-large-patch14-336's through LlavaNextImageProcessor
#   (crop 336, shortest_edge 336, CLIP mean/std, bicubic; e.g. llava-hf/LLaVA-NeXT-Video-7B-hf's file);
#   OneVision's is google/siglip-so400m-patch14-384's through LlavaOnevisionImageProcessor (384 x 384, mean and
#   std 0.5, bicubic; the lmms-lab/llava-onevision-qwen2-* preprocessor_config.json files), not CLIP's.
_CLIP = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
         "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
         "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_NEXT = {"image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
         "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
         "vision_feature_select_strategy": "default", "tie_word_embeddings": False}
_CLIP_PIXELS = {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
PUBLISHED = {
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        **_NEXT, "vision": _CLIP, "pixels": _CLIP_PIXELS,
        "text": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                 "sliding_window": None, "vocab_size": 32064, "tie_word_embeddings": False},
        "prompt": "[INST] <image>\nWhat is it? [/INST]"},
    "llava-hf/llava-v1.6-vicuna-7b-hf": {
        **_NEXT, "vision": _CLIP, "pixels": _CLIP_PIXELS,
        "text": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32064,
                 "tie_word_embeddings": False, "attention_bias": False},
        "prompt": "USER: <image>\nWhat is it? ASSISTANT:"},
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": {
        "image_grid_pinpoints": [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)],
        "image_token_index": 151646, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9", "tie_word_embeddings": False,
        "vision": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                   "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14,
                   "vision_use_head": False, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        "text": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "use_sliding_window": False, "max_window_layers": 28, "vocab_size": 152128,
                 "tie_word_embeddings": False},
        "pixels": {"size": {"height": 384, "width": 384}, "resample": 3, "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.5, 0.5, 0.5]},
        "prompt": "<|im_start|>user <image>\nWhat is it?<|im_end|><|im_start|>assistant\n"},
    # Qwen/Qwen2.5-VL-7B-Instruct (config.json, preprocessor_config.json, chat_template.json as quoted by public code:
    # see pipeline.presets.SizedQwenPreset's docstring for where each came from).
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
                   "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                   "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "out_hidden_size": 3584,
                   "in_channels": 3},
        "text": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
                 "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "mrope_section": [16, 24, 24], "use_sliding_window": False, "max_window_layers": 28,
                 "vocab_size": 152064, "tie_word_embeddings": False},
        "pixels": {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14, "merge_size": 2,
                   "temporal_patch_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]},
        "prompt": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"},
    # Qwen/Qwen3-VL-8B-Instruct (see pipeline.presets.SizedQwen3Preset's docstring).
    "Qwen/Qwen3-VL-8B-Instruct": {
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                   "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "temporal_patch_size": 2,
                   "spatial_merge_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                   "out_hidden_size": 4096, "in_channels": 3},
        "text": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                 "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                 "attention_bias": False, "vocab_size": 151936, "tie_word_embeddings": False},
        "pixels": {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "merge_size": 2,
                   "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
                  "<|im_start|>assistant\n"},
}
_ROPE_KEYS = ("rope_theta", "mrope_section", "mrope_interleaved")  # inside text_config.rope_parameters in v5


def _every_mirroring_preset():
    from pipeline.presets import SHAPE_PRESETS

    return [*SIZED_PRESETS.values(), *SHAPE_PRESETS.values()]


@pytest.mark.parametrize("preset", _every_mirroring_preset(), ids=lambda p: p.name)
def test_every_config_field_is_the_published_checkpoints(preset):
    """bench-* and shape-* build the config the checkpoint publishes (shape-*: one LM layer, by design)."""
    cfg = on_meta(preset).config
    want = PUBLISHED[preset.mirrors]
    for key, value in want.items():
        if key not in ("vision", "text", "pixels", "prompt"):
            got = cfg.image_grid_pinpoints if key == "image_grid_pinpoints" else getattr(cfg, key)
            assert got == value, (preset.name, key)
    for key, value in want["vision"].items():
        assert getattr(cfg.vision_config, key) == value, (preset.name, "vision", key)
    text = cfg.text_config
    for key, value in want["text"].items():
        got = text.rope_parameters[key] if key in _ROPE_KEYS else getattr(text, key)
        if key == "num_hidden_layers" and getattr(preset, "saves_weights", False):
            value = 1  # the real-shape presets cut the LM to one layer
        assert got == value, (preset.name, "text", key, got)
    # the effective window: Mistral's is none (not MistralConfig's 4096); Qwen2's 131072 is unused
    assert getattr(text, "sliding_window", None) is None


@pytest.mark.parametrize("preset", _every_mirroring_preset(), ids=lambda p: p.name)
def test_the_saved_processor_is_the_published_one(preset, tmp_path):
    """Pixels (size, crop, mean/std, resample, pinpoints), the processor's token settings and the chat template
    as the checkpoint's files give them."""
    from pipeline.builders import save_sized
    from pipeline.loading import load_processor

    save_sized(preset, tmp_path)
    processor = load_processor(tmp_path)
    ip = json.loads(processor.image_processor.to_json_string())
    want = PUBLISHED[preset.mirrors]
    for key, value in want["pixels"].items():
        got = ip[key]
        if isinstance(value, dict):
            got = {k: v for k, v in got.items() if v is not None}
        assert got == pytest.approx(value) if isinstance(value, list) else got == value, (preset.name, key, got)
    if "image_grid_pinpoints" in want:  # LLaVA; Qwen has dynamic resolution, no pinpoints
        assert ip["image_grid_pinpoints"] == want["image_grid_pinpoints"]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "What is it?"}]}],
                                           add_generation_prompt=True)
    # the tiny tokenizer's image placeholder is <image>: the checkpoint's <|image_pad|> is written as that
    assert prompt == want["prompt"].replace("<|image_pad|>", processor.image_token)
    if "vision_feature_select_strategy" in want:
        assert processor.vision_feature_select_strategy == want["vision_feature_select_strategy"]
