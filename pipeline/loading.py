"""The one loading path for every model: ``from_pretrained`` from a local dir (its family's classes),
hub ids resolved to a local snapshot, sized presets materialized on their device, and the
process-wide model cache that shard and chunk tasks share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .builders import SIZED_MARKER, on_meta
from .config import first_line
from .errors import UserError
from .families import DEFAULT_FAMILY, UnknownFamilyError, family_of
from .presets import SizedPreset, sized_preset_from_dict


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded. ``str(exc)`` is one line naming it and why."""


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve_hub_snapshot(repo_id: str) -> tuple[Path, str]:
    """Local snapshot dir and commit of a hub model, from the HF cache or a download.

    Honors ``HF_HUB_OFFLINE``; with no network and no cached copy this raises one
    clear ``ModelLoadError`` line instead of a chain of HTTP tracebacks.
    """
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(snapshot_download(repo_id, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all end in one line
        why = "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache" if offline else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'download failed'}"
        raise ModelLoadError(f"cannot load model {repo_id!r}: {why}") from None
    return path, path.name


def _sized_from_marker(model_dir: Path) -> SizedPreset:
    import json

    data = json.loads((Path(model_dir) / SIZED_MARKER).read_text())
    family = data.pop("family", DEFAULT_FAMILY)  # a marker written before OneVision names none
    return sized_preset_from_dict(data, family)


def materialize(model_dir: Path, device: str, dtype: str, allow_cpu: bool = False):
    """(model, processor) of a sized preset's dir: random weights (seeded) built directly on ``device``
    in ``dtype``. A CPU is refused in one line unless ``allow_cpu``."""
    import torch
    from transformers import AutoConfig

    preset = _sized_from_marker(model_dir)
    if not device.startswith("cuda") and not allow_cpu:
        n = sum(p.numel() for p in on_meta(preset).parameters())
        raise ModelLoadError(f"{preset.name} has {n / 1e9:.1f} B parameters ({n * 2 / 2**30:.0f} GiB in bf16): it is "
                             f"for timing on a CUDA device; on the CPU pass --allow-cpu (atr bench) to run it anyway")
    config = AutoConfig.from_pretrained(model_dir)
    before = torch.get_default_dtype()
    torch.manual_seed(preset.seed)
    try:
        torch.set_default_dtype(getattr(torch, dtype))
        with torch.device(device):
            model = preset.family.model_class()(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval(), load_processor(model_dir, preset.family)


def load_processor(model_dir: str | os.PathLike, family=None):
    """The processor of a model dir, as its family reads it (``Family.load_processor``; PIL backend: no
    torchvision). ``family``: None reads it from the dir's config."""
    family = family or family_of(_read_config(Path(model_dir)))
    return family.load_processor(model_dir)


def _read_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu", allow_cpu: bool = False):
    """``from_pretrained`` the model (its family's class: LLaVA-NeXT or LLaVA-OneVision) and its
    processor (PIL backend) from a local dir (a sized preset's dir: :func:`materialize`)."""
    import torch

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    if (model_dir / SIZED_MARKER).is_file():
        return materialize(model_dir, device, dtype, allow_cpu)
    family = _family_of_dir(model_dir)
    try:
        # safetensors only: a folder holding just pytorch_model.bin is refused, never torch.load-ed.
        model = family.model_class().from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        processor = load_processor(model_dir, family)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None
    return model.to(device).eval(), processor


def _family_of_dir(model_dir: Path):
    cfg = _read_config(model_dir)
    try:
        return family_of(cfg)
    except UnknownFamilyError as exc:
        raise ModelLoadError(f"cannot use model from {model_dir}: {exc}") from None


def load_model_config(model_dir: str | os.PathLike):
    """``from_pretrained`` only the config of a LLaVA-NeXT / LLaVA-OneVision model dir (cheap: no weights)."""
    model_dir = Path(model_dir)
    _family_of_dir(model_dir)
    return _read_config(model_dir)


def describe(model_or_config) -> dict[str, Any]:
    """Facts about a model (or its config) that downstream stages record (``Family.describe``)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return family_of(cfg).describe(cfg)


def check_processor(model_dir: str | os.PathLike, name: str) -> None:
    """Load only the processor of ``model_dir`` (a user's model is checked this far, not its weights)."""
    try:
        load_processor(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the processor of {name}: {first_line(exc)}") from None


_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def cached_model(model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                 allow_cpu: bool = False):
    """(model, processor) of ``model_dir`` on ``device`` in ``dtype`` (resolved names; None: the
    defaults of ``pipeline.device``), loaded once per process (``allow_cpu``: a sized preset may
    materialize on the CPU).

    Shard and chunk tasks of one process share it; loading another model drops the previous one."""
    from .device import default_device

    if device is None or dtype is None:
        device, dtype = default_device()
    key = (str(model_dir), device, dtype)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(key[0], dtype=dtype, device=device, allow_cpu=allow_cpu)
    return _LOADED[key]


__all__ = ["ModelLoadError", "is_hub_id", "resolve_hub_snapshot", "materialize", "load_processor", "load_model",
           "load_model_config", "describe", "check_processor", "cached_model"]
