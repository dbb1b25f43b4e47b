"""``atr mask``: draw the tokens a trained selector keeps over one image (the paper's Fig. 1).

One row per AnyRes crop (row 0 = the base crop, i.e. the whole image; then the
grid crops in raster order), two columns: the selector's top-k tokens and a
random-k baseline. Dropped tokens are dimmed, kept tokens outlined. ``--json``
prints the selector's kept token indices per crop instead of (or as well as)
writing the PNG.

Read-only inspection: no Prefect flow, nothing recorded. The only thing it may
build is the model itself (``prepare_model``, a cache hit once prepared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import first_line

DEFAULT_OUT = "mask.png"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl")

SELECTOR_EDGE = "#ff3b30"   # kept-token outline, selector column
RANDOM_EDGE = "#00c7ff"     # kept-token outline, random column
DIM_RGBA = (0.08, 0.08, 0.08, 0.72)  # overlay on dropped tokens


def add_parser(sub, common, model_help: str) -> None:
    """Register ``atr mask`` on the subparsers object ``sub``."""
    p = sub.add_parser(
        "mask", parents=[common], help="draw the tokens a trained selector keeps over one image (vs random)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the model's vision tower on one image (every AnyRes crop), apply a trained token "
                    "selector at --retention and draw, per crop, the kept tokens (outlined) and the dropped "
                    "ones (dimmed) next to a random selection of the same size, like Fig. 1 of the paper. "
                    "Row 0 is the base crop (the whole image); the grid crops follow in raster order, with "
                    "any padding drawn black. Read-only apart from preparing --model if it is not yet prepared: no "
                    "flow runs and nothing is recorded in the results store.",
        epilog="examples:\n"
               "  atr mask --selector 3f2a --image photo.jpg --retention 0.25\n"
               "  atr mask --selector .atr/stages/train/3f2a.../selector-p0.25.safetensors --image doc.png "
               "--retention 0.1 --out doc-mask.png\n"
               "  atr mask --selector 3f2a --image doc.png --retention 0.25 --json | jq '.crops[0].kept'")
    p.add_argument("--selector", required=True, metavar="CKPT_OR_STAGE",
                   help="a selector checkpoint (.safetensors with its .json beside it), or a train stage: its "
                        "directory or its hash (or a unique prefix) under $ATR_HOME/stages/train; from a stage "
                        "the selector trained at the retention nearest to --retention is used")
    p.add_argument("--model", default="tiny-trained",
                   help=model_help + " (must be the model the selector was trained on; default: tiny-trained)")
    p.add_argument("--image", required=True, metavar="PATH", help="the image file to draw on (jpg/png/webp)")
    p.add_argument("--retention", required=True, metavar="R",
                   help="fraction of tokens to keep per crop, in (0, 1]; k = round(R * tokens per crop)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help=f"where to write the overlay PNG (default: ./{DEFAULT_OUT}, or none when only --json "
                        "is given)")
    p.add_argument("--json", action="store_true",
                   help='print {"crops": [{"box": [x0, y0, x1, y1], "grid": [rows, cols], "kept": [...]}, ...], '
                        '"random": [...], "retention": R, "k": k} to stdout and nothing else: one entry per crop, '
                        "box in original-image pixels, grid = the crop's token grid, kept = the selector's sorted "
                        "token indices (raster order; random: the baseline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline column (default: 0)")


# ---------------------------------------------------------------- inputs

def parse_retention(value: Any) -> float:
    """--retention as a float in (0, 1], else ConfigError."""
    from pipeline.config import ConfigError

    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--retention must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < r <= 1.0:  # also refuses nan
        raise ConfigError(f"retention must be in (0, 1], got {r:g}")
    return r


def resolve_selector(home, ref: str, retention: float) -> Path:
    """The checkpoint file for --selector: a file path as given, or the nearest-retention
    checkpoint listed in a train stage's manifest (StageError when neither)."""
    from storage.checkpoints import CheckpointError
    from storage.stages import StageError, find_stage, read_manifest

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


def load_image(path: str):
    """RGB PIL image, strict decoding (BadImage / FileNotFoundError, one line)."""
    from pipeline.images import decode_image

    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    return decode_image(Path(path).expanduser())


def check_out(out: Path) -> None:
    """Fail before any model work if the PNG cannot be written there."""
    from pipeline.config import ConfigError

    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .png file name")


# ---------------------------------------------------------------- computation

def compute(home, selector_ref: str, model: str, image, retention: float, seed: int) -> dict[str, Any]:
    """Everything the outputs need: layout, kept indices (selector and random), counts."""
    import torch

    from pipeline.extract import FeatureExtractor
    from pipeline.presets import load_model
    from pipeline.selector import SelectorConfig, keep_count, random_indices
    from pipeline.train import selector_from_tensors
    from storage.checkpoints import CheckpointError, load_checkpoint

    from .stages import prepare_model

    ckpt = resolve_selector(home, selector_ref, retention)
    model_stage = prepare_model(home, model)
    llava, processor = load_model(model_stage.model_dir)
    fx = FeatureExtractor(llava, processor, crops="all")
    tokens, channels = fx.tokens_per_crop, fx.feature_dim
    tensors, meta = load_checkpoint(ckpt, expect_channels=channels, expect_tokens=tokens)
    try:
        cfg = SelectorConfig.from_dict(meta["config"])
        selector = selector_from_tensors(cfg, meta["tokens"], meta["channels"], tensors)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{ckpt}: cannot build a selector from it ({first_line(exc)})") from None
    warnings = []
    trained_on = (meta.get("encoder") or {}).get("model_key")
    if trained_on and trained_on != model_stage.key:
        warnings.append(f"selector was trained on features of model stage {trained_on}, not {model_stage.key} "
                        f"({model}); the selection may be meaningless")

    feats = fx([image])[0]  # (crops, L, C) float32
    layout = fx.layout(*image.size)
    n = feats.shape[0]
    kept = selector.keep_indices(torch.from_numpy(feats), retention)
    rand = random_indices(n, tokens, retention, torch.Generator().manual_seed(seed))
    return {"layout": layout, "boxes": layout.boxes[:n], "side": fx.side, "tokens": tokens,
            "cls_offset": tokens - fx.side * fx.side, "k": keep_count(retention, tokens),
            "selector": [sorted(int(i) for i in row) for row in kept.tolist()],
            "random": [sorted(int(i) for i in row) for row in rand.tolist()],
            "checkpoint": ckpt, "trained_retention": meta.get("retention", cfg.retention),
            "warnings": warnings}


def _num(v: float) -> float | int:
    v = round(float(v), 3)
    return int(v) if v.is_integer() else v


def to_json(res: dict[str, Any], retention: float) -> dict[str, Any]:
    side = res["side"]

    def entries(kept_lists):
        return [{"box": [_num(v) for v in box], "grid": [side, side], "kept": kept}
                for box, kept in zip(res["boxes"], kept_lists)]

    return {"crops": entries(res["selector"]), "random": entries(res["random"]), "retention": retention,
            "k": res["k"]}


# ---------------------------------------------------------------- drawing

def _crop_title(i: int, grid: tuple[int, int]) -> str:
    if i == 0:
        return "base crop (whole image)"
    r, c = divmod(i - 1, grid[1])
    return f"grid crop r{r} c{c}"


def _draw_panel(ax, image, box, side: int, kept: list[int], cls_offset: int, edge: str) -> None:
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    w, h = image.size
    x0, y0, x1, y1 = box
    ax.set_facecolor("black")  # padding outside the image
    cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    cx1, cy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if cx1 > cx0 and cy1 > cy0:
        part = image.crop((cx0, cy0, cx1, cy1))
        if max(part.size) > 768:  # enough for a ~3 inch panel
            part.thumbnail((768, 768))
        ax.imshow(np.asarray(part), extent=(cx0, cx1, cy1, cy0), interpolation="nearest", zorder=0)
    cells = [t - cls_offset for t in kept if t >= cls_offset]  # a CLS token (strategy "full") has no cell
    keep = np.zeros(side * side, dtype=bool)
    keep[cells] = True
    overlay = np.zeros((side, side, 4))
    overlay[~keep.reshape(side, side)] = DIM_RGBA
    ax.imshow(overlay, extent=(x0, x1, y1, y0), interpolation="nearest", zorder=1)
    tw, th = (x1 - x0) / side, (y1 - y0) / side
    rects = [Rectangle((x0 + (c % side) * tw, y0 + (c // side) * th), tw, th) for c in cells]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=edge,
                                      linewidth=max(0.4, min(1.2, 24 / side)), zorder=2))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("auto")
    ax.set_box_aspect(1)  # square panels: a crop is S x S pixels to the vision tower
    ax.set_xticks([])
    ax.set_yticks([])


def draw(res: dict[str, Any], image, retention: float, seed: int, out: Path, image_name: str) -> Path:
    """Write the two-column overlay PNG atomically (temp file + rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, side, k, tokens = len(res["boxes"]), res["side"], res["k"], res["tokens"]
    panel = 3.0
    fig = Figure(figsize=(2 * panel, n * (panel + 0.35) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    grid = res["layout"].grid
    for i, box in enumerate(res["boxes"]):
        where = _crop_title(i, grid)
        _draw_panel(axes[i][0], image, box, side, res["selector"][i], res["cls_offset"], SELECTOR_EDGE)
        axes[i][0].set_title(f"selector: {k}/{tokens} kept\n{where}", fontsize=9)
        _draw_panel(axes[i][1], image, box, side, res["random"][i], res["cls_offset"], RANDOM_EDGE)
        axes[i][1].set_title(f"random (seed {seed}): {k}/{tokens} kept\n{where}", fontsize=9)
    fig.suptitle(f"{image_name}  {image.size[0]}x{image.size[1]}  retention {retention:g}  "
                 f"({res['checkpoint'].name}, trained p={res['trained_retention']:g})", fontsize=9)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- command

def cmd_mask(home, args) -> int:
    retention = parse_retention(args.retention)
    want_json = bool(getattr(args, "json", False))
    out = getattr(args, "out", None)
    out = Path(out).expanduser() if out else (None if want_json else Path(DEFAULT_OUT))
    if out is not None:
        check_out(out)
    seed = int(getattr(args, "seed", 0) or 0)
    image = load_image(args.image)
    res = compute(home, args.selector, getattr(args, "model", "tiny") or "tiny", image, retention, seed)
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if out is not None:
        draw(res, image, retention, seed, out, Path(args.image).name)
        kept_sel = sum(len(r) for r in res["selector"])
        total = len(res["boxes"]) * res["tokens"]
        line = (f"mask: wrote {out} ({len(res['boxes'])} crops, {res['k']}/{res['tokens']} tokens kept per crop, "
                f"{kept_sel}/{total} in all; selector {res['checkpoint']} trained at p={res['trained_retention']:g} "
                f"vs random seed {seed})")
        print(line, file=sys.stderr if want_json else sys.stdout)
    if want_json:
        sys.stdout.write(json.dumps(to_json(res, retention)) + "\n")
        sys.stdout.flush()
    return 0
