"""Selector checkpoints: ``NAME.safetensors`` (tensors) + ``NAME.json`` (config and facts).

Loading accepts only safetensors (never a pickle-based ``.pt``/``.bin``) and
checks the recorded encoder width C and tokens per crop L before anything uses
the weights.

The meta is also stored inside the safetensors header (``atr_meta``), so tensors
and meta are replaced together by one rename. The sidecar carries the sha256 of
that embedded meta (``atr_meta_sha256``): a sidecar with another digest belongs
to another write (a run killed between writing the tensors and the sidecar
leaves one a checkpoint behind), and loading then takes the embedded meta, so a
resumed run restarts at the step its weights are from. A sidecar that matches
is used as written (it is the file people read and edit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.config import first_line
from pipeline.errors import UserError

from .stages import write_json_atomic


META_KEY = "atr_meta"
META_SHA_KEY = "atr_meta_sha256"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; one line naming the file."""


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically (json last)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as .safetensors")
    tmp = path.with_name(path.name + ".tmp")
    meta = {k: v for k, v in meta.items() if k != META_SHA_KEY}
    embedded = json.dumps(meta, sort_keys=True, default=str)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", META_KEY: embedded})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_json_atomic(path.with_suffix(".json"), {**meta, META_SHA_KEY: _sha(embedded)})
    return path


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def load_checkpoint(path: Path, expect_channels: int | None = None, expect_tokens: int | None = None,
                    expect_family: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a safetensors checkpoint; refuses other formats, a mismatched C/L, and a
    selector trained on another model family's features (LLaVA-NeXT vs OneVision: their tiny presets
    share L and C, their towers do not)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a safetensors checkpoint (pickle-based formats are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(exc)})") from None
    embedded = _embedded_meta(path, header)
    digest = _sha(header[META_KEY]) if embedded is not None else None
    sidecar = path.with_suffix(".json")
    try:
        side = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        side = None
    if embedded is None and not isinstance(side, dict):
        raise CheckpointError(f"{path}: missing or unreadable {sidecar.name}")
    if embedded is None:
        meta = side
    elif isinstance(side, dict) and side.get(META_SHA_KEY) == digest:
        meta = {k: v for k, v in side.items() if k != META_SHA_KEY}  # the sidecar of these tensors
    else:
        meta = embedded  # no sidecar, or one from another write: the meta saved with the tensors
    for source in (side, embedded):  # both must fit: neither may claim another shape
        if not isinstance(source, dict):
            continue
        got = (source.get("tokens"), source.get("channels"))
        if (expect_tokens is not None and got[0] != expect_tokens) or \
                (expect_channels is not None and got[1] != expect_channels):
            want = (expect_tokens if expect_tokens is not None else got[0],
                    expect_channels if expect_channels is not None else got[1])
            raise CheckpointError(f"{path}: selector was trained on features of shape (L, C) = {got} "
                                  f"(L tokens per crop, C encoder width), this model's are {want}; "
                                  f"train one on this model's features (another family's or tower's "
                                  f"selector does not fit)")
    family = (meta.get("encoder") or {}).get("family") if isinstance(meta, dict) else None
    if expect_family is not None and family is not None and family != expect_family:
        raise CheckpointError(f"{path}: selector was trained on {family} features of shape (L, C) = "
                              f"{(meta.get('tokens'), meta.get('channels'))}, this model is {expect_family} with "
                              f"{(expect_tokens, expect_channels)}: another tower's features; train one on this "
                              f"model's features")
    return tensors, meta


def _embedded_meta(path: Path, header: dict[str, str]) -> dict[str, Any] | None:
    if META_KEY not in header:
        return None  # written before the meta was embedded: the sidecar holds it
    try:
        meta = json.loads(header[META_KEY])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: unreadable {META_KEY} in the safetensors header")
    return meta
