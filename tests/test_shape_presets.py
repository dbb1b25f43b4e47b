"""The real-shape presets (``shape-next-mistral``, ``shape-ov-qwen2``): the real towers, processors and chat
templates with a one-layer LM and random weights, saved by ``atr prepare-model`` in the llava-hf layout.

The slow test runs ``prepare-model -> extract -> train -> eval -> mask`` through the real CLI, each command in
its own process (its wall time and peak RSS are printed), on real photos (matplotlib's and scikit-learn's
sample images) and a DocVQA-size page (1700 x 2200), and checks every strategy's visual-token counts against
the stock processor and the budgets, and ``atr mask``'s geometry against ``crop_layout``. On 2 shared CPUs
with one torch thread it took 6 minutes for NeXT and 16 for OneVision, whose eval peaks at 14 GB
(docs/performance.md has each stage's figures). No trimmed end-to-end version runs in the
default suite: ``prepare-model`` alone takes 25-90 s here (random init and a 1.6 GB write); the default suite checks the
presets' shapes on the meta device and ``save_shape`` on a shrunken preset instead.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

RETENTION = 0.25
# The expected figures of each preset: tokens per crop, feature width, crop side, and the pinpoints' source.
SHAPES = {
    "shape-next-mistral": {"tokens": 576, "width": 1024, "crop": 336, "tower_layers": 24, "lm": "MistralModel"},
    "shape-ov-qwen2": {"tokens": 729, "width": 1152, "crop": 384, "tower_layers": 26, "lm": "Qwen2Model"},
}


def photos() -> list[Path]:
    """Real photos shipped with installed packages (matplotlib always; scikit-learn's when installed). The
    second one lands in the 50 % held-out split of ``atr train`` (its id's hash bucket is below 50), the first
    one does not."""
    import matplotlib

    found = [Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"]
    try:
        import sklearn

        found.append(Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg")
    except ImportError:
        found.append(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "Minduka_Present_Blue_Pack.png")
    return [p for p in found if p.is_file()]


def atr_measured(args: list[str], env: dict, timeout: int = 1500) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MB) of `atr args` in a fresh interpreter."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-4000:])
    return out.stdout, seconds, int(out.stderr.strip().splitlines()[-1]) / 1024


def stage_dirs(home: Path, stage: str) -> list[Path]:
    return sorted(p for p in (home / "stages" / stage).iterdir() if (p / "_manifest.json").is_file())


def stock_image_tokens(model_dir: Path, image, interpolation_off: bool) -> int:
    """<image> tokens the stock processor expands one prompt to (with the model's grid interpolation turned
    off through the processor's public setting where the family has one)."""
    from pipeline.families import family_of
    from pipeline.loading import load_model_config, load_processor

    cfg = load_model_config(model_dir)
    processor = load_processor(model_dir)
    off = family_of(cfg).off_value(cfg) if interpolation_off else None
    if off:
        processor.vision_aspect_ratio = off
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "What is it?"}]}],
                                           add_generation_prompt=True)
    ids = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0]
    return int((ids == cfg.image_token_index).sum())


def meta_model(cfg):
    """The model of ``cfg`` on the meta device: its own ``pack_image_features``, no weights."""
    import torch

    from pipeline.families import family_of

    with torch.device("meta"):
        return family_of(cfg).model_class()(cfg)


def image_valid_tokens(model, cfg, image, exp):
    """(crops, L) bool: the tokens of each crop of ``image`` that survive unpadding (pipeline.prune.valid_tokens)."""
    from pipeline.extract import crop_layout
    from pipeline.prune import valid_tokens

    w, h = image.size
    grid = crop_layout(w, h, exp["crop"], cfg.image_grid_pinpoints).grid
    return valid_tokens(model, 1 + grid[0] * grid[1], exp["tokens"], (h, w))


@pytest.mark.parametrize("preset, params, lm_params", [
    ("shape-next-mistral", 805_275_648, 218_112_000), ("shape-ov-qwen2", 1_738_247_200, 233_057_792)])
def test_the_real_towers_and_a_one_layer_lm(preset, params, lm_params):
    """The real tower and projector, one LM layer at the real width and vocabulary (meta device: no memory)."""
    from flows.stages.prepare_model import model_spec
    from pipeline.builders import on_meta
    from pipeline.presets import SHAPE_PRESETS, SIZED_PRESETS

    model = on_meta(SHAPE_PRESETS[preset])
    real = on_meta(next(p for p in SIZED_PRESETS.values() if p.mirrors == SHAPE_PRESETS[preset].mirrors))
    assert sum(p.numel() for p in model.parameters()) == params
    assert type(model.model.language_model).__name__ == SHAPES[preset]["lm"]
    assert len(model.model.language_model.layers) == 1
    assert sum(p.numel() for p in model.model.language_model.layers.parameters()) == lm_params
    for part in ("vision_tower", "multi_modal_projector"):  # the tower and projector are the checkpoint's
        assert [(n, p.shape) for n, p in getattr(model.model, part).named_parameters()] == \
            [(n, p.shape) for n, p in getattr(real.model, part).named_parameters()]
    assert model.lm_head.weight.shape == real.lm_head.weight.shape  # the real vocabulary
    kind, identity = model_spec(preset)
    assert kind == "shape" and identity["shape"]["text_layers"] == 1


def test_save_shape_writes_a_checkpoint_that_loads_like_a_real_one(tmp_path):
    """A shrunken shape preset through save_shape: llava-hf files, bf16 on disk, float32 after loading, the same
    seeded weights every build."""
    import dataclasses

    import torch
    from safetensors import safe_open

    from pipeline.builders import save_shape
    from pipeline.loading import load_model
    from pipeline.presets import SHAPE_PRESETS

    small = dataclasses.replace(SHAPE_PRESETS["shape-next-mistral"], name="small", text_hidden=64, text_heads=4,
                                text_kv_heads=2, text_intermediate=128, vocab_size=512, vision_hidden=32,
                                vision_layers=2, vision_heads=2, vision_intermediate=64)
    for d in ("a", "b"):
        save_shape(small, tmp_path / d)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= set(files), files
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    model, processor = load_model(tmp_path / "a", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.text_config.num_hidden_layers == 1 and model.config.text_config.rms_norm_eps == 1e-5
    assert processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                        "text": "Q"}]}]) == "[INST] <image>\nQ [/INST]"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # OneVision's stages take about 25 minutes on one thread here
@pytest.mark.parametrize("preset", list(SHAPES))
def test_real_shapes_end_to_end(preset, tmp_path, cli_env):
    from PIL import Image

    from pipeline.extract import crop_layout
    from pipeline.loading import load_model_config
    from pipeline.strategies.core import budget_counts
    from test_eval_memory import page_png, write_docvqa

    exp = SHAPES[preset]
    home = tmp_path / "home"
    env = {**cli_env, "ATR_HOME": str(home), "ATR_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pics = photos()
    assert len(pics) >= 2
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in pics[:2]:
        Image.open(p).convert("RGB").save(folder / (p.stem + ".png"))
    page = page_png(0)
    photo_bytes = (folder / (pics[0].stem + ".png")).read_bytes()
    data = write_docvqa(tmp_path / "docvqa.parquet", 2, [page, photo_bytes])  # a DocVQA-size page, then a photo
    figures: dict[str, tuple[float, float]] = {}

    # prepare-model: config.json + safetensors + processor files in the llava-hf layout, no sized marker
    out, *figures["prepare-model"] = atr_measured(["prepare-model", "--model", preset], env)
    (model_dir,) = stage_dirs(home, "prepare-model")
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names, names
    assert any(n.endswith(".safetensors") for n in names) and "atr_sized_preset.json" not in names
    cfg = load_model_config(model_dir)
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_config.hidden_size) == (exp["tower_layers"], exp["width"])
    assert cfg.text_config.num_hidden_layers == 1

    # extract: every crop of two real photos, (crops, L, C) per photo, crops as crop_layout says
    out, *figures["extract"] = atr_measured(["extract", "--model", preset, "--images", str(folder), "--limit", "2",
                                             "--crops", "all", "--batch-size", "2"], env)
    (extract_dir,) = stage_dirs(home, "extract")
    from storage.shards import iter_features

    samples = list(iter_features(extract_dir, json.loads((extract_dir / "_manifest.json").read_text())))
    assert len(samples) == 2
    for s in samples:
        w, h = s.meta["size"]
        layout = crop_layout(w, h, exp["crop"], cfg.image_grid_pinpoints)
        assert list(layout.grid) == s.meta["grid"]
        assert s.features.shape == (1 + layout.grid[0] * layout.grid[1], exp["tokens"], exp["width"])

    # train: a few steps of the selector at the real dims
    out, *figures["train"] = atr_measured(["train", "--features", extract_dir.name, "--retentions", str(RETENTION),
                                           "--steps", "2", "--batch-size", "4", "--warmup-steps", "1",
                                           "--held-out-percent", "50"], env)
    (train_dir,) = stage_dirs(home, "train")

    # eval: every strategy at one retention on the page and the photo
    out, *figures["eval"] = atr_measured(["eval", "--model", preset, "--selector", train_dir.name, "--benchmark",
                                          "docvqa_val", "--data", str(data), "--limit", "2", "--retentions",
                                          str(RETENTION), "--seeds", "1", "--batch-size", "1"], env)
    tokens: dict[tuple[str, float], list[int]] = {}
    stock_recorded = []
    for d in stage_dirs(home, "eval"):
        c = json.loads((d / "_manifest.json").read_text())["config"]
        rows = json.loads((d / "samples.json").read_text())
        tokens[c["strategy"], c["retention"]] = [r["visual_tokens"] for r in rows]
        if all(r.get("stock_visual_tokens") is not None for r in rows):
            stock_recorded.append([r["stock_visual_tokens"] for r in rows])
    strategies = {s for s, _ in tokens}
    assert {"full", "none", "random", "selector", "attention", "diversity", "visionzip", "hired", "divprune",
            "cdpruner"} <= strategies, strategies
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in (page, photo_bytes)]
    stock = [stock_image_tokens(model_dir, im, interpolation_off=False) for im in images]
    stock_off = [stock_image_tokens(model_dir, im, interpolation_off=True) for im in images]
    full = tokens["full", 1.0]
    assert full == stock_off  # what the stock processor sends (interpolation off where the model has it)
    assert tokens["none", 0.0] == [0, 0]
    # Budgets: each image's kept tokens are K = sum over crops of round(r * valid tokens), the same for every
    # strategy; the LLM also sees the newline of each grid row that keeps a token, at most all of them.
    model = meta_model(cfg)
    for i, (image, f) in enumerate(zip(images, full)):
        valid = image_valid_tokens(model, cfg, image, exp)
        k = int(budget_counts(valid, RETENTION, "per-crop").sum())
        newlines = f - int(valid.sum())
        assert newlines >= 0
        for (strategy, r), v in tokens.items():
            if r == RETENTION:
                assert k <= v[i] <= k + newlines, (strategy, i, v[i], k, newlines)
    for rows_stock in stock_recorded:  # eval's own stock count, where it records one, is the stock processor's
        assert rows_stock == stock, (rows_stock, stock)

    # mask: the JSON's crops are crop_layout's boxes, one token grid per crop, k = round(r * valid)
    out, *figures["mask"] = atr_measured(["mask", "--model", preset, "--selector", train_dir.name, "--image",
                                          str(folder / (pics[0].stem + ".png")), "--retentions", str(RETENTION),
                                          "--json"], env)
    mask = json.loads(out)
    w, h = images[1].size
    layout = crop_layout(w, h, exp["crop"], cfg.image_grid_pinpoints)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    valid = image_valid_tokens(model, cfg, images[1], exp)
    ks = budget_counts(valid, RETENTION, "per-crop").tolist()
    assert len(mask["crops"]) == len(layout.boxes) == valid.shape[0]
    for i, (crop, box) in enumerate(zip(mask["crops"], layout.boxes)):
        assert crop["grid"] == [side, side] and crop["valid"] == int(valid[i].sum())
        assert crop["k"] == ks[i] and len(crop["kept"]) == ks[i] and all(valid[i, t] for t in crop["kept"])
        assert crop["box"] == pytest.approx(list(box), abs=1e-3)

    report = {"preset": preset, "stages": {k: {"seconds": round(v[0], 1), "peak_rss_mb": round(v[1])}
                                           for k, v in figures.items()},
              "tokens": {f"{s}@{r}": v for (s, r), v in sorted(tokens.items())},
              "stock_processor": stock, "stock_processor_interpolation_off": stock_off}
    print("\n" + json.dumps(report, indent=1))
    if os.environ.get("ATR_SHAPE_REPORT"):
        Path(os.environ["ATR_SHAPE_REPORT"]).with_suffix(f".{preset}.json").write_text(json.dumps(report, indent=1))
