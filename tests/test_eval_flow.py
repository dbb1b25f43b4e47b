"""`atr eval` end to end on tiny data: chunks, DuckDB rows, MLflow, plots, chunk reuse."""

from __future__ import annotations

import json

import duckdb
import pytest

from conftest import assert_one_line_errors


@pytest.fixture(scope="module")
def selector_file(tmp_path_factory):
    """A selector checkpoint in the train stage's format (random weights: the flow is under test here;
    the trained selector's figures are in docs/selector.md)."""
    from eval_helpers import random_selector_file

    return random_selector_file(tmp_path_factory.mktemp("sel"))


def test_eval_flow_records_rows_plots_and_reuses_chunks(prefect_api_url, session_home, selector_file):
    from flows.orchestration.flows import eval_flow
    from pipeline.evaluate import EvalConfig

    cfg = EvalConfig(benchmarks=("synthetic-ocr",), strategies=("full", "none", "random", "selector"),
                     retentions=(0.25,), seeds=2, limit=24, batch_size=8)
    out = eval_flow(str(session_home.root), "tiny-trained", cfg.to_dict(), str(selector_file))
    by = {(r["strategy"], r["seed"]): r for r in out["summary"]}
    assert set(by) == {("full", 0), ("none", 0), ("random", 0), ("random", 1), ("selector", 0)}
    assert by["full", 0]["score"] >= 0.9 and by["none", 0]["score"] <= 0.1
    assert by["random", 0]["score"] < by["full", 0]["score"]
    assert by["none", 0]["mean_visual_tokens"] == 0
    assert 15 <= by["random", 0]["mean_visual_tokens"] <= 26  # 4 kept per crop + kept newlines
    assert all(r["prefill_ms"] > 0 for r in out["summary"])

    with duckdb.connect(str(session_home.results_db), read_only=True) as con:
        scores = con.execute("SELECT strategy, retention, seed, metric, score, n_samples, mean_visual_tokens "
                             "FROM eval_scores WHERE run_id = ? ORDER BY strategy, seed", [out["run_id"]]).fetchall()
        n_samples = con.execute("SELECT count(*), count(DISTINCT sample_id) FROM eval_samples WHERE run_id = ?",
                                [out["run_id"]]).fetchone()
        run = con.execute("SELECT flow, status, mlflow_run_id FROM runs WHERE run_id = ?", [out["run_id"]]).fetchone()
        stock = con.execute("SELECT strategy, seed, budget, mean_visual_tokens, stock_visual_tokens, tokens_vs_stock "
                            "FROM eval_scores WHERE run_id = ? ORDER BY strategy, seed", [out["run_id"]]).fetchall()
        per_sample = con.execute("SELECT strategy, count(*), count(visual_tokens), sum(visual_tokens), "
                                 "count(stock_visual_tokens), min(stock_visual_tokens) FROM eval_samples "
                                 "WHERE run_id = ? GROUP BY strategy ORDER BY strategy", [out["run_id"]]).fetchall()
    assert len(scores) == 5 and all(s[3] == "exact_match" and s[5] == 24 for s in scores)
    assert dict(((s[0], s[2]), s[4]) for s in scores)["full", 0] == pytest.approx(by["full", 0]["score"])
    assert n_samples == (5 * 24, 24)
    # LLaVA-NeXT never shrinks its grid: the stock model sends what full sends; every row says its budget
    by_stock = {(r[0], r[1]): r[3:] for r in stock}  # (mean tokens, stock tokens, ratio)
    assert all(r[2] == "per-crop" for r in stock)
    assert by_stock["full", 0][1] == pytest.approx(by_stock["full", 0][0]) and by_stock["full", 0][2] == 1.0
    assert by_stock["none", 0][1:] == (None, None)
    assert 0.2 < by_stock["random", 0][2] < 0.5 and by_stock["random", 0][1] == by_stock["full", 0][1]
    samples = {r[0]: r[1:] for r in per_sample}
    assert samples["none"][:3] == (24, 24, 0) and samples["none"][3] == 0  # no image: 0 tokens, no stock count
    assert samples["full"][:2] == (24, 24) and samples["full"][3] == 24 and samples["full"][4] > 0
    assert samples["full"][2] == pytest.approx(24 * by_stock["full", 0][0])
    assert run == ("eval", "completed", out["mlflow_run_id"])
    for png in out["plots"]:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {p.rsplit("/", 1)[1] for p in out["plots"]} == {"eval-synthetic-ocr.png", "eval-grid.png", "frontier.png"}

    # Adding a strategy reuses every finished chunk.
    cfg2 = EvalConfig(benchmarks=("synthetic-ocr",), strategies=("full", "none", "random", "selector", "diversity"),
                      retentions=(0.25,), seeds=2, limit=24, batch_size=8)
    again = eval_flow(str(session_home.root), "tiny-trained", cfg2.to_dict(), str(selector_file))
    cached = {(r["strategy"], r["seed"]): r["cached"] for r in again["summary"]}
    assert cached == {("full", 0): True, ("none", 0): True, ("random", 0): True, ("random", 1): True,
                      ("selector", 0): True, ("diversity", 0): False}
    same = {(r["strategy"], r["seed"]): r["score"] for r in again["summary"]}
    assert all(same[k] == by[k]["score"] for k in by)


def test_eval_cli_errors_are_one_line(cli_env, tmp_path):
    cases = [
        (["eval", "--benchmark", "docvqa_val"], "needs --data"),
        (["eval", "--benchmark", "docvqa"], "unknown benchmark 'docvqa'"),
        (["eval", "--strategies", "full,fastv"], "unknown strategy 'fastv'"),
        (["eval", "--strategies", "selector"], "needs --selector"),
        (["eval", "--retentions", "0.25,1.5"], "retention must be in (0, 1]"),
        (["eval", "--benchmark", "docvqa_val", "--data", str(tmp_path / "none.parquet")], "does not exist"),
    ]
    assert_one_line_errors(cases, cli_env)


def test_eval_cli_prints_the_table(run_cli):
    rc, stdout, stderr = run_cli("eval", "--benchmark", "synthetic-scene", "--strategies", "full,none,random",
                                 "--retentions", "0.25", "--seeds", "1", "--limit", "16")
    assert rc == 0, stderr
    assert "pruned evaluation" in stdout and "synthetic-scene" in stdout
    assert "Rel. (mean over benchmarks of pruned/full): random@0.25" in stdout
    report = stdout.split("report  ")[1].split()[0]
    summary = json.loads(open(f"{report}/summary.json").read())
    assert {r["strategy"] for r in summary} == {"full", "none", "random"}
