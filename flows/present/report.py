"""The Markdown report of ``atr run``: ``summary.md`` of the report stage and the run folder.

``reports/run-<run_id>/`` holds a copy of the report stage's files plus the list
of stages (key, cached, seconds, output) and the DuckDB and MLflow run ids.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.strategies import prunes, seeded
from storage.home import Home
from storage.stages import write_json_atomic

from .frontier import frontier_gaps


def result_label(row: dict) -> str:
    """How a result is named in tables, plots and summary.json: the strategy, its variant in brackets when
    not the defaults (``selector [allocation=image]``), and its threshold under the threshold budget
    (``selector @ t=0.5``)."""
    name = row["strategy"] + (f" [{row['variant']}]" if row.get("variant") else "")
    return name + (f" @ t={row['threshold']:g}" if row.get("budget") == "threshold" else "")


def fixed(row: dict) -> bool:
    """A result under a fixed budget (per-crop, global, stock), one a retention sizes."""
    return row.get("budget", "per-crop") != "threshold"


def stock_token_lines(summary: list[dict]) -> list[str]:
    """Per benchmark, the visual tokens sent against the stock model's (the unpruned checkpoint with its own
    settings: LLaVA-OneVision's interpolation on): for full, for the largest pruned context, and the largest
    retention of each budget whose pruned contexts all stay within stock. Benchmarks where the stock model
    sends what full sends, and no pruned context exceeds it, get no line."""
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in summary):
        rows = [r for r in summary if r["benchmark"] == bench and r.get("stock_visual_tokens")]
        if not rows:
            continue
        stock = rows[0]["stock_visual_tokens"]
        full = [r["mean_visual_tokens"] for r in rows if r["strategy"] == "full"]
        pruned = [r for r in rows if prunes(r["strategy"])]
        if full and abs(full[0] - stock) < 1e-9 and all(r["mean_visual_tokens"] <= stock for r in pruned):
            continue  # the stock model sends what full sends (LLaVA-NeXT, small images): nothing to add
        parts = [f"{bench}: stock context {stock:.1f} visual tokens"]
        if full:
            parts.append(f"full {full[0] / stock:.2f}x it")
        if pruned:
            top = max(pruned, key=lambda r: r["mean_visual_tokens"])
            where = (f"{result_label(top)}, cap {top['retention']:g}" if not fixed(top) else
                     f"{result_label(top)} at {top['retention']:g}")
            parts.append(f"largest pruned context {top['mean_visual_tokens'] / stock:.2f}x "
                         f"({where}, {top.get('budget', 'per-crop')} budget)")
            for budget in dict.fromkeys(r.get("budget", "per-crop") for r in pruned if fixed(r)):
                mine = [r for r in pruned if r.get("budget", "per-crop") == budget]
                over = sorted({r["retention"] for r in mine if r["mean_visual_tokens"] > r["stock_visual_tokens"]})
                under = [x for x in sorted({r["retention"] for r in mine}) if not over or x < over[0]]
                if over:
                    parts.append(f"{budget}: within stock up to retention {under[-1]:g}" if under else
                                 f"{budget}: above stock from retention {over[0]:g}")
        out.append("; ".join(parts))
    return out


def stock_table(rows: list[dict]) -> list[str]:
    """Markdown: mean visual tokens per (benchmark, strategy, budget) and retention, with the ratio to the
    stock model's context in brackets (``eval_table`` rows); [] when no row knows its stock count."""
    if not any(r.get("vs_stock") for r in rows):
        return []
    rows = [r for r in rows if fixed(r)]  # threshold results: their own table (adaptive_table)
    retentions = sorted({r["retention"] for r in rows if prunes(r["strategy"])})
    several = len({r["budget"] for r in rows if prunes(r["strategy"])}) > 1
    lines = ["| benchmark | strategy | " + " | ".join(f"{r:g}" for r in retentions) + " | full | stock |",
             "|---|---|" + "---|" * (len(retentions) + 2)]
    cells: dict[tuple, dict] = {}
    full: dict[str, dict] = {}
    for r in rows:
        if prunes(r["strategy"]):
            cells.setdefault((r["benchmark"], result_label(r), r["budget"]), {})[r["retention"]] = r
        elif r["strategy"] == "full":
            full[r["benchmark"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return ""
        return f"{r['visual_tokens']:.1f}" + ("" if r["vs_stock"] is None else f" ({r['vs_stock']:.2f}×)")

    for (bench, strategy, budget), by_r in cells.items():
        stock = next((r["stock_tokens"] for r in by_r.values() if r.get("stock_tokens")), None)
        name = strategy + (f" [{budget}]" if several else "")
        lines.append(f"| {bench} | {name} | " + " | ".join(cell(by_r.get(x)) for x in retentions) +
                     f" | {cell(full.get(bench))} | {'' if stock is None else f'{stock:.1f}'} |")
    return lines


def adaptive_table(rows: list[dict], full: dict[str, float]) -> list[str]:
    """Markdown: the threshold budget's results (``eval_table`` rows), one per (benchmark, strategy,
    variant, threshold), with their mean visual tokens; [] without any."""
    if not rows:
        return []
    out = ["", "Adaptive budget: each image keeps the tokens whose keep probability reaches the threshold t, "
               "between the floor and the cap (fractions of its valid tokens), so the count follows the image; "
               "compare with the fixed budgets at the same mean visual tokens (frontier plot).", "",
           "| benchmark | result | cap | floor | score | mean visual tokens |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["benchmark"], r["strategy"], r.get("variant", ""), r["threshold"])):
        f = full.get(r["benchmark"])
        score = f"{r['score']:.3f}" + (f" ({r['score'] / f:.2f}×)" if f else "")
        out.append(f"| {r['benchmark']} | {result_label(r)} | {r['retention']:g} | {r.get('floor', 0.0):g} | "
                   f"{score} | {r['visual_tokens']:.1f} |")
    return out


def equal_cost_lines(rows: list[dict], margin: float = 0.01) -> list[str]:
    """The results that beat every selector variant at equal or lower mean visual tokens by more than
    ``margin`` (``flows.present.frontier``): the selector's envelope over its variants, retentions and
    thresholds, compared at each other result's cost. Empty without selector results."""
    if not any(r["strategy"] == "selector" for r in rows):
        return []
    gaps = sorted((g for g in frontier_gaps(rows) if g["gap"] > margin), key=lambda g: (g["benchmark"], -g["gap"]))
    lines = ["", "## At equal cost", "",
             f"Results that beat the selector's best variant by more than {margin:g} at the same mean visual tokens "
             "(the selector's envelope over every variant, retention and threshold, linear between its points; "
             "'cheaper' marks a result cheaper than every selector point, compared with the cheapest):", ""]
    if not gaps:
        return lines + ["None: at every result's cost the selector is within "
                        f"{margin:g} of it or ahead."]
    lines += ["| benchmark | strategy | retention | tokens | score | selector at that cost | gap |", "|---|---|---|---|---|---|---|"]
    for g in gaps:
        lines.append(f"| {g['benchmark']} | {result_label(g)} | {g['retention']:g} | {g['tokens']:.1f} | {g['score']:.3f} | "
                     f"{g['selector_score']:.3f}{' (cheaper)' if g['extrapolated'] else ''} | +{g['gap']:.3f} |")
    return lines


def selector_provenance(manifest: dict) -> str:
    """How a train stage's selectors were trained, as the report names them: each at one p, and the one
    trained on a range of p (``retention_range``), e.g. ``trained at p = 0.25, 0.5; on p in [0.05, 0.4]``."""
    ps = [k for k in manifest["checkpoints"] if k != "range"]
    rng = manifest.get("config", {}).get("retention_range")
    parts = [f"trained at p = {', '.join(ps)}"] if ps else []
    if "range" in manifest["checkpoints"] and rng:
        parts.append(f"one on p in [{rng[0]:g}, {rng[1]:g}] (variant=range)")
    return "; ".join(parts)


def report_markdown(model: str, feat, train, rows: list[dict], plots: list[str],
                    stock_lines: list[str] | None = None) -> str:
    """``summary.md`` of the report stage: the pruned-evaluation table (a row per strategy, variant and
    budget), the threshold budget's results, the held-out selector table, the plots."""
    adaptive = [r for r in rows if not fixed(r)]
    rows = [r for r in rows if fixed(r)]
    retentions = sorted({r["retention"] for r in rows if prunes(r["strategy"])})
    full = {r["benchmark"]: r["score"] for r in rows if r["strategy"] == "full"}
    none = {r["benchmark"]: r["score"] for r in rows if r["strategy"] == "none"}
    fm, tm = feat.manifest, train.manifest
    lines = [f"# atr run report: {model}", "",
             f"- model: `{model}`",
             f"- selector: train stage `{train.key}` ({selector_provenance(tm)}, "
             f"{tm['config']['selector']['steps']} steps, eval mode {tm['eval_mode']})",
             f"- features: extract stage `{feat.key}` ({fm['counts']['samples']} images from "
             f"`{fm['config']['images']}`, {fm['config']['crops']} crops)", "",
             "## Pruned evaluation", "",
             "Score per retention; in brackets the fraction of the full-image score. Random is the mean over "
             "seeds.", "",
             "| benchmark | strategy | " + " | ".join(f"{r:g}" for r in retentions) + " | full | none |",
             "|---|---|" + "---|" * (len(retentions) + 2)]
    cells: dict[tuple, dict] = {}
    several = len({r.get("budget") for r in rows if prunes(r["strategy"])}) > 1
    for r in rows:
        if prunes(r["strategy"]):
            cells.setdefault((r["benchmark"], r["strategy"], r.get("variant", ""), r.get("budget", "per-crop")),
                             {})[r["retention"]] = r
    for (bench, strategy, variant, budget), by_r in cells.items():
        vals = []
        for ret in retentions:
            r = by_r.get(ret)
            vals.append("" if r is None else f"{r['score']:.3f}" + ("" if r["rel"] is None else f" ({r['rel']:.2f}×)"))
        seeds = next(iter(by_r.values()))["seeds"]
        name = result_label({"strategy": strategy, "variant": variant}) + \
            (f" ({seeds} seeds)" if seeded(strategy) or seeds > 1 else "") + (f" [{budget} budget]" if several else "")
        f, n = full.get(bench), none.get(bench)
        lines.append(f"| {bench} | {name} | " + " | ".join(vals) +
                     f" | {'' if f is None else f'{f:.3f}'} | {'' if n is None else f'{n:.3f}'} |")
    lines += adaptive_table(adaptive, full)
    lines += equal_cost_lines(rows + adaptive)
    tokens = stock_table(rows)
    if tokens:
        lines += ["", "Mean visual tokens the LLM saw; in brackets, over what the stock model (the unpruned "
                      "checkpoint with its own settings) sends for the same images:", ""] + tokens
    if stock_lines:
        lines += ["", "Visual tokens against the stock model:", ""] + [f"- {line}" for line in stock_lines]
    sel = tm["selector_metrics"]
    if sel:
        strategies = sorted({r["strategy"] for r in sel})
        lines += ["", "## Selector on held-out crops", "",
                  f"Reconstruction MSE (standardized features) from the kept tokens, {tm['held_out_crops']} "
                  "held-out crops.", "",
                  "| retention | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
        for ret in sorted({r["retention"] for r in sel}):
            by_s = {r["strategy"]: r for r in sel if r["retention"] == ret}
            lines.append(f"| {ret:g} | " + " | ".join(f"{by_s[s]['recon_mse']:.4f}" if s in by_s else ""
                                                       for s in strategies) + " |")
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_run_folder(h: Home, run: dict[str, str], reports, stages: list) -> Path:
    """``reports/run-<run_id>/``: the report stage's files plus the stages and the run ids.

    ``run`` holds ``run_id``, ``mlflow_run_id``, ``experiment_id`` and ``tracking_uri``. ``reports``
    is one report stage, or ``{model: report stage}``: with several models each report goes to its
    own subfolder (``<model>/``, plots included) and ``summary.md`` holds every model's summary."""
    out = h.reports / f"run-{run['run_id']}"
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(reports, dict):
        reports = {None: reports}
    text = []
    for model, report in reports.items():
        where = out if len(reports) == 1 else out / model_folder(model)
        where.mkdir(parents=True, exist_ok=True)
        for f in report.path.iterdir():
            if f.is_file() and f.name != "_manifest.json":
                shutil.copy2(f, where / f.name)
        body = (report.path / "summary.md").read_text()
        if len(reports) > 1:  # plots live in the model's folder: the links say so
            body = re.sub(r"!\[([^\]]*)\]\(", lambda m: f"![{m.group(1)}]({model_folder(model)}/", body)
        text.append(body)
    (out / "summary.md").write_text("\n\n".join(text))
    lines = ["", "## Stages", "", "| stage | key | cached | seconds | output |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | `{r['key']}` | {r['cached']} | {r['seconds']:.1f} | `{r['output']}` |"
              for r in stage_summary(stage_dicts(stages))]
    lines += ["", "## Runs", "",
              f"- DuckDB: run `{run['run_id']}` in `{h.results_db}`, e.g. "
              f"`atr query \"SELECT * FROM eval_scores WHERE run_id = '{run['run_id']}'\"`",
              (f"- MLflow: run `{run['mlflow_run_id']}` (experiment `{run['experiment_id']}`) at "
               f"`{run['tracking_uri']}`" if not str(run['mlflow_run_id']).startswith("offline-") else
               f"- MLflow: `{run['tracking_uri']}` did not answer; the run waits in the spool as "
               f"`{run['mlflow_run_id']}` until `atr sync` replays it")]
    with open(out / "summary.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    write_json_atomic(out / "run.json", {"run_id": run['run_id'], "mlflow_run_id": run['mlflow_run_id'],
                                         **({"report_stage": str(next(iter(reports.values())).path)}
                                            if len(reports) == 1 else
                                            {"report_stages": {m: str(r.path) for m, r in reports.items()}}),
                                         "stages": stage_dicts(stages)})
    return out


def model_folder(model: str) -> str:
    """A model's subfolder name in a run folder: its spec with path separators made safe."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/"))


def stage_dicts(stages: list) -> list[dict[str, Any]]:
    """StageResults as plain dicts (what ``run_flow`` returns and ``run.json`` holds)."""
    return [{"stage": s.stage, "key": s.key, "cached": s.cached, "seconds": s.seconds, "path": str(s.path)}
            for s in stages]


def stage_summary(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage, in run order: ``key`` (or "N chunks" for eval, "N stages" for a stage of several models), ``cached`` ("yes", "no" or
    "k/N"), total ``seconds`` and ``output`` (the stage directory, or the chunks' parent)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in stages:
        groups.setdefault(s["stage"], []).append(s)
    rows = []
    for name, g in groups.items():
        n = sum(s["cached"] for s in g)
        one = len(g) == 1
        rows.append({"stage": name, "key": g[0]["key"] if one else f"{len(g)} {'chunks' if name == 'eval' else 'stages'}",
                     "cached": "yes" if n == len(g) else ("no" if n == 0 else f"{n}/{len(g)}"),
                     "seconds": sum(s["seconds"] for s in g),
                     "output": g[0]["path"] if one else str(Path(g[0]["path"]).parent)})
    return rows
