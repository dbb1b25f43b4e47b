"""Model families: everything that differs between LLaVA-NeXT and LLaVA-OneVision, behind one interface.

The rest of the project (extraction, pruned inference, the tiny world, FLOPs, the
presets) asks a :class:`~pipeline.families.base.Family` instead of assuming
LLaVA-NeXT. The family is chosen from the config's ``model_type``
(:func:`family_of`). One module per family holds its differences:

- ``llava_next``: ``LlavaNextForConditionalGeneration``, a CLIP tower with a CLS
  token (dropped by the ``default`` select strategy), Vicuna/Mistral LMs, the
  vicuna chat format.
- ``llava_onevision``: ``LlavaOnevisionForConditionalGeneration``, a SigLIP tower
  without CLS, a Qwen2 LM, ``anyres_max_9`` (bilinear shrinking of large grids),
  the Qwen ``<|im_start|>`` chat format.

Adding a family means one module here plus its presets (``pipeline/presets.py``).
"""

from __future__ import annotations

from .base import Family, UnknownFamilyError
from .llava_next import FAMILY as LLAVA_NEXT
from .llava_onevision import FAMILY as LLAVA_ONEVISION

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAVA_NEXT, LLAVA_ONEVISION)}


def family_of(model_or_config) -> Family:
    """The family of a model, its config, or a ``model_type`` string; one line listing the
    supported ones for anything else."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        cfg = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(cfg, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{t!r} ({f.label})" for t, f in FAMILIES.items())
        raise UnknownFamilyError(f"model_type {model_type!r} is not a supported family; supported: {supported}")
    return FAMILIES[model_type]


__all__ = ["Family", "FAMILIES", "LLAVA_NEXT", "LLAVA_ONEVISION", "UnknownFamilyError", "family_of"]
