"""``atr prepare-model``: build a preset, train (or copy) tiny-trained, or register a model."""

from __future__ import annotations

import time

from pipeline.errors import UserError

from .common import MODEL_HELP, add_command, preflight


def prepare_model_parser(sub, common) -> None:
    p = add_command(
        sub, common, "prepare-model",
        help="build, train or register a LLaVA-NeXT / LLaVA-OneVision / Qwen-VL model (cached)",
        description="Build a preset with save_pretrained into a content-hashed stage directory, "
                    "or register a local/HF model after checking that from_pretrained loads it. "
                    "tiny-trained, tiny-ov-trained, tiny-qwen25-trained and tiny-qwen3-trained are copied "
                    "from the checkpoints shipped in pipeline/assets when their training config matches; "
                    "otherwise (or with --retrain) they are trained here on the synthetic benchmarks' train "
                    "splits (CPU, about 7, 9, 14 and 15 minutes on 2 cores) and evaluated on their test splits. "
                    "bench-vicuna-7b, bench-mistral-7b, bench-ov-7b, bench-qwen25-vl-7b and bench-qwen3-vl-8b save the real checkpoints' config and processor only (no "
                    "weights); shape-next-mistral and shape-ov-qwen2 save a loadable checkpoint in the llava-hf "
                    "layout: the real tower, processor and chat template, the LM cut to one layer, seeded random "
                    "weights in bf16 (1.6 and 3.5 GB; about 1 and 2 minutes on one thread).")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--retrain", action="store_true",
                   help="tiny-trained / tiny-ov-trained: train from scratch even if cached or shipped (reproduces the "
                        "shipped one)")
    p.add_argument("--seed", type=int, default=None, help="tiny-trained: training seed (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="tiny-trained: LM training steps (default: 2000)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="copy the prepared trained model (weights, processor, provenance.json) to DIR, e.g. "
                        "pipeline/assets/tiny-trained to refresh the shipped checkpoint")


def _tiny_world_overrides(args) -> dict | None:
    """The training config for tiny-trained when --seed/--steps are given (None = the default)."""
    if args.seed is None and args.steps is None:
        return None
    from pipeline.presets import TRAINED_PRESETS
    from pipeline.tinyworld import TRAINED_CONFIGS

    if args.model not in TRAINED_PRESETS:
        raise UserError(f"--seed/--steps train a preset ({', '.join(TRAINED_PRESETS)}); {args.model!r} is not one")
    config = TRAINED_CONFIGS[args.model]
    data = config().to_dict()
    if args.seed is not None:
        data["seed"] = args.seed
    if args.steps is not None:
        data["steps"] = args.steps
    return config.from_dict(data).to_dict()


def cmd_prepare_model(home, args) -> int:
    from pipeline.presets import TRAINED_PRESETS

    from ..orchestration.flows import prepare_model_flow
    from ..present import progress
    from ..present.tables import print_quality
    from ..stages.prepare_model import export_model

    tiny_world = _tiny_world_overrides(args)
    if args.retrain and args.model not in TRAINED_PRESETS:
        raise UserError(f"--retrain applies to trained presets ({', '.join(TRAINED_PRESETS)}), not {args.model!r}")
    preflight(args.model, tiny_world=tiny_world)
    t0 = time.perf_counter()
    progress.enable(True)
    m = prepare_model_flow(str(home.root), args.model, tiny_world, args.retrain)
    d = m["manifest"].get("describe", {})
    model_dir = m["manifest"].get("model_dir") or m["path"]
    print(f"prepare-model {'cached' if m['cached'] else 'built'}: {model_dir}")
    print(f"  key {m['key']}  tokens/crop {d.get('tokens_per_crop')}  C {d.get('vision_hidden')}  "
          f"layer {d.get('vision_feature_layer')}  pinpoints {d.get('grid_pinpoints')}  "
          f"({time.perf_counter() - t0:.1f}s)")
    man = m["manifest"]
    if man.get("source"):
        metrics = man.get("provenance", {}).get("metrics", {})
        how = {"shipped": "copied from the shipped checkpoint", "trained": "trained here"}[man["source"]]
        print(f"  {args.model}: {how}; training took {metrics.get('train_seconds', float('nan')):.0f}s"
              f"{' (when shipped)' if man['source'] == 'shipped' else ''}"
              + (f"; identical to the shipped checkpoint: {man['matches_shipped']}" if "matches_shipped" in man
                 else ""))
        print_quality(man.get("quality", []))
    if args.export:
        out = export_model(model_dir, args.export)
        print(f"  exported to {out}")
    return 0
