"""The tiny LLaVA-NeXT preset and the one from_pretrained loading path (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from flows.stages.prepare_model import prepare_model
from pipeline.builders import IMAGE_TOKEN
from pipeline.loading import ModelLoadError, load_model
from pipeline.presets import TinyPreset
from storage.home import Home


def test_tiny_uses_the_real_hf_classes(tiny_model):
    model, processor = tiny_model
    from transformers import (CLIPVisionModel, LlamaForCausalLM, LlamaModel, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, PreTrainedTokenizerFast)

    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert isinstance(model.model.vision_tower, CLIPVisionModel)
    assert isinstance(model.model.language_model, (LlamaModel, LlamaForCausalLM))
    assert isinstance(processor, LlavaNextProcessor)
    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"


def test_tokenizer_is_trained_locally(tiny_model):
    _, processor = tiny_model
    tok = processor.tokenizer
    assert len(tok) == TinyPreset().vocab_size
    ids = tok("USER: what is written in the image ? ASSISTANT: A7Q")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "USER: what is written in the image ? ASSISTANT: A7Q"
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert tok.tokenize(" what is written") == ["Ġwhat", "Ġis", "Ġwritten"]  # learned words, not bytes


def test_anyres_grids_follow_aspect_ratio(tiny_model):
    _, processor = tiny_model
    sizes = {(256, 64): None, (64, 256): None, (160, 150): None}
    for w, h in sizes:
        out = processor.image_processor(images=[Image.new("RGB", (w, h), "white")], return_tensors="pt")
        sizes[(w, h)] = out["pixel_values"].shape[1]
    # wide -> 1x3 grid + base, tall -> 3x1 + base, square-ish -> 2x2 + base
    assert sizes == {(256, 64): 4, (64, 256): 4, (160, 150): 5}


def test_saved_model_reloads_identically(tiny_stage, tiny_model):
    model, processor = tiny_model
    again, _ = load_model(tiny_stage.model_dir)
    inputs = processor(images=[Image.new("RGB", (100, 60), "red")], text=[f"USER: {IMAGE_TOKEN} what ? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad():
        a, b = model(**inputs).logits, again(**inputs).logits
    assert torch.equal(a, b)
    assert (Path(tiny_stage.model_dir) / "model.safetensors").is_file()


def test_prepare_model_is_content_hashed_and_cached(tiny_stage, session_home):
    again = prepare_model(session_home, "tiny")
    assert again.cached and again.key == tiny_stage.key and again.path == tiny_stage.path
    assert tiny_stage.path.name == tiny_stage.key
    assert tiny_stage.manifest["describe"]["tokens_per_crop"] == 64


def test_local_directory_goes_through_the_same_loader(tiny_stage, tmp_path):
    local = tmp_path / "my-llava"
    shutil.copytree(tiny_stage.model_dir, local, ignore=shutil.ignore_patterns("_manifest.json"))
    result = prepare_model(Home.resolve(tmp_path / "home"), str(local))
    assert not result.cached and result.model_dir == local
    assert result.manifest["kind"] == "local"


def _fake_hub_cache(root: Path, repo_id: str, files_from: Path) -> str:
    """The Hugging Face cache layout (refs/main -> snapshots/<commit>/...), as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(files_from, snap, ignore=shutil.ignore_patterns("_manifest.json"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_loads_from_the_local_hf_cache(tiny_stage, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = _fake_hub_cache(tmp_path / "hub", "atr-test/tiny-llava-next", Path(tiny_stage.model_dir))
    result = prepare_model(Home.resolve(tmp_path / "home"), "atr-test/tiny-llava-next")
    assert result.manifest["kind"] == "hub"
    assert result.manifest["identity"]["commit"] == commit
    assert result.model_dir.name == commit
    model, _ = load_model(result.model_dir)
    assert model.config.vision_feature_layer == -2


def test_uncached_hub_id_offline_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelLoadError) as err:
        prepare_model(Home.resolve(tmp_path / "home"), "llava-hf/llava-v1.6-mistral-7b-hf")
    msg = str(err.value)
    assert "\n" not in msg and "llava-hf/llava-v1.6-mistral-7b-hf" in msg and "offline" in msg
    assert not any((tmp_path / "home" / "stages").rglob("*.tmp"))


def test_bad_model_specs_fail_clearly(tmp_path):
    home = Home.resolve(tmp_path / "home")
    with pytest.raises(ModelLoadError, match="unknown model 'tinyy'"):
        prepare_model(home, "tinyy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        prepare_model(home, str(tmp_path / "empty"))


def test_a_model_of_neither_family_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelLoadError) as err:
        prepare_model(Home.resolve(tmp_path / "home"), str(tmp_path / "llama"))
    line = str(err.value)
    assert "\n" not in line and "model_type 'llama' is not a supported family" in line
    assert "'llava_next' (LLaVA-NeXT)" in line and "'llava_onevision' (LLaVA-OneVision)" in line


def test_a_model_folder_with_only_pickle_weights_is_refused(tiny_stage, tmp_path):
    """load_model reads safetensors only: pytorch_model.bin (a pickle) is never loaded."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from pipeline.loading import ModelLoadError, load_model

    src = tiny_stage.model_dir
    dst = tmp_path / "bin-only"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "_manifest.json"))
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    torch.save(weights, dst / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="cannot load model from"):
        load_model(dst)
