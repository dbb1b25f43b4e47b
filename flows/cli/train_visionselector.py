"""``atr train-visionselector``: train the VisionSelector peer's scorer through a frozen model."""

from __future__ import annotations

import time

from pipeline.errors import UserError

from .common import MODEL_HELP, add_command, add_compute_options, preflight


def train_visionselector_parser(sub, common) -> None:
    p = add_command(
        sub, common, "train-visionselector",
        help="train the VisionSelector peer's scorer through a frozen model (for --strategies visionselector)",
        description="Train VisionSelector's light scorer (Zhu et al., arXiv 2510.16598) end to end through the "
                    "frozen model: the tower, projector and LLM never change; the scorer rates the projected "
                    "tokens of each image, a differentiable top-k keeps --ratio of them (soft in training), and "
                    "the loss is the LLM's next-token loss on the answer plus a BCE between the soft and the "
                    "hard top-k, whose weight grows from 0.1 to 3.0 (curriculum annealing). Data: the train "
                    "splits of synthetic-ocr and synthetic-scene (never val or test). Writes "
                    "visionselector.safetensors and visionselector.json (provenance: family, tokens per crop, "
                    "channels, ratio, steps, data, seconds, the model and its stage key) to --out. Use it with "
                    "atr eval --strategies visionselector --option visionselector.checkpoint=DIR/"
                    "visionselector.safetensors; without the option, eval uses the shipped checkpoint that fits "
                    "the model (tiny-trained, tiny-ov-trained). About 2-3 minutes per tiny model on 2 CPU cores "
                    "at the defaults.",
        epilog="examples:\n  atr train-visionselector --model tiny-trained --out vs-next\n"
               "  atr train-visionselector --model tiny-ov-trained --steps 300 --ratio 0.1 --out vs-ov\n"
               "  atr eval --model tiny-trained --strategies full,visionselector "
               "--option visionselector.checkpoint=vs-next/visionselector.safetensors")
    p.add_argument("--model", default="tiny-trained",
                   help=MODEL_HELP + " (default: tiny-trained; the data are the tiny world's synthetic images)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="directory to write visionselector.safetensors and visionselector.json into")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 600)")
    p.add_argument("--ratio", type=float, default=None,
                   help="the one training ratio: the share of each image's tokens the soft top-k keeps "
                        "(default: 0.2, the reference's); the scorer is then used at every budget")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 16)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default: 3e-3)")
    p.add_argument("--ocr", type=int, default=None,
                   help="synthetic-ocr train-split samples to train on (default: 2000)")
    p.add_argument("--scene", type=int, default=None,
                   help="synthetic-scene train-split samples to train on (default: 1000)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: 0)")
    add_compute_options(p, dtype=False)


def cmd_train_visionselector(home, args) -> int:
    import hashlib
    from pathlib import Path

    from pipeline.device import compute
    from pipeline.families import family_of
    from pipeline.loading import load_model
    from pipeline.visionselector import CHECKPOINT, PROVENANCE, VisionSelectorConfig, save_scorer, train_visionselector

    from storage.stages import code_version

    from ..present import progress
    from ..stages.prepare_model import prepare_model, read_provenance

    user = {"steps": args.steps, "ratio": args.ratio, "batch_size": args.batch_size, "lr": args.lr,
            "train_ocr": args.ocr, "train_scene": args.scene, "seed": args.seed}
    config = VisionSelectorConfig(**{k: v for k, v in user.items() if v is not None})  # bad values: one line
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    preflight(args.model)
    device, _ = compute(args.device, "auto")
    t0 = time.perf_counter()
    result = prepare_model(home, args.model)  # a plain stage call (cached), as atr ask does
    model, processor = load_model(str(result.model_dir), dtype="float32", device=device)
    family = family_of(model.config)
    progress.enable(True)
    with progress.phases() as update:
        scorer, metrics = train_visionselector(model, processor, config, progress=update)
    weights = sorted(Path(result.model_dir).glob("*.safetensors"))
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.read_bytes())
    shipped = read_provenance(Path(result.model_dir)) or {}
    provenance = {
        "strategy": "visionselector", "peer": "Zhu et al., arXiv 2510.16598",
        "code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": args.model, "prepare_model_key": result.key, "family": family.name,
                  "weights_sha256": digest.hexdigest()[:16],
                  **({"config_hash": shipped["config_hash"]} if "config_hash" in shipped else {})},
        "tokens_per_crop": family.tokens_per_crop(model.config), "channels": model.config.vision_config.hidden_size,
        "training_ratio": config.ratio, "config": config.to_dict(), "config_hash": config.hash(),
        "data": config.data(), "device": device,
        "metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    path = save_scorer(out, scorer, model, provenance)
    m = metrics
    print(f"train-visionselector: {args.model} ({family.label}) in {time.perf_counter() - t0:.1f}s "
          f"(training {m['train_seconds']:.1f}s: {m['steps']} steps x {m['batch_size']} images = "
          f"{m['samples_seen']} seen of {m['samples']} train-split samples; data {m['data_seconds']:.1f}s)")
    print(f"  ratio {config.ratio}  lm loss {m['lm_loss_first']:.3f} -> {m['lm_loss_last']:.3f}  "
          f"bce {m['bce_first']:.3f} -> {m['bce_last']:.3f}  scorer {m['parameters']} parameters")
    print(f"  checkpoint  {path}")
    print(f"  provenance  {out / PROVENANCE}")
    print(f"  use it      atr eval --model {args.model} --strategies visionselector "
          f"--option visionselector.checkpoint={out / CHECKPOINT}")
    return 0
