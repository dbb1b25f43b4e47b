"""LLaVA-OneVision: a SigLIP tower without CLS, a Qwen2 LM, ``anyres_max_9``.

The paper's second model. Differences from LLaVA-NeXT that pruning must respect:

- **No CLS.** SigLIP has no class token; the ``full`` select strategy sends every
  patch token. CLS-attention scores (``attention``, ``visionzip``, ``hired``) use
  the mean attention each token *receives* instead (``pipeline.prune.encode_images``).
- **Geometry.** SigLIP-384/14 makes a 27 x 27 grid (729 tokens) that covers 378 of
  the crop's 384 pixels: the stride-14 patch convolution drops the last 6.
- **Interpolation.** ``pack_image_features`` bilinearly shrinks an unpadded grid
  whose area exceeds ``max`` crops (``anyres_max_9``: ratio = sqrt(h*w / (9*27^2))
  > 1.1). A keep mask cannot be gathered through that, so pruned runs turn it off
  through the public ``vision_aspect_ratio`` config (``anyres_max_N`` with N the
  largest grid of the pinpoints: the ratio never exceeds 1), as the paper does.
- **Packing call.** ``LlavaOnevisionModel.pack_image_features(features, sizes,
  image_newline, vision_aspect_ratio)`` has no select-strategy argument; the top-level
  ``LlavaOnevisionForConditionalGeneration.pack_image_features`` wrapper of
  transformers 5.24 passes ``vision_feature_select_strategy`` to it and fails, so
  the inner model's method is called.
- **Newlines.** A one-crop image gets one trailing ``image_newline`` (NeXT: none).
- **Processor.** ``LlavaOnevisionProcessor`` wants a video processor, which needs
  torchvision; images only need ``LlavaOnevisionImageProcessorPil``, so the tiny
  presets save the processor without one and the loader falls back to the image
  processor + tokenizer when the stock one cannot be built.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Family

# llava-onevision-qwen2's chat format (its chat_template.json, images first, for one image
# and one text): "<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ '\n' + item['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
STOCK_ASPECT = "anyres_max_9"


class LlavaOnevision(Family):
    name = "llava-onevision"
    label = "LLaVA-OneVision"
    model_type = "llava_onevision"
    tower = "SigLIP"
    chat_template = CHAT_TEMPLATE
    can_interpolate = True      # anyres_max_N shrinks large grids
    # Several images in one prompt get no AnyRes grid, only their base view (``batch_num_images`` in
    # transformers), which the pruning harness does not model.
    multi_image_anyres = False
    has_crops = True            # AnyRes: a base crop and a grid
    own_runtime = False         # pruned inference: pipeline.prune's LLaVA code
    tiny_text_model = "qwen2"
    corpus_line = "<|im_start|>user {image}{text}<|im_end|>\n<|im_start|>assistant\n {answer}<|im_end|>"

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def image_processor_class(self):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        return LlavaOnevisionImageProcessorPil

    def processor(self, image_processor, tokenizer, image_token: str, patch_size: int, aspect: str | None = None):
        side = image_processor.size["height"] // patch_size
        return image_text_processor()(image_processor=image_processor, tokenizer=tokenizer,
                                      num_image_tokens=side * side, vision_feature_select_strategy="full",
                                      image_token=image_token, chat_template=self.chat_template,
                                      vision_aspect_ratio=aspect or STOCK_ASPECT)

    def load_processor(self, model_dir):
        """The processor of a OneVision dir without a video processor: the PIL image processor,
        the tokenizer, the chat template and ``processor_config.json``'s settings."""
        import json

        model_dir, tokenizer, template = self.saved_parts(model_dir)
        settings = {}
        if (model_dir / "processor_config.json").is_file():
            settings = json.loads((model_dir / "processor_config.json").read_text())
        image_processor = self.image_processor_class().from_pretrained(model_dir)
        known = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "vision_aspect_ratio")
        return image_text_processor()(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                      **{k: settings[k] for k in known if k in settings})

    # ------------------------------------------------------------- tiny and sized presets
    def tokenizer_tokens(self, image_token: str) -> dict:
        """Qwen's chat tokens too; ``<|im_end|>`` ends an answer and there is no BOS, as in Qwen2."""
        return {"special": ["<|im_start|>", "<|im_end|>", "<video>"], "bos": None, "eos": "<|im_end|>",
                "extra": {"image_token": image_token, "video_token": "<video>"}}

    def vision_config(self, *, hidden, intermediate, layers, heads, image_size, patch_size, projection_dim=None,
                      hidden_act=None):
        """SigLIP without its head (no CLS); ``projection_dim`` and ``hidden_act`` are CLIP's and unused."""
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                                  vision_use_head=False)

    def llava_config(self, vision, text, image_token_id, pinpoints, feature_layer, aspect=None):
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                    image_grid_pinpoints=[list(p) for p in pinpoints],
                                    vision_feature_layer=feature_layer, projector_hidden_act="gelu",
                                    vision_feature_select_strategy="full", vision_aspect_ratio=aspect or STOCK_ASPECT)

    def build_image_processor(self, crop, pinpoints):
        return self.image_processor_class()(size={"height": crop, "width": crop},
                                            image_grid_pinpoints=[list(p) for p in pinpoints])

    def has_cls(self, cfg) -> bool:
        return False

    def pack(self, inner, features, image_sizes, image_newline, cfg, aspect=None):
        packed, _ = inner.pack_image_features(features, image_sizes, image_newline=image_newline,
                                              vision_aspect_ratio=aspect or cfg.vision_aspect_ratio)
        return packed

    # ------------------------------------------------------------- interpolation
    def off_value(self, cfg) -> str:
        """``vision_aspect_ratio`` under which no grid of the pinpoints is ever shrunk."""
        return f"anyres_max_{self.max_crops(cfg)}"

    def interpolation(self, cfg) -> bool:
        limit = int(str(cfg.vision_aspect_ratio).removeprefix("anyres_max_"))
        # ratio = sqrt(area / (limit * side^2)) <= sqrt(max_crops / limit): shrinking needs > 1.1
        return self.max_crops(cfg) / limit > 1.1 ** 2

    def shrink(self, cfg, rows: int, cols: int, aspect: str | None = None) -> tuple[int, int]:
        """HF's rule: ratio = sqrt(rows * cols / (N * side^2)) for ``anyres_max_N``; above 1.1 the grid is
        bilinearly resized to (int(rows // ratio), int(cols // ratio))."""
        limit = int(str(aspect or cfg.vision_aspect_ratio).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (limit * self.side(cfg) ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def describe(self, cfg) -> dict[str, Any]:
        return {**super().describe(cfg), "vision_aspect_ratio": cfg.vision_aspect_ratio,
                "interpolates": self.interpolation(cfg), "interpolation_off": self.off_value(cfg)}

    def stock_config(self, model, processor) -> dict[str, Any]:
        stock = getattr(model, "_atr_stock_aspect", None) or model.config.vision_aspect_ratio
        return {"vision_aspect_ratio": stock}

    def set_interpolation(self, model, processor, on: bool) -> None:
        if getattr(model, "_atr_stock_aspect", None) is None:
            model._atr_stock_aspect = model.config.vision_aspect_ratio  # as the checkpoint ships it
        model.config.vision_aspect_ratio = model._atr_stock_aspect if on else self.off_value(model.config)


_PROCESSOR = None


def image_text_processor():
    """``LlavaOnevisionProcessor`` for images and text only (built on first use: it imports transformers).

    The stock class cannot be built without a video processor, and its video processor
    needs torchvision. This subclass drops that one attribute and changes nothing else:
    prompts expand ``<image>`` with the stock ``_get_number_of_features``, and it saves the
    stock layout (``processor_config.json`` names ``LlavaOnevisionProcessor``), so a saved dir
    loads with ``AutoProcessor`` wherever torchvision is installed."""
    global _PROCESSOR
    if _PROCESSOR is None:
        from transformers import LlavaOnevisionProcessor
        from transformers.processing_utils import ProcessorMixin

        class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
            def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                         vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                         video_token="<video>", vision_aspect_ratio=STOCK_ASPECT, **kwargs):
                self.num_image_tokens = num_image_tokens
                self.vision_feature_select_strategy = vision_feature_select_strategy
                self.image_token = getattr(tokenizer, "image_token", None) or image_token
                self.video_token = video_token
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = None
                self.vision_aspect_ratio = vision_aspect_ratio
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

            def to_dict(self):
                out = super().to_dict()
                out["processor_class"] = "LlavaOnevisionProcessor"
                return out

        _PROCESSOR = LlavaOnevisionImageTextProcessor
    return _PROCESSOR


FAMILY = LlavaOnevision()
