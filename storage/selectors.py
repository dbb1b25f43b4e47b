"""Selector checkpoints named on the command line (``--selector``): lookup and loading.

``--selector`` is either a checkpoint file (``.safetensors``, or its ``.json``
sidecar) or a train stage: its hash, a unique prefix of it, or its directory.
From a stage the checkpoint trained at the retention nearest to the one asked
for is used. Loading reads only safetensors (``storage.checkpoints``) and checks
the encoder width C and tokens per crop L before the weights are used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import first_line

from .checkpoints import CheckpointError, load_checkpoint
from .home import Home
from .stages import StageError, find_stage, read_manifest

# Suffixes that mark --selector as a file (pickle-based ones are named only to be refused).
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass
class LoadedSelector:
    """A selector built from its checkpoint, with the facts recorded about it."""

    selector: Any          # a pipeline.selector.TokenSelector in eval mode
    meta: dict[str, Any]   # the checkpoint's meta (config, retention, tokens, channels, encoder)
    path: Path
    sha256: str            # first 16 hex digits of the file's sha256 (part of eval cache keys)


def resolve_selector(home: Home, ref: str, retention: float) -> Path:
    """The checkpoint file for ``--selector``: a file path as given, or the nearest-retention
    checkpoint listed in a train stage's manifest (CheckpointError / StageError when neither)."""
    path = Path(ref).expanduser()
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES:
        if path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
            return path.with_suffix(".safetensors")  # the sidecar was named
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        return path  # load_checkpoint refuses anything but safetensors
    sd = find_stage(home, "train", ref)
    manifest = read_manifest(sd.path)
    checkpoints = manifest.get("checkpoints")
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise StageError(f"{sd.path}: manifest lists no selector checkpoints (not a train stage?)")
    try:
        options = sorted((float(p), name) for p, name in checkpoints.items())
    except (TypeError, ValueError):
        raise StageError(f"{sd.path}: unreadable checkpoints entry in the manifest") from None
    _, name = min(options, key=lambda o: (abs(o[0] - retention), o[0]))
    return sd.path / name


def load_selector(path: Path, build: Callable[[dict, dict], Any], expect_channels: int | None = None,
                  expect_tokens: int | None = None, expect_family: str | None = None) -> LoadedSelector:
    """Read the checkpoint at ``path`` and ``build(tensors, meta)`` the selector from it
    (``pipeline.train.selector_from_checkpoint``); a checkpoint that does not fit ends in one
    CheckpointError line naming the file."""
    tensors, meta = load_checkpoint(path, expect_channels=expect_channels, expect_tokens=expect_tokens,
                                    expect_family=expect_family)
    try:
        selector = build(tensors, meta)
    except (KeyError, TypeError, RuntimeError) as exc:  # a bad config inside: its own ConfigError line
        raise CheckpointError(f"{path}: cannot build a selector from it ({first_line(exc)})") from None
    return LoadedSelector(selector, meta, Path(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16])


__all__ = ["CHECKPOINT_SUFFIXES", "LoadedSelector", "resolve_selector", "load_selector"]
