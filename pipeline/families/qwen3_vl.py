"""Qwen3-VL: a full-attention ViT (16-px patches, learned position embeddings interpolated to the grid, 2 x 2
merger) with **DeepStack**, a Qwen3 LM with interleaved M-RoPE. What it shares with Qwen2.5-VL is in ``_qwen``;
here only its own:

- **DeepStack.** The tower's blocks ``deepstack_visual_indexes`` each feed their own merger, and the LLM adds
  those features into its first layers at the image slots. Pruning gathers every DeepStack layer with the
  same keep index as the main tokens and passes them through ``mm_encoder_outputs``
  (``tests/test_qwen.py`` shows that dropping them changes the answer).
- **No window order**: the pre-merger states are already in the processor's raster-group order.
- **VisionZip's score** reads the last block (every block attends to the whole image).
"""

from __future__ import annotations

from ._qwen import QwenFamily


class Qwen3VL(QwenFamily):
    name = "qwen3-vl"
    label = "Qwen3-VL"
    model_type = "qwen3_vl"
    default_patch = 16
    stock_pixels = (64 * 32 * 32, 16384 * 32 * 32)  # Qwen/Qwen3-VL-8B-Instruct: shortest/longest_edge 65536/16777216
    image_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Qwen/Qwen3-VL-8B-Instruct: image_mean / image_std
    can_interpolate = False
    multi_image_anyres = True   # each image of a several-image prompt gets its own dynamic grid
    has_crops = False
    own_runtime = True          # pruned inference: _qwen (M-RoPE positions, mm_encoder_outputs)
    tiny_text_model = "qwen3"

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def tower_class(self):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return Qwen3VLVisionModel

    def processor_base(self):
        from transformers import Qwen3VLProcessor

        return Qwen3VLProcessor

    def config_classes(self):
        from transformers import Qwen3VLConfig
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

        return Qwen3VLConfig, Qwen3VLVisionConfig, Qwen3VLTextConfig

    def vision_kwargs(self, layers: int) -> dict:
        """DeepStack from three blocks spread over the tower (the 8B: 8, 16, 24 of 27)."""
        picks = sorted({max(0, round(layers * f) - 1) for f in (1 / 3, 2 / 3, 0.9)})
        return {"deepstack_visual_indexes": picks}

    def text_kwargs(self, hidden: int, heads: int, **given) -> dict:
        out = super().text_kwargs(hidden, heads, **given)
        out["rope_parameters"]["mrope_interleaved"] = True
        out["head_dim"] = hidden // heads
        return out

    def deepstack(self, out):
        return list(out.deepstack_features)

    def encoder_output(self, pooled, deepstack):
        """Qwen3-VL's own output class: without ``deepstack_features`` the model cannot take the image."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        if deepstack is None:
            raise ValueError("Qwen3-VL needs the DeepStack features of every kept token (ImageFeatures.deepstack)")
        return BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deepstack)


FAMILY = Qwen3VL()
