"""Bad inputs end in one clear line and leave nothing half-written: images (through the
real `atr extract`), feature shards (through the real train stage), selector
checkpoints (through the real eval loader) and configs."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import ConfigError, ExtractConfig
from storage.home import Home
from storage.shards import ShardError, iter_features
from storage.stages import StageError, read_manifest

from conftest import assert_one_line_errors


def _atr(env, *args):
    """`atr args` with environment ``env``, in this process (tests/conftest.py atr_in_process)."""
    from conftest import atr_in_process

    return atr_in_process(args, env)


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "CMYK": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


# ------------------------------------------------------------------------------------ images

def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels but carries almost no data:
    what a decompression bomb looks like before anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _bad_png_crc(path: Path) -> None:
    _noise(16, 16, 3).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start:start + 4], "big")
    data[start + 8 + length] ^= 0xFF  # the IDAT CRC; the pixels themselves are intact
    path.write_bytes(bytes(data))


def _truncated_jpeg(path: Path) -> None:
    _noise(96, 64, 4).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:1500])


BAD_IMAGES = {  # file -> what the one warning line must say
    "bad/empty.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "bad/truncated.jpg": (_truncated_jpeg, "OSError"),
    "bad/bad_crc.png": (_bad_png_crc, "broken PNG file (bad header checksum in b'IDAT')"),
    "bad/text.jpg": (lambda p: p.write_text("this is a text file, not a JPEG\n"), "cannot identify image file"),
    "bad/bomb.png": (lambda p: p.write_bytes(_png_header_only(100_000, 100_000)),
                     "DecompressionBombError: image size (10000000000 pixels) exceeds limit of 64000000 pixels"),
    "bad/bomb_1x_to_2x.png": (lambda p: p.write_bytes(_png_header_only(9000, 8000)),
                              "DecompressionBombError: image size (72000000 pixels) exceeds limit of 64000000"),
    "bad/one_pixel.png": (lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p), "1x1 pixels is smaller than 2x2"),
}


def _odd_images(root: Path) -> dict[str, str]:
    """Decodable but unusual files, each with its conversion done by hand as an RGB PNG.
    Returns {odd file: by-hand file} (relative paths, the image ids)."""
    (root / "odd").mkdir()
    (root / "byhand").mkdir()
    _noise(40, 24, 1, "CMYK").save(root / "odd/cmyk.jpg", quality=95)
    assert Image.open(root / "odd/cmyk.jpg").mode == "CMYK"
    Image.open(root / "odd/cmyk.jpg").convert("RGB").save(root / "byhand/cmyk.png")

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    _noise(48, 20, 2).save(root / "odd/rotated.jpg", quality=95, exif=exif.tobytes())
    ImageOps.exif_transpose(Image.open(root / "odd/rotated.jpg")).convert("RGB").save(root / "byhand/rotated.png")

    grey = np.random.default_rng(5).integers(0, 65536, (30, 50), dtype=np.uint16)
    Image.fromarray(grey).save(root / "odd/grey16.png")
    assert Image.open(root / "odd/grey16.png").mode == "I;16"
    eight_bit = np.round(grey.astype(np.float64) / 257).astype(np.uint8)  # 0..65535 -> 0..255
    Image.fromarray(eight_bit, "L").convert("RGB").save(root / "byhand/grey16.png")

    # A corrupt EXIF block: PIL warns, the pixels decode; no warning line may reach the user.
    buf = io.BytesIO()
    _noise(32, 32, 6).save(buf, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12")
    (root / "odd/corrupt_exif.jpg").write_bytes(buf.getvalue())
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").save(root / "byhand/corrupt_exif.png")
    return {f"odd/{n}": f"byhand/{Path(n).stem}.png" for n in ("cmyk.jpg", "rotated.jpg", "grey16.png",
                                                                "corrupt_exif.jpg")}


def test_bad_images_are_skipped_in_one_line_each_and_odd_ones_match_hand_conversion(cli_env, tmp_path):
    """`atr extract` over a folder of every kind of bad image: it finishes, says one line per bad
    file, counts them in the manifest, and the decodable odd files give exactly the features of
    the same pixels converted by hand."""
    root = tmp_path / "images"
    (root / "bad").mkdir(parents=True)
    for rel, (write, _) in BAD_IMAGES.items():
        write(root / rel)
    pairs = _odd_images(root)
    _noise(64, 64, 7).save(root / "good.png")

    proc = _atr(cli_env, "extract", "--model", "tiny", "--images", str(root), "--limit", "0",
                "--batch-size", "1", "--shard-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(BAD_IMAGES), warnings
    for rel, (_, says) in BAD_IMAGES.items():
        (line,) = [w for w in warnings if f"{root / rel}:" in w]
        assert line.startswith(f"warning: skipped {root / rel}: ") and says in line, line

    (stage,) = [p for p in (Path(cli_env["ATR_HOME"]) / "stages" / "extract").iterdir() if p.is_dir()]
    m = read_manifest(stage)
    n_good = 1 + 2 * len(pairs)
    assert m["counts"] == {"images": len(BAD_IMAGES) + n_good, "samples": n_good, "skipped": len(BAD_IMAGES),
                           "shards": 4}
    assert sorted(s["image_id"] for s in m["skipped"]) == sorted(BAD_IMAGES)
    assert not list(stage.rglob("*.tmp")) and not (stage / "_shards").exists()

    samples = {s.meta["image_id"]: s for s in iter_features(stage, m)}
    assert set(samples) == {"good.png", *pairs, *pairs.values()}
    for odd, by_hand in pairs.items():
        a, b = samples[odd], samples[by_hand]
        assert a.meta["size"] == b.meta["size"] and a.meta["grid"] == b.meta["grid"], odd
        assert a.features.dtype == np.float16 and np.array_equal(a.features, b.features), odd
    assert samples["odd/rotated.jpg"].meta["size"] == [20, 48]  # EXIF rotation applied
    assert not np.array_equal(samples["odd/cmyk.jpg"].features, samples["odd/rotated.jpg"].features[:1])


# ------------------------------------------------------------------------------------ shards

@pytest.fixture(scope="module")
def feature_stage(session_home, tiny_stage):
    """A real extract stage (tiny, 12 synthetic docs, 3 shards of 4, base crops), built by the stage functions."""
    from flows.stages.extract import extract

    cfg = ExtractConfig(images="synthetic:docs", limit=12, shard_size=4, batch_size=4, crops="base")
    return extract(session_home, cfg, tiny_stage).path


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_tar(tar_path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


class _Unpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_member(index: int, fn):
    """Corruption that rewrites member ``index`` of the middle shard: fn(name, data) -> [(name, data), ...]."""
    def corrupt(stage: Path, marker: Path) -> None:
        shard = stage / "feats-000001.tar"
        members = _members(shard)
        name, data = members[index]
        _write_tar(shard, members[:index] + fn(name, data, marker) + members[index + 1:])
    return corrupt


def _feature(name, data, fn):
    array = np.load(io.BytesIO(data), allow_pickle=False)
    return [(name, _npy(fn(array)))]


def _edit_manifest(fn):
    def corrupt(stage: Path, marker: Path) -> None:
        m = json.loads((stage / "_manifest.json").read_text())
        fn(m)
        (stage / "_manifest.json").write_text(json.dumps(m))
    return corrupt


def _truncate(stage: Path, marker: Path) -> None:
    shard = stage / "feats-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # inside the first sample's feature member


def _flip_one_feature_byte(stage: Path, marker: Path) -> None:
    shard = stage / "feats-000001.tar"
    members = _members(shard)
    name, data = members[0]
    payload = bytearray(data)
    payload[-1] ^= 0x01  # still a finite fp16 value: only the manifest's sha256 can tell
    _write_tar(shard, [(name, bytes(payload))] + members[1:])


FEATURE_KEY = "s000000004"  # the first sample of feats-000001.tar (shard size 4)
SHARD = "feats-000001.tar"
BAD_SHARDS = {  # corruption -> the pieces the one error line must name
    "truncated tar": (_truncate, [SHARD, f"in member '{FEATURE_KEY}.feat.npy'"]),
    "pickle member .pkl": (_replace_member(1, lambda n, d, marker: [
        (n, d), (f"{FEATURE_KEY}.pkl", pickle.dumps(_Unpickled(str(marker))))]),
        [SHARD, f"member '{FEATURE_KEY}.pkl' has extension 'pkl'", "never pickle"]),
    "pickle member .pt": (_replace_member(1, lambda n, d, marker: [
        (n, d), (f"{FEATURE_KEY}.pt", pickle.dumps(_Unpickled(str(marker))))]),
        [SHARD, f"member '{FEATURE_KEY}.pt' has extension 'pt'"]),
    "member with ..": (_replace_member(1, lambda n, d, marker: [("../evil.json", d)]),
                       [SHARD, "member '../evil.json' has an unsafe path"]),
    "absolute member": (_replace_member(1, lambda n, d, marker: [("/tmp/evil.json", d)]),
                        [SHARD, "member '/tmp/evil.json' has an unsafe path"]),
    "object-dtype npy": (_replace_member(0, lambda n, d, marker: [(n, _npy(np.array([_Unpickled(str(marker))],
                                                                                     dtype=object)))]),
                         [SHARD, f"member '{FEATURE_KEY}.feat.npy' is not a plain numeric .npy"]),
    "NaN features": (_replace_member(0, lambda n, d, marker: _feature(n, d, lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 5, np.float16("nan"), a))),
        [SHARD, f"member '{FEATURE_KEY}.feat.npy' holds NaN or inf values"]),
    "inf features": (_replace_member(0, lambda n, d, marker: _feature(n, d, lambda a: np.where(
        np.arange(a.size).reshape(a.shape) == 7, np.float16("-inf"), a))),
                     [SHARD, f"member '{FEATURE_KEY}.feat.npy' holds NaN or inf values"]),
    "float32 features": (_replace_member(0, lambda n, d, marker: _feature(n, d, lambda a: a.astype(np.float32))),
                         [SHARD, f"member '{FEATURE_KEY}.feat.npy' has dtype float32, manifest says float16"]),
    "wrong width": (_replace_member(0, lambda n, d, marker: _feature(n, d, lambda a: a[..., :32])),
                    [SHARD, f"member '{FEATURE_KEY}.feat.npy' has shape (1, 64, 32), manifest says feature_dim=64"]),
    "manifest width": (_edit_manifest(lambda m: m["features"].update(feature_dim=128)),
                       ["feats-000000.tar", "member 's000000000.feat.npy' has shape (1, 64, 64), "
                                            "manifest says feature_dim=128"]),
    "manifest dtype": (_edit_manifest(lambda m: m["features"].update(dtype="float32")),
                       ["feats-000000.tar", "has dtype float16, manifest says float32"]),
    "one byte changed": (_flip_one_feature_byte, [SHARD, "differs from the manifest's", "corrupt or replaced"]),
    "absent shard": (lambda stage, marker: (stage / SHARD).unlink(),
                     ["manifest lists shards that are absent: feats-000001.tar"]),
    "missing manifest": (lambda stage, marker: (stage / "_manifest.json").unlink(),
                         ["no _manifest.json (not a complete stage output)"]),
}


def _corrupt_copy(feature_stage: Path, tmp_path: Path, kind: str) -> tuple[Home, str, Path]:
    home = Home.resolve(tmp_path / "home").ensure()
    stage = home.stages / "extract" / feature_stage.name
    shutil.copytree(feature_stage, stage)
    marker = tmp_path / "unpickled"
    BAD_SHARDS[kind][0](stage, marker)
    return home, feature_stage.name, marker


@pytest.mark.parametrize("kind", list(BAD_SHARDS))
def test_bad_shards_are_refused_by_the_train_stage_in_one_line(feature_stage, tmp_path, kind):
    from flows.stages.train import train
    from storage.stages import stage_result
    from pipeline.selector import SelectorConfig
    from pipeline.train import TrainConfig

    home, key, marker = _corrupt_copy(feature_stage, tmp_path, kind)
    cfg = TrainConfig(selector=SelectorConfig(steps=5, batch_size=4, warmup_steps=1))
    with pytest.raises((ShardError, StageError)) as info:
        train(home, cfg, stage_result(home, "extract", key))
    text = str(info.value)
    assert "\n" not in text and (info.value.__context__ is None or info.value.__suppress_context__)
    for piece in BAD_SHARDS[kind][1]:
        assert piece in text, (kind, text)
    if kind != "missing manifest":
        assert str(home.stages / "extract" / key) in text
    assert not marker.exists()  # nothing was unpickled
    train = home.stages / "train"
    assert not train.exists() or not [p for p in train.rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_bad_shards_reach_the_user_as_one_line(feature_stage, tmp_path, cli_env):
    home, key, _ = _corrupt_copy(feature_stage, tmp_path, "truncated tar")
    env = {**cli_env, "ATR_HOME": str(home.root)}
    assert_one_line_errors([(["train", "--features", key, "--steps", "5"],
                             f"feats-000001.tar: truncated or corrupt tar in member '{FEATURE_KEY}.feat.npy'")], env)


# ----------------------------------------------------------------------------- checkpoints

def _selector_checkpoint(path: Path, channels: int, tokens: int = 64, meta: dict | None = None) -> Path:
    from pipeline.selector import SelectorConfig
    from pipeline.train import Trainer, selector_tensors
    from storage.checkpoints import save_checkpoint

    cfg = SelectorConfig(n_heads=4)
    model = Trainer(cfg, tokens=tokens, channels=channels).model
    return save_checkpoint(path, selector_tensors(model), {"config": cfg.to_dict(), "tokens": tokens,
                                                           "channels": channels, "retention": 0.25, **(meta or {})})


def _pickled_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"weights": _Unpickled(str(marker))}, path)
    path.with_suffix(".json").write_text(json.dumps({"channels": 64, "tokens": 64, "config": {}}))
    return path


def test_checkpoints_are_refused_in_one_line_by_the_eval_loader(tiny_stage, tmp_path):
    from flows.stages.eval import eval_selector
    from storage.checkpoints import CheckpointError

    home = Home.resolve(tmp_path / "home").ensure()
    marker = tmp_path / "unpickled"
    good = _selector_checkpoint(tmp_path / "good.safetensors", channels=64)
    selector = eval_selector(home, str(good), 0.25, tiny_stage).selector  # the same width loads
    assert selector(torch.zeros(1, 64, 64)) is not None
    lying = _selector_checkpoint(tmp_path / "lying.safetensors", channels=32)
    meta = json.loads(lying.with_suffix(".json").read_text())
    lying.with_suffix(".json").write_text(json.dumps({**meta, "channels": 64}))
    (tmp_path / "garbage.safetensors").write_bytes(pickle.dumps(_Unpickled(str(marker))))
    (tmp_path / "garbage.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    partial = _selector_checkpoint(tmp_path / "partial.safetensors", channels=64)
    tensors = load_file(partial)
    save_file({k: v for k, v in tensors.items() if k != "reconstructor.ln.bias"}, partial)  # a tensor short; no embedded meta
    cases = {
        _selector_checkpoint(tmp_path / "c32.safetensors", channels=32):
            "selector was trained on features of shape (L, C) = (64, 32) (L tokens per crop, C encoder width), "
            "this model's are (64, 64)",
        _selector_checkpoint(tmp_path / "l16.safetensors", channels=64, tokens=16):
            "selector was trained on features of shape (L, C) = (16, 64) (L tokens per crop, C encoder width), "
            "this model's are (64, 64)",
        lying: "selector was trained on features of shape (L, C) = (64, 32)",  # the width inside the file decides
        partial: "cannot build a selector from it",
        tmp_path / "garbage.safetensors": "not a valid safetensors file",
    }
    for ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        cases[_pickled_checkpoint(tmp_path / f"pickled{ext}", marker)] = \
            "not a safetensors checkpoint (pickle-based formats are never loaded)"
    for path, says in cases.items():
        with pytest.raises(CheckpointError) as info:
            eval_selector(home, str(path), 0.25, tiny_stage)
        text = str(info.value)
        assert text.startswith(f"{path}: ") and says in text and "\n" not in text, text
    assert not marker.exists()


def test_checkpoint_refusals_reach_the_user_as_one_line(tiny_stage, tmp_path, cli_env):
    image = tmp_path / "doc.png"
    _noise(64, 64).save(image)
    wide = _selector_checkpoint(tmp_path / "c32.safetensors", channels=32)
    assert_one_line_errors([
        (["mask", "--model", "tiny", "--selector", str(wide), "--image", str(image), "--retention", "0.25"],
         "(L, C) = (64, 32) (L tokens per crop, C encoder width), this model's are (64, 64)"),
    ], cli_env)  # a pickled .pt through `atr mask`: tests/test_mask.py::test_pickle_checkpoint_is_refused


# --------------------------------------------------------------------------------- configs

def test_config_keys_and_values_are_refused_naming_the_key():
    from pipeline.evaluate import EvalConfig
    from pipeline.selector import SelectorConfig
    from pipeline.train import TrainConfig

    cases = [
        (ExtractConfig, {"shard_szie": 8}, "unknown extract config key 'shard_szie' (did you mean 'shard_size'?)"),
        (TrainConfig, {"retentoins": [0.5]}, "unknown train config key 'retentoins' (did you mean 'retentions'?)"),
        (TrainConfig, {"selector": {"temprature": 2.0}},
         "unknown selector config key 'temprature' (did you mean 'temperature'?)"),
        (EvalConfig, {"strategy": ["full"]}, "unknown eval config key 'strategy' (did you mean 'strategies'?)"),
        (ExtractConfig, {"limit": "ten"}, "extract config key 'limit' must be an integer or none, got 'ten'"),
        (SelectorConfig, {"steps": True}, "selector config key 'steps' must be an integer, got True"),
        (SelectorConfig, {"lr": "1e-3"}, "selector config key 'lr' must be a number, got '1e-3'"),
        (TrainConfig, {"retentions": 0.5}, "train config key 'retentions' must be a list, got 0.5"),
        (TrainConfig, {"selector": 3}, "train config key 'selector' must be a table of selector keys, got 3"),
        (EvalConfig, {"strategies": ["full", "fastv"]},
         "unknown strategy 'fastv'; valid: full, none, random, selector, attention, diversity"),
        (EvalConfig, {"benchmarks": ["docvqa"]}, "unknown benchmark 'docvqa'; valid: synthetic-ocr, synthetic-scene, "
                                                 "docvqa_val, infovqa_val, chartqa, textvqa_val, mmbench_en_dev, ai2d"),
        (EvalConfig, {"budget": "per-image"}, "unknown budget 'per-image'; valid: per-crop, global"),
    ]
    for retention in (0, -0.25, 1.5, float("nan"), float("inf")):
        cases += [(TrainConfig, {"retentions": [retention]}, "retention must be in (0, 1]"),
                  (EvalConfig, {"retentions": [0.25, retention]}, "retention must be in (0, 1]"),
                  (SelectorConfig, {"retention": retention}, "retention must be in (0, 1]")]
    for cls, data, says in cases:
        with pytest.raises(ConfigError) as info:
            cls.from_dict(data)
        assert says in str(info.value) and "\n" not in str(info.value), (data, str(info.value))


def test_config_file_mistakes_reach_the_user_as_one_line(tmp_path, cli_env):
    bad = tmp_path / "run.toml"
    bad.write_text('model = "tiny"\n[train]\nretentoins = [0.25]\n')
    assert_one_line_errors([(["run", "--config", str(bad)],
                             "unknown train config key 'retentoins' (did you mean 'retentions'?)")], cli_env)
    assert not (Path(cli_env["ATR_HOME"]) / "stages").exists() or \
        not list((Path(cli_env["ATR_HOME"]) / "stages").rglob("_manifest.json"))


# ------------------------------------------------------------------ the figure, through the CLI

def _outcome(proc: subprocess.CompletedProcess, needle: str, *, goes_on: bool = False) -> str:
    """'one line' when the command ends as promised, else 'traceback' or 'other'."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if "Traceback" in proc.stderr:
        return "traceback"
    if goes_on:
        warned = [line for line in lines if line.startswith("warning:") and needle in line]
        return "one line" if proc.returncode == 0 and len(warned) == 1 else "other"
    ok = proc.returncode == 2 and lines and lines[-1].startswith("error: ") and needle in lines[-1]
    return "one line" if ok else "other"


@pytest.mark.slow
def test_every_bad_input_through_the_cli(feature_stage, tmp_path, cli_env):
    """Each bad input of the issue, through the `atr` command a user would run: how many end in
    one clear line and how many in a traceback, per category."""
    from test_reliability_sql import REFUSED, SLOW_SQL

    from storage.results import ResultsStore

    tally: dict[str, dict[str, int]] = {}
    failures = []

    def count(category, what, outcome):
        tally.setdefault(category, {"one line": 0, "traceback": 0, "other": 0})[outcome] += 1
        if outcome != "one line":
            failures.append((category, what, outcome))

    # images: skipped with a warning by `atr extract`; refused by `atr ask`
    root = tmp_path / "images"
    (root / "bad").mkdir(parents=True)
    for rel, (write, _) in BAD_IMAGES.items():
        write(root / rel)
    _noise(64, 64, 7).save(root / "good.png")
    proc = _atr(cli_env, "extract", "--model", "tiny", "--images", str(root), "--limit", "0")
    for rel, (_, says) in BAD_IMAGES.items():
        count("images (atr extract: skipped)", rel, _outcome(proc, f"{root / rel}: ", goes_on=True))
        ask = _atr(cli_env, "ask", "--model", "tiny", "--image", str(root / rel), "--question", "what?")
        count("images (atr ask: refused)", rel, _outcome(ask, str(root / rel)))

    # shards and features: `atr train --features`
    for kind, (_, pieces) in BAD_SHARDS.items():
        home, key, marker = _corrupt_copy(feature_stage, tmp_path / kind.replace(" ", "_"), kind)
        proc = _atr({**cli_env, "ATR_HOME": str(home.root)}, "train", "--features", key, "--steps", "5")
        count("shards and features (atr train)", kind, _outcome(proc, pieces[-1]))
        assert not marker.exists()

    # checkpoints: `atr mask --selector`
    image = tmp_path / "doc.png"
    _noise(64, 64).save(image)
    marker = tmp_path / "unpickled"
    lying = _selector_checkpoint(tmp_path / "lying.safetensors", channels=32)
    lying.with_suffix(".json").write_text(json.dumps({**json.loads(lying.with_suffix(".json").read_text()),
                                                      "channels": 64}))
    (tmp_path / "garbage.safetensors").write_bytes(pickle.dumps(_Unpickled(str(marker))))
    checkpoints = {
        "another width C": (_selector_checkpoint(tmp_path / "c32.safetensors", channels=32), "(L, C) = (64, 32)"),
        "another L": (_selector_checkpoint(tmp_path / "l16.safetensors", channels=64, tokens=16), "(L, C) = (16, 64)"),
        "sidecar lies about C": (lying, "(L, C) = (64, 32)"),
        "pickle named .safetensors": (tmp_path / "garbage.safetensors", "not a valid safetensors file"),
        "missing file": (tmp_path / "nothing.safetensors", "no such checkpoint"),
    }
    for ext in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        checkpoints[f"pickle-based {ext}"] = (_pickled_checkpoint(tmp_path / f"sel{ext}", marker),
                                              "not a safetensors checkpoint")
    for what, (path, needle) in checkpoints.items():
        proc = _atr(cli_env, "mask", "--model", "tiny", "--selector", str(path), "--image", str(image),
                    "--retention", "0.25")
        count("checkpoints (atr mask)", what, _outcome(proc, needle))
    assert not marker.exists()

    # configs: `atr run --config` (TOML) and command-line values
    tomls = {
        "misspelt key": ('[train]\nretentoins = [0.25]\n', "did you mean 'retentions'?"),
        "misspelt nested key": ('[train.selector]\ntemprature = 2.0\n', "did you mean 'temperature'?"),
        "unknown section": ('[evaluate]\nlimit = 3\n', "unknown run config key 'evaluate'"),
        "wrong type": ('[extract]\nlimit = "ten"\n', "'limit' must be an integer"),
        "retention 1.5": ('[train]\nretentions = [1.5]\n', "retention must be in (0, 1]"),
        "retention 0": ('[eval]\nretentions = [0.0]\n', "retention must be in (0, 1]"),
        "unknown strategy": ('[eval]\nstrategies = ["fastv"]\n', "unknown strategy 'fastv'; valid: full"),
        "unknown benchmark": ('[eval]\nbenchmarks = ["docvqa"]\n', "unknown benchmark 'docvqa'; valid:"),
        "not TOML": ('[train\n', "not valid TOML"),
    }
    for what, (text, needle) in tomls.items():
        path = tmp_path / f"{what.replace(' ', '_')}.toml"
        path.write_text(text)
        count("configs (atr run --config)", what, _outcome(_atr(cli_env, "run", "--config", str(path)), needle))
    flags = {
        "train --retention 1.5": (["train", "--retention", "1.5"], "retention must be in (0, 1]"),
        "train --retention 0": (["train", "--retention", "0"], "retention must be in (0, 1]"),
        "train --retention nan": (["train", "--retention", "nan"], "retention must be in (0, 1]"),
        "eval --strategies bogus": (["eval", "--strategies", "bogus"], "unknown strategy 'bogus'; valid: full"),
        "eval --benchmark bogus": (["eval", "--benchmark", "bogus"], "unknown benchmark 'bogus'; valid:"),
        "eval --retentions 1.5": (["eval", "--retentions", "1.5"], "retention must be in (0, 1]"),
        "mask --retention -1": (["mask", "--selector", "x.safetensors", "--image", str(image), "--retention", "-1"],
                                "retention must be in (0, 1]"),
    }
    for what, (argv, needle) in flags.items():
        count("configs (command-line values)", what, _outcome(_atr(cli_env, *argv), needle))

    # SQL: `atr query`
    store = ResultsStore(Path(cli_env["ATR_HOME"]) / "results.duckdb")
    store.start_run("r1", "eval", "abc", "{}")
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    for name, (sql, _, _) in REFUSED.items():
        proc = _atr(cli_env, "query", sql.format(dir=tmp_path, secret=secret))
        count("SQL (atr query)", name, _outcome(proc, "atr query"))
    count("SQL (atr query)", "timeout", _outcome(_atr(cli_env, "query", "--timeout", "0.5", SLOW_SQL),
                                                 "query interrupted after the 0.5 s timeout"))

    width = max(len(c) for c in tally)
    print(f"\n{'category':{width}}  tried  one line  traceback  other")
    for category, t in tally.items():
        print(f"{category:{width}}  {sum(t.values()):5}  {t['one line']:8}  {t['traceback']:9}  {t['other']:5}")
    total = {k: sum(t[k] for t in tally.values()) for k in ("one line", "traceback", "other")}
    print(f"{'all':{width}}  {sum(total.values()):5}  {total['one line']:8}  {total['traceback']:9}  {total['other']:5}")
    assert failures == []
