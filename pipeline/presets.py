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
PRESETS: dict[str, TinyPreset] = {"tiny": TinyPreset(), "bench": BENCH_PRESET, "tiny-ov": TinyOvPreset()}


@dataclasses.dataclass(frozen=True)
class SizedPreset(_Geometry, Config):
    """A random-init LLaVA-NeXT with exactly the dimensions of a real checkpoint, for timing on a GPU.

    Its prepare-model stage saves only the config and a processor (no weights: 14 GB of random
    numbers would mean nothing). Loading builds the model straight on the target device in the
    target dtype, seeded (:func:`materialize`); ``on_meta`` builds it on the meta device to check
    shapes and parameter counts without allocating anything. The processor's tokenizer is the tiny
    one (ids fit the real vocabulary): timings do not depend on which ids the prompt holds."""

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
    vision_hidden: int = 1024                # CLIP ViT-L/14-336
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    crop_size: int = 336
    patch_size: int = 14
    grid_pinpoints: tuple = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    vision_feature_layer: int = -2
    seed: int = 0
    version: str = PRESET_VERSION

    def validate(self) -> None:
        check(self.text_model in ("llama", "mistral"), f"text_model must be llama or mistral, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")


@dataclasses.dataclass(frozen=True)
class SizedOvPreset(SizedPreset):
    """A random-init LLaVA-OneVision with the dimensions of ``llava-hf/llava-onevision-qwen2-7b-ov-hf``:
    SigLIP-so400m/14-384 (26 layers, no head, no CLS: 27 x 27 = 729 tokens per crop), Qwen2-7B
    (GQA 28/4), its 36 grid pinpoints and ``anyres_max_9``."""

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
    vision_hidden: int = 1152
    vision_layers: int = 26
    vision_heads: int = 16
    vision_intermediate: int = 4304
    crop_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
    vision_feature_layer: int = -1
    vision_aspect_ratio: str = "anyres_max_9"
    image_token_index: int = 151646

    def validate(self) -> None:
        check(self.text_model == "qwen2", f"a OneVision sized preset has a qwen2 LM, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")


SIZED_PRESETS: dict[str, SizedPreset] = {
    "bench-vicuna-7b": SizedPreset(),
    "bench-mistral-7b": SizedPreset(name="bench-mistral-7b", mirrors="llava-hf/llava-v1.6-mistral-7b-hf",
                                    text_model="mistral", text_kv_heads=8, text_intermediate=14336,
                                    max_position=32768, rope_theta=1000000.0),
    "bench-ov-7b": SizedOvPreset(),
}
# Presets whose weights are trained in-project (pipeline.tinyworld); built by the prepare-model stage.
TRAINED_PRESETS = ("tiny-trained", "tiny-ov-trained")


def sized_preset_from_dict(data: dict[str, Any], family: str) -> SizedPreset:
    """The sized preset of ``family`` (its short name, as a sized dir's marker records it) from its fields."""
    classes = {type(p).model_type: type(p) for p in SIZED_PRESETS.values()}
    return classes[family_named(family).model_type].from_dict(data)


def unknown_model_message(spec: str) -> str:
    return (f"unknown model {spec!r}: use a preset ({', '.join([*TRAINED_PRESETS, *PRESETS, *SIZED_PRESETS])}), "
            f"a local directory "
            f"with config.json, or a Hugging Face id such as llava-hf/llava-v1.6-mistral-7b-hf")


__all__ = ["PRESET_VERSION", "TinyPreset", "TinyOvPreset", "BENCH_PRESET", "PRESETS", "SizedPreset", "SizedOvPreset",
           "SIZED_PRESETS", "TRAINED_PRESETS", "sized_preset_from_dict", "unknown_model_message"]
