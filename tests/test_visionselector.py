"""VisionSelector (Zhu et al., arXiv 2510.16598): the differentiable top-k, the scorer's training through the
frozen tiny LLaVA, the strategy's budgets, checkpoint matching and the shipped checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import REPO
from pipeline import visionselector as vs
from pipeline.config import ConfigError
from pipeline.strategies import Context, image_budget, select

ASSETS = REPO / "pipeline" / "assets"


@pytest.fixture(scope="module")
def models():
    """The two shipped tiny models, interpolation off (as eval and training run them)."""
    from pipeline.families import family_of
    from pipeline.loading import load_model

    out = {}
    for name in vs.TRAINABLE_MODELS:
        model, processor = load_model(ASSETS / name)
        family_of(model.config).set_interpolation(model, processor, False)
        out[name] = (model, processor)
    return out


def _images(model, processor, n: int = 4):
    """Features, valid masks and projected tokens of a few val-split images of both benchmarks."""
    from pipeline.prune import encode_images, project
    from pipeline.synthetic import generate_samples

    samples = generate_samples("synthetic-ocr", "val", n) + generate_samples("synthetic-scene", "val", n)
    feats = encode_images(model, processor, [s.image for s in samples])
    return [(f.features, f.valid, project(model, f.features), f.image_size) for f in feats]


# ---------------------------------------------------------------- the differentiable top-k

def test_top_k_is_exact_at_inference_and_differentiable_in_training():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    valid = torch.ones(4, 20, dtype=torch.bool)
    valid[1, 13:] = False
    valid[3, ::3] = False
    k = torch.tensor([1, 4, 7, 12])  # row 3 has 13 valid tokens
    hard = vs.differentiable_top_k(scores, k, valid, training=False)
    assert hard.sum(dim=1).tolist() == k.tolist()  # exactly k, every row
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and not hard[~valid].any()
    for row in range(4):  # the k highest valid scores
        best = scores[row].masked_fill(~valid[row], float("-inf")).topk(int(k[row])).indices
        assert hard[row, best].all()
    x = scores.clone().requires_grad_()
    soft = vs.differentiable_top_k(x, k, valid, training=True)
    assert torch.allclose(soft.sum(dim=1), k.double(), atol=1e-6)
    assert (soft[valid] > 0).all() and (soft[valid] < 1).all() and (soft[~valid] == 0).all()
    order = scores[0].argsort()
    assert (soft[0, order].diff() >= 0).all()  # ordered as the scores
    (soft * torch.arange(20.0, dtype=torch.float64)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[valid].abs().max() > 1e-3
    assert (x.grad[~valid] == 0).all()
    assert torch.allclose(x.grad.sum(dim=1), torch.zeros(4, dtype=torch.float64), atol=1e-9)  # sum stays k
    assert torch.autograd.gradcheck(lambda s: vs.soft_top_k(s, k, valid), (scores.clone().requires_grad_(),))
    full = vs.soft_top_k(x, torch.tensor([20, 13, 0, 13]), valid)  # k = every valid token (or none)
    assert torch.equal(full, torch.stack([valid[0], valid[1], torch.zeros(20, dtype=torch.bool), valid[3]]).double())


def test_curriculum_weight_anneals_linearly_from_0_1_to_3():
    assert vs.reg_weight(0, 100) == pytest.approx(0.1)
    assert vs.reg_weight(50, 100) == pytest.approx(1.55)
    assert vs.reg_weight(100, 100) == pytest.approx(3.0)
    assert [vs.train_k(n, 0.2) for n in (3, 5, 48, 80)] == [1, 1, 9, 16]  # int(r * N), at least 1


def test_scorer_reads_all_tokens_of_the_image_as_the_reference():
    """score_i = mean_j q_i . k_j / sqrt(hidden) over the row's valid tokens (their TransformerScorer)."""
    torch.manual_seed(0)
    scorer = vs.Scorer(8, init_scale=0.5)
    x = torch.randn(2, 6, 8)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    got = scorer(x, valid)
    for b in range(2):
        xs = x[b, valid[b]]
        q, k = scorer.q_proj(xs), scorer.k_proj(xs)
        want = (q @ k.T / scorer.hidden ** 0.5).mean(dim=-1)
        assert torch.allclose(got[b, valid[b]], want, atol=1e-5)
    assert scorer.hidden == 4  # half the width, as theirs (4096 -> 2048)


# ---------------------------------------------------------------- training

def test_scorer_trains_through_the_frozen_model(models):
    """A few steps on a handful of train-split samples lower the frozen LM's answer loss; the model's
    weights do not move."""
    model, processor = models["tiny-trained"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = vs.VisionSelectorConfig(steps=25, batch_size=8, train_ocr=6, train_scene=2, warmup_ratio=0.0)
    items = vs.prepare_items(model, processor, vs.train_split_samples(config))
    assert len(items) == 8

    def lm_loss(scorer):
        with torch.no_grad():
            return float(vs.step_loss(model, scorer, items, config.ratio, 0.0)["lm"])

    torch.manual_seed(config.seed)
    start = lm_loss(vs.Scorer(items[0].projected.shape[1]))  # the scorer training starts from
    scorer, metrics = vs.train_visionselector(model, processor, config, items=items)
    end = lm_loss(scorer)
    assert end < 0.7 * start, (start, end)
    assert metrics["steps"] == 25 and metrics["samples_seen"] == 200 and metrics["train_seconds"] < 30
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_training_data_are_train_splits_only():
    config = vs.VisionSelectorConfig(train_ocr=3, train_scene=2)
    assert {d["split"] for d in config.data()} == {"train"}
    assert {s.split for s in vs.train_split_samples(config)} == {"train"}
    with pytest.raises(ConfigError, match="ratio"):
        vs.VisionSelectorConfig(ratio=1.5)


# ---------------------------------------------------------------- the strategy

@pytest.mark.parametrize("name", vs.TRAINABLE_MODELS)
def test_strategy_keeps_exactly_the_budget_on_both_budgets(models, name):
    model, processor = models[name]
    for features, valid, projected, _ in _images(model, processor):
        loaded = vs.resolve("", features, projected, valid)
        assert loaded.path.name == f"{name}.safetensors"  # the shipped checkpoint of this model
        for budget in ("per-crop", "global"):
            for r in (0.1, 0.25, 0.5, 1.0):
                sel = select("visionselector", features, r, budget, Context(projected=projected), valid)
                assert sel.extra is None
                assert int(sel.mask.sum()) == image_budget(valid, r, budget)
                assert not (sel.mask & ~valid).any()


def test_strategy_keeps_the_stock_budget_on_onevision(models):
    """``--budget stock`` (K from what the stock OneVision sends) arrives as its global equivalent."""
    from pipeline.families import family_of
    from pipeline.strategies.core import stock_budget

    model, processor = models["tiny-ov-trained"]
    family = family_of(model.config)
    stock_cfg = family.stock_config(model, None)
    for features, valid, projected, size in _images(model, processor):
        stock = family.stock_tokens(model.config, size, stock_cfg).features
        for r in (0.1, 0.25, 0.5):
            sel = select("visionselector", features, r, "stock", Context(projected=projected), valid, stock=stock)
            assert sel.tokens == stock_budget(valid, r, stock)


def test_strategy_keeps_the_highest_scores_of_the_image(models):
    model, processor = models["tiny-trained"]
    features, valid, projected, _ = _images(model, processor, 1)[0]
    loaded = vs.resolve("", features, projected, valid)
    scores = vs.image_scores(loaded, projected, valid)
    mask = select("visionselector", features, 0.25, "per-crop", Context(projected=projected), valid).mask
    assert scores[mask].min() >= scores[valid & ~mask].max()  # one K over the image, not per crop


def test_checkpoint_of_another_family_or_shape_is_refused_in_one_line(models, tmp_path):
    model, processor = models["tiny-trained"]
    features, valid, projected, _ = _images(model, processor, 1)[0]
    ov = str(ASSETS / "visionselector" / "tiny-ov-trained.safetensors")
    with pytest.raises(ConfigError) as err:  # same L, C, D: the projector tells the families apart
        select("visionselector", features, 0.25, "per-crop", Context(projected=projected), valid,
               options={"checkpoint": ov})
    assert "\n" not in str(err.value) and "llava-onevision" in str(err.value) and "another model" in str(err.value)
    odd_f, odd_p = torch.randn(2, 9, 64), torch.randn(2, 9, 128)
    with pytest.raises(ConfigError) as err:  # another L, no checkpoint given: how to train one
        select("visionselector", odd_f, 0.25, "per-crop", Context(projected=odd_p))
    assert "\n" not in str(err.value) and "atr train-visionselector" in str(err.value)
    with pytest.raises(ConfigError) as err:  # another L, a checkpoint given
        select("visionselector", odd_f, 0.25, "per-crop", Context(projected=odd_p), options={"checkpoint": ov})
    assert "\n" not in str(err.value) and "L=16" in str(err.value) and "L=9" in str(err.value)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    for bad, needle in ((other, "not a VisionSelector checkpoint"),
                        (tmp_path / "missing.safetensors", "does not exist"),
                        (ASSETS / "visionselector" / "tiny-trained.json", "not a safetensors file")):
        with pytest.raises(ConfigError, match=needle) as err:
            select("visionselector", features, 0.25, "per-crop", Context(projected=projected), valid,
                   options={"checkpoint": str(bad)})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="needs"):  # no projected tokens
        select("visionselector", features, 0.25, "per-crop", Context(), valid)


def test_shipped_checkpoints_load_once_with_their_provenance():
    families = {"tiny-trained": "llava-next", "tiny-ov-trained": "llava-onevision"}
    assert [p.stem for p in vs.shipped_checkpoints()] == sorted(families)
    for name, family in families.items():
        path = ASSETS / "visionselector" / f"{name}.safetensors"
        loaded = vs.load_scorer(path)
        assert vs.load_scorer(path) is loaded  # cached by path and mtime
        f = loaded.facts
        assert (f["family"], f["tokens_per_crop"], f["channels"], f["width"], f["hidden"]) == (family, 16, 64, 128, 64)
        prov = json.loads(path.with_suffix(".json").read_text())
        assert prov["model"]["name"] == name and prov["family"] == family and prov["training_ratio"] == 0.2
        assert {d["split"] for d in prov["data"]} == {"train"}
        assert {d["benchmark"] for d in prov["data"]} == {"synthetic-ocr", "synthetic-scene"}
        assert prov["metrics"]["steps"] == prov["config"]["steps"] and prov["metrics"]["train_seconds"] > 0
        assert path.stat().st_size < 1_000_000
    spec = __import__("pipeline.strategies", fromlist=["get"]).get("visionselector")
    assert spec.peer and spec.files == ("checkpoint",) and spec.needs == ("projected",)


# ---------------------------------------------------------------- the command

@pytest.mark.slow
def test_train_visionselector_command_writes_a_checkpoint_eval_uses(cli_env, tmp_path):
    """`atr train-visionselector` end to end on a few samples, then `atr eval` with its checkpoint."""
    from conftest import atr_in_process, assert_one_line_errors

    out = tmp_path / "vs"
    proc = atr_in_process(["train-visionselector", "--model", "tiny-trained", "--steps", "5", "--ocr", "16",
                           "--scene", "8", "--out", str(out)], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "5 steps x 16 images" in proc.stdout
    prov = json.loads((out / vs.PROVENANCE).read_text())
    assert prov["metrics"]["steps"] == 5 and prov["model"]["prepare_model_key"]
    assert prov["data"] == [{"benchmark": "synthetic-ocr", "split": "train", "samples": 16, "seed": 0},
                            {"benchmark": "synthetic-scene", "split": "train", "samples": 8, "seed": 0}]
    ckpt = out / vs.CHECKPOINT
    proc = atr_in_process(["eval", "--model", "tiny-trained", "--strategies", "visionselector", "--retentions",
                           "0.25", "--limit", "8", "--benchmark", "synthetic-ocr", "--option",
                           f"visionselector.checkpoint={ckpt}"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert_one_line_errors([(["train-visionselector", "--out", str(out), "--ratio", "2"], "ratio must be in (0, 1)"),
                            (["train-visionselector", "--out", str(out), "--steps", "0"], "steps must be positive")],
                           cli_env)


def test_atr_run_leaves_visionselector_out_for_a_model_without_a_shipped_checkpoint(capfd):
    from flows.orchestration.flows import _run_strategies
    from pipeline.run_config import RunConfig

    cfg = RunConfig().eval
    assert "visionselector" in cfg.strategies
    assert _run_strategies(cfg, "tiny-trained") is cfg and _run_strategies(cfg, "tiny-ov-trained") is cfg
    other = _run_strategies(cfg, "llava-hf/llava-v1.6-mistral-7b-hf")
    assert "visionselector" not in other.strategies and set(other.strategies) == set(cfg.strategies) - {"visionselector"}
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "visionselector left out for llava-hf/llava-v1.6-mistral-7b-hf" in err
    given = dataclasses.replace(cfg, options={**cfg.options, "visionselector": {"checkpoint": "/x.safetensors"}})
    assert _run_strategies(given, "llava-hf/llava-v1.6-mistral-7b-hf") is given
