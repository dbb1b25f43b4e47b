"""Build a preset's model: its tokenizer (trained locally), its HF configs and processor, and the saved dir.

Everything family-specific (tower and LM config classes, the tokenizer's chat tokens and corpus
format, the image processor, the processor and chat template) is asked of ``preset.family``;
this module holds only what every family shares. Nothing here downloads.
"""

from __future__ import annotations

import random
from pathlib import Path

from .families import Family
from .presets import PRESETS, SizedPreset, TinyPreset

IMAGE_TOKEN = "<image>"
# The special tokens of every tiny tokenizer (ids 0-4); a family's chat tokens follow them.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SIZED_MARKER = "atr_sized_preset.json"  # in a model dir: no weights, materialize the sized preset on load


def _tokenizer_corpus(seed: int, version: str, family: Family, n: int = 4000) -> list[str]:
    """Text the tiny tokenizer is trained on: prompts, glyph codes and colour/shape words.

    v2 is the tiny world's corpus: its two questions and every colour word, with
    glyphs always space-separated so BPE never merges two glyphs -- an answer
    code is then one token per glyph, which a 2-layer LM can copy. Lines follow the
    family's prompt format (``Family.corpus_line``: vicuna for NeXT, Qwen's ``<|im_start|>``
    for OneVision)."""
    rng = random.Random(seed)
    line = family.corpus_line
    if version == "v2":
        from .synthetic import COLOURS, OCR_QUESTION, SCENE_QUESTION

        lines = []
        for _ in range(n):
            q = rng.choice([OCR_QUESTION, SCENE_QUESTION])
            ans = " ".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 3))) if q == OCR_QUESTION \
                else rng.choice(list(COLOURS))
            lines.append(line.format(image=IMAGE_TOKEN + "\n", text=q, answer=ans))
        return lines
    words = ("what is written in the image ? answer with the text . which colour is the large shape ? "
             "red green blue yellow orange purple cyan magenta black white grey brown pink "
             "square circle triangle rectangle ellipse the a of and question answer user assistant").split()
    lines = []
    for _ in range(n):
        code = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 4)))
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        lines.append(line.format(image=IMAGE_TOKEN + " ", text=sentence, answer=code))
    return lines


def build_tokenizer(preset: TinyPreset):
    """Train a small BPE tokenizer locally (no download) and wrap it as a fast HF tokenizer.

    The family adds its chat tokens and picks BOS/EOS (``Family.tokenizer_tokens``): a
    OneVision preset's tokenizer knows Qwen's chat tokens and ends answers with
    ``<|im_end|>``, as Qwen2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = preset.family.tokenizer_tokens(IMAGE_TOKEN)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *spec["special"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(preset.seed, preset.tokenizer, preset.family), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>", bos_token=spec["bos"], eos_token=spec["eos"],
        pad_token="<pad>",
        extra_special_tokens=spec["extra"],
        padding_side="left",
        model_max_length=4096,
    )


def _preset_processor(preset, tokenizer):
    """The preset's processor: its family's image processor and processor around ``tokenizer``; a sized
    or shape preset's own mean/std and chat template (the checkpoint's) where it records them."""
    family = preset.family
    image_processor = family.preset_image_processor(preset)
    if getattr(preset, "image_mean", None):
        image_processor.image_mean, image_processor.image_std = list(preset.image_mean), list(preset.image_std)
    processor = family.processor(image_processor, tokenizer, IMAGE_TOKEN, preset.patch_size,
                                 getattr(preset, "vision_aspect_ratio", None))
    if getattr(preset, "chat_template", ""):
        processor.chat_template = preset.chat_template
    return processor


def build_tiny(preset: TinyPreset):
    """Build (model, processor) for ``preset`` with seeded random weights (its family's HF classes)."""
    import torch

    family = preset.family
    tokenizer = build_tokenizer(preset)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = family.vision_config(hidden=preset.vision_hidden,
                                  intermediate=(getattr(preset, "vision_intermediate", 0) or 4 * preset.vision_hidden),
                                  layers=preset.vision_layers, heads=preset.vision_heads, image_size=preset.crop_size,
                                  patch_size=preset.patch_size)
    text = family.text_config_class(family.tiny_text_model)(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=4 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        **family.text_kwargs(preset.text_hidden, preset.text_heads),
    )
    config = family.llava_config(vision, text, image_token_id, preset.grid_pinpoints, preset.vision_feature_layer,
                                 getattr(preset, "vision_aspect_ratio", None))
    family.finish_config(config, tokenizer)
    torch.manual_seed(preset.seed)
    model = family.model_class()(config).eval()
    return model, _preset_processor(preset, tokenizer)


def save_tiny(preset: TinyPreset, out_dir: Path) -> None:
    """Build the preset and ``save_pretrained`` model + processor into ``out_dir``."""
    model, processor = build_tiny(preset)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def sized_config(preset: SizedPreset, image_token_id: int, special_ids: dict[str, int] | None = None):
    """The model config of a sized preset (the real checkpoint's dimensions, its family's classes), through the
    family's hooks: ``vision_config`` with the preset's tower fields (``preset.vision_fields()``),
    ``text_config_class`` and ``text_kwargs`` with its LM fields (``preset.text_fields()``: Qwen-VL's rope theta
    and M-RoPE sections), ``llava_config``; ``special_ids`` (top-level ids such as Qwen-VL's vision start/end)
    are set last."""
    family = preset.family
    vision = family.vision_config(hidden=preset.vision_hidden, intermediate=preset.vision_intermediate,
                                  layers=preset.vision_layers, heads=preset.vision_heads, image_size=preset.crop_size,
                                  patch_size=preset.patch_size, **preset.vision_fields())
    text_class = family.text_config_class(preset.text_model)
    # sliding_window only where the LM's config has one (Mistral's null, Qwen2's unused 131072; Llama: none)
    window = {"sliding_window": preset.sliding_window} if "sliding_window" in text_class().to_dict() else {}
    text = text_class(
        vocab_size=preset.vocab_size, hidden_size=preset.text_hidden, intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads, max_position_embeddings=preset.max_position,
        rope_theta=preset.rope_theta, rms_norm_eps=preset.rms_norm_eps, tie_word_embeddings=False,
        **{**window, **family.text_kwargs(preset.text_hidden, preset.text_heads, **preset.text_fields())})
    config = family.llava_config(vision, text, image_token_id, preset.grid_pinpoints, preset.vision_feature_layer,
                                 getattr(preset, "vision_aspect_ratio", None))
    config.tie_word_embeddings = False  # the checkpoints' top-level value too
    for key, value in (special_ids or {}).items():
        setattr(config, key, value)
    return config


def on_meta(preset: SizedPreset):
    """The sized model built on the meta device: shapes and parameter counts, no memory (the checkpoint's
    own ``image_token_index`` and special ids)."""
    import torch

    config = sized_config(preset, image_token_id=preset.image_token_index, special_ids=preset.special_ids())
    with torch.device("meta"):
        return preset.family.model_class()(config).eval()


def _saved_config(preset: SizedPreset):
    """(config, tokenizer) of a sized or shape preset's dir: the checkpoint's config with the tiny
    tokenizer's image, BOS, EOS and pad ids (the prompt's ids must be the ones the model looks for)."""
    tokenizer = build_tokenizer(PRESETS[preset.tokenizer_preset])
    config = sized_config(preset, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    preset.family.finish_config(config, tokenizer)  # the tokenizer's own family-specific ids (Qwen: vision start/end)
    config.text_config.bos_token_id, config.text_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    return config, tokenizer


def save_sized(preset: SizedPreset, out_dir: Path) -> None:
    """config.json, the processor (its family's tiny tokenizer) and the marker: everything but weights."""
    import json

    config, tokenizer = _saved_config(preset)
    out_dir = Path(out_dir)
    config.save_pretrained(out_dir)
    _preset_processor(preset, tokenizer).save_pretrained(out_dir)
    (out_dir / SIZED_MARKER).write_text(json.dumps({"family": preset.family.name, **preset.to_dict()}, indent=2,
                                                   sort_keys=True) + "\n")


def save_shape(preset: SizedPreset, out_dir: Path) -> None:
    """A shape preset's dir in the llava-hf layout: config.json, seeded random weights (safetensors, sharded
    at 2 GB, in ``preset.weights_dtype``) and the processor files. No marker: it loads through the same
    ``from_pretrained`` as a real checkpoint.

    The model is built in ``weights_dtype`` directly (bf16: half the memory while building and saving)."""
    import torch

    config, tokenizer = _saved_config(preset)
    before = torch.get_default_dtype()
    torch.manual_seed(preset.seed)
    try:
        torch.set_default_dtype(getattr(torch, preset.weights_dtype))
        model = preset.family.model_class()(config).eval()
    finally:
        torch.set_default_dtype(before)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="2GB")
    del model
    _preset_processor(preset, tokenizer).save_pretrained(out_dir)


__all__ = ["IMAGE_TOKEN", "SIZED_MARKER", "build_tokenizer", "build_tiny", "save_tiny", "sized_config", "on_meta",
           "save_sized", "save_shape"]
