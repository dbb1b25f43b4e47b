"""The report stage: the run's tables (``summary.md``, ``summary.json``) and plots (the eval plots per
benchmark, their grid and the frontier plot: score against mean visual tokens).

Output ``stages/report/<key>/``; the key hashes the model and the keys of the
train stage and of every eval chunk, so an unchanged run is a cache hit.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import content_hash
from pipeline.evaluate import eval_table
from storage.home import Home
from storage.stages import StageResult, code_version, run_stage, stage_key, write_json_atomic

from ..present.plots import plot_eval
from ..present.report import report_markdown, result_label, stock_token_lines
from .eval import eval_summary

REPORT_VERSION = "2"  # 2: the frontier plot, rows per variant and threshold (issue 30)


def report_key(model: str, train_key: str, chunk_keys: list[str]) -> tuple[str, dict[str, str]]:
    """(key, inputs) of the report stage: the model and the keys of the train stage and of every eval chunk."""
    inputs = {"train": train_key, "eval": content_hash(sorted(chunk_keys))}
    return stage_key("report", REPORT_VERSION, {"model": model}, inputs), inputs


def report(home: Home, model: str, feat: StageResult, train: StageResult, results: list, *,
           force: bool = False) -> StageResult:
    """Summary tables (Markdown + JSON) and plots of one run, keyed by its model and its inputs' keys:
    the train stage and every eval chunk (``results``: (Chunk, StageResult) pairs)."""
    t0 = time.perf_counter()
    key, inputs = report_key(model, train.key, [o.key for _, o in results])

    def build(work: Path) -> dict[str, Any]:
        # "cached" is a property of one run, not of the report.
        chunks = eval_summary(results)
        # every row names its result (label), variant, threshold (0: a fixed budget) and mean visual tokens
        rows = [{**{k: v for k, v in r.items() if k != "cached"}, "label": result_label(r)} for r in eval_table(chunks)]
        summary = [{**{k: v for k, v in r.items() if k != "cached"}, "label": result_label(r)} for r in chunks]
        write_json_atomic(work / "summary.json", {"eval": rows, "chunks": summary,
                                                   "selector_metrics": train.manifest["selector_metrics"]})
        plots = [p.name for p in plot_eval(summary, work, model)]
        if (train.path / "selector_metrics.png").is_file():
            shutil.copy2(train.path / "selector_metrics.png", work / "selector_metrics.png")
            plots.append("selector_metrics.png")
        (work / "summary.md").write_text(report_markdown(model, feat, train, rows, plots, stock_token_lines(summary)))
        return {"config": {"model": model}, "inputs": inputs, "plots": plots, "code_version": code_version(),
                "counts": {"chunks": len(results), "plots": len(plots)}, "seconds": time.perf_counter() - t0}

    # Nothing of an interrupted report is reused: every file is rewritten from the inputs.
    return run_stage(home, "report", key, build, force=force, fresh=True)
