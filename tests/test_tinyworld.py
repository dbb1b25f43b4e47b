"""tiny-trained: the training recipe (shortened), the shipped checkpoint, and its figures."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pipeline.synthetic import CELL, GLYPHS, chance_accuracy, generate_samples
from pipeline.tinyworld import PROMPT, TinyWorldConfig, glyph_targets, quality

SHORT = TinyWorldConfig(train_ocr=200, train_scene=800, tower_steps=100, tower_batch=64, steps=400,
                        batch_size=16, warmup=30, eval_samples=60, eval_seeds=1)


def test_prompt_is_the_processor_chat_template(trained_model):
    _, processor = trained_model
    q = "What is written in the image?"
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == PROMPT.format(question=q)
    # one token per glyph: a 3-glyph answer is three tokens the LM can copy
    assert len(processor.tokenizer(" K7X", add_special_tokens=False)["input_ids"]) == 3


def test_glyph_targets_label_the_glyph_token_of_each_grid_crop():
    from pipeline.extract import crop_layout

    s = next(x for x in generate_samples("synthetic-ocr", "val", 50) if x.image.size == (128, 128) and len(x.answer) == 1)
    layout = crop_layout(128, 128, 64, ((64, 128), (128, 64), (128, 128)))
    t = glyph_targets(layout.boxes, 4, s.glyph_boxes)
    assert t.shape == (5, 16)
    assert (t[0] == -100).all()  # base crop: unlabelled
    x0, y0 = s.glyph_boxes[0][:2]
    col, row = int(x0 // CELL), int(y0 // CELL)
    crop = 1 + (row // 4) * 2 + col // 4
    expect = torch.zeros(4, 16, dtype=torch.long)
    expect[crop - 1, (row % 4) * 4 + col % 4] = 1 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".index(s.answer)
    assert torch.equal(t[1:], expect)


def test_glyph_targets_follow_the_padding_of_an_image_that_fits_no_pinpoint():
    """A 96 x 128 image lands on the 128 x 128 canvas with 16 px of padding above and below: its glyph
    cell is one token row lower on the canvas, and still exactly one token."""
    from pipeline.extract import crop_layout

    s = next(x for x in generate_samples("synthetic-ocr", "val", 200) if x.image.size == (128, 96) and len(x.answer) == 1)
    layout = crop_layout(128, 96, 64, ((64, 128), (128, 64), (128, 128)))
    assert layout.grid == (2, 2)
    t = glyph_targets(layout.boxes, 4, s.glyph_boxes)
    x0, y0 = s.glyph_boxes[0][:2]
    col, row = int(x0 // CELL), int(y0 // CELL) + 1  # + the 16-px padding strip
    crop = 1 + (row // 4) * 2 + col // 4
    assert (t[1:] > 0).sum() == 1 and t[crop, (row % 4) * 4 + col % 4] == 1 + GLYPHS.index(s.answer)


def test_config_refuses_bad_values():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="steps must be positive"):
        TinyWorldConfig(steps=0)
    with pytest.raises(ConfigError, match="unknown tiny-world config key 'setps'.*'steps'"):
        TinyWorldConfig.from_dict({"setps": 10})


def test_shortened_training_through_the_stage_beats_no_image(session_home):
    """The real prepare-model stage trains a short tiny-trained; it reads colours far above no-image."""
    from flows.stages.prepare_model import prepare_model
    from pipeline.loading import load_model

    result = prepare_model(session_home, "tiny-trained", tiny_world=SHORT.to_dict())
    m = result.manifest
    assert not result.cached and m["source"] == "trained"
    assert m["provenance"]["config_hash"] == SHORT.hash()
    prov = json.loads((result.model_dir / "provenance.json").read_text())
    assert prov["config"] == SHORT.to_dict() and len(prov["code_hash"]) == 16
    card = {(r["benchmark"], r["strategy"]): r for r in m["quality"]}
    assert set(card) == {(b, s) for b in ("synthetic-ocr", "synthetic-scene") for s in ("full", "none", "random")}
    scene_full, scene_none = card["synthetic-scene", "full"]["accuracy"], card["synthetic-scene", "none"]["accuracy"]
    assert scene_full >= scene_none + 0.4, (scene_full, scene_none)
    assert scene_none <= chance_accuracy("synthetic-scene") + 0.10
    assert card["synthetic-scene", "none"]["mean_visual_tokens"] == 0
    # saved with save_pretrained, read back with from_pretrained: the same answers
    model, processor = load_model(result.model_dir)
    test = generate_samples("synthetic-scene", "test", 60)
    assert quality(model, processor, test, "full")["accuracy"] == pytest.approx(scene_full)
    again = prepare_model(session_home, "tiny-trained", tiny_world=SHORT.to_dict())
    assert again.cached and again.path == result.path


def test_shipped_checkpoint_is_used_and_within_limits(trained_stage):
    from flows.stages.prepare_model import SHIPPED_LIMIT_BYTES, shipped_model_dir

    m = trained_stage.manifest
    assert m["source"] == "shipped"
    assert m["provenance"]["config_hash"] == TinyWorldConfig().hash()
    shipped = shipped_model_dir("tiny-trained")
    assert sum(f.stat().st_size for f in shipped.iterdir()) <= SHIPPED_LIMIT_BYTES
    assert list(shipped.glob("*.safetensors")) and not list(shipped.glob("*.bin")) and not list(shipped.glob("*.pt"))
    # the quality card recorded when it was trained reaches the issue's figures
    card = m["quality"]
    acc = {(r["benchmark"], r["strategy"]): [] for r in card}
    for r in card:
        acc[r["benchmark"], r["strategy"]].append(r["accuracy"])
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    assert mean["synthetic-ocr", "full"] >= 0.85 and mean["synthetic-scene", "full"] >= 0.85
    assert mean["synthetic-ocr", "none"] <= chance_accuracy("synthetic-ocr") + 0.10
    assert mean["synthetic-scene", "none"] <= chance_accuracy("synthetic-scene") + 0.10
    assert mean["synthetic-ocr", "random"] <= 0.7 * mean["synthetic-ocr", "full"]
    assert len(acc["synthetic-ocr", "random"]) == 3


def test_shipped_model_reads_test_questions(trained_model):
    """Measured now, not read from the card: 100 test questions per benchmark."""
    model, processor = trained_model
    ocr = generate_samples("synthetic-ocr", "test", 100)
    scene = generate_samples("synthetic-scene", "test", 100)
    assert quality(model, processor, ocr, "full")["accuracy"] >= 0.8
    assert quality(model, processor, scene, "full")["accuracy"] >= 0.9
    assert quality(model, processor, ocr, "none")["accuracy"] <= chance_accuracy("synthetic-ocr") + 0.10
    assert quality(model, processor, ocr, "random", retention=0.25)["accuracy"] <= 0.5


def test_visual_information_stays_local(trained_model):
    """Drawing one glyph into a blank cell changes few feature tokens (the tower does not smear it)."""
    from pipeline.tinyworld import locality

    model, processor = trained_model
    blank = Image.new("RGB", (128, 128), (250, 250, 250))
    out = locality(model, processor, blank, (48, 48))
    assert out["tokens_total"] == 5 * 16
    assert 1 <= out["tokens_changed"] <= 3, out  # the grid token holding it (+ the base token)


def test_ask_answers_through_hf_generate(trained_model):
    from pipeline.tinyworld import ask

    model, processor = trained_model
    samples = generate_samples("synthetic-ocr", "test", 12) + generate_samples("synthetic-scene", "test", 12)
    answers = ask(model, processor, [s.image for s in samples], [s.question for s in samples])
    assert sum(a == s.answer for a, s in zip(answers, samples)) >= 20
    one = ask(model, processor, [samples[0].image], [samples[0].question])
    assert one == answers[:1]  # left-padded batch = batch of one


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_training_reaches_the_issue_figures(tmp_path):
    """Trains tiny-trained from scratch with the default config (about 8 minutes on 2 CPUs)."""
    import time

    from flows.stages.prepare_model import prepare_model
    from storage.home import Home

    home = Home.resolve(tmp_path / "home").ensure()
    t0 = time.perf_counter()
    result = prepare_model(home, "tiny-trained", retrain=True)
    seconds = time.perf_counter() - t0
    m = result.manifest
    assert m["source"] == "trained"
    rows = m["quality"]
    mean = {}
    for r in rows:
        mean.setdefault((r["benchmark"], r["strategy"]), []).append(r["accuracy"])
    mean = {k: sum(v) / len(v) for k, v in mean.items()}
    print(f"\ntiny-trained: stage {seconds:.0f}s, training {m['metrics']['train_seconds']:.0f}s; {mean}")
    assert all(r["n_samples"] >= 300 for r in rows)
    assert mean["synthetic-ocr", "full"] >= 0.85 and mean["synthetic-scene", "full"] >= 0.85
    assert mean["synthetic-ocr", "none"] <= chance_accuracy("synthetic-ocr") + 0.10
    assert mean["synthetic-scene", "none"] <= chance_accuracy("synthetic-scene") + 0.10
    assert mean["synthetic-ocr", "random"] <= 0.7 * mean["synthetic-ocr", "full"]
    assert m["matches_shipped"] is True  # --retrain reproduces the shipped checkpoint byte for byte
