"""``atr train``: the paper's selector(s) trained on extracted features, compared on held-out crops."""

from __future__ import annotations

import time

from .common import MODEL_HELP, add_command, add_compute_options, add_retentions_option, parse_retentions, preflight


def train_parser(sub, common) -> None:
    p = add_command(
        sub, common, "train",
        help="train the token selector(s) and evaluate them on held-out crops",
        description="Train the paper's selector + reconstructor on extracted features (loss = "
                    "MSE + max(mean(M), p)), one selector per retention p, then compare selector "
                    "top-k with random-k (mean of 3 seeds) and a uniform grid on held-out crops at "
                    "retentions 0.1, 0.25, 0.5, 0.75 (reconstruction MSE, glyph coverage). With "
                    "--retention-range MIN,MAX one more selector is trained on the whole range and "
                    "compared with the per-p ones. "
                    "Features come from --features, or are extracted first from --model/--images. "
                    "A killed run resumes from its last checkpoint; an identical run is a cache hit.",
        epilog="examples:\n  atr train --retentions 0.25\n  atr train --features 4c914bad --retentions "
               "0.1,0.25,0.5 --steps 2000\n  atr train --retentions 0.1,0.25,0.5 --retention-range 0.05,0.6"
               "\n  atr train --model llava-hf/llava-v1.6-mistral-7b-hf "
               "--images /data/coco/train2017 --limit 100000 --steps 20000 --batch-size 64")
    p.add_argument("--features", metavar="STAGE_OR_HASH", default=None,
                   help="an extract stage: its hash (or a unique prefix) or its directory")
    p.add_argument("--model", default="tiny-trained",
                   help=MODEL_HELP + " (used without --features; default: tiny-trained)")
    p.add_argument("--images", default="synthetic:docs", help="image source to extract first (default: synthetic:docs)")
    p.add_argument("--limit", type=int, default=2048, help="images to extract first (default: 2048)")
    p.add_argument("--crops", choices=["all", "base"], default="base",
                   help="crops to extract for training: base (the paper: one base-resolution crop per image) "
                        "or all (default: base)")
    p.add_argument("--qwen-features", choices=["premerger", "merged"], default="premerger",
                   help="features to extract first on a family without crops (Qwen-VL): premerger (the 2 x 2 "
                        "pre-merger groups, the paper's encoder output before the projector) or merged (the "
                        "merger's output); see docs/qwen.md (default: premerger)")
    add_retentions_option(p, "0.25", alias=True,
                          help="target keep ratio p, or a comma-separated list for one selector per p (default: "
                               "0.25; --retention is the same option)")
    p.add_argument("--retention-range", metavar="MIN,MAX", default=None,
                   help="also train one selector on a range of keep ratios (p drawn per batch uniformly from "
                        "[MIN, MAX]; its ranking serves every budget), saved as selector-range beside the per-p "
                        "ones, e.g. 0.05,0.5 (default: none)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per selector (default: 2000, also for the tiny presets)")
    p.add_argument("--batch-size", type=int, default=None, help="crops per step (default: 64; 32 for the tiny presets)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default: 1e-4; 4e-3 for the tiny presets)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 100; 50 for tiny)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=250,
                   help="steps between resumable checkpoints (default: 250)")
    p.add_argument("--held-out-percent", type=int, default=10,
                   help="percent of images (by hash of image id) held out for evaluation (default: 10)")
    add_compute_options(p)
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="train the selector under bfloat16 autocast on CUDA (default: none; --dtype is the "
                        "model's precision when features are extracted first)")


def parse_retention_range(text: str | None) -> tuple[float, float] | None:
    """``--retention-range MIN,MAX``: two numbers; their bounds are checked by TrainConfig (one line)."""
    from pipeline.config import ConfigError

    if text is None:
        return None
    parts = [t.strip() for t in str(text).split(",")]
    try:
        lo, hi = (float(t) for t in parts)
    except ValueError:
        raise ConfigError(f"--retention-range: give two keep ratios MIN,MAX like 0.05,0.5, got {text!r}") from None
    return (lo, hi)


def cmd_train(home, args) -> int:
    from pipeline.config import ExtractConfig
    from pipeline.selector import SelectorConfig
    from pipeline.train import TrainConfig
    from storage.stages import find_stage

    from ..orchestration.flows import train_flow
    from ..present import progress
    from ..present.tables import print_selector_table

    user = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps}
    user_set = {k for k, v in user.items() if v is not None}
    selector = SelectorConfig(seed=args.seed, **{k: v for k, v in user.items() if v is not None})
    cfg = TrainConfig(selector=selector, retentions=parse_retentions(args.retentions),
                      held_out_percent=args.held_out_percent, checkpoint_every=args.checkpoint_every,
                      device=args.device, autocast=args.autocast,
                      retention_range=parse_retention_range(args.retention_range))
    from pipeline.device import resolve_device

    resolve_device(cfg.device)  # --device cuda without CUDA: one line before any flow starts
    extract = None
    if args.features is None:
        ext = ExtractConfig(images=args.images, limit=args.limit or None, crops=args.crops, device=args.device,
                            model_dtype=args.dtype, qwen_features=args.qwen_features)
        preflight(args.model, ext.images, ext.seed)
        extract = ext.to_dict()
    else:
        find_stage(home, "extract", args.features)
    progress.enable(True)
    t0 = time.perf_counter()
    out = train_flow(str(home.root), cfg.to_dict(), features=args.features, model=args.model, extract=extract,
                     user_set=sorted(user_set))
    m = out["manifest"]
    print(f"train {'cached' if out['cached'] else 'computed'} in {out['seconds']:.1f}s "
          f"(wall {time.perf_counter() - t0:.1f}s), eval mode {m['eval_mode']}, "
          f"{m['held_out_crops']} held-out crops")
    print_selector_table(m["selector_metrics"])
    print(f"  output  {out['path']}")
    print(f"  plot    {out['report']}/selector_metrics.png")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0
