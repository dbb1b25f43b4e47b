"""Stage cache keys change only when a stage's version is bumped on purpose.

A changed key makes every existing home recompute that stage and the ones after
it. The golden keys: the three home-independent keys of the default ``atr run``
(prepare-model, extract, train) and the key formulas of the eval chunks, the
report and the synthetic benchmark stage on fixed inputs.

- report: REPORT_VERSION 2 (issue 30: the frontier plot and rows per variant and threshold; version 1,
  a43732adfc352b19, was the key from before the layout moved, commit 2098605).
- prepare-model, extract, benchmark, train (the real-geometry tiny world): the
  synthetic images changed (GENERATOR_VERSION 2, DejaVu fonts, sizes that fit no
  pinpoint, and the font files' hash is an input), tiny-trained was retrained
  (TINYWORLD_VERSION 2) and the tiny schedule became 2000 steps at lr 4e-3;
  before: d4e8bc058126d036, 2bd43fe0c858a515, 523953cd1d7b7baa and
  61410984703304f0.
- train (TRAIN_VERSION 3: the reconstructor ends in a learned projection; the
  resolved device is an input; the tiny schedule's lr is 2e-3; the held-out comparison
  adds retention 1) and eval (EVAL_VERSION 2: budgets count valid
  tokens, the prompt keeps the tokenizer's BOS, the compute is an input) changed
  on purpose; before: 09430ba04dcbb4fc and 2345352157043801 / 97e68575ca5d9ab3 /
  ee8b15eac9fc336d.
- eval again (EVAL_VERSION 3: shards share one tower pass, a merged result's key
  records the shard size, random keeps are seeded per row); before:
  f68383022a24c89c / 0d728a5f92839dca / b4d92f138fa4803a.
- train again (TRAIN_VERSION 4: the held-out selector metrics choose through
  ``strategies.select``, and their ``random`` draws per crop as eval's ``random``
  does, so a cached train stage's random rows would be the old code's); the
  selector weights are unchanged, so eval keys (which take the checkpoint's
  sha256) stay; before: 8b759855d1b80712.
- the eval keys did not change when they moved to ``ResultKey`` (a frozen
  dataclass that makes its own keys, issue "extension"): the goldens below
  are the ones the positional ``chunk_key``/``result_key`` gave.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.stages.eval import ResultKey
from flows.stages.extract import plan_extract
from flows.stages.prepare_model import prepare_model_key
from flows.stages.report import report_key
from flows.stages.train import train_key
from pipeline.device import default_device
from pipeline.evaluate import EvalConfig, Pruning
from pipeline.run_config import RunConfig
from pipeline.train import tiny_schedule
from storage.stages import StageResult

PREPARE, EXTRACT, TRAIN = "1997ddafa39302bd", "0fb4d5fce44848ea", "a141afc2fa9d8269"


def test_the_default_run_keys_are_the_golden_ones():
    cfg = RunConfig()
    key, kind, _ = prepare_model_key(cfg.model)
    assert (key, kind) == (PREPARE, "trained")
    if default_device()[0] != "cpu":
        pytest.skip("the extract key records where it ran; the golden one is the CPU's")
    model = StageResult("prepare-model", PREPARE, Path("."), True, 0.0, {"model_dir": "."})
    assert plan_extract(model, cfg.extract).key == EXTRACT
    features = StageResult("extract", EXTRACT, Path("."), True, 0.0, {})
    assert train_key(features, tiny_schedule(cfg.train, cfg.model, set())) == TRAIN


@pytest.mark.parametrize("args, golden", [
    (("m" * 16, "d" * 16, None, "synthetic-ocr", "full", 1.0, 0), "6b4b9305aae467b4"),
    (("m" * 16, "d" * 16, "s" * 16, "synthetic-scene", "selector", 0.25, 0), "ad57f44c7566ca76"),
    (("m" * 16, "d" * 16, None, "synthetic-ocr", "random", 0.1, 2), "a9d13e6a3e098a50"),
])
def test_eval_chunk_keys_are_the_golden_ones(args, golden):
    model, data, selector, benchmark, strategy, retention, seed = args
    cfg = EvalConfig()
    key = ResultKey(benchmark, Pruning(strategy, retention, seed, cfg.budget), cfg.limit, model, data,
                    selector=selector)
    assert key.chunk_key(cfg.shard_size) == golden


def test_eval_shard_result_keys_are_the_golden_ones():
    key = ResultKey("synthetic-ocr", Pruning("full", 1.0, 0), EvalConfig().limit, "m" * 16, "d" * 16)
    assert [key.shard_key(a, b) for a, b in ((0, 100), (100, 200))] == ["cd0d84c596ce4063", "6dd249836663da3d"]


def test_strategy_options_enter_the_key_only_when_changed():
    """An ablation switch is part of the key (issue "extension": they were module globals a test flipped,
    outside every key); its default value leaves the golden keys as they were."""
    def key(options):
        return ResultKey("synthetic-scene", Pruning("visionzip", 0.25, 0, "per-crop", options), 300, "m" * 16,
                         "d" * 16).chunk_key(100)

    assert key({}) == key({"cls": True, "merge": "reference"})
    assert len({key({}), key({"cls": False}), key({"merge": "average"}), key({"cls": False, "merge": "average"})}) == 4


def test_report_and_benchmark_keys_are_unchanged(tmp_path):
    from flows.stages.benchmark import synthetic_benchmark
    from storage.home import Home

    assert report_key("tiny-trained", "t" * 16, ["b", "a"])[0] == "38bda47752e27d2a"
    path = synthetic_benchmark(Home.resolve(tmp_path).ensure(), "synthetic-ocr", "test", 3)
    assert path.parent.name == "07ac550511e4ac1f" and path.name == "synthetic-ocr-test.parquet"
