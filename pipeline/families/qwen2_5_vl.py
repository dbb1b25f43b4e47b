"""Qwen2.5-VL: a windowed-attention ViT (14-px patches, 2 x 2 merger, full attention in a few blocks), a Qwen2.5
LM with M-RoPE. What it shares with Qwen3-VL is in ``_qwen``; here only its own:

- **Window order.** The tower runs its patches grouped by attention window and restores raster order only
  after the merger. Its pre-merger states (the selector's features) are put back into raster order with
  the model's own ``get_vision_window_index``.
- **VisionZip's score** reads the last *full-attention* block (``fullatt_block_indexes[-1]``; the 7B's block
  31, its last): a windowed block's attention only covers a 112-px window, so "attention received" there
  would measure a token against its window, not the image.
"""

from __future__ import annotations

import torch

from ._qwen import QwenFamily


class Qwen25VL(QwenFamily):
    name = "qwen2.5-vl"
    label = "Qwen2.5-VL"
    model_type = "qwen2_5_vl"
    default_patch = 14
    stock_pixels = (56 * 56, 28 * 28 * 16384)  # Qwen/Qwen2.5-VL-7B-Instruct: min_pixels 3136, max_pixels 12845056
    can_interpolate = False
    multi_image_anyres = True   # each image of a several-image prompt gets its own dynamic grid
    has_crops = False
    own_runtime = True          # pruned inference: _qwen (M-RoPE positions, mm_encoder_outputs)

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def tower_class(self):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel

    def processor_base(self):
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor

    def config_classes(self):
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (Qwen2_5_VLTextConfig,
                                                                              Qwen2_5_VLVisionConfig)

        return Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig, Qwen2_5_VLTextConfig

    def vision_kwargs(self, layers: int) -> dict:
        """Full attention in every fourth block ending with the last (the 7B: 7, 15, 23, 31 of 32); windows of
        4 x 4 merged tokens (the 7B's 112 px of 14-px patches), set from the patch size by the preset."""
        return {"fullatt_block_indexes": [i for i in range(layers) if i % 4 == 3 or i == layers - 1]}

    def vision_config(self, *, hidden, intermediate, layers, heads, image_size, patch_size, projection_dim=None,
                      hidden_act=None, **fields):
        """Windows of 4 x 4 merged tokens, as the 7B's 112 px of 14-px patches (unless ``fields`` gives one)."""
        vision = super().vision_config(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                                       image_size=image_size, patch_size=patch_size, hidden_act=hidden_act, **fields)
        if "window_size" not in fields:
            vision.window_size = patch_size * vision.spatial_merge_size * 4
        return vision

    def attention_block(self, cfg) -> int:
        return list(cfg.vision_config.fullatt_block_indexes)[-1]

    def raster(self, hidden: torch.Tensor, grid: torch.Tensor, cfg) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        vis = cfg.vision_config
        unit = vis.spatial_merge_size ** 2
        window, _ = get_vision_window_index(grid.cpu(), vis.spatial_merge_size, vis.window_size, vis.patch_size)
        back = torch.argsort(window.to(hidden.device))
        return hidden.reshape(-1, unit, hidden.shape[-1])[back].reshape(hidden.shape)


FAMILY = Qwen25VL()
