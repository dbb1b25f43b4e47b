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
    """A shrunken sized preset (the 7B one needs 14 GiB): built in bf16, the same weights every load."""
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
