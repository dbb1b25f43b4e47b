"""``atr extract``: vision-encoder features into WebDataset shards."""

from __future__ import annotations

import time

from .common import MODEL_HELP, add_command, add_compute_options, add_dask_options, on_dask, preflight


def extract_parser(sub, common) -> None:
    p = add_command(
        sub, common, "extract",
        help="extract vision-encoder features into WebDataset shards",
        description="Run the model's image processor and vision tower over an image source and "
                    "store, per image, the per-crop tensors LLaVA-NeXT feeds its projector "
                    "(vision_feature_layer, CLS dropped) as fp16 feat.npy (crops x L x C) in "
                    "feats-NNNNNN.tar shards, plus a json with crop grid, crop boxes and (synthetic "
                    "images) a per-token glyph mask. Interrupted runs resume; identical runs are "
                    "cache hits.")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--images", default="synthetic:docs",
                   help="image source: synthetic:docs (text-like), synthetic:scenes (shapes), or a folder of "
                        "jpg/png/webp searched recursively (default: synthetic:docs)")
    p.add_argument("--limit", type=int, default=256,
                   help="number of images; a folder is sampled deterministically (by --seed) when it holds more "
                        "(default: 256; 0 = the whole folder)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic images and folder sampling (default: 0)")
    p.add_argument("--crops", choices=["all", "base"], default="all",
                   help="all AnyRes crops (base + grid), or only the base crop as in the paper's selector "
                        "training (default: all)")
    p.add_argument("--qwen-features", choices=["premerger", "merged"], default="premerger",
                   help="families without crops (Qwen2.5-VL, Qwen3-VL): premerger, the tower's states before the "
                        "merger in 2 x 2 groups (1 x L x 4C per image: the paper's encoder output before the "
                        "projector), or merged, the merger's output (1 x L x D); see docs/qwen.md "
                        "(default: premerger)")
    p.add_argument("--batch-size", type=int, default=16, help="images per vision-tower batch (default: 16)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default: 64)")
    add_compute_options(p)
    add_dask_options(p)


def cmd_extract(home, args) -> int:
    from pipeline.config import ExtractConfig

    from ..orchestration.flows import extract_flow
    from ..present import progress

    cfg = ExtractConfig(images=args.images, limit=args.limit or None, seed=args.seed, crops=args.crops,
                        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                        model_dtype=args.dtype, qwen_features=args.qwen_features)
    preflight(args.model, cfg.images, cfg.seed)
    t0 = time.perf_counter()
    progress.enable(True)
    out = on_dask(extract_flow, args)(str(home.root), args.model, cfg.to_dict())
    wall = time.perf_counter() - t0
    ext = out["stages"][-1]
    m = ext["manifest"]
    c = m["counts"]
    f = m["features"]
    state = "cached" if ext["cached"] else "computed"
    rate = m.get("images_per_second")
    shape = (f"(1, L per image, {f['feature_dim']}; {f.get('qwen_features')})" if f.get("grid") == "dynamic"
             else f"(crops, {f['tokens_per_crop']}, {f['feature_dim']})")
    print(f"extract {state} in {ext['seconds']:.2f}s (wall {wall:.1f}s): {c['samples']} samples in "
          f"{c['shards']} shards, {c['skipped']} skipped; features {f['dtype']} {shape}"
          + (f"; {progress.rate_text(rate)}" if rate and not ext["cached"] else ""))
    print(f"  output  {ext['path']}")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0
