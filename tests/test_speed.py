"""``atr speed`` end to end on the tiny preset (real model, stages, DuckDB, MLflow), and its timing helpers.

No test asserts a wall-clock time: only that the figures are written, consistent
with each other and with the FLOPs model.
"""

from __future__ import annotations

import time

import duckdb
import pytest
import torch

from flows.cli import main
from pipeline.speed import LoadSampler, interleaved, median, peak_memory, spread


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("speed-home")
    argv = ["speed", "--home", str(home), "--model", "tiny", "--retentions", "0.5,0.25", "--repeats", "1",
            "--warmup", "0", "--extract-images", "4", "--batch-size", "2", "--shard-size", "2", "--ttft",
            "--selector-training", "16x64", "--selector-batch", "3", "--selector-steps", "2"]
    assert main(argv) == 0
    con = duckdb.connect(str(home / "results.duckdb"), read_only=True)
    rows = con.execute("SELECT run_id, name, retention, measured_speedup, ideal_speedup, value, unit "
                       "FROM bench_results").fetchall()
    runs = con.execute("SELECT run_id, flow, status, mlflow_run_id FROM runs WHERE flow = 'bench'").fetchall()
    con.close()
    return home, rows, runs


def _by(rows):
    return {(r[1], r[2]): {"measured": r[3], "ideal": r[4], "value": r[5], "unit": r[6]} for r in rows}


def test_speed_writes_rows_a_run_and_a_plot(speed_run, capsys):
    home, rows, runs = speed_run
    assert len(runs) == 1 and runs[0][2] == "completed" and runs[0][3]
    run_id = runs[0][0]
    assert {r[0] for r in rows} == {run_id}
    by = _by(rows)
    for name in ("prefill/full/seconds", "prefill/visual_tokens", "memory/peak_bytes/full", "memory/kv_cache_bytes",
                 "ttft/full/seconds"):
        assert (name, 1.0) in by, name
    for r in (0.5, 0.25):
        for name in ("prefill/pruned/seconds", "prefill/measured_over_ideal/causal", "prefill/measured_over_ideal/fastv",
                     "prefill/measured_over_ideal/square", "selector/seconds_per_image", "selector/share_predicted",
                     "memory/peak_bytes/pruned", "ttft/pruned/seconds"):
            assert (name, r) in by, (name, r)
    for name in ("extract/images_per_second/stage", "extract/images_per_second/bare_tower", "extract/cached_over_cold",
                 "selector/projected_share/llava-v1.6-vicuna-7b", "load/other_cores_mean", "load/trustworthy",
                 "prefill/text_only/seconds", "load/prefill/trustworthy", "load/extract/other_cores_mean"):
        assert (name, None) in by, name
    plot = home / "reports" / f"bench-{run_id}" / "speedup.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((home / "mlartifacts").rglob("speedup.png")), "plot not logged to MLflow"
    assert not (home / "bench-scratch").exists(), "the scratch extract stage was left behind"


def test_speed_figures_are_consistent(speed_run):
    _, rows, _ = speed_run
    by = _by(rows)
    # tiny: 5 crops of 8x8 tokens for the 128x128 pinpoint: base 64 + 2x2 grid, 16 rows of 16 + a newline.
    assert by[("prefill/encoder_tokens", None)]["value"] == 5 * 64
    assert by[("prefill/visual_tokens", 1.0)]["value"] == 64 + 16 * 17
    full_tokens = by[("prefill/visual_tokens", 1.0)]["value"]
    previous = full_tokens
    for r in (0.5, 0.25):
        vis = by[("prefill/visual_tokens", r)]["value"]
        kept = 5 * round(r * 64)
        assert kept <= vis <= kept + 16 < previous  # kept tokens plus at most one newline per grid row
        previous = vis
        causal, fastv, square = (by[(f"prefill/measured_over_ideal/{c}", r)] for c in ("causal", "fastv", "square"))
        assert 1.0 < causal["ideal"] < square["ideal"] < fastv["ideal"]
        for x in (causal, fastv, square):
            assert x["measured"] > 0 and x["value"] == pytest.approx(x["measured"] / x["ideal"])
        pruned = by[("prefill/pruned/seconds", r)]
        assert pruned["ideal"] == pytest.approx(causal["ideal"]) and pruned["unit"] == "s"
        assert pruned["measured"] == pytest.approx(by[("prefill/full/seconds", 1.0)]["value"] / pruned["value"])
        assert 0 < by[("selector/share_predicted", r)]["value"]
        assert by[("memory/peak_bytes/pruned", r)]["value"] < by[("memory/peak_bytes/full", 1.0)]["value"]
    for r in (1.0, 0.5, 0.25):
        # The K/V tensors the model really cached equal the FLOPs model's KV-cache bytes.
        assert by[("memory/kv_cache_bytes", r)]["value"] == by[("memory/kv_cache_bytes_model", r)]["value"] > 0
    assert 0 < by[("extract/cached_over_cold", None)]["value"] < 1
    assert by[("extract/images_per_second/stage", None)]["value"] > 0
    assert 0.005 < by[("selector/projected_share/llava-v1.6-vicuna-7b", None)]["value"] < 0.01
    assert by[("load/trustworthy", None)]["value"] in (0.0, 1.0)


def test_speed_times_every_strategy_at_equal_budgets(speed_run):
    from pipeline.strategies import pruners

    _, rows, _ = speed_run
    by = _by(rows)
    full_ttft = by[("select/full/ttft_seconds", 1.0)]["value"]
    assert full_ttft > 0
    for r in (0.5, 0.25):
        timed = [s for s in pruners() if s != "visionselector"]  # timed only when named: its checkpoint fits no bench
        sent = {s: by[(f"select/{s}/tokens", r)]["value"] for s in timed}
        assert set(sent.values()) == {5 * round(r * 64)}, sent  # every strategy sends what random sends
        for s in timed:
            ms, ttft = by[(f"select/{s}/ms_per_image", r)], by[(f"select/{s}/ttft_seconds", r)]
            assert ms["unit"] == "ms" and ms["value"] > 0
            assert ttft["measured"] == pytest.approx(full_ttft / ttft["value"])
            vis = by[(f"select/{s}/visual_tokens", r)]["value"]
            assert sent[s] <= vis <= sent[s] + 16  # plus at most one newline per grid row


def test_speed_times_selector_training_against_the_flops_model(speed_run):
    from pipeline.flops import SelectorDims, selector_parameters, selector_training_flops

    home, rows, runs = speed_run
    by = _by(rows)
    dims = SelectorDims(tokens=16, channels=64)
    row = {name.rsplit("/", 1)[-1]: by[(name, None)] for name, r in by if name.startswith("selector_training/16x64/")
           and name.count("/") == 2}
    assert row["parameters"]["value"] == selector_parameters(dims) and row["batch_size"]["value"] == 3
    assert row["flops_per_crop"]["value"] == selector_training_flops(dims, 1)
    step = row["seconds_per_step"]["value"]
    assert row["crops_per_second"]["value"] == pytest.approx(3 / step)
    assert row["achieved_flops_per_second"]["value"] == pytest.approx(selector_training_flops(dims, 3) / step)
    assert row["torch_threads"]["value"] == torch.get_num_threads() and row["bf16_autocast"]["value"] == 0.0
    assert row["peak_bytes"]["value"] is None  # counted on CUDA only
    # The default schedule, 2000 steps x 64 crops, at the measured rate and on an H100 at 40 % of its bf16 peak.
    assert by[("selector_training/16x64/projected_crops", None)]["value"] == 128_000
    measured = by[("selector_training/16x64/projected_seconds/measured", None)]["value"]
    assert measured == pytest.approx(selector_training_flops(dims, 128_000) / row["achieved_flops_per_second"]["value"])
    gpu = by[("selector_training/16x64/projected_seconds/h100_bf16_at_40pct", None)]
    assert gpu["unit"] == "s" and gpu["value"] == pytest.approx(selector_training_flops(dims, 128_000) / (0.4 * 989e12))
    assert ("load/selector_training/trustworthy", None) in by
    import json

    summary = json.loads((home / "reports" / f"bench-{runs[0][0]}" / "summary.json").read_text())
    assert summary["selector_training"]["16x64"]["projection"]["passes"] == 1.28


def test_speed_prints_the_selector_training_projection():
    from flows.present.tables import duration, selector_training_lines

    x = {"tokens": 576, "channels": 1024, "d_model": 1024, "heads": 16, "layers": 3, "reconstructor_layers": 3,
         "parameters": 77_812_737, "batch_size": 2, "autocast": False, "steps": 2, "warmup": 1, "device": "cpu",
         "threads": 1, "crops_per_second": 0.25, "flops_per_second": 72.25e9, "flops_per_crop": 289.0e9,
         "projection": {"steps": 2000, "batch_size": 64, "crops": 128_000, "passes": 1.28,
                        "seconds_measured": 512_000.0, "gpu": "H100", "gpu_utilization": 0.4,
                        "gpu_peak_flops": 989e12, "seconds_gpu": 93.5}}
    (line,) = selector_training_lines({"next": x}, {})
    assert "measured 0.25 crops/s at 72 GFLOP/s (cpu, 1 thread;" in line
    assert line.endswith("100K COCO crops at the default schedule (2000 steps × 64 = 128,000 crops, 1.28 passes) "
                         "≈ 5.9 days here; on an H100 at 40% of 989 TFLOP/s bf16 ≈ 94 s")
    assert "not measured" in selector_training_lines(None, {})[0]
    assert [duration(s) for s in (5.0, 95.0, 600.0, 9000.0, 200_000.0)] == ["5.00 s", "95 s", "10.0 min", "2.5 h",
                                                                            "2.3 days"]


@pytest.mark.parametrize("argv, needle", [
    (["--selector-training", "next,12xc"], "--selector-training: unknown shape '12xc'; valid: next, ov, none"),
    (["--selector-batch", "0"], "--selector-batch must be >= 1, got 0"),
    (["--retentions", "0,0.5"], "retention must be in (0, 1], got 0"),
    (["--retentions", "1.5"], "retention must be in (0, 1], got 1.5"),
    (["--retentions", "half"], "'half' is not a number"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--strategies", "random,fastv"], "unknown strategy 'fastv'; valid: random, selector, attention"),
])
def test_speed_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    assert main(["speed", "--home", str(tmp_path / "h"), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "h" / "results.duckdb").exists()  # refused before any run is recorded


def test_speed_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["speed", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--retentions", "--repeats", "--warmup", "--extract-images", "--extract-repeats",
                "--batch-size",
                "--shard-size", "--ttft", "--load-threshold", "--strategies", "--selector-training",
                "--selector-batch", "--selector-steps", "--selector-autocast"):
        assert opt in out


NOTE = "note: `atr bench` is now `atr speed`; the old name goes in the next release"


def test_the_old_name_bench_runs_atr_speed_with_one_note(tmp_path, capsys):
    """``atr bench`` (the name before ``atr speed``) parses the same options and runs the same command,
    after one note line on stderr; ``atr speed`` prints no note."""
    assert main(["bench", "--home", str(tmp_path / "h"), "--repeats", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0] == NOTE and sum("note:" in line for line in err) == 1, err
    assert err[-1] == "error: --repeats must be >= 1, got 0", err
    assert main(["speed", "--home", str(tmp_path / "h"), "--repeats", "0"]) == 2
    assert "note:" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--load-threshold" in capsys.readouterr().out


def test_interleaved_runs_rounds_in_order_after_warmup():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, repeats=0)
    assert median([3.0, 1.0, 2.0]) == 2.0 and spread([1.0, 2.0, 3.0]) == 1.0


def test_peak_memory_counts_live_tensors_only():
    weight = torch.randn(256, 512)

    def work():
        a = torch.randn(1000, 256)          # 1 MB, freed before the end
        b = a @ weight                      # 2 MB
        view = weight.t()                   # a view of a pre-existing tensor: no new bytes
        del a
        b.add_(1.0)                         # in place: no new bytes
        return b.sum() + view[0, 0]

    with torch.inference_mode():
        peak = peak_memory(work)
    assert peak >= (1000 * 256 + 1000 * 512) * 4
    assert peak < (1000 * 256 + 1000 * 512) * 4 + 4096


def test_load_sampler_sees_this_process_apart_from_others():
    with LoadSampler(interval=0.1) as sampler:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            sum(i * i for i in range(1000))
    rep = sampler.report
    assert rep.samples >= 3 and rep.cpus >= 1
    assert rep.own_cores is not None and rep.own_cores > 0.5  # the busy loop is ours, not "other" load
    assert rep.other_cores is not None and rep.other_cores >= 0
    assert rep.trustworthy == (rep.other_cores <= rep.threshold)
    assert bool(rep.warnings) != rep.trustworthy


def test_feature_loader_reads_every_crop_once_in_workers(tmp_path):
    import numpy as np

    from storage.loader import feature_loader
    from storage.shards import iter_features, write_shard

    rng = np.random.default_rng(0)
    shards, expected = [], []
    for s in range(3):
        samples = []
        for i in range(4):
            feats = rng.standard_normal((1 + (i % 2), 16, 8)).astype(np.float16)
            samples.append((f"s{s}x{i}", feats, {"image_id": f"img{s}-{i}", "crops": feats.shape[0]}))
        shards.append(write_shard(tmp_path / f"feats-{s:06d}.tar", samples))
    manifest = {"shards": shards, "features": {"dtype": "float16", "tokens_per_crop": 16, "feature_dim": 8},
                "config": {"crops": "all"}}
    expected = sorted(c.tobytes() for smp in iter_features(tmp_path, manifest) for c in smp.features)
    loader = feature_loader(tmp_path, manifest, batch_size=2, workers=2, repeat=False, drop_last=False,
                            buffer_size=4)
    batches = list(loader)
    assert all(b.dtype == torch.float16 and b.shape[1:] == (16, 8) for b in batches)
    got = sorted(c.numpy().tobytes() for b in batches for c in b)
    assert got == expected and len(got) == 18
    # One process and two workers read the same crops; a held-out filter applies in the workers too.
    single = feature_loader(tmp_path, manifest, batch_size=4, workers=0, repeat=False, drop_last=False)
    assert sorted(c.numpy().tobytes() for b in single for c in b) == expected
    only = feature_loader(tmp_path, manifest, batch_size=1, workers=2, repeat=False,
                          keep_image=_first_images)
    assert sum(b.shape[0] for b in only) == 3 * (1 + 2)  # images *-0 (1 crop) and *-1 (2 crops)


def _first_images(image_id: str) -> bool:
    return image_id.endswith(("-0", "-1"))


def test_selector_runs_on_all_crops_of_a_batch_in_one_forward(tiny_model):
    from PIL import Image

    from pipeline.prune import encode_images
    from pipeline.selector import SelectorConfig, TokenSelector
    from pipeline.strategies import Context, keep_mask, keep_masks

    model, processor = tiny_model
    images = [Image.new("RGB", size, colour) for size, colour in
              (((256, 64), "red"), ((64, 64), "blue"), ((160, 150), "white"), ((64, 256), "green"))]
    for i, im in enumerate(images):  # some structure, so the logits differ between tokens
        im.paste((0, 0, 0), (4 * i, 4 * i, 30 + 4 * i, 20 + 4 * i))
    feats = [f.features for f in encode_images(model, processor, images)]
    assert sorted({f.shape[0] for f in feats}) == [3, 4, 5]  # images with different crop counts
    torch.manual_seed(0)
    selector = TokenSelector(SelectorConfig(n_heads=4), feats[0].shape[1], feats[0].shape[2]).eval()
    calls = []
    selector.selector.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for budget in ("per-crop", "global"):
        calls.clear()
        batched = keep_masks("selector", feats, 0.25, budget, Context(selector=selector))
        assert calls == [sum(f.shape[0] for f in feats)]  # one selector forward over every crop
        alone = [keep_mask("selector", f, 0.25, budget, Context(selector=selector)) for f in feats]
        assert all(torch.equal(a, b) for a, b in zip(alone, batched))
    # Random draws from the generator in the same order as one call per image.
    a = keep_masks("random", feats, 0.5, context=Context(generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    b = [keep_mask("random", f, 0.5, context=Context(generator=g)) for f in feats]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert keep_masks("none", feats, 0.5) == [None] * 4
