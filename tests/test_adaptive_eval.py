"""Issue 30 items 3 and 6: the threshold budget and strategy variants through eval -- config, keys, the
results store (its migration from the schema before them), the CLI, TOML, the report and the frontier plot."""

from __future__ import annotations

import json
import re

import duckdb
import pytest

from conftest import REPO, assert_one_line_errors
from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig, Pruning


@pytest.fixture(scope="module")
def selector_file(tmp_path_factory):
    """A selector checkpoint in the train stage's format for tiny-trained (random weights: the plumbing is
    under test here, not the selector)."""
    from eval_helpers import random_selector_file

    return random_selector_file(tmp_path_factory.mktemp("sel"))


# ---------------------------------------------------------------- config and chunks

def test_chunks_add_one_threshold_result_per_variant_and_threshold():
    cfg = EvalConfig(strategies=("full", "random", "selector"), retentions=(0.25, 0.5), seeds=2,
                     options={"selector": [{}, {"allocation": "image"}]}, thresholds=(0.3, 0.6),
                     threshold_floor=0.05, threshold_cap=0.6)
    got = [(p.strategy, p.retention, p.seed, p.budget, p.variant, p.threshold, p.floor) for p in cfg.chunks()]
    assert got == [("full", 1.0, 0, "per-crop", "", 0.0, 0.0),
                   ("random", 0.25, 0, "per-crop", "", 0.0, 0.0), ("random", 0.25, 1, "per-crop", "", 0.0, 0.0),
                   ("random", 0.5, 0, "per-crop", "", 0.0, 0.0), ("random", 0.5, 1, "per-crop", "", 0.0, 0.0),
                   ("selector", 0.25, 0, "per-crop", "", 0.0, 0.0), ("selector", 0.5, 0, "per-crop", "", 0.0, 0.0),
                   ("selector", 0.6, 0, "threshold", "", 0.3, 0.05), ("selector", 0.6, 0, "threshold", "", 0.6, 0.05),
                   ("selector", 0.25, 0, "per-crop", "allocation=image", 0.0, 0.0),
                   ("selector", 0.5, 0, "per-crop", "allocation=image", 0.0, 0.0),
                   ("selector", 0.6, 0, "threshold", "allocation=image", 0.3, 0.05),
                   ("selector", 0.6, 0, "threshold", "allocation=image", 0.6, 0.05)]
    # the default config's chunks are as they were: no threshold, one variant
    assert all(p.budget == "per-crop" and p.threshold == 0.0 for p in EvalConfig().chunks())


@pytest.mark.parametrize("kwargs, message", [
    ({"thresholds": (0.0,)}, "threshold must be in (0, 1), got 0.0"),
    ({"thresholds": (1.0,)}, "threshold must be in (0, 1), got 1.0"),
    ({"thresholds": (0.3, 0.3)}, "--thresholds lists a threshold twice"),
    ({"threshold_cap": 0.0}, "--threshold-cap must be in (0, 1]"),
    ({"threshold_floor": 0.8}, "--threshold-floor must be in [0, cap=0.75]"),
    ({"thresholds": (0.5,), "strategies": ("full", "random")}, "--thresholds applies to adaptive strategies (selector"),
    ({"budget": "threshold"}, "--budget takes fixed budgets (per-crop, global, stock); the threshold budget comes "
                              "from --thresholds"),
    ({"budget": "per-crop,threshold"}, "the threshold budget comes from --thresholds"),
    ({"split": "train"}, "--split train is refused: the learned methods train on the synthetic train split"),
    ({"split": "dev"}, "--split must be val or test, got 'dev'"),
    ({"options": {"selector": [{}, {"variant": "nearest"}]}}, "list the variant '(defaults)' twice"),
    ({"options": {"selector": []}}, "must be a table or a list of tables"),
    ({"options": {"selector": [{"allocation": "pixel"}]}}, "option selector.allocation must be one of crop, image"),
    ({"harness": "lmms-eval", "tasks": ("docvqa_val",), "thresholds": (0.5,)}, "takes no --thresholds"),
    ({"harness": "lmms-eval", "tasks": ("docvqa_val",), "options": {"selector": [{}, {"allocation": "image"}]}},
     "takes one variant per strategy"),
])
def test_bad_eval_config_is_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        EvalConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- keys

def _key(pruning, **kw):
    from flows.stages.eval import ResultKey

    return ResultKey("synthetic-ocr", pruning, 300, "m" * 16, "d" * 16, selector="s" * 16, **kw)


def test_new_coordinates_enter_the_key_only_when_not_default():
    from flows.stages.eval import result_coords

    base = Pruning("selector", 0.25, 0, "per-crop")
    assert "split" not in result_coords("synthetic-ocr", base, 300, False, "test")
    assert result_coords("synthetic-ocr", base, 300, False, "val")["split"] == "val"
    assert _key(base, split="val").chunk_key(100) != _key(base).chunk_key(100)
    t = Pruning("selector", 0.75, 0, "threshold", {}, threshold=0.5, floor=0.02)
    coords = result_coords("synthetic-ocr", t, 300, False)
    assert (coords["budget"], coords["threshold"], coords["floor"], coords["retention"]) == ("threshold", 0.5, 0.02, 0.75)
    keys = {_key(t).chunk_key(100), _key(Pruning("selector", 0.75, 0, "threshold", {}, 0.6, 0.02)).chunk_key(100),
            _key(Pruning("selector", 0.75, 0, "threshold", {}, 0.5, 0.05)).chunk_key(100),
            _key(Pruning("selector", 0.75, 0, "threshold", {"allocation": "image"}, 0.5, 0.02)).chunk_key(100)}
    assert len(keys) == 4
    # the options at their defaults leave the key as it was
    assert _key(Pruning("selector", 0.25, 0, "per-crop", {"variant": "nearest", "allocation": "crop"})).chunk_key(100) \
        == _key(base).chunk_key(100)


def test_an_option_naming_a_file_puts_its_sha256_in_the_key(tmp_path):
    import hashlib

    from pipeline.strategies import Strategy, register, unregister

    def keep_all(req):
        return req.valid

    register(Strategy("filed", keep_all, params={"table": ""}, files=("table",)))
    try:
        f = tmp_path / "table.json"
        f.write_text("[1, 2]")
        p = Pruning("filed", 0.25, 0, "per-crop", {"table": str(f)})
        assert _key(p).inputs()["option_files"] == {"table": hashlib.sha256(b"[1, 2]").hexdigest()[:16]}
        k1 = _key(p).chunk_key(100)
        f.write_text("[1, 3]")
        assert _key(p).chunk_key(100) != k1
        assert "option_files" not in _key(Pruning("filed", 0.25)).inputs()  # empty path: nothing to hash
        with pytest.raises(ConfigError, match=r"option filed.table: no such file .*missing.json$"):
            _key(Pruning("filed", 0.25, 0, "per-crop", {"table": str(tmp_path / "missing.json")})).inputs()
    finally:
        unregister("filed")


# ---------------------------------------------------------------- the store before these columns

# eval_scores and eval_samples as the atr before variants and thresholds (HEAD 52fd9da) created them
OLD_SCORES = ('CREATE TABLE eval_scores ("run_id" VARCHAR, "model" VARCHAR, "benchmark" VARCHAR, "strategy" VARCHAR, '
              '"retention" DOUBLE, "seed" INTEGER, "metric" VARCHAR, "score" DOUBLE, "n_samples" INTEGER, '
              '"mean_visual_tokens" DOUBLE, "prefill_ms" DOUBLE, "budget" VARCHAR DEFAULT \'per-crop\', '
              '"stock_visual_tokens" DOUBLE, "tokens_vs_stock" DOUBLE, '
              'PRIMARY KEY (run_id, model, benchmark, strategy, retention, seed, metric, budget))')
OLD_SAMPLES = ('CREATE TABLE eval_samples ("run_id" VARCHAR, "model" VARCHAR, "benchmark" VARCHAR, "sample_id" VARCHAR, '
               '"strategy" VARCHAR, "retention" DOUBLE, "seed" INTEGER, "prediction" VARCHAR, "answer" VARCHAR, '
               '"score" DOUBLE, "budget" VARCHAR DEFAULT \'per-crop\', "visual_tokens" INTEGER, '
               '"stock_visual_tokens" INTEGER, '
               'PRIMARY KEY (run_id, model, benchmark, sample_id, strategy, retention, seed, budget))')


def test_a_store_from_before_variants_and_thresholds_keeps_every_row(tmp_path):
    from storage.results import TABLES, ResultsStore

    path = tmp_path / "results.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(TABLES["runs"].ddl())
        conn.execute(OLD_SCORES)
        conn.execute(OLD_SAMPLES)
        for run, cfg in (("r1", {"eval": {"interpolation": True}}), ("r2", {"eval": {"interpolation": False}}),
                         ("r3", {"model": "tiny"})):
            conn.execute("INSERT INTO runs (run_id, flow, status, config_json) VALUES (?, 'eval', 'completed', ?)",
                         [run, json.dumps(cfg)])
        for run in ("r1", "r2", "r3", "r4"):  # r4: no runs row at all
            for budget, score in (("per-crop", 0.5), ("global", 0.625)):
                conn.execute("INSERT INTO eval_scores VALUES (?, 'tiny-trained', 'synthetic-ocr', 'selector', 0.25, 0, "
                             "'exact_match', ?, 8, 20.0, 3.0, ?, 30.0, 0.667)", [run, score, budget])
                conn.execute("INSERT INTO eval_samples VALUES (?, 'tiny-trained', 'synthetic-ocr', 'q1', 'selector', "
                             "0.25, 0, 'K7', 'K7', 1.0, ?, 20, 30)", [run, budget])
    store = ResultsStore(path)
    with duckdb.connect(str(path), read_only=True) as conn:
        scores = conn.execute("SELECT run_id, budget, score, stock_visual_tokens, variant, threshold, interpolation "
                              "FROM eval_scores ORDER BY run_id, budget").fetchall()
        samples = conn.execute("SELECT run_id, budget, visual_tokens, variant, threshold, interpolation "
                               "FROM eval_samples ORDER BY run_id, budget").fetchall()
        comments = dict(conn.execute("SELECT column_name, comment FROM duckdb_columns() WHERE table_name = "
                                     "'eval_scores' AND column_name IN ('variant', 'threshold', 'interpolation')")
                        .fetchall())
    interp = {"r1": True, "r2": False, "r3": False, "r4": False}
    assert scores == [(r, b, s, 30.0, "", 0.0, interp[r]) for r in ("r1", "r2", "r3", "r4")
                      for b, s in (("global", 0.625), ("per-crop", 0.5))]
    assert samples == [(r, b, 20, "", 0.0, interp[r]) for r in ("r1", "r2", "r3", "r4") for b in ("global", "per-crop")]
    assert "k=v" in comments["variant"] and "0: a fixed budget" in comments["threshold"] and comments["interpolation"]
    # the new key: a variant and a threshold of the same (strategy, retention, budget) are rows of their own;
    # a writer that leaves the new columns out records the defaults
    row = dict(run_id="r2", model="tiny-trained", benchmark="synthetic-ocr", strategy="selector", retention=0.25,
               seed=0, metric="exact_match", score=0.75, n_samples=8, budget="per-crop")
    store.insert_rows("eval_scores", [{**row, "variant": "allocation=image"}, {**row, "budget": "threshold",
                                                                                "threshold": 0.5, "score": 0.875},
                                      {**row, "score": 0.5}])
    with duckdb.connect(str(path), read_only=True) as conn:
        got = conn.execute("SELECT budget, variant, threshold, interpolation, score FROM eval_scores WHERE run_id = 'r2' "
                           "ORDER BY budget, variant").fetchall()
    assert got == [("global", "", 0.0, False, 0.625), ("per-crop", "", 0.0, False, 0.5),
                   ("per-crop", "allocation=image", 0.0, False, 0.75), ("threshold", "", 0.5, False, 0.875)]
    ResultsStore(path)  # a second open changes nothing
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM eval_scores").fetchone() == (10,)


# ---------------------------------------------------------------- CLI and TOML

def test_variants_and_thresholds_parse_from_the_command_line():
    from flows.cli.eval import parse_options, parse_thresholds, parse_variants

    base = parse_options(["selector.calibration=crop-z", "visionzip.cls=false"])
    got = parse_variants(["selector:allocation=image", "selector:allocation=image,variant=p0.25"], base)
    assert got == {"selector": [{"calibration": "crop-z"}, {"calibration": "crop-z", "allocation": "image"},
                                {"calibration": "crop-z", "allocation": "image", "variant": "p0.25"}],
                   "visionzip": {"cls": False}}
    assert parse_variants([], base) == base
    assert parse_thresholds("0.3, 0.5,0.7") == (0.3, 0.5, 0.7) and parse_thresholds(None) == ()
    cfg = EvalConfig(strategies=("selector",), options=got, thresholds=(0.5,))
    assert [p.variant for p in cfg.chunks() if p.budget == "threshold"] == \
        ["calibration=crop-z", "allocation=image,calibration=crop-z", "allocation=image,calibration=crop-z,variant=p0.25"]


def test_bad_eval_flags_are_one_line(cli_env):
    cases = [
        (["eval", "--strategies", "full,random", "--thresholds", "0.5"], "--thresholds applies to adaptive strategies"),
        (["eval", "--strategies", "full", "--thresholds", "0.3,x"], "'x' is not a number"),
        (["eval", "--strategies", "full", "--variant", "selector"], "write STRATEGY:NAME=VALUE"),
        (["eval", "--strategies", "full", "--budget", "threshold"], "the threshold budget comes from --thresholds"),
        (["eval", "--strategies", "full", "--split", "train"], "--split train is refused"),
    ]
    assert_one_line_errors(cases, cli_env)


def test_a_run_config_with_variants_reads_and_writes_back(tmp_path):
    from pipeline.run_config import load_run_config, run_config_toml

    path = tmp_path / "run.toml"
    path.write_text('[eval]\nthresholds = [0.3, 0.6]\nsplit = "val"\n'
                    '[eval.options]\nselector = [{}, {allocation = "image"}]\n[eval.options.visionzip]\ncls = false\n')
    cfg, _ = load_run_config(path)
    assert cfg.eval.options["selector"] == [{}, {"allocation": "image"}] and cfg.eval.thresholds == (0.3, 0.6)
    text = run_config_toml(cfg)
    assert '[eval.options]\nselector = [{}, {allocation = "image"}]\n[eval.options.visionzip]\ncls = false' in text
    assert "thresholds = [0.3, 0.6]" in text and 'split = "val"' in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert load_run_config(again)[0] == cfg


# ---------------------------------------------------------------- one real run

def equal_tokens_query() -> str:
    text = (REPO / "docs" / "results-store.md").read_text()
    section = text.split("## Variants, adaptive budgets and interpolation", 1)[1].split("\n## ", 1)[0]
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.S)
    return sql.strip()


def test_one_run_holds_variants_and_thresholds_side_by_side(prefect_api_url, session_home, selector_file):
    """selector (defaults) + selector [allocation=image] at a fixed retention and at thresholds 0.3 and 0.6, in
    one ``atr eval`` run: distinct rows in eval_scores and eval_samples, the report's tables and the frontier
    plot, and the documented equal-tokens query on the run's store."""
    from flows.orchestration.flows import eval_flow
    from flows.present.report import report_markdown  # noqa: F401  (the report stage's writer, imported whole)
    from storage.results import query

    cfg = EvalConfig(benchmarks=("synthetic-ocr",), strategies=("full", "none", "selector"), retentions=(0.25,),
                     limit=8, batch_size=8, options={"selector": [{}, {"allocation": "image"}]},
                     thresholds=(0.3, 0.6))
    out = eval_flow(str(session_home.root), "tiny-trained", cfg.to_dict(), str(selector_file))
    by = {(r["strategy"], r["variant"], r["budget"], r["threshold"]): r for r in out["summary"]}
    assert set(by) == {("full", "", "per-crop", 0.0), ("none", "", "per-crop", 0.0),
                       ("selector", "", "per-crop", 0.0), ("selector", "allocation=image", "per-crop", 0.0),
                       ("selector", "", "threshold", 0.3), ("selector", "", "threshold", 0.6),
                       ("selector", "allocation=image", "threshold", 0.3),
                       ("selector", "allocation=image", "threshold", 0.6)}
    full = by["full", "", "per-crop", 0.0]["mean_visual_tokens"]
    lo, hi = by["selector", "", "threshold", 0.3], by["selector", "", "threshold", 0.6]
    # a lower threshold keeps at least as many tokens; the cap (0.75) bounds both below full
    assert full > lo["mean_visual_tokens"] >= hi["mean_visual_tokens"] > 0
    # allocation decides top-k, not the threshold budget: the same probabilities, the same counts
    assert by["selector", "allocation=image", "threshold", 0.3]["mean_visual_tokens"] == lo["mean_visual_tokens"]
    with duckdb.connect(str(session_home.results_db), read_only=True) as con:
        scores = con.execute("SELECT strategy, variant, budget, threshold, retention, interpolation, "
                             "mean_visual_tokens FROM eval_scores WHERE run_id = ? ORDER BY ALL",
                             [out["run_id"]]).fetchall()
        samples = con.execute("SELECT variant, budget, threshold, count(*), sum(visual_tokens) FROM eval_samples "
                              "WHERE run_id = ? AND strategy = 'selector' GROUP BY ALL ORDER BY ALL",
                              [out["run_id"]]).fetchall()
    assert len(scores) == 8 and len({s[:4] for s in scores}) == 8
    assert all(s[5] is False for s in scores)
    assert {s[4] for s in scores if s[2] == "threshold"} == {0.75}  # the cap is the retention
    assert [(s[0], s[1], s[2], s[3]) for s in samples] == [
        ("", "per-crop", 0.0, 8), ("", "threshold", 0.3, 8), ("", "threshold", 0.6, 8),
        ("allocation=image", "per-crop", 0.0, 8), ("allocation=image", "threshold", 0.3, 8),
        ("allocation=image", "threshold", 0.6, 8)]
    assert samples[1][4] == pytest.approx(8 * lo["mean_visual_tokens"])
    names = {p.rsplit("/", 1)[1] for p in out["plots"]}
    assert names == {"eval-synthetic-ocr.png", "eval-grid.png", "frontier.png"}
    for png in out["plots"]:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # the documented query: each threshold result against the nearest fixed-budget result of each variant
    cols, rows = query(session_home.results_db, equal_tokens_query())
    mine = [dict(zip(cols, r)) for r in rows if r[0] == "tiny-trained"]
    pairs = {(r["adaptive"], r["fixed"]) for r in mine}
    assert {("selector @ t=0.3", "selector"), ("selector @ t=0.3", "selector [allocation=image]"),
            ("selector [allocation=image] @ t=0.6", "selector")} <= pairs
    one = next(r for r in mine if r["adaptive"] == "selector @ t=0.3" and r["fixed"] == "selector")
    assert one["adaptive_tokens"] == pytest.approx(round(lo["mean_visual_tokens"], 1))


def test_report_tables_label_variants_and_thresholds():
    from flows.present.report import adaptive_table, result_label, stock_table
    from flows.present.tables import print_eval
    from pipeline.evaluate import eval_table

    chunks = [dict(benchmark="b", strategy="full", variant="", retention=1.0, seed=0, budget="per-crop", threshold=0.0,
                   metric="acc", score=1.0, n_samples=4, mean_visual_tokens=40.0, prefill_ms=1.0),
              dict(benchmark="b", strategy="selector", variant="", retention=0.25, seed=0, budget="per-crop",
                   threshold=0.0, metric="acc", score=0.5, n_samples=4, mean_visual_tokens=10.0, prefill_ms=1.0),
              dict(benchmark="b", strategy="selector", variant="allocation=image", retention=0.25, seed=0,
                   budget="per-crop", threshold=0.0, metric="acc", score=0.75, n_samples=4, mean_visual_tokens=10.0,
                   prefill_ms=1.0),
              dict(benchmark="b", strategy="selector", variant="", retention=0.75, seed=0, budget="threshold",
                   threshold=0.5, floor=0.02, metric="acc", score=0.25, n_samples=4, mean_visual_tokens=12.5,
                   prefill_ms=1.0)]
    rows = eval_table(chunks)
    assert [result_label(r) for r in rows] == ["full", "selector", "selector [allocation=image]", "selector @ t=0.5"]
    assert rows[3]["floor"] == 0.02 and rows[3]["visual_tokens"] == 12.5
    table = adaptive_table([r for r in rows if r["budget"] == "threshold"], {"b": 1.0})
    assert table[-1] == "| b | selector @ t=0.5 | 0.75 | 0.02 | 0.250 (0.25×) | 12.5 |"
    assert stock_table(rows) == []
    print_eval(chunks)  # renders every label without error


def test_the_frontier_plot_draws_a_line_per_fixed_variant_and_threshold_sweep():
    import matplotlib.pyplot as plt

    from flows.present.plots import _frontier_axes

    def row(strategy, retention, score, tokens, variant="", budget="per-crop", threshold=0.0, seed=0):
        return dict(benchmark="b", strategy=strategy, variant=variant, retention=retention, seed=seed, budget=budget,
                    threshold=threshold, metric="acc", score=score, mean_visual_tokens=tokens)

    rows = [row("full", 1.0, 0.9, 100.0), row("none", 0.0, 0.1, 0.0),
            row("random", 0.25, 0.2, 27.0), row("random", 0.25, 0.4, 27.0, seed=1), row("random", 0.5, 0.5, 52.0),
            row("selector", 0.25, 0.6, 27.0), row("selector", 0.5, 0.7, 52.0),
            row("selector", 0.25, 0.65, 27.0, "allocation=image"), row("selector", 0.5, 0.75, 52.0, "allocation=image"),
            row("selector", 0.75, 0.8, 35.0, budget="threshold", threshold=0.5),
            row("selector", 0.75, 0.85, 60.0, budget="threshold", threshold=0.3)]
    fig, ax = plt.subplots()
    _frontier_axes(ax, rows, "b")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"full image (100 tokens)", "no image (0 tokens)", "random", "selector",
                          "selector [allocation=image]", "selector @ thresholds"}
    # x: mean visual tokens (seeds averaged), y: score; the sweep ordered by tokens
    assert list(lines["random"].get_xdata()) == [27.0, 52.0] and list(lines["random"].get_ydata()) == \
        pytest.approx([0.3, 0.5])
    assert list(lines["selector @ thresholds"].get_xdata()) == [35.0, 60.0]
    assert sorted(t.get_text() for t in ax.texts) == ["t=0.3", "t=0.5"]
    plt.close(fig)


def test_mlflow_metric_names_add_only_what_is_not_default():
    from types import SimpleNamespace

    from flows.orchestration.recorder import chunk_metric_name

    def name(p):
        return chunk_metric_name(SimpleNamespace(benchmark="synthetic-ocr", strategy=p.strategy, retention=p.retention,
                                                 seed=p.seed, pruning=p))

    assert name(Pruning("selector", 0.25)) == "synthetic-ocr/selector/r0.25/seed0"
    assert name(Pruning("selector", 0.75, 0, "threshold", {"allocation": "image", "calibration": "crop-z"}, 0.5,
                        0.02)) == "synthetic-ocr/selector/r0.75/threshold/allocation:image.calibration:crop-z/t0.5/seed0"


def test_the_lmms_eval_harness_refuses_options_it_cannot_apply_in_one_line():
    from flows.stages.lmms_eval import plan_lmms

    cfg = EvalConfig(harness="lmms-eval", tasks=("docvqa_val",), strategies=("visionzip",),
                     options={"visionzip": {"cls": False}})
    with pytest.raises(ConfigError, match=r"^--harness lmms-eval runs visionzip with its default options under a "
                                          r"fixed budget; drop its options \(cls=false\) or use --harness builtin$"):
        plan_lmms(None, cfg, ("docvqa_val",), None, {}, None)


def test_the_split_picks_the_generated_file_and_real_benchmarks_ignore_it(tmp_path):
    from flows.stages.eval import data_files
    from storage.home import Home

    home = Home.resolve(tmp_path).ensure()
    val, test = data_files("synthetic-ocr", {}, home, 3, "val"), data_files("synthetic-ocr", {}, home, 3)
    assert (val[0].name, test[0].name) == ("synthetic-ocr-val.parquet", "synthetic-ocr-test.parquet")
    assert val[0].read_bytes() != test[0].read_bytes()
    given = data_files("synthetic-ocr", {"synthetic-ocr": str(test[0])}, home, 3, "val")
    assert given == [test[0]]  # --data decides: the split does not regenerate it
