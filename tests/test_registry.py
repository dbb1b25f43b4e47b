"""The strategy registry is the one extension point: a strategy declared in this file alone runs through
`atr eval` and `atr speed`, an installed package adds one through the `atr.strategies` entry points, and
everything else (CLI help, cache keys, tower outputs, plots) derives from the declaration."""

from __future__ import annotations

import ast
from pathlib import Path

import duckdb
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.strategies import (
    Request,
    get,
    image_budget,
    load_plugins,
    names,
    peers,
    pruners,
    select,
    strategy,
    style,
    tower_outputs,
    unregister,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "test-norm"


@pytest.fixture
def norm_strategy():
    """A strategy declared here and nowhere else: the top-k tokens by the norm of their projected
    (LLM-space) token, with an option that flips the order."""

    @strategy(NAME, needs=("projected",), version="1", params={"smallest": False},
              help="top-k by the projected token's norm (a test's own strategy)")
    def norm(req: Request) -> torch.Tensor:
        scores = req.need("projected").float().norm(dim=-1)
        return req.top(-scores if req.options["smallest"] else scores)

    yield NAME
    unregister(NAME)


def test_the_declaration_is_all_the_project_reads(norm_strategy):
    spec = get(norm_strategy)
    assert norm_strategy in names() and norm_strategy in pruners() and norm_strategy not in peers()
    assert tower_outputs([norm_strategy]).attention is False  # only the projector's output
    assert tower_outputs(["visionzip"]).attention and not tower_outputs(["none"]).images
    assert tower_outputs(["cdpruner"], relevance=True).embeds and not tower_outputs(["cdpruner"]).embeds
    assert style(norm_strategy) == style(norm_strategy) and len(style(norm_strategy)) == 2  # a default style
    feats, proj = torch.randn(2, 8, 4), torch.randn(2, 8, 6)
    from pipeline.strategies import Context

    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 6:] = False
    sel = select(norm_strategy, feats, 0.5, "per-crop", Context(projected=proj), valid)
    assert sel.tokens == image_budget(valid, 0.5, "per-crop") == select("random", feats, 0.5, valid=valid).tokens
    norms = proj.norm(dim=-1).masked_fill(~valid, -1)
    assert set(sel.mask[0].nonzero().flatten().tolist()) == set(norms[0].topk(4).indices.tolist())
    low = select(norm_strategy, feats, 0.5, "per-crop", Context(projected=proj), valid, {"smallest": True})
    assert not (low.mask & sel.mask)[0].any()
    with pytest.raises(ConfigError, match="has no option 'largest'; its options: smallest"):
        spec.resolve_options({"largest": True})
    with pytest.raises(ConfigError, match="needs the projected tokens"):
        select(norm_strategy, feats, 0.5)


def test_declarations_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="declared twice"):
        strategy("divprune")(lambda req: None)
    with pytest.raises(ConfigError, match="needs attention_maps, which atr cannot give"):
        strategy("x-bad", needs=("attention_maps",))(lambda req: None)
    with pytest.raises(ConfigError, match="unknown declaration field"):
        strategy("x-bad", colour="red")
    with pytest.raises(ConfigError, match=r"unknown strategy 'divprun' \(did you mean 'divprune'\?\)"):
        get("divprun")
    with pytest.raises(ConfigError, match="option visionzip.merge must be one of reference, average, target"):
        get("visionzip").resolve_options({"merge": "median"})


def test_atr_run_leaves_out_what_a_model_cannot_run_through_the_declaration(capfd):
    """``available`` (the strategy's own check) and ``crops`` (on a family without crops) are all ``atr run``
    reads to leave a strategy out for one model: a plugin needs no edit of the flow."""
    import dataclasses

    from flows.orchestration.flows import _run_strategies
    from pipeline.evaluate import EvalConfig, default_strategies
    from pipeline.families import family_of
    from pipeline.strategies import unavailable

    @strategy("test-needs-file", available=lambda model, options: None if (options or {}).get("table") or
              model == "tiny-trained" else f"no table for {model}", params={"table": ""})
    def needs_file(req: Request) -> torch.Tensor:
        return req.top(req.features.norm(dim=-1))

    try:
        cfg = EvalConfig(strategies=("full", "hired", "test-needs-file"))
        assert _run_strategies(cfg, "tiny-trained") is cfg
        other = _run_strategies(cfg, "tiny-ov-trained")
        assert other.strategies == ("full", "hired")
        given = dataclasses.replace(cfg, options={"test-needs-file": {"table": "t.csv"}})
        assert _run_strategies(given, "tiny-ov-trained") is given
        err = capfd.readouterr().err
        assert err == "atr run: test-needs-file left out for tiny-ov-trained: no table for tiny-ov-trained\n"
        qwen = family_of("qwen2_5_vl")
        assert unavailable("hired", qwen) == "Qwen2.5-VL has no AnyRes crops" and unavailable("hired") is None
        assert unavailable("test-needs-file", qwen) is None  # the hook runs only for a named model
        assert "hired" not in default_strategies(family=qwen) and "test-needs-file" in default_strategies()
    finally:
        unregister("test-needs-file")


def test_a_strategy_from_this_file_runs_through_atr_eval_and_atr_speed(norm_strategy, run_cli, tmp_path):
    home = tmp_path / "home"
    argv = ["eval", "--home", str(home), "--benchmark", "synthetic-ocr", "--strategies", f"full,random,{NAME}",
            "--retentions", "0.25", "--limit", "12", "--seeds", "1", "--shard-size", "6"]
    rc, out, err = run_cli(*argv)
    assert rc == 0, err
    assert NAME in out
    con = duckdb.connect(str(home / "results.duckdb"), read_only=True)
    rows = dict(con.execute("SELECT strategy, mean_visual_tokens FROM eval_scores").fetchall())
    samples = con.execute("SELECT count(*) FROM eval_samples WHERE strategy = ?", [NAME]).fetchone()[0]
    con.close()
    assert samples == 12
    # equal budgets: as many encoder tokens as random (visual tokens differ only by the kept rows' newlines)
    assert abs(rows[NAME] - rows["random"]) < 2 and rows[NAME] < 0.6 * rows["full"]
    # its cache key carries its version: a second run is a cache hit
    assert run_cli(*argv)[0] == 0
    con = duckdb.connect(str(home / "results.duckdb"), read_only=True)
    computed = con.execute("SELECT m.value FROM stage_metrics m JOIN runs r USING (run_id) WHERE m.stage = 'eval' "
                           "AND m.name = 'computed' ORDER BY r.started_at").fetchall()
    con.close()
    assert [c[0] for c in computed] == [6.0, 0.0]  # 3 results x 2 shards, then none
    png = list((home / "reports").glob("eval-*/*.png"))
    assert png, "the eval plots include the new strategy's line"

    speed = ["speed", "--home", str(tmp_path / "speed"), "--model", "tiny", "--retentions", "0.25", "--repeats", "1",
             "--warmup", "0", "--extract-images", "0", "--strategies", f"random,{NAME}", "--ttft"]
    rc, _, err = run_cli(*speed)
    assert rc == 0, err
    con = duckdb.connect(str(tmp_path / "speed" / "results.duckdb"), read_only=True)
    got = dict(con.execute("SELECT name, value FROM bench_results WHERE name LIKE 'select/%/tokens'").fetchall())
    con.close()
    assert got[f"select/{NAME}/tokens"] == got["select/random/tokens"] > 0


def test_an_installed_package_adds_a_strategy_through_entry_points(tmp_path, monkeypatch):
    """A package on the path with an `atr.strategies` entry point: its module declares a strategy, and
    load_plugins() finds it the way importlib.metadata finds any installed package's entry points."""
    (tmp_path / "atr_demo_plugin.py").write_text(
        "from pipeline.strategies import strategy\n\n"
        "@strategy('demo-first', help='the first k valid tokens')\n"
        "def first(req):\n"
        "    import torch\n"
        "    order = torch.arange(req.valid.numel(), 0, -1, dtype=torch.float).view_as(req.valid)\n"
        "    return req.top(order)\n")
    info = tmp_path / "atr_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atr-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[atr.strategies]\ndemo = atr_demo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "demo" in load_plugins()
        assert "demo-first" in names()
        mask = select("demo-first", torch.zeros(1, 8, 2), 0.25).mask
        assert mask[0].tolist() == [True, True] + [False] * 6
    finally:
        unregister("demo-first")
    (info / "entry_points.txt").write_text("[atr.strategies]\nbroken = atr_no_such_module\n")
    with pytest.raises(ConfigError, match=r"strategy plugin 'broken' \(atr_no_such_module\) does not load"):
        load_plugins()


def _library_files():
    return [p for root in ("pipeline", "storage", "flows") for p in sorted((REPO / root).rglob("*.py"))]


def test_a_strategy_name_lives_in_one_file():
    """Issue "extension": "divprune" was spelled in 3 non-test files (config, strategies, plots), and a new
    strategy touched about 10 places in 7 files; now its module declares it and nothing else names it."""
    holding = [p.relative_to(REPO).as_posix() for p in _library_files() if "divprune" in p.read_text()]
    assert holding == ["pipeline/strategies/divprune.py"]


def test_no_public_function_takes_more_than_eight_parameters():
    wide = []
    for p in _library_files():
        rel = p.relative_to(REPO).as_posix()
        if not (rel.startswith("pipeline/") or rel.startswith("flows/stages/")):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                a = node.args
                params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if len(params) > 8:
                    wide.append(f"{rel}:{node.lineno} {node.name} ({len(params)})")
    assert not wide, wide


def test_eval_option_flags_parse_into_strategy_options():
    from flows.cli.eval import parse_options
    from pipeline.errors import UserError

    got = parse_options(["visionzip.cls=false", "visionzip.merge=average", "visionzip.split=[1, 1]", "hired.alpha=0.3"])
    assert got == {"visionzip": {"cls": False, "merge": "average", "split": [1, 1]}, "hired": {"alpha": 0.3}}
    from pipeline.evaluate import EvalConfig

    cfg = EvalConfig(strategies=("visionzip", "hired"), options=got)
    assert {p.strategy: dict(p.options) for p in cfg.chunks()} == got
    with pytest.raises(UserError, match="write STRATEGY.NAME=VALUE"):
        parse_options(["visionzip-cls"])
    with pytest.raises(ConfigError, match="option hired.alpha must be a float"):
        EvalConfig(strategies=("hired",), options={"hired": {"alpha": "big"}})
