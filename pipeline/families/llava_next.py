"""LLaVA-NeXT (llava-v1.6): a CLIP ViT tower with a CLS token, Vicuna / Mistral LMs, AnyRes with unpadding.

The paper's first model. ``vision_feature_select_strategy="default"`` drops CLS
before the projector; the ``full`` strategy keeps it as token 0 of every crop.
A grid row ends in one ``image_newline`` token; the base crop has none.
"""

from __future__ import annotations

from .base import Family

# Vicuna-style LLaVA conversation ("USER: <image>\n{question} ASSISTANT:"), the format
# llava-v1.6-vicuna uses; ``apply_chat_template`` gives the tiny models the same prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaNext(Family):
    name = "llava-next"
    label = "LLaVA-NeXT"
    model_type = "llava_next"
    tower = "CLIP"
    chat_template = CHAT_TEMPLATE
    can_interpolate = False
    multi_image_anyres = True  # each image of a several-image prompt gets its own AnyRes grid
    has_crops = True            # AnyRes: a base crop and a grid
    own_runtime = False         # pruned inference: pipeline.prune's LLaVA code
    tiny_text_model = "llama"
    corpus_line = "USER: {image}{text} ASSISTANT: {answer}"

    def model_class(self):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def image_processor_class(self):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil

    def processor(self, image_processor, tokenizer, image_token: str, patch_size: int, aspect: str | None = None):
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                  vision_feature_select_strategy="default", image_token=image_token,
                                  num_additional_image_tokens=1, chat_template=self.chat_template)

    # ------------------------------------------------------------- tiny and sized presets
    def tokenizer_tokens(self, image_token: str) -> dict:
        return {"special": [], "bos": "<s>", "eos": "</s>", "extra": {"image_token": image_token}}

    def vision_config(self, *, hidden, intermediate, layers, heads, image_size, patch_size, projection_dim=None,
                      hidden_act=None):
        """CLIP (with CLS)."""
        from transformers import CLIPVisionConfig

        kw = {"hidden_act": hidden_act} if hidden_act else {}
        return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                                projection_dim=projection_dim or hidden, **kw)

    def llava_config(self, vision, text, image_token_id, pinpoints, feature_layer, aspect=None):
        from transformers import LlavaNextConfig

        return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                               image_grid_pinpoints=[list(p) for p in pinpoints], vision_feature_layer=feature_layer,
                               projector_hidden_act="gelu", vision_feature_select_strategy="default")

    def build_image_processor(self, crop, pinpoints):
        return self.image_processor_class()(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                            image_grid_pinpoints=[list(p) for p in pinpoints])

    def has_cls(self, cfg) -> bool:
        return True

    def pack(self, inner, features, image_sizes, image_newline, cfg, aspect=None):
        packed, _ = inner.pack_image_features(features, image_sizes, cfg.vision_feature_select_strategy,
                                              image_newline=image_newline)
        return packed


FAMILY = LlavaNext()
