"""What one image's tower pass gives pruning (:class:`ImageFeatures`) and how a prompt is cut at its image
placeholders (:func:`prompt_segments`): shared by ``pipeline.prune`` (LLaVA) and the families that bring their
own pruned inference (``pipeline.families._qwen``), below both so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """Tower output of one image: ``features`` (crops, L, C) and ``image_size`` (height, width)."""

    features: torch.Tensor
    image_size: tuple[int, int]
    cls_attention: torch.Tensor | None = None  # (crops, L): CLS -> token attention in the feature layer
    valid: torch.Tensor | None = None  # (crops, L) bool: the tokens LLaVA-NeXT's unpadding keeps
    early_attention: torch.Tensor | None = None  # (crops, L): CLS -> token attention in encoder layer 0
    keys: torch.Tensor | None = None  # (crops, L, head_dim): the feature layer's keys, mean over heads
    last_hidden: torch.Tensor | None = None  # (crops, L, C'): the embeds layer (the feature layer), post-norm (embeds=True)
    cls_tokens: torch.Tensor | None = None  # (crops, C): the CLS token's hidden state of the feature layer
    grid: tuple[int, int, int] | None = None  # Qwen-VL: the image's (t, h, w) patch grid
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: (L, D) DeepStack features per layer, raster order

    @property
    def crops(self) -> int:
        return self.features.shape[0]

    @property
    def tokens_per_crop(self) -> int:
        return self.features.shape[1]


def prompt_segments(tokenizer, prompt: str, image_token_id: int) -> list[torch.Tensor]:
    """The ids of ``prompt`` cut at its image placeholders: one more segment than placeholders.

    The prompt is tokenized exactly as ``processor(images=..., text=...)`` does it:
    with the tokenizer's special tokens, so a tokenizer that adds BOS (the llava-hf
    mistral and vicuna ones, whose chat templates do not write ``<s>``) gets it."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    cuts = [int(w) for w in (ids == image_token_id).nonzero()[:, 0]]
    bounds = [-1, *cuts, ids.shape[0]]
    return [ids[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])]


__all__ = ["ImageFeatures", "prompt_segments"]
