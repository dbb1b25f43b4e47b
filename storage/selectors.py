"""Selector checkpoints named on the command line (``--selector``): lookup and loading.

``--selector`` is either a checkpoint file (``.safetensors``, or its ``.json``
sidecar) or a train stage: its hash, a unique prefix of it, or its directory.
From a stage, ``variant`` picks the checkpoint: ``nearest`` (the default) the one
trained at the retention nearest to the one asked for, ``range`` the one trained
on a retention range (``atr train --retention-range``), ``p0.25`` exactly the one
trained at 0.25. Loading reads only safetensors (``storage.checkpoints``) and checks
the family the selector was trained on (one line naming both when it differs), then the
encoder width C and tokens per crop L, before the weights are used. Checkpoints record
their family (``encoder.family``) and, for Qwen-VL's dynamic token grids, ``grid``
dynamic with ``tokens`` null and the features read (``qwen_features``).
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


RANGE = "range"  # the train manifest's checkpoints key of the range-trained selector
VARIANTS = ("nearest", RANGE, "p<P>")


def parse_variant(variant: str) -> float | str:
    """"nearest" or "range" as given, "p0.25" as the float 0.25; anything else one CheckpointError line."""
    if variant in ("nearest", RANGE):
        return variant
    if isinstance(variant, str) and variant.startswith("p"):
        try:
            p = float(variant[1:])
        except ValueError:
            p = None
        if p is not None and 0.0 < p <= 1.0:
            return p
    raise CheckpointError(f"selector variant must be nearest, range or p<P> (e.g. p0.25), got {variant!r}")


def resolve_selector(home: Home, ref: str, retention: float, variant: str = "nearest") -> Path:
    """The checkpoint file for ``--selector``: a file path as given, or a checkpoint listed in a train
    stage's manifest, chosen by ``variant``: ``nearest`` (trained at the p nearest ``retention``),
    ``range`` (the range-trained one) or ``p0.25`` (exactly that p). CheckpointError / StageError, one
    line, when there is none; a file named directly must fit the variant too (``range``: trained on a
    range; ``p0.25``: trained at 0.25)."""
    want = parse_variant(variant)
    path = Path(ref).expanduser()
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES:
        if path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
            path = path.with_suffix(".safetensors")  # the sidecar was named
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint")
        if want != "nearest":
            _check_file_variant(path, want)
        return path  # load_checkpoint refuses anything but safetensors
    sd = find_stage(home, "train", ref)
    manifest = read_manifest(sd.path)
    checkpoints = manifest.get("checkpoints")
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise StageError(f"{sd.path}: manifest lists no selector checkpoints (not a train stage?)")
    try:
        options = sorted((float(p), name) for p, name in checkpoints.items() if p != RANGE)
    except (TypeError, ValueError):
        raise StageError(f"{sd.path}: unreadable checkpoints entry in the manifest") from None
    trained = ", ".join(f"{p:g}" for p, _ in options)
    if want == RANGE:
        if RANGE not in checkpoints:
            raise CheckpointError(f"{sd.path} was trained at {'one p' if len(options) == 1 else 'p'} ({trained}), "
                                  f"not on a range: variant=range needs a checkpoint from atr train "
                                  f"--retention-range MIN,MAX")
        return sd.path / checkpoints[RANGE]
    if want == "nearest":
        if not options:
            raise StageError(f"{sd.path}: manifest lists no per-p selector checkpoints")
        _, name = min(options, key=lambda o: (abs(o[0] - retention), o[0]))
        return sd.path / name
    exact = [name for p, name in options if abs(p - want) < 1e-9]
    if not exact:
        raise CheckpointError(f"{sd.path} has no selector trained at p = {want:g} (variant=p{want:g}); it has "
                              f"p = {trained or 'none'}{' and a range' if RANGE in checkpoints else ''}")
    return sd.path / exact[0]


def _check_file_variant(path: Path, want: float | str) -> None:
    """A checkpoint file named directly with variant range or p<P>: its meta must say so (one line)."""
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError:
        return  # loading it reports what is wrong with the file
    rng = meta.get("retention_range") or (meta.get("config") or {}).get("retention_range")
    p = meta.get("retention", (meta.get("config") or {}).get("retention"))
    if want == RANGE and not rng:
        raise CheckpointError(f"{path} was trained at one p ({p:g}), not on a range: variant=range needs a "
                              f"checkpoint from atr train --retention-range MIN,MAX" if isinstance(p, (int, float))
                              else f"{path} was not trained on a range: variant=range needs a checkpoint from "
                                   f"atr train --retention-range MIN,MAX")
    if isinstance(want, float) and (rng or not isinstance(p, (int, float)) or abs(float(p) - want) > 1e-9):
        what = f"on the range [{rng[0]:g}, {rng[1]:g}]" if rng else f"at p = {p}"
        raise CheckpointError(f"{path} was trained {what}, not at p = {want:g} (variant=p{want:g})")


def selector_family(meta: dict[str, Any]) -> str | None:
    """The model family a selector checkpoint was trained on (its meta's ``family``, else its encoder's)."""
    if not isinstance(meta, dict):
        return None
    return meta.get("family") or (meta.get("encoder") or {}).get("family")


def selector_grid(meta: dict[str, Any]) -> str:
    """``dynamic`` (a token grid per image: Qwen-VL) or ``fixed`` (L tokens per crop: LLaVA)."""
    grid = meta.get("grid") or (meta.get("encoder") or {}).get("grid") if isinstance(meta, dict) else None
    return "dynamic" if grid == "dynamic" else "fixed"


def check_selector_family(path: Path, meta: dict[str, Any], expect_family: str | None) -> None:
    """One CheckpointError line when the checkpoint was trained on another family's features (a NeXT selector on
    Qwen features, a Qwen2.5-VL one on Qwen3-VL), naming both. Unknown families (old or foreign checkpoints,
    no family given) pass: the shape checks still apply."""
    family = selector_family(meta)
    if expect_family is None or family is None or family == expect_family:
        return
    grid = selector_grid(meta)
    shape = "(1, L, C) token grids" if grid == "dynamic" else f"(L, C) = {(meta.get('tokens'), meta.get('channels'))}"
    raise CheckpointError(f"{path}: selector was trained on {family} features ({grid} grid, {shape}); this model is "
                          f"{expect_family}: a selector serves only the family it was trained on, train one on "
                          f"this model's features (atr train --model ...)")


def load_selector(path: Path, build: Callable[[dict, dict], Any], expect_channels: int | None = None,
                  expect_tokens: int | None = None, expect_family: str | None = None) -> LoadedSelector:
    """Read the checkpoint at ``path`` and ``build(tensors, meta)`` the selector from it
    (``pipeline.train.selector_from_checkpoint``); a checkpoint that does not fit ends in one
    CheckpointError line naming the file.

    The family is checked first (:func:`check_selector_family`: one line naming both families), then the shape.
    A dynamic-grid selector (Qwen-VL; meta ``grid`` dynamic, ``tokens`` null) has no fixed L; its channels are
    its features' width (4C pre-merger or D merged), so ``expect_channels`` (the tower width C) is compared
    with the tower width it recorded (``encoder.tower_width``)."""
    tensors, meta = load_checkpoint(path)
    check_selector_family(path, meta, expect_family)
    if selector_grid(meta) == "dynamic":
        width = (meta.get("encoder") or {}).get("tower_width")
        if expect_channels is not None and width is not None and width != expect_channels:
            raise CheckpointError(f"{path}: selector was trained on the features of a tower of width {width}, this "
                                  f"model's is {expect_channels}; train one on this model's features")
    elif expect_channels is not None or expect_tokens is not None or expect_family is not None:
        tensors, meta = load_checkpoint(path, expect_channels=expect_channels, expect_tokens=expect_tokens,
                                        expect_family=expect_family)
    try:
        selector = build(tensors, meta)
    except (KeyError, TypeError, RuntimeError) as exc:  # a bad config inside: its own ConfigError line
        raise CheckpointError(f"{path}: cannot build a selector from it ({first_line(exc)})") from None
    return LoadedSelector(selector, meta, Path(path), hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16])


__all__ = ["CHECKPOINT_SUFFIXES", "LoadedSelector", "VARIANTS", "check_selector_family", "load_selector",
           "parse_variant", "resolve_selector", "selector_family", "selector_grid"]
