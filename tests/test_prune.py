"""Pruned inference: packing with a keep mask, the row-newline rule, batching, no-image prompts."""

from __future__ import annotations

import pytest
import torch

from pipeline.extract import crop_layout
from pipeline.prune import encode_images, generate_answers, split_prompt, visual_embeddings
from pipeline.strategies import Context, keep_mask
from pipeline.synthetic import generate_samples as make_samples
from pipeline.tinyworld import PROMPT, prompt_for


def _full_count(valid: torch.Tensor, grid: tuple[int, int]) -> int:
    """tiny-trained: 4x4 tokens per 64-px crop. The base crop's 16, then every grid token that survives
    unpadding, plus one newline per token row that keeps any."""
    rows, cols = grid
    canvas = valid[1:].view(rows, cols, 4, 4).permute(0, 2, 1, 3).reshape(rows * 4, cols * 4)
    return 16 + int(canvas.sum()) + int(canvas.any(dim=1).sum())


def test_full_keep_equals_the_models_own_packing(trained_model):
    model, processor = trained_model
    samples = make_samples("synthetic-ocr", "test", 6)
    feats = encode_images(model, processor, [s.image for s in samples])
    padded = 0
    for f, s in zip(feats, samples):
        w, h = s.image.size
        grid = crop_layout(w, h, 64, model.config.image_grid_pinpoints).grid
        assert f.features.shape == (1 + grid[0] * grid[1], 16, 64)
        padded += not bool(f.valid.all())
        vis = visual_embeddings(model, f)
        assert vis.shape[0] == _full_count(f.valid, grid)
        # the same as HF's get_image_features on the processor's pixel values
        enc = processor.image_processor(images=[s.image], return_tensors="pt")
        with torch.no_grad():
            ref = model.model.get_image_features(enc["pixel_values"], torch.tensor([[h, w]])).pooler_output[0]
        torch.testing.assert_close(vis, ref)
    assert padded >= 2  # the check covers images whose unpadding drops rows or columns


def test_row_newline_kept_iff_its_row_keeps_a_token(trained_model):
    model, processor = trained_model
    s = next(x for x in make_samples("synthetic-ocr", "test", 40) if x.image.size == (128, 128))
    f = encode_images(model, processor, [s.image])[0]
    full = visual_embeddings(model, f)
    newline = model.model.image_newline
    keep = torch.zeros(5, 16, dtype=torch.bool)
    keep[0, 3] = True  # one base token: no newline (the base crop has none)
    keep[1, 5] = True  # grid crop (0,0), token row 1 -> packed grid row 1
    keep[4, 15] = True  # grid crop (1,1), last row -> packed grid row 7
    vis = visual_embeddings(model, f, keep)
    assert vis.shape[0] == 3 + 2
    is_nl = torch.isclose(vis, newline.expand_as(vis)).all(-1)
    assert is_nl.tolist() == [False, False, True, False, True]
    torch.testing.assert_close(vis[0], full[3])
    assert visual_embeddings(model, f, torch.zeros(5, 16, dtype=torch.bool)).shape[0] == 0
    with pytest.raises(ValueError, match="keep mask shape"):
        visual_embeddings(model, f, torch.ones(4, 16, dtype=torch.bool))


def test_batched_generation_equals_batch_of_one(trained_model):
    model, processor = trained_model
    samples = make_samples("synthetic-ocr", "test", 5) + make_samples("synthetic-scene", "test", 5)
    feats = encode_images(model, processor, [s.image for s in samples])
    g = torch.Generator().manual_seed(1)
    vis = []
    for i, f in enumerate(feats):  # mixed: full, random 50 %, and no image
        if i % 3 == 0:
            vis.append(visual_embeddings(model, f))
        elif i % 3 == 1:
            vis.append(visual_embeddings(model, f, keep_mask("random", f.features, 0.5, context=Context(generator=g),
                                                             valid=f.valid)))
        else:
            vis.append(None)
    prompts = [prompt_for(s.question) if v is not None else PROMPT.replace("<image>\n", "").format(question=s.question)
               for s, v in zip(samples, vis)]
    batched = generate_answers(model, processor, prompts, vis, max_new_tokens=6)
    single = [generate_answers(model, processor, [p], [v], max_new_tokens=6)[0] for p, v in zip(prompts, vis)]
    assert batched == single
    assert sum(batched[i] == samples[i].answer for i in range(0, len(samples), 3)) >= 3  # full-image ones


def test_images_must_match_the_prompts_placeholders(trained_model):
    model, processor = trained_model
    hidden = model.get_input_embeddings().weight.shape[1]
    one = torch.zeros(3, hidden)
    with pytest.raises(ValueError, match="1 images for a prompt with 2 image placeholders"):
        generate_answers(model, processor, ["USER: <image><image> hi ASSISTANT:"], [[one]])
    with pytest.raises(ValueError, match="2 images for a prompt with 1 image placeholders"):
        generate_answers(model, processor, ["USER: <image> hi ASSISTANT:"], [[one, one]])
    with pytest.raises(ValueError, match="at most one image placeholder, got 2"):
        split_prompt(processor.tokenizer, "USER: <image><image> hi ASSISTANT:", model.config.image_token_id)


def test_a_model_without_the_llava_next_api_is_refused_in_one_line():
    from pipeline.loading import ModelLoadError
    from pipeline.prune import ImageFeatures

    class NotLlava(torch.nn.Module):
        config = None

    with pytest.raises(ModelLoadError, match=r"lacks model\.pack_image_features.*transformers 5"):
        visual_embeddings(NotLlava(), ImageFeatures(torch.zeros(1, 16, 64), (64, 64)))
