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

import json
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.errors import MissingFile

from .common import MODEL_HELP, add_command, add_compute_options, add_retentions_option, parse_retentions

DEFAULT_OUT = "mask.png"


def mask_parser(sub, common) -> None:
    """Register ``atr mask`` on the subparsers object ``sub``."""
    p = add_command(
        sub, common, "mask",
        help="draw the tokens a trained selector keeps over one image (vs random)",
        description="Run the model's vision tower on one image (every AnyRes crop), apply a trained token "
                    "selector at --retentions R and draw, per crop, the kept tokens (outlined) and the dropped "
                    "ones (dimmed) next to a random selection of the same size, like Fig. 1 of the paper. "
                    "Row 0 is the base crop (the whole image); the grid crops follow in raster order. Tokens "
                    "on canvas padding, which LLaVA-NeXT's unpadding drops, are greyed out and never kept: "
                    "k = round(R * the crop's valid tokens). Qwen2.5-VL and Qwen3-VL have no crops: one row, the "
                    "whole image on the processor's resized grid of merged (2 x 2 patch) tokens, k = round(R * "
                    "rows * cols). Read-only apart from preparing --model if it is not yet prepared: no "
                    "flow runs and nothing is recorded in the results store.",
        epilog="examples:\n"
               "  atr mask --selector 3f2a --image photo.jpg --retentions 0.25\n"
               "  atr mask --selector .atr/stages/train/3f2a.../selector-p0.25.safetensors --image doc.png "
               "--retentions 0.1 --out doc-mask.png\n"
               "  atr mask --selector 3f2a --image doc.png --retentions 0.25 --json | jq '.crops[0].kept'")
    p.add_argument("--selector", default=None, metavar="CKPT_OR_STAGE",
                   help="a selector checkpoint (.safetensors with its .json beside it), or a train stage: its "
                        "directory or its hash (or a unique prefix) under $ATR_HOME/stages/train; from a stage "
                        "the selector trained at the retention nearest to --retentions is used (needed by "
                        "--strategy selector, the default)")
    p.add_argument("--strategy", default="selector", metavar="NAME",
                   help="the strategy drawn in the left column (default: selector); any pruning strategy, e.g. "
                        "visionzip, cdpruner, random (any without a selector; `atr eval --help` lists them)")
    p.add_argument("--model", default="tiny-trained",
                   help=MODEL_HELP + " (must be the model the selector was trained on; default: tiny-trained)")
    p.add_argument("--image", required=True, metavar="PATH", help="the image file to draw on (jpg/png/webp)")
    add_retentions_option(p, None, alias=True,
                          help="one fraction of tokens to keep per crop, in (0, 1]; k = round(R * the crop's valid tokens) "
                               "(--retention is the same option)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help=f"where to write the overlay PNG (default: ./{DEFAULT_OUT}, or none when only --json "
                        "is given)")
    p.add_argument("--json", action="store_true",
                   help='print {"crops": [{"box": [x0, y0, x1, y1], "grid": [rows, cols], "valid": V, "k": k, '
                        '"kept": [...]}, ...], "random": [...], "retention": R, "k": [k per crop]} to stdout and '
                        "nothing else: one entry per crop, box in original-image pixels, grid = the crop's token "
                        "grid (Qwen-VL: one entry, the whole image, grid = merged rows x cols), valid = its tokens that survive unpadding, k = round(R * valid), kept = the "
                        "selector's sorted token indices (raster order; random: the baseline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline column (default: 0)")
    add_compute_options(p)


def load_image(path: str):
    """RGB PIL image, strict decoding (BadImage / MissingFile, one line)."""
    from pipeline.images import decode_image

    if not Path(path).expanduser().is_file():
        raise MissingFile(f"{path}: no such image file")
    return decode_image(Path(path).expanduser())


def check_out(out: Path) -> None:
    """Fail before any model work if the PNG cannot be written there."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise MissingFile(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a .png file name")


def mask_tokens(home, selector_ref: str | None, model: str, image, retention: float, seed: int,
                device: str = "auto", dtype: str = "auto", strategy: str = "selector") -> dict:
    """Everything the outputs need: layout, kept indices (``strategy``'s, the selector's by default, and
    random), counts, the checkpoint (None without a selector)."""
    from pipeline.device import compute
    from pipeline.loading import load_model
    from pipeline.masks import encoder_shape, kept_tokens
    from pipeline.strategies import get
    from pipeline.train import selector_from_checkpoint
    from storage.selectors import load_selector, resolve_selector

    from ..stages.eval import check_crops, eval_selector
    from ..stages.prepare_model import prepare_model

    spec = get(strategy)
    needs_selector = "selector" in spec.needs
    if needs_selector and not selector_ref:
        raise ConfigError(f"atr mask --strategy {strategy} needs --selector (a train stage hash or a .safetensors "
                          f"checkpoint); or draw a strategy without one, e.g. --strategy visionzip")
    if not spec.prunes or spec.files:
        raise ConfigError(f"atr mask draws a swept pruning strategy's keep; {strategy!r} is not one")
    ckpt = resolve_selector(home, selector_ref, retention) if needs_selector else None
    device, dtype = compute(device, dtype)
    model_stage = prepare_model(home, model)
    from pipeline.evaluate import EvalConfig

    check_crops(model_stage, EvalConfig(strategies=(strategy,)))  # HiRED on Qwen-VL: one line, no tower pass
    llava, processor = load_model(model_stage.model_dir, dtype=dtype, device=device)
    warnings, loaded = [], None
    if needs_selector:
        from pipeline.families import family_of

        if family_of(llava).has_crops:
            tokens, channels = encoder_shape(llava, processor)
            loaded = load_selector(ckpt, selector_from_checkpoint, expect_channels=channels, expect_tokens=tokens)
        else:  # no fixed token count per image: the checks eval makes (width, family)
            loaded = eval_selector(home, str(ckpt), retention, model_stage)
        trained_on = (loaded.meta.get("encoder") or {}).get("model_key")
        if trained_on and trained_on != model_stage.key:
            warnings.append(f"selector was trained on features of model stage {trained_on}, not {model_stage.key} "
                            f"({model}); the selection may be meaningless")
    res = kept_tokens(llava, processor, None if loaded is None else loaded.selector, image, retention, seed, strategy)
    trained = None if loaded is None else loaded.meta.get("retention", loaded.selector.cfg.retention)
    return {**res, "checkpoint": ckpt, "trained_retention": trained, "warnings": warnings}


def cmd_mask(home, args) -> int:
    from pipeline.masks import mask_json

    from ..present.plots import draw_mask

    retention = parse_retentions(args.retentions, single=True)[0]
    want_json = bool(getattr(args, "json", False))
    out = getattr(args, "out", None)
    out = Path(out).expanduser() if out else (None if want_json else Path(DEFAULT_OUT))
    if out is not None:
        check_out(out)
    seed = int(getattr(args, "seed", 0) or 0)
    image = load_image(args.image)
    res = mask_tokens(home, getattr(args, "selector", None), getattr(args, "model", "tiny") or "tiny", image,
                      retention, seed, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"),
                      getattr(args, "strategy", "selector") or "selector")
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if out is not None:
        draw_mask(res, image, retention, seed, out, Path(args.image).name)
        kept_sel = sum(len(r) for r in res["selector"])
        padding = len(res["boxes"]) * res["tokens"] - sum(res["valid"])
        by = (f"selector {res['checkpoint']} trained at p={res['trained_retention']:g}" if res["checkpoint"]
              else res["strategy"])
        line = (f"mask: wrote {out} ({len(res['boxes'])} crops, {res['k'][0]}/{res['tokens']} tokens kept in the "
                f"base crop, {kept_sel}/{sum(res['valid'])} valid tokens in all, {padding} padding tokens never "
                f"kept; {by} vs random seed {seed})")
        print(line, file=sys.stderr if want_json else sys.stdout)
    if want_json:
        sys.stdout.write(json.dumps(mask_json(res, retention)) + "\n")
        sys.stdout.flush()
    return 0
