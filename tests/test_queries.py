"""Every SQL query in docs/results-store.md's "Useful queries" runs, read-only, on a real store with known rows."""

from __future__ import annotations

import re

import pytest

from conftest import REPO


def documented_queries() -> list[str]:
    text = (REPO / "docs" / "results-store.md").read_text()
    section = text.split("## Useful queries", 1)[1].split("\n## ", 1)[0]
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", section, re.S)]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    from storage.results import ResultsStore

    path = tmp_path_factory.mktemp("q") / "results.duckdb"
    store = ResultsStore(path)
    store.start_run("r1", "eval", "h", "{}")
    store.record_stage_run("r1", "prepare-model", "m1", True, 0.5, "/m")
    store.record_stage_run("r1", "eval", "e1", False, 30.0, "/e1")
    store.record_stage_run("r1", "eval", "e2", True, 0.1, "/e2")
    rows = []
    for bench, full in (("synthetic-ocr", 1.0), ("synthetic-scene", 1.0)):
        rows.append(dict(strategy="full", retention=1.0, seed=0, score=full, benchmark=bench))
        for r, sel, rnd in ((0.1, 0.9, 0.1), (0.25, 0.99, 0.2), (0.5, 1.0, 0.96)):
            rows.append(dict(strategy="selector", retention=r, seed=0, score=sel, benchmark=bench))
            rows += [dict(strategy="random", retention=r, seed=s, score=rnd + d, benchmark=bench)
                     for s, d in ((0, -0.02), (1, 0.02))]
    store.insert_rows("eval_scores", [{"run_id": "r1", "model": "tiny-trained", "metric": "exact_match",
                                       "n_samples": 2, "mean_visual_tokens": 10.0, "prefill_ms": 1.0, **r}
                                      for r in rows])
    store.insert_rows("eval_samples", [
        {"run_id": "r1", "model": "tiny-trained", "benchmark": "synthetic-ocr", "sample_id": "q1", "strategy": "selector", "retention": 0.25,
         "seed": 0, "prediction": "K7", "answer": "K7", "score": 1.0},
        {"run_id": "r1", "model": "tiny-trained", "benchmark": "synthetic-ocr", "sample_id": "q1", "strategy": "random", "retention": 0.25,
         "seed": 0, "prediction": "X", "answer": "K7", "score": 0.0},
        {"run_id": "r1", "model": "tiny-trained", "benchmark": "synthetic-ocr", "sample_id": "q2", "strategy": "selector", "retention": 0.25,
         "seed": 0, "prediction": "B", "answer": "B", "score": 1.0},
        {"run_id": "r1", "model": "tiny-trained", "benchmark": "synthetic-ocr", "sample_id": "q2", "strategy": "random", "retention": 0.25,
         "seed": 0, "prediction": "B", "answer": "B", "score": 1.0},
    ])
    store.insert_rows("stage_metrics", [{"run_id": run, "stage": "eval", "name": k, "value": v}
                                        for run, figures in (("r1", {"images": 600, "tower_passes": 600, "computed": 52,
                                                                     "skipped": 1}),
                                                             ("r2", {"images": 0, "tower_passes": 0, "computed": 0,
                                                                     "skipped": 0}))
                                        for k, v in figures.items()])
    return path


def test_results_store_page_has_the_queries():
    assert len(documented_queries()) == 6


def test_every_documented_query_gives_the_expected_rows(store_path):
    from storage.results import query

    results = [query(store_path, q) for q in documented_queries()]
    (c1, r1), (c2, r2), (c6, r6), (c3, r3), (c4, r4), (c5, r5) = results
    assert c1 == ["benchmark", "strategy", "score", "seeds"]
    assert r1 == [("synthetic-ocr", "random", 0.2, 2), ("synthetic-ocr", "selector", 0.99, 1),
                  ("synthetic-scene", "random", 0.2, 2), ("synthetic-scene", "selector", 0.99, 1)]
    assert r2 == [("tiny-trained", "synthetic-ocr", "random", 0.5), ("tiny-trained", "synthetic-ocr", "selector", 0.25),
                  ("tiny-trained", "synthetic-scene", "random", 0.5),
                  ("tiny-trained", "synthetic-scene", "selector", 0.25)]
    assert c6 == ["run_id", "images", "tower_passes", "computed", "skipped"]
    assert r6 == [("r1", 600, 600, 52, 1), ("r2", 0, 0, 0, 0)]
    assert r3 == [("eval", 2, 0.5), ("prepare-model", 1, 1.0)]
    assert r4[0] == ("eval", "e1", 30.0) and len(r4) == 3
    assert r5 == [("synthetic-ocr", "q1", "K7", "X")]
