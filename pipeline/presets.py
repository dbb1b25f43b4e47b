"""Model presets as data: the tiny and sized presets' dataclasses, their registries and lookups.

``tiny`` is a LLaVA-NeXT built from config with the real HF classes
(``LlavaNextForConditionalGeneration`` = CLIP vision tower + Llama LM), a
locally trained tokenizer and a ``LlavaNextProcessor`` whose AnyRes grid
pinpoints give images of different aspect ratios different crop grids;
``tiny-ov`` is its LLaVA-OneVision counterpart. Each preset class names the family
it builds by ``model_type`` (``preset.family``); ``pipeline.builders`` builds and saves
a preset's model with that family's classes, and ``pipeline.loading`` reads every model
back with ``from_pretrained`` -- the same code path as ``llava-hf/llava-v1.6-*`` ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Config, check
from .families import Family, family_named, family_of

PRESET_VERSION = "1"  # bump when the tiny builder changes in a way that changes weights/tokenizer


class _Geometry:
    """What every preset answers from its fields: tokens per crop and its family (by ``model_type``)."""

    crop_size: int
    patch_size: int
    model_type: str

    @property
    def tokens_per_crop(self) -> int:
        return (self.crop_size // self.patch_size) ** 2

    @property
    def family(self) -> Family:
        return family_of(self.model_type)


@dataclasses.dataclass(frozen=True)
class TinyPreset(_Geometry, Config):
    """Dimensions of the in-project tiny LLaVA-NeXT (all fields enter its hash)."""

    kind = "tiny-preset"
    model_type = "llava_next"      # the family it builds (pipeline.families.family_of); not a field

    name: str = "tiny"
    seed: int = 0
    crop_size: int = 64            # CLIP image_size: one AnyRes crop is crop_size x crop_size pixels
    patch_size: int = 8            # -> (64/8)^2 = 64 tokens per crop
    grid_pinpoints: tuple = ((64, 128), (128, 64), (128, 128), (64, 192), (192, 64))  # (height, width)
    vision_hidden: int = 64        # C, the feature width the selector sees
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 384
    vision_feature_layer: int = -2
    tokenizer: str = "v1"          # v2: tiny-world corpus, glyphs never merged (one token per glyph)
    version: str = PRESET_VERSION

    def validate(self) -> None:
        check(self.crop_size % self.patch_size == 0, "crop_size must be a multiple of patch_size")
        check(self.tokenizer in ("v1", "v2"), f"tokenizer must be 'v1' or 'v2', got {self.tokenizer!r}")
        check(self.vision_layers >= 2, "vision_layers must be >= 2 so vision_feature_layer=-2 is a real layer")
        for h, w in self.grid_pinpoints:
            check(h % self.crop_size == 0 and w % self.crop_size == 0,
                  f"grid pinpoint {(h, w)} is not a multiple of crop_size {self.crop_size}")


@dataclasses.dataclass(frozen=True)
class TinyOvPreset(TinyPreset):
    """Dimensions of an in-project tiny LLaVA-OneVision: a SigLIP tower (no CLS), a Qwen2 LM and
    OneVision's square grid pinpoints up to 3 x 3 crops.

    ``tiny-ov`` mirrors SigLIP-384/14's geometry in miniature: 64-px crops of 9-px patches make a
    7 x 7 grid that covers 63 of the 64 pixels, as 27 x 14 = 378 of 384 does. ``anyres_max_4``
    against a largest grid of 9 crops mirrors ``anyres_max_9`` against OneVision's 36: large
    grids are shrunk by interpolation unless that is turned off."""

    kind = "tiny-ov-preset"
    model_type = "llava_onevision"

    name: str = "tiny-ov"
    patch_size: int = 9
    grid_pinpoints: tuple = tuple((64 * r, 64 * c) for r in (1, 2, 3) for c in (1, 2, 3))
    vision_feature_layer: int = -1     # OneVision's: the last layer, every token ("full")
    vision_aspect_ratio: str = "anyres_max_4"
    vision_intermediate: int = 0       # 0: 4 x vision_hidden

    def validate(self) -> None:
        # SigLIP's stride-patch convolution drops remainder pixels: crop_size need not divide.
        check(self.crop_size >= self.patch_size, "crop_size must be at least patch_size")
        check(self.tokenizer in ("v1", "v2"), f"tokenizer must be 'v1' or 'v2', got {self.tokenizer!r}")
        check(self.vision_aspect_ratio.startswith("anyres_max_")
              and self.vision_aspect_ratio.removeprefix("anyres_max_").isdigit(),
              f"vision_aspect_ratio must be anyres_max_N, got {self.vision_aspect_ratio!r}")
        for h, w in self.grid_pinpoints:
            check(h % self.crop_size == 0 and w % self.crop_size == 0,
                  f"grid pinpoint {(h, w)} is not a multiple of crop_size {self.crop_size}")


@dataclasses.dataclass(frozen=True)
class TinyQwenPreset(TinyPreset):
    """Dimensions of an in-project tiny Qwen2.5-VL: a windowed ViT of 8-px patches whose 2 x 2 merger makes one
    token per 16-px cell (the tiny world's glyph cell), a Qwen2.5 LM with M-RoPE, and dynamic resolution
    between ``min_pixels`` and ``max_pixels`` (both part of the preset, so of every key built on it).
    ``crop_size`` is one merged token's side (patch x merge); Qwen has no crops or pinpoints."""

    kind = "tiny-qwen25-preset"
    model_type = "qwen2_5_vl"

    name: str = "tiny-qwen25"
    patch_size: int = 8
    crop_size: int = 16
    grid_pinpoints: tuple = ()
    min_pixels: int = 32 * 32           # at least 2 x 2 merged tokens
    max_pixels: int = 224 * 224         # the tiny world's images (<= 208 px a side) are never shrunk
    vision_feature_layer: int = -1      # the merger reads the last block

    def validate(self) -> None:
        from .families._qwen import check_pixels

        check(self.crop_size == 2 * self.patch_size, "crop_size is one merged token's side: 2 x patch_size")
        check(self.tokenizer in ("v1", "v2"), f"tokenizer must be 'v1' or 'v2', got {self.tokenizer!r}")
        check(self.vision_layers >= 1 and self.text_hidden // self.text_heads >= 8,
              "a Qwen preset needs a tower block and an LM head_dim of at least 8 (M-RoPE's three sections)")
        check_pixels(self.min_pixels, self.max_pixels, self.patch_size, 2, f"preset {self.name}")


@dataclasses.dataclass(frozen=True)
class TinyQwen3Preset(TinyQwenPreset):
    """:class:`TinyQwenPreset` as a Qwen3-VL: a full-attention ViT with DeepStack and a Qwen3 LM."""

    kind = "tiny-qwen3-preset"
    model_type = "qwen3_vl"

    name: str = "tiny-qwen3"


# ``bench``: random weights, but the real model's token counts -- 336-px crops of 14-px
# patches (576 tokens per crop), llava-v1.6's grid pinpoints, so up to 5 crops (base +
# 2x2) and 2,928 visual tokens per square image -- with widths small enough that one full
# prefill takes about a second on 2 CPUs. Used by ``atr speed`` (prefill speed, selector
# overhead, extraction throughput); its outputs mean nothing.
BENCH_PRESET = TinyPreset(
    name="bench", crop_size=336, patch_size=14,
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    vision_hidden=256, vision_layers=6, vision_heads=4,
    text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=8,
)
PRESETS: dict[str, TinyPreset] = {"tiny": TinyPreset(), "bench": BENCH_PRESET, "tiny-ov": TinyOvPreset(),
                                  "tiny-qwen25": TinyQwenPreset(), "tiny-qwen3": TinyQwen3Preset()}


# The published checkpoints' chat templates (their chat_template.json), which the sized and shape presets
# mirror; "" in a preset's ``chat_template`` means its family's tiny template.
# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n{question} [/INST]" (the template of the llava-hf
# Mistral-7B LLaVA-NeXT repos; also the prompt of transformers' convert_llava_next_weights_to_hf.py).
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# llava-hf/llava-onevision-qwen2-7b-ov-hf's chat_template.json (as transformers' test_processor_llava_onevision.py
# copies it): "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n".
ONEVISION_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SizedPreset(_Geometry, Config):
    """A random-init LLaVA-NeXT with exactly the dimensions of a real checkpoint, for timing on a GPU.

    Every field is the checkpoint's (its ``config.json``, ``preprocessor_config.json`` and chat
    template; ``tests/test_sized_presets.py`` compares them with the published values). Its
    prepare-model stage saves only the config and a processor (no weights: 14 GB of random
    numbers would mean nothing). Loading builds the model straight on the target device in the
    target dtype, seeded (:func:`materialize`); ``on_meta`` builds it on the meta device to check
    shapes and parameter counts without allocating anything. The processor's tokenizer is the tiny
    one (ids fit the real vocabulary): timings do not depend on which ids the prompt holds. So the
    saved config's ``image_token_index`` and BOS/EOS/pad ids are the tiny tokenizer's; the
    checkpoint's are recorded here (``image_token_index``) and used by ``on_meta``."""

    kind = "sized-preset"
    model_type = "llava_next"      # the family it builds (pipeline.families.family_of); not a field
    tokenizer_preset = "tiny"      # the preset whose tokenizer its processor gets; not a field

    name: str = "bench-vicuna-7b"
    mirrors: str = "llava-hf/llava-v1.6-vicuna-7b-hf"
    text_model: str = "llama"                # llama (Vicuna), mistral, or qwen2 (OneVision)
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 32
    text_intermediate: int = 11008
    vocab_size: int = 32064
    max_position: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5               # lmsys/vicuna-7b-v1.5 and Mistral-7B-Instruct-v0.2 (not 1e-6)
    sliding_window: int | None = None        # Mistral-7B-Instruct-v0.2: null (MistralConfig's default is 4096)
    image_token_index: int = 32000
    vision_hidden: int = 1024                # CLIP ViT-L/14-336
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    crop_size: int = 336
    patch_size: int = 14
    grid_pinpoints: tuple = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    vision_feature_layer: int = -2
    image_mean: tuple = CLIP_MEAN            # preprocessor_config.json
    image_std: tuple = CLIP_STD
    chat_template: str = ""                  # "": the family's (vicuna's "USER: <image>\n... ASSISTANT:")
    seed: int = 0
    version: str = PRESET_VERSION

    def validate(self) -> None:
        check(self.text_model in ("llama", "mistral"), f"text_model must be llama or mistral, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean and image_std have 3 channels")


@dataclasses.dataclass(frozen=True)
class SizedOvPreset(SizedPreset):
    """A random-init LLaVA-OneVision with the dimensions of ``llava-hf/llava-onevision-qwen2-7b-ov-hf``:
    SigLIP-so400m/14-384 as the checkpoint has it (26 layers: LLaVA-OneVision drops the tower's last one;
    no head, no CLS: 27 x 27 = 729 tokens per crop), Qwen2-7B-Instruct (GQA 28/4), its 36 grid
    pinpoints, ``anyres_max_9`` and SigLIP's mean and std (0.5)."""

    kind = "sized-ov-preset"
    model_type = "llava_onevision"
    tokenizer_preset = "tiny-ov"

    name: str = "bench-ov-7b"
    mirrors: str = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    text_model: str = "qwen2"
    text_hidden: int = 3584
    text_layers: int = 28
    text_heads: int = 28
    text_kv_heads: int = 4
    text_intermediate: int = 18944
    vocab_size: int = 152128
    max_position: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = 131072      # Qwen2-7B-Instruct's (unused: use_sliding_window is false)
    image_token_index: int = 151646
    vision_hidden: int = 1152
    vision_layers: int = 26
    vision_heads: int = 16
    vision_intermediate: int = 4304
    crop_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
    vision_feature_layer: int = -1
    vision_aspect_ratio: str = "anyres_max_9"
    image_mean: tuple = SIGLIP_MEAN
    image_std: tuple = SIGLIP_STD
    chat_template: str = ONEVISION_QWEN2_CHAT_TEMPLATE

    def validate(self) -> None:
        check(self.text_model == "qwen2", f"a OneVision sized preset has a qwen2 LM, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean and image_std have 3 channels")


_MISTRAL = dict(mirrors="llava-hf/llava-v1.6-mistral-7b-hf", text_model="mistral", text_kv_heads=8,
                text_intermediate=14336, max_position=32768, rope_theta=1000000.0, chat_template=MISTRAL_CHAT_TEMPLATE)
SIZED_PRESETS: dict[str, SizedPreset] = {
    "bench-vicuna-7b": SizedPreset(),
    "bench-mistral-7b": SizedPreset(name="bench-mistral-7b", **_MISTRAL),
    "bench-ov-7b": SizedOvPreset(),
}


class _Shape:
    """Real shapes, saved weights: the checkpoint's tower, projector, processor and chat template, its LM
    cut to ``text_layers`` (1) with the real width and vocabulary, random seeded weights saved in the
    llava-hf layout (``weights_dtype``: bf16 halves the disk and the write; loading in float32 upcasts).
    The tokenizer is the in-project tiny one (ids fit the real vocabulary), so the saved config's
    ``image_token_index`` and BOS/EOS/pad ids are the tiny tokenizer's. Nothing downloads."""

    saves_weights = True
    weights_dtype: str

    def validate(self) -> None:
        super().validate()  # the sized preset's checks (the next class in the MRO)
        check(self.weights_dtype in ("bfloat16", "float32"), f"weights_dtype must be bfloat16 or float32, "
                                                            f"got {self.weights_dtype!r}")


@dataclasses.dataclass(frozen=True)
class ShapePreset(_Shape, SizedPreset):
    """``shape-next-mistral``: ``llava-hf/llava-v1.6-mistral-7b-hf`` with the real CLIP ViT-L/14-336 tower
    (24 layers, feature layer -2), its 5 pinpoints, the ``[INST] <image>\n... [/INST]`` template and a
    one-layer Mistral-7B (4096 wide, GQA 32/8, vocabulary 32064). See :class:`_Shape`."""

    kind = "shape-preset"

    name: str = "shape-next-mistral"
    text_layers: int = 1
    weights_dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class ShapeOvPreset(_Shape, SizedOvPreset):
    """``shape-ov-qwen2``: ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` with its SigLIP-so400m/14-384 tower
    (26 layers), 36 pinpoints, ``anyres_max_9``, SigLIP's mean/std, the Qwen2 chatml template and a
    one-layer Qwen2-7B (3584 wide, GQA 28/4, vocabulary 152128). See :class:`_Shape`."""

    kind = "shape-ov-preset"

    name: str = "shape-ov-qwen2"
    text_layers: int = 1
    weights_dtype: str = "bfloat16"


SHAPE_PRESETS: dict[str, SizedPreset] = {
    "shape-next-mistral": ShapePreset(name="shape-next-mistral", **_MISTRAL),
    "shape-ov-qwen2": ShapeOvPreset(),
}
# Presets whose weights are trained in-project (pipeline.tinyworld); built by the prepare-model stage.
TRAINED_PRESETS = ("tiny-trained", "tiny-ov-trained")


def sized_preset_from_dict(data: dict[str, Any], family: str) -> SizedPreset:
    """The sized preset of ``family`` (its short name, as a sized dir's marker records it) from its fields."""
    classes = {type(p).model_type: type(p) for p in SIZED_PRESETS.values()}
    return classes[family_named(family).model_type].from_dict(data)


def unknown_model_message(spec: str) -> str:
    return (f"unknown model {spec!r}: use a preset "
            f"({', '.join([*TRAINED_PRESETS, *PRESETS, *SIZED_PRESETS, *SHAPE_PRESETS])}), "
            f"a local directory "
            f"with config.json, or a Hugging Face id such as llava-hf/llava-v1.6-mistral-7b-hf")


__all__ = ["PRESET_VERSION", "TinyPreset", "TinyOvPreset", "TinyQwenPreset", "TinyQwen3Preset", "BENCH_PRESET", "PRESETS", "SizedPreset", "SizedOvPreset",
           "SIZED_PRESETS", "ShapePreset", "ShapeOvPreset", "SHAPE_PRESETS", "MISTRAL_CHAT_TEMPLATE",
           "ONEVISION_QWEN2_CHAT_TEMPLATE", "TRAINED_PRESETS", "sized_preset_from_dict", "unknown_model_message"]
