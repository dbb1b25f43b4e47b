"""One selector for every budget: the range-trained selector (issue 30, item 2).

Range validation, p drawn per batch within the range, the offset that moves the keep
ratio but not the ranking, the train stage's range checkpoint and its variant
resolution, exact resume with a range, and an old single-p checkpoint still loading.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, ExtractConfig
from pipeline.selector import SelectorConfig, TokenSelector
from pipeline.train import Callback, TrainConfig, Trainer, selector_from_checkpoint
from storage.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from storage.selectors import load_selector, resolve_selector

L, C = 16, 32
RANGE_CFG = SelectorConfig(n_heads=4, steps=40, batch_size=8, lr=3e-3, warmup_steps=2, retention_range=(0.05, 0.6))

# SelectorConfig().to_dict() as the code before retention_range wrote it into every checkpoint and stage key
OLD_SELECTOR_KEYS = ["batch_size", "betas", "d_model", "dropout", "ffn_mult", "grad_clip", "lr", "n_heads",
                     "reconstructor_layers", "retention", "seed", "selector_layers", "standardize", "steps",
                     "temperature", "warmup_steps", "weight_decay"]


def _batches(seed=0, n=1000):
    """Low-rank token features (learnable structure), deterministic."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, C)).astype(np.float32)
    for _ in range(n):
        yield rng.standard_normal((8, L, 4)).astype(np.float32) @ basis


@pytest.mark.parametrize("bad, words", [
    ((0.5, 0.5), "retention_range min 0.5 must be below max 0.5"),
    ((0.6, 0.2), "retention_range min 0.6 must be below max 0.2"),
    ((0.0, 0.5), "retention_range (0, 0.5) must lie in (0, 1]"),
    ((0.1, 1.5), "retention_range (0.1, 1.5) must lie in (0, 1]"),
    ((0.1,), "retention_range must be two numbers (min, max), got (0.1,)"),
])
def test_a_bad_range_is_refused_in_one_line_naming_the_values(bad, words):
    for build in (lambda: SelectorConfig(retention_range=bad), lambda: TrainConfig(retention_range=bad),
                  lambda: TrainConfig.from_dict({"retention_range": list(bad)})):
        with pytest.raises(ConfigError) as err:
            build()
        assert str(err.value) == words or str(err.value).startswith(words), str(err.value)
        assert "\n" not in str(err.value)


def test_cli_range_parser():
    from flows.cli.train import parse_retention_range

    assert parse_retention_range("0.05, 0.5") == (0.05, 0.5) and parse_retention_range(None) is None
    for bad in ("0.05", "0.1,0.2,0.3", "a,b"):
        with pytest.raises(ConfigError, match=r"^--retention-range: give two keep ratios MIN,MAX"):
            parse_retention_range(bad)
    with pytest.raises(ConfigError, match=r"min 0.5 must be below max 0.05"):
        TrainConfig(retention_range=parse_retention_range("0.5,0.05"))


def test_unset_range_leaves_config_dicts_as_they_were():
    assert sorted(SelectorConfig().to_dict()) == OLD_SELECTOR_KEYS
    d = TrainConfig().to_dict()
    assert "retention_range" not in d and sorted(d["selector"]) == OLD_SELECTOR_KEYS
    assert TrainConfig.from_dict(d) == TrainConfig()
    ranged = TrainConfig(retention_range=(0.05, 0.5))
    assert ranged.to_dict()["retention_range"] == [0.05, 0.5]
    assert TrainConfig.from_dict(json.loads(json.dumps(ranged.to_dict()))) == ranged
    # the range selector's config; the per-p ones never carry the range
    assert ranged.selector_for_range().retention_range == (0.05, 0.5)
    assert ranged.selector_for(0.25).retention_range is None and ranged.selector_for(0.25).retention == 0.25
    with pytest.raises(ConfigError, match=r"^set the range as \[train\] retention_range .*got selector "
                                          r"retention_range \(0.1, 0.5\)\)$"):
        TrainConfig.from_dict({"selector": {"retention_range": [0.1, 0.5]}})


def test_p_is_drawn_per_batch_within_the_range_from_the_seed_and_step_alone():
    trainer = Trainer(RANGE_CFG, L, C)
    draws = [trainer.batch_retention(s) for s in range(2000)]
    assert all(0.05 <= p <= 0.6 for p in draws)
    assert min(draws) < 0.06 and max(draws) > 0.59 and abs(np.mean(draws) - 0.325) < 0.01  # uniform
    again = Trainer(RANGE_CFG, L, C)
    before = torch.get_rng_state()
    assert [again.batch_retention(s) for s in range(50)] == draws[:50]  # a function of (seed, step)
    assert torch.equal(before, torch.get_rng_state())  # drawing p touches no global RNG
    other = Trainer(dataclasses.replace(RANGE_CFG, seed=1), L, C)
    assert [other.batch_retention(s) for s in range(50)] != draws[:50]
    assert Trainer(SelectorConfig(n_heads=4), L, C).batch_retention(0) is None  # single p: no draw

    class Log(Callback):
        rows: list = []

        def on_step(self, step, metrics):
            self.rows.append(metrics)

    log = Log()
    Trainer(RANGE_CFG, L, C).fit(_batches(), [log], log_every=1)
    assert [r["p"] for r in log.rows] == pytest.approx(draws[:40])


def test_the_offset_moves_the_keep_ratio_but_never_the_ranking():
    torch.manual_seed(0)
    model = Trainer(RANGE_CFG, L, C).fit(_batches())
    assert model.is_range and set(n for n, _ in model.named_parameters() if n.startswith("offset."))
    x = torch.from_numpy(next(_batches(seed=7)))
    with torch.no_grad():
        order = model.keep_logits(x).argsort(dim=1)
        means = []
        for p in (0.05, 0.1, 0.25, 0.5, 0.6):
            prob = model.keep_probability(x, p)
            assert torch.equal(prob.argsort(dim=1), order), p  # same ranking at every p
            means.append(prob.mean().item())
    # offset(p) starts as logit(p) and stays monotone here: the keep probability rises with p
    assert all(a < b for a, b in zip(means, means[1:])), means
    with pytest.raises(ConfigError, match=r"^this selector was trained on the retention range \[0.05, 0.6\]: give"):
        model.keep_probability(x)
    single = TokenSelector(SelectorConfig(n_heads=4), L, C)
    assert single.offset is None and not single.is_range
    assert torch.equal(single.keep_probability(x), torch.sigmoid(single.keep_logits(x)))


def test_resume_with_a_range_is_exact():
    class StopAt(Callback):
        def on_step(self, step, metrics):
            if step == 15:
                raise KeyboardInterrupt

    full = Trainer(RANGE_CFG, L, C)
    full.fit(_batches(), log_every=1)
    half = Trainer(RANGE_CFG, L, C)
    with pytest.raises(KeyboardInterrupt):
        half.fit(_batches(), [StopAt()], log_every=1)
    tensors, meta = half.state()
    json.dumps(meta)  # the resumable meta stays JSON
    resumed = Trainer(RANGE_CFG, L, C)
    resumed.load_state(tensors, meta)
    stream = _batches()
    for _ in range(resumed.step):
        next(stream)
    resumed.fit(stream, log_every=1)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_an_old_single_p_checkpoint_still_loads(tmp_path):
    torch.manual_seed(0)
    old = TokenSelector(SelectorConfig(n_heads=4), L, C).eval()
    tensors = {k: v.contiguous() for k, v in old.state_dict().items()}
    assert not any(k.startswith("offset") for k in tensors)
    config = {k: v for k, v in SelectorConfig(n_heads=4).to_dict().items()}
    assert sorted(config) == OLD_SELECTOR_KEYS
    path = save_checkpoint(tmp_path / "selector-p0.25.safetensors", tensors, {  # the meta the old code wrote
        "name": "selector-p0.25", "retention": 0.25, "config": config, "tokens": L, "channels": C, "steps": 1})
    loaded = load_selector(path, selector_from_checkpoint, expect_channels=C, expect_tokens=L)
    assert not loaded.selector.is_range
    x = torch.from_numpy(next(_batches(seed=3)))
    with torch.no_grad():
        assert torch.equal(loaded.selector.keep_logits(x), old.keep_logits(x))
    assert resolve_selector(None, str(path), 0.1) == path and resolve_selector(None, str(path), 0.1, "p0.25") == path
    with pytest.raises(CheckpointError) as err:
        resolve_selector(None, str(path), 0.1, "range")
    assert str(err.value) == (f"{path} was trained at one p (0.25), not on a range: variant=range needs a "
                              f"checkpoint from atr train --retention-range MIN,MAX")
    with pytest.raises(CheckpointError, match=r"was trained at p = 0.25, not at p = 0.5 \(variant=p0.5\)$"):
        resolve_selector(None, str(path), 0.1, "p0.5")
    with pytest.raises(CheckpointError, match=r"^selector variant must be nearest, range or p<P>"):
        resolve_selector(None, str(path), 0.1, "widest")


@pytest.fixture(scope="module")
def features(session_home, tiny_stage):
    from flows.stages.extract import extract

    cfg = ExtractConfig(images="synthetic:docs", limit=96, seed=5, crops="base", shard_size=32, batch_size=16)
    return extract(session_home, cfg, tiny_stage)


STAGE_SELECTOR = SelectorConfig(steps=30, batch_size=8, warmup_steps=5, lr=1e-3, seed=3)


def test_the_stage_trains_a_range_selector_beside_the_per_p_ones(features, tmp_path):
    from flows.stages.train import train
    from storage.home import Home

    home = Home.resolve(tmp_path / "home").ensure()
    cfg = TrainConfig(selector=STAGE_SELECTOR, retentions=(0.1, 0.25), retention_range=(0.05, 0.6),
                      loader_workers=0, device="cpu", eval_retentions=(0.1, 0.25, 0.5))
    out = train(home, cfg, features)
    m = out.manifest
    assert m["checkpoints"] == {"0.1": "selector-p0.1.safetensors", "0.25": "selector-p0.25.safetensors",
                                "range": "selector-range.safetensors"}
    assert m["counts"]["selectors"] == 3 and set(m["final_loss"]) == {"0.1", "0.25", "range"}
    _, meta = load_checkpoint(out.path / "selector-range.safetensors")
    assert meta["trained_on"] == "range" and meta["retention_range"] == [0.05, 0.6]
    assert meta["config"]["retention_range"] == [0.05, 0.6]
    assert json.loads((out.path / "selector-range.json").read_text())["trained_on"] == "range"
    _, meta = load_checkpoint(out.path / "selector-p0.1.safetensors")
    assert meta["trained_on"] == "p" and meta["retention"] == 0.1 and "retention_range" not in meta["config"]
    curves = json.loads((out.path / "curves-range.json").read_text())
    assert len(curves) == 3 and all(0.05 <= c["p"] <= 0.6 for c in curves)

    # the three-way comparison, each selector scored with its own reconstructor
    rows = {(r["strategy"], r["retention"]): r for r in m["selector_metrics"]}
    assert {s for s, _ in rows} == {"selector", "random", "uniform-grid", "selector-p0.25", "selector-range"}
    assert rows[("selector", 0.5)]["selector_retention"] == 0.25
    assert rows[("selector", 0.1)]["selector_retention"] == 0.1
    assert rows[("selector-p0.25", 0.1)]["selector_retention"] == 0.25
    ranged_row = rows[("selector-range", 0.1)]
    assert ranged_row["checkpoint"] == "range" and ranged_row["selector_retention"] is None
    assert rows[("selector-p0.25", 0.25)]["recon_mse"] == rows[("selector", 0.25)]["recon_mse"]  # the same model
    from pipeline.selector_eval import held_out_metrics
    from flows.stages.train import _split_crops
    from pipeline.train import selector_from_tensors
    from storage.stages import read_manifest

    t, _ = load_checkpoint(out.path / "selector-range.safetensors")
    ranged = selector_from_tensors(cfg.selector_for_range(), features.manifest["features"]["tokens_per_crop"],
                                   features.manifest["features"]["feature_dim"], t)
    held = list(_split_crops(features.path, read_manifest(features.path), True, cfg.held_out_percent))
    own = held_out_metrics({0.25: ranged}, held, (0.1,), seeds=1)  # the range selector alone, its reconstructor
    assert own[0]["strategy"] == "selector" and own[0]["recon_mse"] == pytest.approx(ranged_row["recon_mse"])
    assert own[0]["glyph_coverage"] == pytest.approx(ranged_row["glyph_coverage"])

    # variant resolution on the stage
    assert resolve_selector(home, out.key, 0.12) == out.path / "selector-p0.1.safetensors"
    assert resolve_selector(home, out.key, 0.12, "range") == out.path / "selector-range.safetensors"
    assert resolve_selector(home, out.key, 0.12, "p0.25") == out.path / "selector-p0.25.safetensors"
    with pytest.raises(CheckpointError) as err:
        resolve_selector(home, out.key, 0.12, "p0.5")
    assert str(err.value) == (f"{out.path} has no selector trained at p = 0.5 (variant=p0.5); "
                              f"it has p = 0.1, 0.25 and a range")
    loaded = load_selector(resolve_selector(home, out.key, 0.5, "range"), selector_from_checkpoint)
    assert loaded.selector.is_range and loaded.meta["trained_on"] == "range"

    single = train(home, TrainConfig(selector=STAGE_SELECTOR, loader_workers=0, device="cpu",
                                     eval_retentions=(0.25,)), features)
    assert single.manifest["checkpoints"] == {"0.25": "selector-p0.25.safetensors"}
    assert {r["strategy"] for r in single.manifest["selector_metrics"]} == {"selector", "random", "uniform-grid"}
    assert all("checkpoint" not in r for r in single.manifest["selector_metrics"])
    with pytest.raises(CheckpointError) as err:
        resolve_selector(home, single.key, 0.25, "range")
    assert str(err.value) == (f"{single.path} was trained at one p (0.25), not on a range: variant=range needs a "
                              f"checkpoint from atr train --retention-range MIN,MAX")
    _, meta = load_checkpoint(single.path / "selector-p0.25.safetensors")
    assert meta["trained_on"] == "p" and sorted(meta["config"]) == OLD_SELECTOR_KEYS


def test_the_report_names_how_each_selector_was_trained():
    from flows.present.report import selector_provenance

    assert selector_provenance({"checkpoints": {"0.25": "s"}, "config": {}}) == "trained at p = 0.25"
    both = {"checkpoints": {"0.25": "a", "0.5": "b", "range": "c"}, "config": {"retention_range": [0.05, 0.4]}}
    assert selector_provenance(both) == "trained at p = 0.25, 0.5; one on p in [0.05, 0.4] (variant=range)"
