"""The tower pass keeps what a stage needs: extraction reads the vision tower's weights alone, and the
tower keeps only the hidden states that are used, bit-identical to ``output_hidden_states=True``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.extract import FeatureExtractor, crops_per_pass, encoder_layers, projector_inputs, tower_hidden_states
from pipeline.families import family_of
from pipeline.loading import ModelLoadError, load_model, load_vision_tower
from pipeline.prune import _layer_attention, encode_images

REPO = Path(__file__).resolve().parents[1]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
            [(200, 90), (64, 64), (90, 250), (160, 160)]]


@pytest.fixture(scope="module")
def tiny_ov_stage(session_home):
    from flows.stages.prepare_model import prepare_model

    return prepare_model(session_home, "tiny-ov")


@pytest.fixture(scope="module")
def bench_stage(session_home):
    """336-px crops of 577 tokens: a batch of them takes several tower passes (PASS_TOKENS)."""
    from flows.stages.prepare_model import prepare_model

    return prepare_model(session_home, "bench")


@pytest.fixture(scope="module")
def models(tiny_stage, tiny_ov_stage, bench_stage):
    return {name: (stage.model_dir, load_model(stage.model_dir))
            for name, stage in (("tiny", tiny_stage), ("tiny-ov", tiny_ov_stage), ("bench", bench_stage))}


def _reference(model, processor, images):
    """encode_images as it was: every hidden state kept (``output_hidden_states=True``)."""
    cfg = model.config
    tower = model.model.vision_tower
    family = family_of(cfg)
    enc = processor.image_processor(images=images, return_tensors="pt")
    counts = [len(FeatureExtractor(model, processor).layout(*im.size).boxes) for im in images]
    pixels = torch.cat([px[:n] for px, n in zip(enc["pixel_values"], counts)])
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        layer = cfg.vision_feature_layer
        index = layer % len(hs)
        cls, keys = _layer_attention(tower, hs, index, family.has_cls(cfg))
        early = _layer_attention(tower, hs, 1, family.has_cls(cfg))[0]
        last = tower.post_layernorm(hs[layer])  # CDPruner's relevance input: the feature layer, post-norm
        last = last[:, 1:] if family.has_cls(cfg) else last
        return {"features": projector_inputs(hs, layer, cfg.vision_feature_select_strategy), "cls_attention": cls,
                "keys": keys, "early_attention": early, "last_hidden": last,
                "cls_tokens": hs[layer][:, 0] if family.has_cls(cfg) else None}, counts


@pytest.mark.parametrize("name", ["tiny", "tiny-ov", "bench"])
def test_encode_images_keeps_only_the_used_layers_bit_identical(models, name):
    """Features, attention scores (feature layer and layer 0), keys, CLS tokens and CDPruner's embeds
    equal the all-hidden-states pass over every crop at once bit for bit (bench: in several passes),
    and so do the extractor's features."""
    model_dir, (model, processor) = models[name]
    images = _images()
    ref, counts = _reference(model, processor, images)
    ours = encode_images(model, processor, images, attention=True, embeds=True)
    assert [f.crops for f in ours] == counts
    passes = -(-sum(counts) // crops_per_pass(model.model.vision_tower, "cpu"))
    assert (passes > 1) == (name == "bench"), passes
    extracted = FeatureExtractor(load_vision_tower(model_dir), processor)(images)
    assert np.array_equal(np.concatenate(extracted), ref["features"].numpy())
    chunked = encode_images(model, processor, images, embeds=True)  # without attention: in passes
    for field in ("features", "last_hidden"):
        assert torch.equal(torch.cat([getattr(f, field) for f in chunked]), ref[field]), field
    for field, want in ref.items():
        got = [getattr(f, field) for f in ours]
        if want is None:
            assert all(g is None for g in got), field
            continue
        assert torch.equal(torch.cat(got), want), field


@pytest.mark.parametrize("name", ["tiny", "tiny-ov"])
def test_extraction_runs_the_tower_up_to_the_feature_layer_only(models, name):
    """LLaVA-NeXT's feature layer is -2: its last encoder layer never runs during extraction, and only
    the feature layer's state is kept. OneVision's is -1: every layer runs, one state is kept."""
    model_dir, (model, processor) = models[name]
    tower = load_vision_tower(model_dir)
    layers = encoder_layers(tower.vision_tower)
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        FeatureExtractor(tower, processor)(_images()[:2])
    finally:
        for h in hooks:
            h.remove()
    feature = model.config.vision_feature_layer % (len(layers) + 1)  # hidden state i: output of layer i - 1
    assert calls == [1] * feature + [0] * (len(layers) - feature)
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        kept = tower_hidden_states(tower.vision_tower, pixels, [model.config.vision_feature_layer])
        ref = tower.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
    assert sorted(kept.kept) == [feature] and len(kept) == len(ref)
    assert torch.equal(kept[model.config.vision_feature_layer], ref[model.config.vision_feature_layer])
    with pytest.raises(KeyError, match="was not kept"):
        kept[0]


def _split_checkpoint(src: Path, dst: Path, rename=None) -> dict[str, str]:
    """Copy model dir ``src`` to ``dst`` with its weights in two shards: the vision tower's tensors in the
    first, everything else (LM, projector, newline) in the second, and an index. ``rename`` maps keys
    (the llava-hf hub layout). Returns the index's weight map."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {(rename or (lambda k: k))(k): f.get_tensor(k) for k in f.keys()}
    tower = {k: v for k, v in tensors.items() if ".vision_tower." in f".{k}"}
    rest = {k: v for k, v in tensors.items() if k not in tower}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(tower, dst / names[0], metadata={"format": "pt"})
    save_file(rest, dst / names[1], metadata={"format": "pt"})
    weight_map = {**{k: names[0] for k in tower}, **{k: names[1] for k in rest}}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _hub_layout(key: str) -> str:
    """transformers 5.x's saved key -> the llava-hf hub layout (the tower nested in ``vision_model``)."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def _module_layout(key: str) -> str:
    """transformers 5.x's saved key -> the module's own state_dict names (``model.vision_tower.``...)."""
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return "model." + key


LAYOUTS = {"saved": None, "hub": _hub_layout, "module": _module_layout}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_extraction_never_reads_lm_tensors(tiny_stage, tiny_model, tmp_path, layout):
    """The LM's shard deleted, the tower alone still loads and gives the whole model's features exactly,
    in transformers 5.x's saved layout, the llava-hf hub layout and the module's own key names."""
    model, processor = tiny_model
    folder = tmp_path / layout
    weight_map = _split_checkpoint(tiny_stage.model_dir, folder, LAYOUTS[layout])
    assert any(k.startswith(("model.language_model.", "language_model.")) for k in weight_map)
    if layout == "hub":
        assert all(k.startswith("vision_tower.vision_model.") for k, f in weight_map.items() if "00001" in f)
        assert torch.equal(load_model(folder)[0].model.vision_tower.embeddings.patch_embedding.weight,
                           model.model.vision_tower.embeddings.patch_embedding.weight)  # transformers agrees
    (folder / "model-00002-of-00002.safetensors").unlink()
    tower = load_vision_tower(folder)
    assert sum(p.numel() for p in tower.parameters()) == sum(p.numel() for p in model.model.vision_tower.parameters())
    images = _images()
    for ours, whole in zip(FeatureExtractor(tower, processor)(images), FeatureExtractor(model, processor)(images)):
        assert np.array_equal(ours, whole)


def test_the_extract_stage_loads_the_tower_alone(session_home, tiny_stage, tiny_model, tmp_path):
    """`atr extract`'s stage on a folder whose LM shard is gone: it runs and stores the whole model's
    features."""
    from flows.stages.extract import extract
    from flows.stages.prepare_model import prepare_model
    from pipeline.config import ExtractConfig
    from pipeline.images import open_source
    from storage.shards import iter_features

    folder = tmp_path / "no-lm"
    _split_checkpoint(tiny_stage.model_dir, folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    stage = prepare_model(session_home, str(folder))
    out = extract(session_home, ExtractConfig(images="synthetic:docs", limit=3, shard_size=4), stage)
    stored = [s.features for s in iter_features(out.path, out.manifest)]
    images = [item.load().image for item in open_source("synthetic:docs", seed=0).items(3)]
    whole = FeatureExtractor(*tiny_model)(images)
    assert len(stored) == 3 and all(np.array_equal(s, w.astype(np.float16)) for s, w in zip(stored, whole))


def _with_config(src: Path, dst: Path, **vision) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vision_config"].update(vision)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tower_config_and_weights_that_disagree_end_in_one_line(tiny_stage, tmp_path):
    src = Path(tiny_stage.model_dir)
    layers = json.loads((src / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    deeper = _with_config(src, tmp_path / "deeper", num_hidden_layers=layers + 1)
    with pytest.raises(ModelLoadError) as exc:
        load_vision_tower(deeper)
    msg = str(exc.value)
    assert "\n" not in msg and str(deeper) in msg and f"encoder.layers.{layers}." in msg and "disagree" in msg
    wider = _with_config(src, tmp_path / "wider", intermediate_size=96)
    with pytest.raises(ModelLoadError) as exc:
        load_vision_tower(wider)
    msg = str(exc.value)
    assert "\n" not in msg and str(wider) in msg
    assert "tensor vision_tower.encoder.layers.0.mlp.fc1.weight is [256, 64]" in msg
    assert "[96, 64]" in msg and "disagree" in msg
    empty = tmp_path / "no-weights"
    shutil.copytree(src, empty)
    (empty / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"cannot load the vision tower from .*no-weights: unreadable"):
        load_vision_tower(empty)


def test_atr_extract_names_a_bad_tower_in_one_line(tiny_stage, tmp_path, cli_env):
    from tests.conftest import assert_one_line_errors

    bad = _with_config(Path(tiny_stage.model_dir), tmp_path / "bad", intermediate_size=96)
    assert_one_line_errors([(["extract", "--model", str(bad), "--limit", "2"],
                             "mlp.fc1.weight is [256, 64] in model.safetensors")], cli_env)


def test_a_sized_preset_builds_its_tower_alone_with_the_whole_models_weights(tmp_path):
    from pipeline.builders import save_sized
    from pipeline.loading import materialize
    from pipeline.presets import SizedPreset

    preset = SizedPreset(name="sized-small", text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=4,
                         text_intermediate=128, vision_hidden=64, vision_layers=2, vision_heads=4,
                         vision_intermediate=128, seed=3)
    save_sized(preset, tmp_path)
    whole, _ = materialize(tmp_path, "cpu", "float32", allow_cpu=True)
    tower = load_vision_tower(tmp_path)
    ref = whole.model.vision_tower.state_dict()
    got = tower.vision_tower.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert load_vision_tower(tmp_path, dtype="bfloat16").vision_tower.embeddings.patch_embedding.weight.dtype \
        == torch.bfloat16


_PEAK = textwrap.dedent("""
    import json, re, sys, torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from pipeline.extract import tower_hidden_states

    def rss(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    def growth(fn):
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS
        before = rss("VmRSS")
        fn()
        return rss("VmHWM") - before

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=24,
                                             num_attention_heads=4, image_size=224, patch_size=14)).eval()
    pixels = torch.randn(16, 3, 224, 224)
    with torch.inference_mode():
        tower_hidden_states(tower, pixels[:2], [-2])  # warm-up
        bounded = growth(lambda: tower_hidden_states(tower, pixels, [-2]))
        every = growth(lambda: tower(pixels, output_hidden_states=True, return_dict=True))
    print(json.dumps({"bounded": bounded, "every": every, "state": pixels.shape[0] * 257 * 256 * 4}))
""")


@pytest.mark.slow
def test_the_tower_pass_holds_one_hidden_state_not_every_layer(tmp_path):
    """Peak RSS growth of one tower pass (24 layers, 16 crops) in a fresh process whose allocator hands
    every tensor back to the system at once: keeping every hidden state costs the 25 states on top of a
    layer's working set; keeping the used one does not grow with depth."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _PEAK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # Measured here at 24 crops: bounded 10 states (one layer's working set: attention, MLP), every 32.
    assert m["every"] - m["bounded"] > 20 * m["state"], m  # the 23 states not kept
    assert m["bounded"] < 14 * m["state"], m  # one layer's working set, whatever the depth


def test_eval_loads_the_whole_model_once_per_process_and_extraction_borrows_its_tower(tiny_stage, tmp_path):
    """cached_model (eval's per-worker load) loads once; cached_tower lends the cached model's own tower
    rather than reading it again, and loads the tower alone when no whole model is cached."""
    from pipeline.loading import VisionTower, cached_model, cached_tower

    model_dir = str(tiny_stage.model_dir)
    first = cached_model(model_dir, "cpu", "float32")
    assert cached_model(model_dir, "cpu", "float32") is first
    tower, processor = cached_tower(model_dir, "cpu", "float32")
    assert tower.vision_tower is first[0].model.vision_tower and processor is first[1]
    assert cached_model(model_dir, "cpu", "float32") is first  # still cached: the tower did not drop it
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    alone, _ = cached_tower(str(other), "cpu", "float32")
    assert isinstance(alone, VisionTower) and not hasattr(alone, "model")
    assert cached_tower(str(other), "cpu", "float32")[0] is alone


def test_a_tower_that_does_not_fit_is_refused_before_a_byte_is_read(tiny_stage, monkeypatch):
    from pipeline.memory import NotEnoughMemory

    monkeypatch.setenv("ATR_MEMORY_LIMIT", "512MiB")
    with pytest.raises(NotEnoughMemory) as exc:
        load_vision_tower(tiny_stage.model_dir)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"the vision tower of {tiny_stage.model_dir} needs 1.0 GiB")
