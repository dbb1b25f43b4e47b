"""Selector checkpoints: ``NAME.safetensors`` (tensors) + ``NAME.json`` (config and facts).

Loading accepts only safetensors (never a pickle-based ``.pt``/``.bin``) and
checks the recorded encoder width C and tokens per crop L before anything uses
the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.config import first_line

from .stages import write_json_atomic


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; one line naming the file."""


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically (json last)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as .safetensors")
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), meta)
    return path


def load_checkpoint(path: Path, expect_channels: int | None = None,
                    expect_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a safetensors checkpoint; refuses other formats and mismatched C/L."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a safetensors checkpoint (pickle-based formats are never loaded)")
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: missing or unreadable {sidecar.name}") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None
    for key, want, what in (("channels", expect_channels, "C (encoder width)"),
                            ("tokens", expect_tokens, "L (tokens per crop)")):
        if want is not None and meta.get(key) != want:
            raise CheckpointError(f"{path}: selector was trained for {what} = {meta.get(key)}, "
                                  f"these features have {want}")
    return tensors, meta
