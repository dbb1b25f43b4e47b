"""Qwen2.5-VL and Qwen3-VL through ``pipeline.prune`` (the families' own runtime), on the tiny random-weight
presets: token-exact parity with stock ``generate`` at batch 1 and 8, pruned batches equal batch-1 runs,
DeepStack pruned with the same keep set (and needed), raster-order features, token counts equal to the stock
processor's on real photos and a real page, bad input in one line, and the save / load / tower-only paths."""

from __future__ import annotations

import copy
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.builders import build_tiny
from pipeline.errors import UserError
from pipeline.evaluate import chat_prompt
from pipeline.families import family_of
from pipeline.families._qwen import KeptImage, QwenInputError
from pipeline.presets import PRESETS
from pipeline.prune import base_regions, encode_images, generate_ids, project, visual_embeddings

NAMES = ("tiny-qwen25", "tiny-qwen3")
# (height, width): square, portrait, landscape, thin strips, odd sizes; the tiny presets' 16-px merged token,
# pixel limits 32*32 .. 224*224 (the 208 x 90 and 48 x 200 images are resized to other aspect ratios).
SIZES = [(64, 64), (100, 150), (208, 90), (128, 128), (48, 200), (160, 64), (96, 128), (77, 131)]
QUESTIONS = ["what is written in the image ?", "which colour is the large shape ?"] * 4
NEW = 6


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    torch.manual_seed(0)
    model, processor = build_tiny(PRESETS[request.param])
    return request.param, model.eval(), processor


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def prompts(processor, n=8):
    return [chat_prompt(processor, q, True) for q in QUESTIONS[:n]]


def stock(model, processor, imgs, texts):
    enc = processor(images=imgs, text=texts, return_tensors="pt", padding=len(texts) > 1)
    out = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    return out[:, enc["input_ids"].shape[1]:]


@torch.no_grad()
def test_full_equals_stock_generate_at_batch_8_and_1(tiny, images):
    name, model, processor = tiny
    texts = prompts(processor)
    feats = encode_images(model, processor, images)
    vis = [visual_embeddings(model, f) for f in feats]
    assert all(isinstance(v, KeptImage) and v.kept_indices.tolist() == list(range(f.features.shape[1]))
               for v, f in zip(vis, feats))
    ours = generate_ids(model, processor, texts, vis, max_new_tokens=NEW)
    assert torch.equal(ours, stock(model, processor, images, texts)), name
    for i in (0, 2, 4, 7):  # batch 1: a square, a tall, a thin-strip and an odd-sized image
        one = generate_ids(model, processor, [texts[i]], [vis[i]], max_new_tokens=NEW)
        assert torch.equal(one, stock(model, processor, [images[i]], [texts[i]])), (name, SIZES[i])
    # the answers are not trivially constant, so equality above says something
    assert len({tuple(r.tolist()) for r in ours}) > 1


@torch.no_grad()
def test_a_pruned_batch_of_8_equals_batch_one_runs(tiny, images):
    name, model, processor = tiny
    texts = prompts(processor)
    feats = encode_images(model, processor, images)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(f.features.shape[:2], generator=g) < 0.3 for f in feats]
    for m in masks:
        m[0, 0] = True  # at least one kept token per image
    vis = [visual_embeddings(model, f, m) for f, m in zip(feats, masks)]
    assert [v.embeds.shape[0] for v in vis] == [int(m.sum()) for m in masks]
    batch = generate_ids(model, processor, texts, vis, max_new_tokens=NEW)
    full = generate_ids(model, processor, texts, [visual_embeddings(model, f) for f in feats], max_new_tokens=NEW)
    assert not torch.equal(batch, full), "pruning ~70% of random-weight tokens changes some answer"
    for i in range(8):
        one = generate_ids(model, processor, [texts[i]], [vis[i]], max_new_tokens=NEW)[0]
        # alone, a row stops at EOS; in the batch it goes on with pad ids
        assert torch.equal(batch[i, :len(one)], one), (name, i)
        assert bool((batch[i, len(one):] == processor.tokenizer.pad_token_id).all()), (name, i)


@torch.no_grad()
def test_qwen3_deepstack_is_pruned_with_the_same_keep_set_and_needed(images):
    torch.manual_seed(0)
    model, processor = build_tiny(PRESETS["tiny-qwen3"])
    model.eval()
    texts = prompts(processor)
    feats = encode_images(model, processor, images)
    enc = processor.image_processor(images=images, return_tensors="pt")
    out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    layers = len(model.config.vision_config.deepstack_visual_indexes)
    g = torch.Generator().manual_seed(2)
    kept = []
    for i, f in enumerate(feats):
        assert len(f.deepstack) == layers
        mask = torch.rand(f.features.shape[:2], generator=g) < 0.5
        mask[0, -1] = True
        v = visual_embeddings(model, f, mask)
        keep = mask[0].nonzero()[:, 0]
        assert torch.equal(v.kept_indices, keep)
        torch.testing.assert_close(v.embeds, out.pooler_output[i][keep], rtol=1e-5, atol=1e-5)
        for layer in range(layers):
            torch.testing.assert_close(v.deepstack[layer], out.deepstack_features[layer][i][keep],
                                       rtol=1e-5, atol=1e-5)
        kept.append(v)
    full = [visual_embeddings(model, f) for f in feats]
    ours = generate_ids(model, processor, texts, full, max_new_tokens=NEW)
    dropped = [copy.copy(v) for v in full]
    for v in dropped:
        v.deepstack = [torch.zeros_like(d) for d in v.deepstack]
    assert not torch.equal(generate_ids(model, processor, texts, dropped, max_new_tokens=NEW), ours)
    # the logits move too, not only the argmax somewhere
    pruned = generate_ids(model, processor, texts, kept, max_new_tokens=NEW)
    no_stack = [copy.copy(v) for v in kept]
    for v in no_stack:
        v.deepstack = [torch.zeros_like(d) for d in v.deepstack]
    assert not torch.equal(generate_ids(model, processor, texts, no_stack, max_new_tokens=NEW), pruned)


@torch.no_grad()
def test_features_are_in_raster_order(tiny, images):
    """project(features) is the model's own merged tokens, which HF returns in raster order; for Qwen2.5-VL the
    tower's window order differs from raster order on these images (windows of 4 x 4 merged tokens), so the
    reordering is exercised."""
    name, model, processor = tiny
    enc = processor.image_processor(images=images, return_tensors="pt")
    pooled = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
    feats = encode_images(model, processor, images)
    for f, ref, grid in zip(feats, pooled, enc["image_grid_thw"]):
        assert f.grid == tuple(grid.tolist())
        assert f.features.shape[:2] == (1, ref.shape[0]) and bool(f.valid.all())
        torch.testing.assert_close(project(model, f.features)[0], ref, rtol=1e-5, atol=1e-5)
    if name == "tiny-qwen25":
        from transformers.vision_utils import get_vision_window_index

        vis = model.config.vision_config
        window, _ = get_vision_window_index(enc["image_grid_thw"], vis.spatial_merge_size, vis.window_size,
                                            vis.patch_size)
        assert not torch.equal(window, torch.arange(len(window)))


# ------------------------------------------------------------------ token counts on real images

# (label, family's preset, patch, min_pixels, max_pixels): the hub checkpoints' preprocessor_config.json, the
# PIL processor's own defaults (which shrink a page), and Qwen3-VL at a lower max (its README's 1280 tokens).
SETTINGS = [
    ("Qwen2.5-VL-7B hub", "tiny-qwen25", 14, 3136, 12845056),
    ("Qwen2VLImageProcessorPil defaults", "tiny-qwen25", 14, 3136, 1003520),
    ("Qwen3-VL-8B hub", "tiny-qwen3", 16, 65536, 16777216),
    ("Qwen3-VL max 1280 tokens", "tiny-qwen3", 16, 65536, 1280 * 32 * 32),
]


def real_images() -> dict[str, Image.Image]:
    """Photos and graphics shipped by matplotlib and scikit-learn, and an A4 page at 150 dpi set in DejaVu."""
    import matplotlib
    import sklearn.datasets

    from pipeline.fonts import font

    out = {}
    sample = os.path.join(matplotlib.get_data_path(), "sample_data")
    for name in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"):
        out[name] = Image.open(os.path.join(sample, name))
    skl = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    for name in ("china.jpg", "flower.jpg"):
        out[name] = Image.open(os.path.join(skl, name))
    page = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(page)
    face = font("serif", 28)
    for row in range(40):
        draw.text((120, 120 + row * 38), f"{row + 1:02d}. The quick brown fox jumps over the lazy dog; 0123456789.",
                  fill="black", font=face)
    out["A4 page 150 dpi"] = page
    out["A4 page landscape"] = page.rotate(90, expand=True)
    return out


def token_table() -> list[tuple[str, str, tuple[int, int], int, int, int]]:
    """(setting, image, (height, width), stock tokens from image_grid_thw, stock image tokens in the prompt,
    ours from geometry): the stock processor (with the real limits and patch) against Family.visual_tokens."""
    rows = []
    imgs = real_images()
    for label, preset, patch, lo, hi in SETTINGS:
        model, tiny_proc = build_tiny(PRESETS[preset])
        family = family_of(model.config)
        cfg = copy.deepcopy(model.config)
        cfg.vision_config.patch_size = patch
        image_processor = family.build_image_processor(0, (), patch=patch, min_pixels=lo, max_pixels=hi)
        processor = family.processor(image_processor, tiny_proc.tokenizer, tiny_proc.image_token, patch)
        family.note_processor(types.SimpleNamespace(config=cfg), processor)  # what loading does
        text = chat_prompt(processor, "read it", True)
        for name, image in imgs.items():
            enc = processor(images=[image], text=[text], return_tensors="pt")
            from_grid = int(enc["image_grid_thw"].prod()) // 4
            in_prompt = int((enc["input_ids"] == processor.image_token_id).sum())
            ours = family.visual_tokens(cfg, (image.height, image.width)).total
            rows.append((label, name, (image.height, image.width), from_grid, in_prompt, ours))
    return rows


def test_token_counts_match_the_stock_processor_on_real_images():
    rows = token_table()
    print("\nsetting | image | (h, w) | stock grid/4 | stock prompt tokens | ours")
    for row in rows:
        print(" | ".join(str(x) for x in row))
    assert len(rows) == len(SETTINGS) * 7
    assert all(grid == prompt == ours for *_, grid, prompt, ours in rows)
    # a config no processor was noted on (a meta-device 7B) counts with the hub checkpoint's limits
    for label, preset, patch, *_ in SETTINGS:
        if label.endswith("hub"):
            model, _ = build_tiny(PRESETS[preset])
            cfg = copy.deepcopy(model.config)
            cfg.vision_config.patch_size = patch
            assert getattr(cfg, "atr_pixels", None) is None
            family = family_of(cfg)
            assert all(family.visual_tokens(cfg, size).total == ours
                       for setting, _, size, _, _, ours in rows if setting == label)
    page = {label: ours for label, name, *_, ours in rows if name == "A4 page 150 dpi"}
    # the page is shrunk only where max_pixels is below its 2.2 M pixels
    assert page["Qwen2VLImageProcessorPil defaults"] < page["Qwen2.5-VL-7B hub"]
    assert page["Qwen3-VL max 1280 tokens"] <= 1280 < page["Qwen3-VL-8B hub"]


# ------------------------------------------------------------------ bad input, one line each

def test_bad_input_is_refused_in_one_line(tiny, images):
    name, model, processor = tiny
    family = family_of(model.config)
    text = prompts(processor, 1)
    with pytest.raises(QwenInputError) as err:
        processor(images=None, text=text, videos=[np.zeros((4, 32, 32, 3), dtype=np.uint8)], return_tensors="pt")
    assert "videos" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        encode_images(model, processor, [[images[0], images[1]]])  # a clip of frames
    assert "videos" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        encode_images(model, processor, [np.zeros((32, 32, 3), dtype=np.uint8)])
    assert "PIL" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        base_regions(model, 1, 16, (64, 64))
    assert "needs AnyRes crops" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        encode_images(model, processor, images[:1], embeds=True)
    assert "--text-encoder" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        family.build_image_processor(0, (), patch=14, min_pixels=100, max_pixels=27 * 27)
    assert "below one merged token" in one_line(err.value) and "784" in str(err.value)
    with pytest.raises(UserError) as err:
        type(PRESETS[name])(max_pixels=15 * 15, min_pixels=100)
    assert "below one merged token" in one_line(err.value)
    with pytest.raises(UserError) as err:
        type(PRESETS[name])(min_pixels=0)
    one_line(err.value)
    import dataclasses

    from pipeline.presets import SIZED_PRESETS

    for sized in (p for p in SIZED_PRESETS.values() if p.family is family):
        with pytest.raises(UserError) as err:
            dataclasses.replace(sized, max_pixels=500)
        assert "below one merged token" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        encode_images(model, processor, [Image.new("RGB", (403, 2))])
    assert "aspect ratio" in one_line(err.value)
    with pytest.raises(QwenInputError) as err:
        family.visual_tokens(model.config, (2, 403))
    assert "aspect ratio" in one_line(err.value)
    # a CMYK JPEG is a still image: the processor converts it
    cmyk = images[1].convert("CMYK")
    assert encode_images(model, processor, [cmyk])[0].features.shape[1] > 0


# ------------------------------------------------------------------ save, load, tower only

@torch.no_grad()
def test_saved_dir_loads_through_load_model_and_the_tower_alone(tiny, images, tmp_path, monkeypatch):
    import sys

    from pipeline.loading import (cached_model, cached_tower, check_tower_weights, load_model, load_processor,
                                  load_vision_tower)

    name, model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, lproc = load_model(tmp_path)
    assert type(loaded) is type(model) and getattr(lproc, "video_processor", None) is None
    assert lproc.image_processor.patch_size == PRESETS[name].patch_size
    assert loaded.config.atr_pixels == {"min_pixels": PRESETS[name].min_pixels,
                                        "max_pixels": PRESETS[name].max_pixels}  # noted at load
    texts = prompts(processor, 4)
    want = generate_ids(model, processor, texts, [visual_embeddings(model, f)
                                                  for f in encode_images(model, processor, images[:4])],
                        max_new_tokens=NEW)
    got = generate_ids(loaded, lproc, texts, [visual_embeddings(loaded, f)
                                              for f in encode_images(loaded, lproc, images[:4])],
                       max_new_tokens=NEW)
    assert torch.equal(got, want)
    assert torch.equal(stock(loaded, lproc, images[:4], texts), want)
    with pytest.raises(QwenInputError):
        lproc(images=None, text=texts[:1], videos=[np.zeros((2, 32, 32, 3), dtype=np.uint8)])
    assert not (tmp_path / "video_preprocessor_config.json").exists()
    with monkeypatch.context() as patch:  # no torchvision, no video processor: the processor still loads
        patch.setitem(sys.modules, "torchvision", None)
        again = load_processor(tmp_path)
    assert again(images=images[:1], text=texts[:1], return_tensors="pt")["input_ids"].shape[0] == 1

    check_tower_weights(tmp_path)
    tower = load_vision_tower(tmp_path)
    assert type(tower.vision_tower) is type(model.model.visual)
    whole = encode_images(model, processor, images[:3], attention=True)
    alone = encode_images(tower, lproc, images[:3], attention=True)
    for a, b in zip(whole, alone):
        assert a.grid == b.grid
        assert torch.equal(a.features, b.features) and torch.equal(a.cls_attention, b.cls_attention)
        assert torch.equal(project(model, a.features), project(tower, b.features))
        if a.deepstack is not None:
            assert all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack))
    # a whole model already cached lends its tower (Family.tower_of), the Qwen tower with its merger
    whole_model, _ = cached_model(tmp_path, "cpu", "float32")
    lent, _ = cached_tower(tmp_path, "cpu", "float32")
    assert lent.vision_tower is whole_model.model.visual


@torch.no_grad()
def test_hub_style_stop_ids_and_no_pad_token(tiny, images):
    """The hub checkpoints' generation_config stops on two ids (<|im_end|>, <|endoftext|>) while the tokenizer
    names one, and a tokenizer may have no pad token: stock generate stops on both, so must ours."""
    name, model, processor = tiny
    model, processor = copy.deepcopy(model), copy.deepcopy(processor)
    texts = prompts(processor, 2)
    vis = [visual_embeddings(model, f) for f in encode_images(model, processor, images[:2])]
    free = generate_ids(model, processor, texts[:1], vis[:1], max_new_tokens=NEW)[0]
    stop = int(free[2])  # a token the model emits mid-answer becomes a second eos id
    assert stop != processor.tokenizer.eos_token_id
    model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id, stop]
    processor.tokenizer.pad_token = None
    assert processor.tokenizer.pad_token_id is None
    ours = generate_ids(model, processor, texts[:1], vis[:1], max_new_tokens=NEW)[0]
    assert torch.equal(ours, stock(model, processor, images[:1], texts[:1])[0])
    assert int(ours[-1]) == stop and len(ours) <= 3
    both = generate_ids(model, processor, texts, vis, max_new_tokens=NEW)  # padded with an eos id
    assert torch.equal(both[0, :len(ours)], ours)


# The hub Qwen2.5-VL chat template's shape: a default system prompt, "<|vision_start|><|image_pad|><|vision_end|>"
# per image, then the text (its video branch left out).
HUB_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@torch.no_grad()
def test_hub_style_tokenizer_and_chat_template(tiny, images, tmp_path):
    """A tokenizer whose image token is ``<|image_pad|>`` and names no image_token attribute (the hub's), and a
    chat template with a default system prompt: full equals stock generate, pruned batch equals batch 1."""
    import json

    from transformers import AutoTokenizer

    from pipeline.families._qwen import qwen_processor_class

    name, model, processor = tiny
    processor.tokenizer.save_pretrained(tmp_path)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        path = tmp_path / file
        path.write_text(path.read_text().replace('"<image>"', '"<|image_pad|>"'))
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("image_token", "video_token", "vision_bos_token", "vision_eos_token"):
        conf.pop(key, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert not hasattr(tok, "image_token") and tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    hub = qwen_processor_class(family_of(model.config))(image_processor=processor.image_processor, tokenizer=tok,
                                                        chat_template=HUB_TEMPLATE)
    assert hub.image_token == "<|image_pad|>" and hub.image_token_id == model.config.image_token_id
    texts = [chat_prompt(hub, q, True) for q in QUESTIONS[:4]]
    assert texts[0].startswith("<|im_start|>system\nYou are a helpful assistant.")
    feats = encode_images(model, hub, images[:4])
    full = generate_ids(model, hub, texts, [visual_embeddings(model, f) for f in feats], max_new_tokens=NEW)
    assert torch.equal(full, stock(model, hub, images[:4], texts))
    assert torch.equal(generate_ids(model, hub, texts[1:2], [visual_embeddings(model, feats[1])], max_new_tokens=NEW),
                       stock(model, hub, images[1:2], texts[1:2]))
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(f.features.shape[:2], generator=g) < 0.4 for f in feats]
    vis = [visual_embeddings(model, f, m) for f, m in zip(feats, masks)]
    batch = generate_ids(model, hub, texts, vis, max_new_tokens=NEW)
    for i in range(4):
        one = generate_ids(model, hub, [texts[i]], [vis[i]], max_new_tokens=NEW)[0]
        assert torch.equal(batch[i, :len(one)], one)
