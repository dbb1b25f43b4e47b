"""CDPruner's instruction relevance through a real (tiny) CLIP checkpoint saved locally, and
``atr eval --strategies cdpruner --text-encoder DIR`` end to end."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError


def _save_clip(out, vision_width: int = 64, seed: int = 0):
    """A tiny CLIPModel (text tower + projections) and a tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    from pipeline.builders import build_tokenizer
    from pipeline.presets import PRESETS

    tok = build_tokenizer(PRESETS["tiny"])
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                  "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                                  "bos_token_id": tok.bos_token_id},
                     vision_config={"hidden_size": vision_width, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _save_clip(tmp_path_factory.mktemp("clip"))


def test_relevance_is_cdpruners_formula(clip_dir):
    from pipeline.relevance import load_text_encoder

    rel = load_text_encoder(str(clip_dir), expect_width=64)
    hidden = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    q = "What is written in the image?\nAnswer the question using a single word or phrase."
    got = rel.relevance(hidden, q)
    assert got.shape == (3, 16)
    # by hand: normalized projections, negated similarity, mean over text segments, min-max over the image
    m = rel.model
    with torch.no_grad():
        img = torch.nn.functional.normalize(m.visual_projection(hidden), dim=-1)
        ids = rel.tokenizer("What is written in the image?")["input_ids"]  # their loader strips the suffix
        txt = m.get_text_features(input_ids=torch.tensor([ids + [rel.tokenizer.pad_token_id] * (77 - len(ids))]),
                                  attention_mask=torch.tensor([[1] * len(ids) + [0] * (77 - len(ids))]))
        txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    want = -(img @ txt.T).mean(-1)
    want = (want - want.min() + 1e-6) / (want.max() - want.min())
    torch.testing.assert_close(got, want)
    raw = -(img @ txt.T).mean(-1)
    assert float(got.min()) == pytest.approx(1e-6 / float(raw.max() - raw.min()), rel=1e-3)  # min-max over the image
    assert float(got.max()) == pytest.approx(1.0, abs=1e-4)
    # a long question is cut into 77-token segments, one embedding each
    assert rel.text_embeds(" ".join(["word"] * 200)).shape[0] >= 2


def test_text_encoder_errors_are_one_line(tmp_path, clip_dir):
    from pipeline.relevance import load_text_encoder

    with pytest.raises(ConfigError, match=r"visual_projection takes width 64, but the model's vision tower gives 32"):
        load_text_encoder(str(clip_dir), expect_width=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load a CLIP model") as exc:
        load_text_encoder(str(tmp_path / "empty"))
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="not a directory with a CLIP checkpoint, nor a hub id"):
        load_text_encoder(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--text-encoder openai/no-such-clip"):
        load_text_encoder("openai/no-such-clip")  # offline (HF_HUB_OFFLINE=1) and not cached


def test_relevance_changes_what_cdpruner_keeps(trained_model, clip_dir):
    from pipeline.prune import encode_images, project
    from pipeline.relevance import load_text_encoder
    from pipeline.strategies import Context, select
    from pipeline.synthetic import generate_samples

    model, processor = trained_model
    rel = load_text_encoder(str(clip_dir), expect_width=model.config.vision_config.hidden_size)
    differ = 0
    for sample in generate_samples("synthetic-ocr", "test", 4):
        image = sample.image
        f = encode_images(model, processor, [image], embeds=True)[0]
        assert f.last_hidden is not None and f.last_hidden.shape[:2] == f.features.shape[:2]
        proj = project(model, f.features)
        plain = select("cdpruner", f.features, 0.25, "per-crop", Context(projected=proj), f.valid)
        cond = select("cdpruner", f.features, 0.25, "per-crop",
                      Context(projected=proj, relevance=rel.relevance(f.last_hidden, "What is written?")), f.valid)
        assert plain.tokens == cond.tokens
        differ += int((plain.mask != cond.mask).any())
    assert differ >= 1


def test_relevance_reads_the_feature_layer_as_the_reference(trained_model):
    """CDPruner's clip_encoder.py: image_embeds = post_layernorm(hidden_states[select_layer]) of the patch
    tokens, select_layer = -2 on LLaVA-NeXT -- the feature layer, not the last layer."""
    from pipeline.prune import encode_images
    from pipeline.synthetic import generate_samples

    model, processor = trained_model
    layer = model.config.vision_feature_layer
    assert layer == -2
    image = generate_samples("synthetic-ocr", "test", 1)[0].image
    f = encode_images(model, processor, [image], embeds=True)[0]
    tower = model.model.vision_tower
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0][:f.features.shape[0]]
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        post = getattr(tower, "vision_model", tower).post_layernorm
        want, last = post(hidden[layer])[:, 1:], post(hidden[-1])[:, 1:]
    torch.testing.assert_close(f.last_hidden, want, rtol=1e-5, atol=1e-5)
    assert (f.last_hidden - last).abs().max() > 1e-3  # the last layer would differ


# slow (57 s): the whole atr eval with a CLIP text tower; the relevance scores are checked in the default run
@pytest.mark.slow
def test_eval_cdpruner_with_a_text_encoder(cli_env, clip_dir, tmp_path):
    from conftest import assert_one_line_errors, atr_in_process

    base = ["eval", "--benchmark", "synthetic-ocr", "--strategies", "cdpruner", "--retentions", "0.25",
            "--limit", "6", "--shard-size", "6"]
    plain = atr_in_process(base, cli_env)
    assert plain.returncode == 0, plain.stderr
    assert "unconditioned DPP" in plain.stderr
    cond = atr_in_process([*base, "--text-encoder", str(clip_dir)], cli_env)
    assert cond.returncode == 0, cond.stderr
    assert "unconditioned DPP" not in cond.stderr
    assert "for 1 of 1 shard results" in cond.stdout  # a new result, not the unconditioned one from cache
    wrong = _save_clip(tmp_path / "clip32", vision_width=32)
    assert_one_line_errors([
        ([*base, "--text-encoder", str(wrong)], "visual_projection takes width 32, but the model's vision tower gives 64"),
        ([*base, "--text-encoder", str(tmp_path / "nowhere")], "not a directory with a CLIP checkpoint"),
    ], cli_env)
