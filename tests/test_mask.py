"""`atr mask`: selector vs random kept tokens drawn over one image, with real components."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import one_line as _one_line
from flows.cli.mask import cmd_mask, mask_parser
from pipeline.errors import UserError
from pipeline.prune import valid_tokens
from pipeline.strategies import Context, budget_counts, keep_mask
from storage.selectors import resolve_selector
from pipeline.extract import FeatureExtractor
from pipeline.images import open_source
from pipeline.selector import SelectorConfig
from storage.home import Home

TOKENS = CHANNELS = 64


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS, help="home")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="verbose")
    parser = argparse.ArgumentParser(prog="atr", parents=[common])
    mask_parser(parser.add_subparsers(dest="command", required=True), common)
    return parser


def run_mask(home: Home, *argv: str) -> int:
    """What flows.cli.main does for a subcommand: parse, resolve the home, call the handler."""
    if "--model" not in argv:  # these selectors are trained on the `tiny` preset's features
        argv = ("--model", "tiny", *argv)
    args = _parser().parse_args(["mask", "--home", str(home.root), *argv])
    return cmd_mask(Home.resolve(args.home), args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A real selector checkpoint (30 steps on tiny features of synthetic docs) + a test image."""
    from pipeline.train import Trainer, selector_tensors
    from storage.checkpoints import save_checkpoint

    model, processor = tiny_model
    images = [item.load().image for item in open_source("synthetic:docs").items(16)]
    feats = np.concatenate(FeatureExtractor(model, processor, crops="all")(images)).astype(np.float32)
    cfg = SelectorConfig(retention=0.25, steps=30, batch_size=16, lr=1e-3, warmup_steps=5)
    trainer = Trainer(cfg, tokens=TOKENS, channels=CHANNELS)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            yield feats[rng.choice(len(feats), 16, replace=False)]

    # One thread: 30 tiny steps take ~3 s, while two spinning OpenMP threads on a shared
    # 2-CPU machine were measured at ~40 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        selector = trainer.fit(batches(), log_every=10)
    finally:
        torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("mask")
    ckpt = save_checkpoint(root / "selector-p0.25.safetensors", selector_tensors(selector),
                           {"config": cfg.to_dict(), "tokens": TOKENS, "channels": CHANNELS, "retention": 0.25})
    image_path = root / "doc.png"
    # A wide 249x118 doc (not a training image): it lands on the 192x64 canvas, base + a 1x3 grid whose
    # outer crops cover padding.
    wide = open_source("synthetic:docs", seed=7).items(20)[19].load().image
    assert wide.size == (249, 118)
    wide.save(image_path)
    return {"ckpt": ckpt, "image": image_path, "selector": selector, "root": root}


def test_json_lists_the_selectors_kept_tokens_per_crop(session_home, tiny_stage, tiny_model, trained, capsys,
                                                       tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(trained["image"]),
                    "--retention", "0.25", "--json") == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is exactly one JSON document
    assert not list(tmp_path.iterdir()), "--json alone writes no PNG"
    image = Image.open(trained["image"]).convert("RGB")
    w, h = image.size
    model, processor = tiny_model
    fx = FeatureExtractor(model, processor, crops="all")
    layout = fx.layout(w, h)
    assert len(data["crops"]) == len(layout.boxes) == 1 + layout.grid[0] * layout.grid[1] > 1
    assert data["crops"][0]["box"] == [0, 0, w, h]
    feats = torch.from_numpy(fx([image])[0])
    valid = valid_tokens(model, feats.shape[0], TOKENS, (h, w))
    ks = budget_counts(valid, 0.25, "per-crop").tolist()
    counts = valid.sum(1).tolist()
    assert counts[0] == TOKENS and min(counts) < TOKENS  # the base crop is whole; the outer grid crops pad
    assert ks == [round(0.25 * c) for c in counts] and data["k"] == ks and data["retention"] == 0.25
    expected = keep_mask("selector", feats, 0.25, "per-crop", Context(selector=trained["selector"]), valid)
    for i, crop in enumerate(data["crops"]):
        assert set(crop) == {"box", "grid", "valid", "k", "kept"}
        assert crop["grid"] == [8, 8] and crop["valid"] == counts[i] and crop["k"] == ks[i]
        np.testing.assert_allclose(crop["box"], layout.boxes[i], atol=1e-3)
        assert len(crop["kept"]) == ks[i] and crop["kept"] == sorted(crop["kept"])
        assert len(set(crop["kept"])) == ks[i] and all(valid[i, t] for t in crop["kept"])  # never padding
        assert crop["kept"] == expected[i].nonzero().flatten().tolist()
    assert len(data["random"]) == len(data["crops"])
    assert all(len(r["kept"]) == k and r["kept"] == sorted(r["kept"]) and all(valid[i, t] for t in r["kept"])
               for i, (r, k) in enumerate(zip(data["random"], ks)))
    assert [r["kept"] for r in data["random"]] != [c["kept"] for c in data["crops"]]


def test_png_has_one_row_per_crop_and_two_columns(session_home, tiny_stage, trained, capsys, tmp_path):
    out = tmp_path / "overlay.png"
    assert run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(trained["image"]),
                    "--retention", "0.25", "--out", str(out), "--seed", "3") == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and str(out) in line and "16/64" in line
    with Image.open(out) as png:
        png.load()
        assert png.format == "PNG"
        pw, ph = png.size
    crops = 1 + 3  # the wide image: base + a 1x3 grid
    assert 400 <= pw <= 1200 and ph > crops * 200 and ph > pw
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]  # no temp file left


def test_json_and_out_together_keep_stdout_pure_json(session_home, tiny_stage, trained, capsys, tmp_path):
    out = tmp_path / "both.png"
    assert run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(trained["image"]),
                    "--retention", "0.5", "--out", str(out), "--json") == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["k"][0] == 32 and all(len(c["kept"]) == c["k"] == round(0.5 * c["valid"]) for c in data["crops"])
    assert out.is_file() and str(out) in captured.err


def test_default_out_is_mask_png_in_the_current_directory(session_home, tiny_stage, trained, capsys, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(trained["image"]),
                    "--retention", "1") == 0
    assert (tmp_path / "mask.png").is_file()
    assert "64/64" in capsys.readouterr().out


def _fake_train_stage(parent: Path, key: str, trained) -> Path:
    """A complete train stage directory holding two selectors (p=0.25 and p=0.5)."""
    from storage.stages import MANIFEST

    stage = parent / key
    stage.mkdir(parents=True)
    for p in ("0.25", "0.5"):
        shutil.copy(trained["ckpt"], stage / f"selector-p{p}.safetensors")
        meta = json.loads(trained["ckpt"].with_suffix(".json").read_text())
        (stage / f"selector-p{p}.json").write_text(json.dumps({**meta, "retention": float(p)}))
    (stage / MANIFEST).write_text(json.dumps({"complete": True, "checkpoints": {
        "0.25": "selector-p0.25.safetensors", "0.5": "selector-p0.5.safetensors"}}))
    return stage


def test_selector_from_a_train_stage_by_hash_prefix_or_directory(tiny_stage, trained, tmp_path, capsys):
    # A home of its own, sharing the session's prepared tiny model (a cache hit, no rebuild).
    home = Home.resolve(tmp_path / "home").ensure()
    (home.stages / "prepare-model").mkdir(parents=True)
    (home.stages / "prepare-model" / tiny_stage.key).symlink_to(tiny_stage.path, target_is_directory=True)
    stage = _fake_train_stage(home.stages / "train", "ab12cd34ef567890", trained)
    assert resolve_selector(home, "ab12", 0.3) == stage / "selector-p0.25.safetensors"
    assert resolve_selector(home, "ab12cd34ef567890", 0.45) == stage / "selector-p0.5.safetensors"
    assert resolve_selector(home, str(stage), 1.0) == stage / "selector-p0.5.safetensors"
    out = tmp_path / "stage.png"
    assert run_mask(home, "--selector", "ab12", "--image", str(trained["image"]), "--retention", "0.4",
                    "--out", str(out)) == 0
    line = capsys.readouterr().out
    assert "selector-p0.5.safetensors" in line and "p=0.5" in line and out.is_file()

    from storage.stages import StageError

    with pytest.raises(StageError) as e:
        run_mask(home, "--selector", "ffff", "--image", str(trained["image"]), "--retention", "0.25",
                 "--out", str(tmp_path / "no.png"))
    assert isinstance(e.value, UserError) and "ffff" in _one_line(e.value)
    assert not (tmp_path / "no.png").exists()


def _user_error(exc_info) -> str:
    exc = exc_info.value
    assert isinstance(exc, UserError), f"{type(exc).__name__} would print a traceback"
    text = str(exc).strip()
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "nan", "abc"])
def test_retention_outside_0_1_is_refused_before_anything_is_written(session_home, trained, tmp_path, value):
    from pipeline.config import ConfigError

    out = tmp_path / "r.png"
    with pytest.raises(ConfigError) as e:
        run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(trained["image"]),
                 "--retention", value, "--out", str(out))
    assert "retention" in _user_error(e)
    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoint_is_refused(session_home, tiny_stage, trained, tmp_path):
    from storage.checkpoints import CheckpointError

    pt = tmp_path / "selector.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    out = tmp_path / "pt.png"
    with pytest.raises(CheckpointError) as e:
        run_mask(session_home, "--selector", str(pt), "--image", str(trained["image"]), "--retention", "0.25",
                 "--out", str(out))
    assert "safetensors" in _user_error(e)
    with pytest.raises(CheckpointError) as e:
        run_mask(session_home, "--selector", str(tmp_path / "gone.safetensors"), "--image", str(trained["image"]),
                 "--retention", "0.25", "--out", str(out))
    assert "no such checkpoint" in _user_error(e)
    assert not out.exists()


def test_checkpoint_for_another_encoder_width_is_refused(session_home, tiny_stage, trained, tmp_path):
    from storage.checkpoints import CheckpointError

    other = tmp_path / "selector-c32.safetensors"
    shutil.copy(trained["ckpt"], other)
    meta = json.loads(trained["ckpt"].with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**meta, "channels": 32}))
    out = tmp_path / "c.png"
    with pytest.raises(CheckpointError) as e:
        run_mask(session_home, "--selector", str(other), "--image", str(trained["image"]), "--retention", "0.25",
                 "--out", str(out))
    text = _user_error(e)
    assert "(L, C) = (64, 32)" in text and "this model's are (64, 64)" in text
    assert not out.exists()


def test_corrupt_or_missing_image_is_one_line(session_home, trained, tmp_path):
    from pipeline.images import BadImage

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    out = tmp_path / "i.png"
    with pytest.raises(BadImage) as e:
        run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(bad), "--retention", "0.25",
                 "--out", str(out))
    assert "bad.png" in _user_error(e)
    with pytest.raises(FileNotFoundError) as e:
        run_mask(session_home, "--selector", str(trained["ckpt"]), "--image", str(tmp_path / "nope.jpg"),
                 "--retention", "0.25", "--out", str(out))
    assert "nope.jpg" in _user_error(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["mask", "--help"])
    text = capsys.readouterr().out
    assert "--home" in text and "--selector" in text and "--json" in text
    sub = _parser()._subparsers._group_actions[0].choices["mask"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"mask {action.option_strings} has no help"
