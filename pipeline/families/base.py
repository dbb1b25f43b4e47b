"""The family interface: what pruned inference, extraction and FLOPs need to know about a model."""

from __future__ import annotations

from typing import Any

from ..errors import UserError


class UnknownFamilyError(UserError, ValueError):
    """A ``model_type`` that no family handles. ``str(exc)`` is one line listing the supported ones."""


class InterpolatedGridError(UserError, ValueError):
    """A keep mask asked to go through a grid the model shrinks by interpolation (one line)."""


class Family:
    """One LLaVA model family. Methods take the LLaVA config (``model.config``) so they work on a
    config alone (a 7B on the meta device, a checkpoint's ``config.json``)."""

    name = ""          # short id used in presets, the SQL store and plots ("llava-next")
    label = ""         # human name ("LLaVA-NeXT")
    model_type = ""    # transformers model_type of the LLaVA config
    tower = ""         # the vision tower (for messages)
    chat_template = ""  # the tiny presets' chat template (the real checkpoints ship their own)

    # ------------------------------------------------------------- classes
    def model_class(self):
        raise NotImplementedError

    def image_processor_class(self):
        """The PIL-backend image processor (no torchvision needed)."""
        raise NotImplementedError

    def processor(self, image_processor, tokenizer, image_token: str, patch_size: int, chat_template: str):
        """The stock processor built from its parts (tiny presets)."""
        raise NotImplementedError

    # ------------------------------------------------------------- token geometry
    def has_cls(self, cfg) -> bool:
        """Does the tower put a CLS token in front of the patch tokens?"""
        raise NotImplementedError

    def side(self, cfg) -> int:
        """Tokens per crop side: ``image_size // patch_size`` (SigLIP-384/14: 27, covering 378 px)."""
        return cfg.vision_config.image_size // cfg.vision_config.patch_size

    def covered(self, cfg) -> float:
        """Share of each crop side the token grid covers (CLIP-336/14: 1.0; SigLIP-384/14: 378/384):
        the tower's stride-``patch_size`` convolution drops the remainder pixels."""
        v = cfg.vision_config
        return self.side(cfg) * v.patch_size / v.image_size

    def cls_in_features(self, cfg) -> bool:
        """Does the projector input keep a CLS token (a CLIP tower with the ``full`` select strategy)?"""
        return self.has_cls(cfg) and cfg.vision_feature_select_strategy == "full"

    def tokens_per_crop(self, cfg) -> int:
        """L: tokens per crop the projector receives."""
        return self.side(cfg) ** 2 + int(self.cls_in_features(cfg))

    def patch_offset(self, cfg) -> int:
        """Index of the first patch token in the tower's hidden states (1 after a CLS token)."""
        return int(self.has_cls(cfg))

    # ------------------------------------------------------------- packing
    def pack(self, inner, features: list, image_sizes, image_newline, cfg, aspect: str | None = None) -> list:
        """The model's own ``pack_image_features`` (base crop, unpadded grid, row newlines). ``aspect``
        overrides OneVision's ``vision_aspect_ratio`` for this call (the config is never mutated)."""
        raise NotImplementedError

    def interpolation(self, cfg) -> bool:
        """Does the model shrink large grids by interpolation as configured now?"""
        return False

    def off_value(self, cfg) -> str | None:
        """The public config value that turns interpolation off (None: the family never interpolates)."""
        return None

    def set_interpolation(self, model, processor, on: bool) -> None:
        """Turn the family's grid interpolation on (the checkpoint's setting) or off, through public config."""

    def stock_config(self, model, processor) -> dict[str, Any]:
        """The public config values :meth:`set_interpolation` changes, as the checkpoint ships them."""
        return {}

    # ------------------------------------------------------------- cost model
    def flops_dims(self, cfg):
        from ..flops import LlavaNextDims

        return LlavaNextDims.from_config(cfg, cls_token=self.has_cls(cfg))

    def describe(self, cfg) -> dict[str, Any]:
        """Facts recorded by the prepare-model stage."""
        vis = cfg.vision_config
        out = {"family": self.name, "model_type": cfg.model_type, "vision_model_type": vis.model_type,
               "vision_hidden": vis.hidden_size, "crop_size": vis.image_size, "patch_size": vis.patch_size,
               "tokens_per_crop": self.tokens_per_crop(cfg), "has_cls": self.has_cls(cfg),
               "vision_feature_layer": cfg.vision_feature_layer,
               "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
               "grid_pinpoints": cfg.image_grid_pinpoints, "text_model_type": cfg.text_config.model_type,
               "text_hidden": cfg.text_config.hidden_size, "text_layers": cfg.text_config.num_hidden_layers}
        return out

    def __repr__(self) -> str:
        return f"<family {self.name}>"
