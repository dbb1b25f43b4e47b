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

    def vision_fields(self) -> dict[str, Any]:
        """Tower-config fields beyond the common dimensions, passed to ``Family.vision_config`` (CLIP ViT-L/14-336's
        projection width and activation; a Qwen preset's window or DeepStack blocks)."""
        return {"projection_dim": 768, "hidden_act": "quick_gelu"}

    def text_fields(self) -> dict[str, Any]:
        """The checkpoint's own values of the family's LM fields, passed to ``Family.text_kwargs`` (LLaVA: none;
        Qwen-VL: rope theta and M-RoPE sections)."""
        return {}

    def special_ids(self) -> dict[str, int]:
        """Top-level token ids of the checkpoint's config beside ``image_token_index`` (``on_meta`` sets them;
        a saved dir gets the tiny tokenizer's through ``Family.finish_config``)."""
        return {}

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


# Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json (the same string as its tokenizer_config.json's; quoted verbatim
# by fine-tuning code that re-installs the "official" template, e.g. the Qwen2.5-VL training recipes that set
# ``processor.chat_template``): a default system prompt, then <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen/Qwen3-VL-8B-Instruct's chat_template.json (quoted byte for byte, as "identical to the template shipped with
# Qwen/Qwen3-VL-8B-Instruct", by NVIDIA's tao-vl-reason cosmos-rl dataset code): no default system prompt, tools
# and tool responses, <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n                    {{- content_item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN_IMAGE_PAD = "<|image_pad|>"  # the checkpoints' image placeholder; the tiny tokenizer's is "<image>"


@dataclasses.dataclass(frozen=True)
class _SizedQwen(SizedPreset):
    """What the Qwen-VL sized presets share: dynamic resolution between ``min_pixels`` and ``max_pixels`` (part of
    the preset, so of every key built on it), M-RoPE sections, the vision start/end and video ids. ``crop_size``
    is one merged token's side (patch x merge), as in :class:`TinyQwenPreset`: Qwen has no crops. The saved
    processor's tokenizer is the tiny Qwen one, whose image placeholder is ``<image>``: ``chat_template`` is the
    checkpoint's with ``<|image_pad|>`` written as that (the published strings are the ``*_CHAT_TEMPLATE``
    constants)."""

    kind = "sized-qwen-preset"

    vision_act: str = "silu"
    mrope_section: tuple = (16, 24, 24)
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    grid_pinpoints: tuple = ()
    vision_feature_layer: int = -1           # the merger reads the last block
    min_pixels: int = 3136
    max_pixels: int = 12845056

    def validate(self) -> None:
        from .families._qwen import check_pixels

        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")
        check(self.crop_size == 2 * self.patch_size, "crop_size is one merged token's side: 2 x patch_size")
        check(sum(self.mrope_section) == self.text_hidden // self.text_heads // 2,
              "mrope_section must split half the LM's head_dim")
        check(all(0 <= i < self.vision_layers for i in self.vision_blocks()),
              "the tower's special blocks must be among its layers")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean and image_std have 3 channels")
        check_pixels(self.min_pixels, self.max_pixels, self.patch_size, 2, f"preset {self.name}")

    def vision_blocks(self) -> tuple:
        """The tower blocks the family treats specially (Qwen2.5-VL: full attention; Qwen3-VL: DeepStack)."""
        return ()

    def text_fields(self) -> dict[str, Any]:
        return {"rope_theta": self.rope_theta, "mrope_section": list(self.mrope_section)}

    def special_ids(self) -> dict[str, int]:
        return {"video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id}


@dataclasses.dataclass(frozen=True)
class SizedQwenPreset(_SizedQwen):
    """A random-init Qwen2.5-VL with exactly the dimensions of ``Qwen/Qwen2.5-VL-7B-Instruct``, for timing on a GPU
    (see :class:`SizedPreset`: config and processor only, materialized on the target device, ``on_meta`` for
    shapes and parameter counts: 8,292,166,656 = 8.29 B, the vision tower 676,550,144 -- exactly the hub's
    ``numParameters`` 8292166656 for the checkpoint, and the 676550144 of ``model.visual`` that fine-tuning
    scripts print when they freeze it).

    Sources (read 2026-12-07; the checkpoint's files quoted verbatim by public code, as none downloads here):

    - ``config.json``: text 3584 wide, 28 layers, 28 heads / 4 KV heads, FFN 18944, vocabulary 152064,
      ``max_position_embeddings`` 128000, ``rope_theta`` 1e6, M-RoPE ``mrope_section`` [16, 24, 24],
      ``rms_norm_eps`` 1e-6, ``sliding_window`` 32768 unused (``use_sliding_window`` false, ``max_window_layers``
      28), ``tie_word_embeddings`` false; ids image 151655, video 151656, vision start 151652 / end 151653
      (bos 151643, eos 151645); ``vision_config`` depth 32, hidden 1280, FFN 3420, 16 heads, ``silu``, patch 14,
      temporal patch 2, merge 2, ``window_size`` 112, ``fullatt_block_indexes`` [7, 15, 23, 31],
      ``tokens_per_second`` 2, ``out_hidden_size`` 3584 (copies in Qwen-Image's text-encoder docs, the
      ``Qwen2_5_VLConfig(...)`` of text-encoder loaders pinned to the 7B, and sgl-jax / vLLM-prep scripts;
      the module dump of ``Qwen2_5_VLForConditionalGeneration`` confirms the shapes: qkv 1280 -> 3840, merger
      5120 -> 5120 -> 3584, k/v 3584 -> 512, embeddings 152064 x 3584).
    - ``preprocessor_config.json``: ``min_pixels`` 3136 (56 x 56), ``max_pixels`` 12845056 (16384 merged tokens
      of 28 x 28), patch 14, merge 2, temporal patch 2, CLIP's mean and std (``Qwen2VLImageProcessor``).
    - ``chat_template.json``: :data:`QWEN25_VL_CHAT_TEMPLATE`.

    ``crop_size`` is one merged token's side (patch x merge), as in :class:`TinyQwenPreset`: Qwen has no crops.
    The saved processor's tokenizer is the tiny Qwen one, whose image placeholder is ``<image>``: the template is
    the checkpoint's with ``<|image_pad|>`` written as that (:attr:`chat_template`; the published string is
    :data:`QWEN25_VL_CHAT_TEMPLATE`)."""

    kind = "sized-qwen25-preset"
    model_type = "qwen2_5_vl"
    tokenizer_preset = "tiny-qwen25"

    name: str = "bench-qwen25-vl-7b"
    mirrors: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    text_model: str = "qwen2_5_vl_text"
    text_hidden: int = 3584
    text_layers: int = 28
    text_heads: int = 28
    text_kv_heads: int = 4
    text_intermediate: int = 18944
    vocab_size: int = 152064
    max_position: int = 128000
    rope_theta: float = 1000000.0
    mrope_section: tuple = (16, 24, 24)
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = 32768       # unused: use_sliding_window is false
    max_window_layers: int = 28
    image_token_index: int = 151655
    vision_hidden: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_intermediate: int = 3420
    vision_act: str = "silu"
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    window_size: int = 112
    tokens_per_second: int = 2
    crop_size: int = 28
    patch_size: int = 14
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    chat_template: str = QWEN25_VL_CHAT_TEMPLATE.replace(QWEN_IMAGE_PAD, "<image>")

    def vision_blocks(self) -> tuple:
        return self.fullatt_block_indexes

    def vision_fields(self) -> dict[str, Any]:
        return {"hidden_act": self.vision_act, "fullatt_block_indexes": list(self.fullatt_block_indexes),
                "window_size": self.window_size, "tokens_per_second": self.tokens_per_second}

    def text_fields(self) -> dict[str, Any]:
        return {**super().text_fields(), "max_window_layers": self.max_window_layers, "use_sliding_window": False}


@dataclasses.dataclass(frozen=True)
class SizedQwen3Preset(_SizedQwen):
    """A random-init Qwen3-VL with exactly the dimensions of ``Qwen/Qwen3-VL-8B-Instruct`` (see
    :class:`SizedQwenPreset`): ``on_meta`` counts 8,767,123,696 = 8.77 B parameters, exactly the hub's safetensors
    total for the checkpoint (``{"BF16": 8767123696}``; GGUF converters write the same ``general.parameter_count``);
    the vision tower, with its three DeepStack mergers, 576,388,336.

    Sources (read 2026-12-07, quoted verbatim by public code):

    - ``config.json``: ``text_config`` 4096 wide, 36 layers, 32 heads / 8 KV heads, ``head_dim`` 128, FFN 12288,
      vocabulary 151936, ``max_position_embeddings`` 262144, ``rope_theta`` 5e6, interleaved M-RoPE
      ``mrope_section`` [24, 20, 20], ``rms_norm_eps`` 1e-6, no attention bias, ``tie_word_embeddings`` false;
      ids image 151655, video 151656, vision start 151652 / end 151653; ``vision_config`` depth 27, hidden 1152,
      FFN 4304, 16 heads, ``gelu_pytorch_tanh``, patch 16, temporal patch 2, merge 2,
      ``num_position_embeddings`` 2304, ``deepstack_visual_indexes`` [8, 16, 24], ``out_hidden_size`` 4096
      (TensorRT-LLM's Qwen3-VL test config "Qwen3-VL-8B-Instruct" with 4 of 36 layers, Cosmos-Reason2-8B ports
      built on it, and a Swift port's copy of the config).
    - ``preprocessor_config.json``: ``size`` {shortest_edge 65536, longest_edge 16777216} (min / max pixels:
      256 x 256 to 4096 x 4096), patch 16, merge 2, temporal patch 2, mean and std 0.5.
    - ``chat_template.json``: :data:`QWEN3_VL_CHAT_TEMPLATE` (no default system prompt)."""

    kind = "sized-qwen3-preset"
    model_type = "qwen3_vl"
    tokenizer_preset = "tiny-qwen3"

    name: str = "bench-qwen3-vl-8b"
    mirrors: str = "Qwen/Qwen3-VL-8B-Instruct"
    text_model: str = "qwen3_vl_text"
    text_hidden: int = 4096
    text_layers: int = 36
    text_heads: int = 32
    text_kv_heads: int = 8
    text_intermediate: int = 12288
    vocab_size: int = 151936
    max_position: int = 262144
    rope_theta: float = 5000000.0
    mrope_section: tuple = (24, 20, 20)
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    image_token_index: int = 151655
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_intermediate: int = 4304
    vision_act: str = "gelu_pytorch_tanh"
    deepstack_visual_indexes: tuple = (8, 16, 24)
    num_position_embeddings: int = 2304
    crop_size: int = 32
    patch_size: int = 16
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple = SIGLIP_MEAN
    image_std: tuple = SIGLIP_STD
    chat_template: str = QWEN3_VL_CHAT_TEMPLATE.replace(QWEN_IMAGE_PAD, "<image>")

    def vision_blocks(self) -> tuple:
        return self.deepstack_visual_indexes

    def vision_fields(self) -> dict[str, Any]:
        return {"hidden_act": self.vision_act, "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
                "num_position_embeddings": self.num_position_embeddings}


_MISTRAL = dict(mirrors="llava-hf/llava-v1.6-mistral-7b-hf", text_model="mistral", text_kv_heads=8,
                text_intermediate=14336, max_position=32768, rope_theta=1000000.0, chat_template=MISTRAL_CHAT_TEMPLATE)
SIZED_PRESETS: dict[str, SizedPreset] = {
    "bench-vicuna-7b": SizedPreset(),
    "bench-mistral-7b": SizedPreset(name="bench-mistral-7b", **_MISTRAL),
    "bench-ov-7b": SizedOvPreset(),
    "bench-qwen25-vl-7b": SizedQwenPreset(),
    "bench-qwen3-vl-8b": SizedQwen3Preset(),
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
TRAINED_PRESETS = ("tiny-trained", "tiny-ov-trained", "tiny-qwen25-trained", "tiny-qwen3-trained")


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
           "ONEVISION_QWEN2_CHAT_TEMPLATE", "QWEN25_VL_CHAT_TEMPLATE", "QWEN3_VL_CHAT_TEMPLATE", "SizedQwenPreset",
           "SizedQwen3Preset", "TRAINED_PRESETS", "sized_preset_from_dict", "unknown_model_message"]
