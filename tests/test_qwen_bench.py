"""Real-size Qwen presets and ``atr speed`` on Qwen: bench-qwen25-vl-7b and bench-qwen3-vl-8b built on the meta
device with the published parameter counts, their sized dirs (config + processor, no weights) materialized seeded,
the Qwen cost model checked against torch's FLOP counter, and ``atr speed`` on the tiny Qwen presets giving the
NeXT bench's rows."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.builders import SIZED_MARKER, build_tiny, on_meta
from pipeline.flops import lm_prefill_flops, qwen_dims, qwen_tower_flops
from pipeline.presets import PRESETS, SIZED_PRESETS


# Published totals: the hub's parameter count of Qwen/Qwen2.5-VL-7B-Instruct (numParameters 8292166656) and its
# vision tower (676550144, as scripts that freeze model.visual print it); Qwen/Qwen3-VL-8B-Instruct's safetensors
# total (BF16 8767123696). See the presets' docstrings for the sources of every dimension.
@pytest.mark.parametrize("name, total, tower, lm_class, special", [
    ("bench-qwen25-vl-7b", 8_292_166_656, 676_550_144, "Qwen2_5_VLTextModel", [7, 15, 23, 31]),
    ("bench-qwen3-vl-8b", 8_767_123_696, 576_388_336, "Qwen3VLTextModel", [8, 16, 24]),
])
def test_the_meta_build_has_the_published_dimensions_and_parameter_count(name, total, tower, lm_class, special):
    preset = SIZED_PRESETS[name]
    model = on_meta(preset)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.model.visual.parameters()) == tower
    assert type(model.model.language_model).__name__ == lm_class
    cfg = model.config
    assert cfg.model_type == preset.family.model_type
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)
    vis = cfg.vision_config
    blocks = vis.fullatt_block_indexes if name.startswith("bench-qwen25") else vis.deepstack_visual_indexes
    assert list(blocks) == special and vis.out_hidden_size == cfg.text_config.hidden_size
    if name == "bench-qwen3-vl-8b":  # one DeepStack merger per listed block, beside the main one
        assert len(model.model.visual.deepstack_merger_list) == 3


@pytest.mark.parametrize("name", ["bench-qwen25-vl-7b", "bench-qwen3-vl-8b"])
def test_prepare_model_writes_config_processor_and_marker_only(session_home, name):
    from flows.stages.prepare_model import prepare_model
    from pipeline.loading import load_model_config, load_processor

    result = prepare_model(session_home, name)
    files = {p.name for p in result.path.iterdir()}
    assert {SIZED_MARKER, "config.json"} <= files and not any(f.endswith(".safetensors") for f in files)
    assert sum(p.stat().st_size for p in result.path.iterdir()) < 2_000_000
    marker = json.loads((result.path / SIZED_MARKER).read_text())
    assert marker["family"] == SIZED_PRESETS[name].family.name and marker["name"] == name
    cfg = load_model_config(result.path)
    preset = SIZED_PRESETS[name]
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size) == (preset.text_layers, preset.text_hidden)
    processor = load_processor(result.path)
    # the saved config's image and vision start/end ids are the tiny tokenizer's: the prompt's ids are the ones
    # the model looks for
    tok = processor.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids(processor.image_token)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    size = dict(processor.image_processor.size)
    assert (size["shortest_edge"], size["longest_edge"]) == (preset.min_pixels, preset.max_pixels)
    # the published preprocessor_config.json's normalisation: OpenAI CLIP's for Qwen2.5-VL, 0.5 for Qwen3-VL
    norm = {"bench-qwen25-vl-7b": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
            "bench-qwen3-vl-8b": ([0.5] * 3, [0.5] * 3)}[name]
    assert (list(processor.image_processor.image_mean), list(processor.image_processor.image_std)) == norm
    d = result.manifest["describe"]
    assert d["family"] == preset.family.name and d["vision_layers"] == preset.vision_layers


def _small(name: str):
    """A sized Qwen preset shrunk to seconds on a CPU (the real ones: 15.4 / 16.3 GiB in bf16)."""
    preset = SIZED_PRESETS[name]
    blocks = {"fullatt_block_indexes": (1,)} if name.startswith("bench-qwen25") else {"deepstack_visual_indexes": (0,)}
    return dataclasses.replace(preset, name="small", text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=2,
                               text_intermediate=128, mrope_section=(2, 3, 3), vision_hidden=32, vision_layers=2,
                               vision_heads=2, vision_intermediate=64, vocab_size=512, min_pixels=64 * 64,
                               max_pixels=224 * 224, **blocks)


@pytest.mark.parametrize("name", ["bench-qwen25-vl-7b", "bench-qwen3-vl-8b"])
def test_a_sized_qwen_dir_materializes_seeded_and_prefills(name, tmp_path):
    """What the real presets do on CUDA, on a shrunk one: materialized in bf16, the same weights every load, the
    processor's image tokens the model's own, a prefill through the speed harness's inputs."""
    from pipeline.builders import save_sized
    from pipeline.evaluate import chat_prompt
    from pipeline.loading import load_model
    from pipeline.prune import encode_images, visual_embeddings
    from pipeline.speed import input_length, prompt_inputs

    save_sized(_small(name), tmp_path)
    a, processor = load_model(tmp_path, dtype="bfloat16", device="cpu", allow_cpu=True)
    b, _ = load_model(tmp_path, dtype="bfloat16", device="cpu", allow_cpu=True)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8))
    prompt = chat_prompt(processor, "What is written in the image?", True)
    with torch.inference_mode():
        feats = encode_images(a, processor, [image])[0]
        kept = visual_embeddings(a, feats)
        x = prompt_inputs(a, processor, prompt, None, None, kept)
        text = prompt_inputs(a, processor, prompt, None, None)
        logits = a(**x, logits_to_keep=1).logits
    assert torch.isfinite(logits.float()).all()
    # every merged token of the image is one LLM position, as the stock processor counts them
    stock = processor(images=[image], text=[prompt], return_tensors="pt")
    assert input_length(x) == stock["input_ids"].shape[1] and input_length(x) - input_length(text) == kept.shape[0]
    with pytest.raises(Exception, match="for timing on a CUDA device; on the CPU pass --allow-cpu"):
        load_model(tmp_path, dtype="bfloat16", device="cpu")


@pytest.mark.parametrize("name", ["tiny-qwen25", "tiny-qwen3"])
def test_the_qwen_cost_model_is_torchs_flop_count(name):
    """Tower FLOPs per image follow its patch grid (Qwen2.5-VL: windowed blocks cost the sum of each window's
    square, full blocks the whole square), the LLM's per position: both equal torch's FLOP counter on the real
    modules (eager attention, whose QK^T and AV the counter sees; the LM's square convention, which eager runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, processor = build_tiny(PRESETS[name])
    model.set_attn_implementation("eager")
    dims = qwen_dims(model.config)
    assert dims.vision.window == (8 if name == "tiny-qwen25" else 0)  # 4 x 4 merged tokens of 2 x 2 patches
    for h, w in ((208, 96), (64, 64), (144, 208)):
        image = Image.fromarray(np.zeros((h, w, 3), np.uint8))
        enc = processor.image_processor(images=[image], return_tensors="pt")
        t, rows, cols = enc["image_grid_thw"][0].tolist()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        assert counter.get_total_flops() == qwen_tower_flops(dims.vision, rows, cols, t)["total"], (h, w)
    ids = torch.randint(10, 300, (1, 50))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    assert counter.get_total_flops() == lm_prefill_flops(dims.lm, 50, "square")["total"]


def test_the_7b_windows_save_tower_flops_and_the_families_answer_flops_dims():
    """Qwen2.5-VL-7B on the speed image (1344 x 1680 px: 96 x 120 patches, 2,880 merged tokens): 28 of its 32
    blocks attend within 8 x 8-patch windows, so attention costs a fraction of a full-attention tower's."""
    from pipeline.flops import QwenDims
    from pipeline.speed import DYNAMIC_SPEED_IMAGE

    cfg = on_meta(SIZED_PRESETS["bench-qwen25-vl-7b"]).config
    dims = SIZED_PRESETS["bench-qwen25-vl-7b"].family.flops_dims(cfg)
    assert isinstance(dims, QwenDims) and dims.projector_in == 4 * 1280 and dims.lm.kv_heads == 4
    h, w = DYNAMIC_SPEED_IMAGE
    rows, cols = h // 14, w // 14
    assert (rows // 2) * (cols // 2) == 2880 == SIZED_PRESETS["bench-qwen25-vl-7b"].family.visual_tokens(cfg, (h, w)).total
    windowed = qwen_tower_flops(dims.vision, rows, cols)
    full = qwen_tower_flops(dataclasses.replace(dims.vision, window=0), rows, cols)
    assert windowed["attention"] * 5 < full["attention"] and windowed["linear"] == full["linear"]
    patches = rows * cols
    assert full["attention"] == 32 * 4 * 1280 * patches ** 2
    assert windowed["attention"] == 4 * 1280 * (4 * patches ** 2 + 28 * patches * 64)  # every window 8 x 8 here
    cfg3 = on_meta(SIZED_PRESETS["bench-qwen3-vl-8b"]).config
    dims3 = SIZED_PRESETS["bench-qwen3-vl-8b"].family.flops_dims(cfg3)
    assert dims3.vision.mergers == 4 and dims3.vision.window == 0 and dims3.lm.e == 128


@pytest.fixture(scope="module", params=["tiny-qwen25", "tiny-qwen3"])
def qwen_speed_run(request, tmp_path_factory):
    from flows.cli import main

    home = tmp_path_factory.mktemp("speed-qwen")
    argv = ["speed", "--home", str(home), "--model", request.param, "--retentions", "0.5,0.25", "--repeats", "1",
            "--warmup", "0", "--extract-images", "2", "--batch-size", "2", "--shard-size", "2", "--ttft",
            "--selector-training", "none"]
    assert main(argv) == 0
    con = duckdb.connect(str(home / "results.duckdb"), read_only=True)
    rows = con.execute("SELECT name, retention, measured_speedup, ideal_speedup, value, unit FROM bench_results")\
        .fetchall()
    con.close()
    return request.param, {(r[0], r[1]): {"measured": r[2], "ideal": r[3], "value": r[4], "unit": r[5]}
                           for r in rows}


def test_atr_speed_on_qwen_gives_the_next_bench_rows(qwen_speed_run):
    """The rows the NeXT bench writes (tests/test_speed.py), from a Qwen model: prefill full vs pruned with the FLOPs
    limits, memory, TTFT, the selector, every strategy the family runs (HiRED, which needs crops, left out of the
    default list), extraction through the stage against the bare tower."""
    name, by = qwen_speed_run
    for row in ("prefill/full/seconds", "prefill/visual_tokens", "memory/peak_bytes/full", "memory/kv_cache_bytes",
                "ttft/full/seconds", "prefill/flops/causal"):
        assert (row, 1.0) in by, row
    for r in (0.5, 0.25):
        for row in ("prefill/pruned/seconds", "prefill/measured_over_ideal/causal", "selector/seconds_per_image",
                    "selector/share_predicted", "memory/peak_bytes/pruned", "ttft/pruned/seconds",
                    "select/visionzip/ttft_seconds", "select/divprune/ms_per_image", "select/cdpruner/tokens"):
            assert (row, r) in by, (row, r)
    for row in ("extract/images_per_second/stage", "extract/images_per_second/bare_tower", "extract/cached_over_cold",
                "prefill/text_tokens", "prefill/encoder_tokens", "prefill/text_only/seconds", "load/trustworthy"):
        assert (row, None) in by, row
    assert not any(n.startswith("select/hired/") for n, _ in by)
    # the speed image (1344 x 1680) within the tiny preset's max_pixels (224 x 224): 12 x 15 merged tokens, each
    # one LLM position; pruning keeps that fraction of them, and the KV cache holds exactly text + kept positions
    full = by[("prefill/visual_tokens", 1.0)]["value"]
    assert full == by[("prefill/encoder_tokens", None)]["value"] == 180
    text = by[("prefill/text_tokens", None)]["value"]
    for r in (1.0, 0.5, 0.25):
        assert by[("prefill/visual_tokens", r)]["value"] == round(180 * r)
        assert by[("memory/kv_cache_bytes", r)]["value"] == by[("memory/kv_cache_bytes_model", r)]["value"]
    lm = qwen_dims(build_tiny(PRESETS[name])[0].config).lm
    assert by[("prefill/flops/causal", 0.25)]["value"] == lm_prefill_flops(lm, int(text) + 45)["total"]
    assert by[("select/visionzip/visual_tokens", 0.25)]["value"] == 45


def test_a_cpu_speed_run_of_a_real_size_qwen_is_refused_in_one_line(cli_env):
    from conftest import assert_one_line_errors

    assert_one_line_errors([
        (["speed", "--model", "bench-qwen25-vl-7b", "--device", "cpu"], "bench-qwen25-vl-7b has 8.3 B parameters"),
        (["speed", "--model", "bench-qwen3-vl-8b", "--device", "cpu"], "bench-qwen3-vl-8b has 8.8 B parameters"),
    ], cli_env)


@pytest.mark.parametrize("name, per_token", [
    # KV: 2 x 28 layers x 4 KV heads x 128; activations: 6 x 3584 + 3 x 18944; bf16
    ("bench-qwen25-vl-7b", (2 * 28 * 4 * 128 + 6 * 3584 + 3 * 18944) * 2),
    # KV: 2 x 36 x 8 x 128 (head_dim 128 from the config); activations: 6 x 4096 + 3 x 12288
    ("bench-qwen3-vl-8b", (2 * 36 * 8 * 128 + 6 * 4096 + 3 * 12288) * 2),
])
def test_generate_batches_size_qwen_tokens_from_the_text_config(name, per_token):
    """eval's --batch-size auto on a Qwen model: bytes per token from ``text_config`` (GQA, head_dim), whose KV
    part is the FLOPs model's KV cache per position."""
    from pipeline.flops import kv_cache_bytes
    from pipeline.memory import token_bytes

    cfg = on_meta(SIZED_PRESETS[name]).config
    assert token_bytes(cfg.text_config, 2) == per_token
    lm = qwen_dims(cfg).lm
    assert kv_cache_bytes(lm, 1, 2) == 2 * lm.layers * lm.kv_heads * lm.e * 2


def test_gpu_check_runs_atr_speed_on_both_qwen_presets(tmp_path):
    """.ci/gpu-check --dry-run (no GPU): the steps it would run, the two Qwen ones among them, and every model it
    names a preset."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    assert subprocess.run(["bash", "-n", ".ci/gpu-check"], cwd=repo).returncode == 0
    proc = subprocess.run(["bash", ".ci/gpu-check", "--dry-run", str(tmp_path / "out")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {line.split("\t")[0]: line.split("\t")[2] for line in proc.stdout.splitlines() if line.count("\t") == 2}
    for name in ("bench-qwen25-vl-7b", "bench-qwen3-vl-8b"):
        assert f"atr speed --model {name} --device cuda" in steps[f"speed-{name.removeprefix('bench-')}"]
    assert proc.stdout.splitlines()[-1].endswith("all presets")
    # two parts, each within one 10-minute device call: the Qwen runs alone, the rest alone
    timeouts = {}
    for part in ("llava", "qwen"):
        out = subprocess.run(["bash", ".ci/gpu-check", "--dry-run", "--part", part, str(tmp_path / part)], cwd=repo,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        rows = [line.split("\t") for line in out.stdout.splitlines() if line.count("\t") == 2]
        timeouts[part] = {name: int(limit.rstrip("s")) for name, limit, _ in rows}
        assert sum(timeouts[part].values()) <= 570
    assert set(timeouts["qwen"]) == {"speed-qwen25-vl-7b", "speed-qwen3-vl-8b", "bench-results"}
    assert set(timeouts["llava"]) | set(timeouts["qwen"]) == set(steps)
    bad = subprocess.run(["bash", ".ci/gpu-check", "--dry-run", "--part", "gpu"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu-check: --part must be llava or qwen, got 'gpu'"
