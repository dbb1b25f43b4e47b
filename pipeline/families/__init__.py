"""Model families: everything that differs between LLaVA-NeXT and LLaVA-OneVision, behind one interface.

The rest of the project (extraction, pruned inference, the tiny world, FLOPs, the
preset builders and loaders) asks a :class:`~pipeline.families.base.Family` instead of
assuming LLaVA-NeXT, and never compares family names (``tests/test_families.py``
checks). The family is chosen from the config's ``model_type`` (:func:`family_of`).
One module per family holds its differences:

- ``llava_next``: ``LlavaNextForConditionalGeneration``, a CLIP tower with a CLS
  token (dropped by the ``default`` select strategy), Vicuna/Mistral LMs, the
  vicuna chat format.
- ``llava_onevision``: ``LlavaOnevisionForConditionalGeneration``, a SigLIP tower
  without CLS, a Qwen2 LM, ``anyres_max_9`` (bilinear shrinking of large grids),
  the Qwen ``<|im_start|>`` chat format.

Adding a family means one module here and its presets entry, nothing else: the module
defines a :class:`~pipeline.families.base.Family` subclass answering every abstract
method and capability, and a module-level ``FAMILY`` instance, which :data:`FAMILIES`
finds on its own (every module of this package but ``base`` and private ``_*`` helpers shared by
several families, such as ``_qwen``); its presets are
dataclasses in ``pipeline/presets.py`` that name it by ``model_type`` and are listed
in ``PRESETS`` / ``SIZED_PRESETS``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import CAPABILITIES, Family, UnknownFamilyError


def _discover() -> dict[str, Family]:
    """``model_type -> FAMILY`` of every family module in this package, in module-name order."""
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):  # base and shared helpers (_qwen) are no family
            continue
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        found[family.model_type] = family
    return found


FAMILIES: dict[str, Family] = _discover()
LLAVA_NEXT: Family = FAMILIES["llava_next"]
LLAVA_ONEVISION: Family = FAMILIES["llava_onevision"]
# The family of a record made before families existed (a manifest's describe, a selector
# checkpoint's encoder): every model then was a LLaVA-NeXT.
DEFAULT_FAMILY: str = LLAVA_NEXT.name


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


def family_named(name: str) -> Family:
    """The family whose short name (``Family.name``, as manifests and checkpoints record it) is ``name``."""
    by_name = {f.name: f for f in FAMILIES.values()}
    if name not in by_name:
        raise UnknownFamilyError(f"family {name!r} is not supported; supported: {', '.join(by_name)}")
    return by_name[name]


__all__ = ["CAPABILITIES", "DEFAULT_FAMILY", "Family", "FAMILIES", "LLAVA_NEXT", "LLAVA_ONEVISION",
           "UnknownFamilyError", "family_named", "family_of"]
