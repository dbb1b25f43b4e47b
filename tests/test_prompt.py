"""The pruned path sends the prompt exactly as the stock processor builds it.

The llava-hf mistral and vicuna tokenizers add BOS while their chat templates do
not write ``<s>``; the tiny tokenizer adds nothing, so these tests give a copy of
it a BOS post-processor (as those tokenizers have) and check that ``full``
generates the same token ids as stock ``model.generate(**processor(...))``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.evaluate import chat_prompt
from pipeline.prune import encode_images, generate_ids, split_prompt, visual_embeddings
from pipeline.synthetic import generate_samples

MAX_NEW = 6


def with_bos(processor):
    """A copy of ``processor`` whose tokenizer prepends ``<s>`` to every text, like Llama's."""
    from tokenizers import processors

    out = copy.deepcopy(processor)
    tok = out.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    tok.padding_side = "left"
    return out


@pytest.fixture(scope="module")
def bos_world(trained_model):
    model, processor = trained_model
    bos = with_bos(processor)
    prompt = chat_prompt(bos, "What is written in the image?", True)
    assert "<s>" not in prompt  # the template does not write BOS ...
    assert bos.tokenizer(prompt)["input_ids"][0] == bos.tokenizer.bos_token_id  # ... the tokenizer adds it
    samples = generate_samples("synthetic-ocr", "test", 8) + generate_samples("synthetic-scene", "test", 8)
    return model, bos, samples


def test_split_prompt_keeps_the_tokenizers_bos(bos_world):
    model, processor, samples = bos_world
    prompt = chat_prompt(processor, samples[0].question, True)
    before, after = split_prompt(processor.tokenizer, prompt, model.config.image_token_id)
    stock = processor(images=[samples[0].image], text=[prompt], return_tensors="pt")["input_ids"][0]
    image = stock == model.config.image_token_id
    first = int(image.nonzero()[0, 0])
    assert before[0] == processor.tokenizer.bos_token_id
    assert before.tolist() == stock[:first].tolist()
    assert after.tolist() == stock[first + int(image.sum()):].tolist()


def _stock(model, processor, samples) -> list[list[int]]:
    prompts = [chat_prompt(processor, s.question, True) for s in samples]
    enc = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding=True)
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    return [_until_eos(row, tok) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def _pruned_full(model, processor, samples) -> list[list[int]]:
    feats = encode_images(model, processor, [s.image for s in samples])
    visual = [visual_embeddings(model, f) for f in feats]
    prompts = [chat_prompt(processor, s.question, True) for s in samples]
    out = generate_ids(model, processor, prompts, visual, MAX_NEW)
    return [_until_eos(row, processor.tokenizer) for row in out.tolist()]


def _until_eos(ids: list[int], tok) -> list[int]:
    return ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids


@pytest.mark.parametrize("batch", [1, 8])
def test_full_generates_the_ids_of_stock_generate(bos_world, batch):
    model, processor, samples = bos_world
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        assert _pruned_full(model, processor, chunk) == _stock(model, processor, chunk), start


def test_ask_and_eval_full_agree_on_every_sample(trained_model):
    """`atr ask` (stock processor + generate) and `atr eval --strategies full` give the same answers."""
    from pipeline.benchmarks import items
    from eval_helpers import evaluate_chunk
    from pipeline.tinyworld import ask

    model, processor = trained_model
    rows = [s.row() for s in generate_samples("synthetic-ocr", "test", 12)]
    evaluated = items("synthetic-ocr", rows)
    res = evaluate_chunk(model, processor, "synthetic-ocr", evaluated, "full", 1.0, batch_size=4)
    from pipeline.benchmarks import spec

    answers = ask(model, processor, [it.image for it in evaluated], [it.prompt for it in evaluated],
                  max_new_tokens=spec("synthetic-ocr").max_new_tokens)
    assert [r["prediction"] for r in res.samples] == [a.strip() for a in answers]  # no stop string, as llava_hf
    assert res.score > 0.8  # and they read: the comparison is not between two empty answers


def test_two_image_prompt_generates_the_ids_of_stock_generate(bos_world):
    """A prompt with two images (MMMU's several-image questions, as lmms-eval sends them): each image
    is packed on its own and fills its own placeholder, as the stock processor and model do."""
    model, processor, samples = bos_world
    pairs = [(samples[0], samples[9]), (samples[3], samples[12])]
    prompts = [chat_prompt(processor, a.question + " Compare the two images.", 2) for a, _ in pairs]
    assert all(p.count("<image>") == 2 for p in prompts)
    tok = processor.tokenizer
    for (a, b), prompt in zip(pairs, prompts):
        enc = processor(images=[a.image, b.image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        stock = _until_eos(out[0, enc["input_ids"].shape[1]:].tolist(), tok)
        visual = [visual_embeddings(model, f) for f in encode_images(model, processor, [a.image, b.image])]
        assert int((enc["input_ids"] == model.config.image_token_id).sum()) == sum(v.shape[0] for v in visual)
        ours = _until_eos(generate_ids(model, processor, [prompt], [visual], MAX_NEW)[0].tolist(), tok)
        assert ours == stock
    with pytest.raises(ValueError, match="1 images for a prompt with 2 image placeholders"):
        generate_ids(model, processor, prompts[:1], [visual[:1]], MAX_NEW)


def test_mmmu_question_with_two_images_prunes_each(trained_model):
    """An MMMU row naming two images: both are encoded, each pruned on its own at the retention, and
    the LLM sees the sum of their tokens."""
    import io

    from pipeline.benchmarks import build_items
    from pipeline.evaluate import Pruning, encode_shard, evaluate_features

    model, processor = trained_model
    imgs = [s.image for s in generate_samples("synthetic-scene", "test", 2)]

    def cell(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return {"bytes": buf.getvalue()}

    rows = [{"id": "validation_Art_1", "question": "Is <image 2> brighter than <image 1>?", "options": "['yes', 'no']",
             "question_type": "multiple-choice", "answer": "A", "image_1": cell(imgs[0]), "image_2": cell(imgs[1])},
            {"id": "validation_Art_2", "question": "What is in <image 1>?", "options": "[]", "question_type": "open",
             "answer": "cat", "image_1": cell(imgs[1]), "image_2": cell(imgs[0])}]
    items, _, skipped = build_items("mmmu_val", rows)
    assert not skipped and [it.n_images for it in items] == [2, 1]
    shard = encode_shard(model, processor, items)
    assert shard.images == 3 and len(shard.more[0]) == 1 and shard.more[1] == []
    per_image = [visual_embeddings(model, f).shape[0] for f in encode_images(model, processor, imgs)]
    full = evaluate_features(model, processor, "mmmu_val", shard, Pruning("full", 1.0))
    assert [r["visual_tokens"] for r in full.samples] == [per_image[0] + per_image[1], per_image[1]]
    half = evaluate_features(model, processor, "mmmu_val", shard, Pruning("random", 0.5, seed=1))
    assert 0 < half.samples[0]["visual_tokens"] < full.samples[0]["visual_tokens"]
    assert half.samples[0]["visual_tokens"] > half.samples[1]["visual_tokens"]  # two pruned images, not one
