"""Rich tables printed by the ``atr`` commands (evaluation, selector, quality card, stages, speed)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.evaluate import eval_table
from pipeline.strategies import prunes

from .report import fixed, result_label, stock_token_lines


def console() -> Console:
    """A rich console; when piped (not a terminal) 120 columns wide instead of rich's 80."""
    return _console_width(120)


def _console_width(width: int) -> Console:
    return Console() if sys.stdout.isatty() else Console(width=width)


def print_quality(rows: list[dict]) -> None:
    """Test-split figures: accuracy per benchmark and strategy (random averaged over seeds)."""
    if not rows:
        return
    table = Table(title="tiny world, test splits")
    for col in ("benchmark", "strategy", "retention", "accuracy", "vs full", "chance", "tokens"):
        table.add_column(col, justify="left" if col in ("benchmark", "strategy") else "right")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["strategy"], r["retention"]), []).append(r)
    full = {b: g[0]["accuracy"] for (b, s, _), g in groups.items() if s == "full"}
    for (bench, strategy, retention), g in groups.items():
        acc = sum(r["accuracy"] for r in g) / len(g)
        rel = acc / full[bench] if full.get(bench) else float("nan")
        name = strategy if len(g) == 1 else f"{strategy} x{len(g)} seeds"
        table.add_row(bench, name, f"{retention:g}", f"{acc:.3f}", f"{rel:.2f}",
                      f"{g[0]['chance']:.3f}", f"{sum(r['mean_visual_tokens'] for r in g) / len(g):.1f}")
    console().print(table)
    print("  (accuracy: exact match on the test splits; random: mean over seeds; tokens: mean visual tokens "
          "the LM saw)")


def eval_figures_line(f: dict) -> str:
    """One line: what the eval stage encoded and computed (its ``stage_metrics``)."""
    line = (f"  tower   {int(f['images'])} images encoded, {int(f['tower_passes'])} tower passes for "
            f"{int(f['computed'])} of {int(f['shard_results'])} shard results ({int(f['shards'])} shards, "
            f"{int(f['cached_shards'])} fully cached)")
    if f["computed"]:
        line += f"; left padding {f['padding_share']:.1%} of batch positions"
    if f["skipped"]:
        line += f"; {int(f['skipped'])} rows skipped (see the warnings above)"
    return line


def print_eval_figures(figures: dict | None) -> None:
    if figures:
        print(eval_figures_line(figures))


def print_eval(summary: list[dict], title: str | None = None) -> None:
    """The eval table of one model's chunks, with the Rel. line: a row per (strategy, variant, budget,
    retention), labelled e.g. ``selector [allocation=image]``; a threshold result as ``selector @ t=0.5``
    with ``<=cap`` in the retention column and its mean visual tokens."""
    from rich.markup import escape

    rows = eval_table(summary)
    budgets = {r["budget"] for r in rows if prunes(r["strategy"])}
    several = len({b for b in budgets if b != "threshold"}) > 1
    show_budget = budgets - {"per-crop"} != set()  # the paper's per-crop alone: no column
    table = Table(title=title or "pruned evaluation")
    for col in ("benchmark", "strategy", *(("budget",) if show_budget else ()), "retention", "metric", "score",
                "vs full", "tokens", "vs stock", "prefill ms", "cached"):
        # a name too long for its column folds onto the next line, never cut short
        table.add_column(col, justify="left" if col in ("benchmark", "strategy", "budget", "metric") else "right",
                         overflow="fold" if col in ("benchmark", "strategy") else "ellipsis")
    for r in rows:
        name = result_label(r) + (f" x{r['seeds']}" if r["seeds"] > 1 else "")
        budget = ((r["budget"] if prunes(r["strategy"]) else ""),) if show_budget else ()
        table.add_row(r["benchmark"], escape(name), *budget, f"{r['retention']:g}" if fixed(r) else f"<={r['retention']:g}",
                      r["metric"], f"{r['score']:.3f}", "" if r["rel"] is None else f"{r['rel']:.2f}",
                      f"{r['visual_tokens']:.1f}", "" if r["vs_stock"] is None else f"{r['vs_stock']:.2f}",
                      f"{r['prefill_ms']:.1f}", "yes" if r["cached"] else "")
    console().print(table)
    print("  (tokens: mean visual tokens the LLM saw; vs stock: those over what the stock model sends for the same "
          "images)")
    rel: dict[tuple, list[float]] = {}
    for r in rows:
        if prunes(r["strategy"]) and r["rel"] is not None:
            rel.setdefault((result_label(r) + (f"[{r['budget']}]" if several and fixed(r) else ""),
                            r["retention"] if fixed(r) else None), []).append(r["rel"])
    if rel:
        print("  Rel. (mean over benchmarks of pruned/full): " + ", ".join(
            f"{s}@{ret:g} {sum(v) / len(v):.2f}" if ret is not None else f"{s} {sum(v) / len(v):.2f}"
            for (s, ret), v in sorted(rel.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0))))
    for line in stock_token_lines(summary):
        print("  " + line)



def print_selector_table(rows: list[dict]) -> None:
    table = Table(title="held-out: selector vs random (3 seeds) vs uniform grid")
    for col in ("retention", "strategy", "recon MSE", "glyph coverage"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for r in sorted(rows, key=lambda r: (r["retention"], r["strategy"])):
        cov = r["glyph_coverage"]
        table.add_row(f"{r['retention']:g}", r["strategy"], f"{r['recon_mse']:.4f}",
                      "n/a" if cov != cov else f"{cov:.3f}")
    console().print(table)


def print_stages(rows: list[dict]) -> None:
    """The stage table of ``atr run``: stage, key (or "N chunks"), cached, seconds."""
    table = Table(title="stages")
    for col in ("stage", "key", "cached", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in rows:
        table.add_row(r["stage"], r["key"], r["cached"], f"{r['seconds']:.1f}")
    console().print(table)


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def duration(seconds: float | None) -> str:
    """``seconds`` in the largest unit that keeps it readable: s, min, h or days."""
    if seconds is None:
        return "n/a"
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2f} s"


def selector_training_lines(training: dict[str, Any] | None, cfg: dict[str, Any]) -> list[str]:
    """``atr speed``'s selector-training figures, one line per shape: the measurement and the 100K-crop projection."""
    if not training:
        return ["selector training: not measured (--selector-training next,ov times it at the real dims, the "
                "default on CUDA)"]
    lines = []
    for shape, x in training.items():
        p = x["projection"]
        threads = f", {x['threads']} thread{'s' if x['threads'] != 1 else ''}"
        where = x["device"] + ("" if x["device"].startswith("cuda") else threads)
        lines.append(
            f"selector training, {shape} ({x['tokens']} × {x['channels']}, d {x['d_model']}, {x['heads']} heads, "
            f"{x['layers']}+{x['reconstructor_layers']} layers, {x['parameters'] / 1e6:.1f} M parameters; batch "
            f"{x['batch_size']}, {'bf16 autocast' if x['autocast'] else 'float32'}, median of {x['steps']} steps "
            f"after {x['warmup']} warm-up): measured {x['crops_per_second']:.3g} crops/s at "
            f"{x['flops_per_second'] / 1e9:.0f} GFLOP/s ({where}; FLOPs model: {x['flops_per_crop'] / 1e9:.0f} GFLOP "
            f"per crop, forward + backward); 100K COCO crops at the default schedule ({p['steps']} steps × "
            f"{p['batch_size']} = {p['crops']:,} crops, {p['passes']:.2f} passes) ≈ "
            f"{duration(p['seconds_measured'])} here; on an {p['gpu']} at {p['gpu_utilization']:.0%} of "
            f"{p['gpu_peak_flops'] / 1e12:.0f} TFLOP/s bf16 ≈ {duration(p['seconds_gpu'])}")
    return lines


def strategy_cost_lines(st: dict[str, Any]) -> list[str]:
    """Which strategy is cheapest at each retention and where the selector stands (plain lines)."""
    lines = []
    by = {name: {float(r): v for r, v in x.items()} for name, x in st["strategies"].items()}
    retentions = sorted({r for x in by.values() for r in x}, reverse=True)
    for r in retentions:
        ms = sorted((x[r]["select_seconds"] * 1000.0, name) for name, x in by.items() if r in x)
        line = f"at {r:g}: cheapest {ms[0][1]} ({ms[0][0]:.2f} ms), dearest {ms[-1][1]} ({ms[-1][0]:.2f} ms)"
        names = [n for _, n in ms]
        if "selector" in names:
            line += f"; selector {names.index('selector') + 1} of {len(names)} ({ms[names.index('selector')][0]:.2f} ms)"
        lines.append(line)
    return lines


def print_strategy_costs(console, st: dict[str, Any]) -> None:
    t = Table(title=f"strategies side by side: selection per image and time to first token (equal budgets; "
                    f"{st['crops']} crops × {st['tokens_per_crop']} tokens, full TTFT "
                    f"{st['ttft_full_seconds'] * 1000:.1f} ms)")
    for col in ("strategy", "retention", "tokens sent", "LLM visual tokens", "select ms", "TTFT ms", "TTFT full ÷"):
        t.add_column(col, justify="right")
    full = st["ttft_full_seconds"]
    for name, by in st["strategies"].items():
        for r, x in sorted(by.items(), key=lambda kv: -float(kv[0])):
            t.add_row(name, f"{float(r):g}", str(x["tokens"]), str(x["visual_tokens"]),
                      f"{x['select_seconds'] * 1000:.2f}", f"{x['ttft_seconds'] * 1000:.1f}",
                      f"{full / x['ttft_seconds']:.2f}")
    console.print(t)
    for line in strategy_cost_lines(st):
        console.print(line)


def print_speed(out: dict[str, Any]) -> None:
    """The ``atr speed`` tables: prefill per retention, selector share, extraction, figures vs targets, load."""
    from rich.markup import escape

    console = _console_width(150)  # a log or a pipe: do not wrap the speed tables at 80 columns
    p, e, load = out["prefill"], out["extract"], out["load"]
    cfg = out["config"]
    t = Table(title=f"prefill: {cfg['model']} on {cfg['device']} ({cfg['dtype']}, {cfg['torch_threads']} threads, "
                    f"{cfg['attn_implementation']}), {p['text_tokens']} text tokens, {p['crops']} crops × "
                    f"{p['tokens_per_crop']}, median of {cfg['repeats']}")
    for col in ("retention", "LLM tokens", "seconds", "measured ×", "ideal × (causal)", "÷ ideal causal",
                "÷ ideal square", "÷ ideal FastV", "GFLOP/s", "peak MiB", "KV MiB"):
        t.add_column(col, justify="right")
    for r, x in sorted(p["by_retention"].items(), key=lambda kv: -float(kv[0])):
        t.add_row(f"{float(r):g}", str(p["text_tokens"] + x["visual_tokens"]), f"{x['seconds']:.3f}",
                  f"{x['measured_speedup']:.2f}", f"{x['ideal_causal']:.2f}",
                  *[f"{x['measured_speedup'] / x[f'ideal_{c}']:.2f}" for c in ("causal", "square", "fastv")],
                  f"{x['flops_per_second'] / 1e9:.0f}", f"{x['peak_bytes'] / 2**20:.1f}",
                  _fmt(None if x["kv_cache_bytes"] is None else x["kv_cache_bytes"] / 2**20, ".1f"))
    console.print(t)
    s = Table(title="selector + top-k per image (all crops in one forward) vs full prefill")
    for col in ("retention", "seconds", "measured share", "FLOPs share", "measured/predicted"):
        s.add_column(col, justify="right")
    for r, x in sorted(p["by_retention"].items(), key=lambda kv: -float(kv[0])):
        if "selector_seconds" in x:
            s.add_row(f"{float(r):g}", f"{x['selector_seconds']:.4f}", f"{x['selector_share']:.2%}",
                      f"{x['selector_share_predicted']:.2%}",
                      f"{x['selector_share'] / x['selector_share_predicted']:.2f}")
    console.print(s)
    console.print(f"the prompt without its image ({p['text_tokens']} tokens): {p['text_only']['seconds'] * 1000:.1f} ms "
                  f"per forward (fixed cost + text)")
    proj = p["projection"]
    console.print(f"projection: {proj['selector']} selector vs {proj['model']} prefill ({proj['text_tokens']} text + "
                  f"{proj['visual_tokens']} visual tokens): {proj['selector_flops'] / 1e9:.0f} GFLOP / "
                  f"{proj['prefill_flops'] / 1e12:.1f} TFLOP = {proj['selector_share']:.2%}")
    if out.get("strategies"):
        print_strategy_costs(console, out["strategies"])
    if e is not None:
        console.print(f"extraction ({e['images']} {e['source']} images, {e['crops']} crops, batch {e['batch_size']}, "
                      f"{e['shards']} shards): stage {e['stage_images_per_second']:.2f} images/s, bare tower "
                      f"{e['bare_tower_images_per_second']:.2f} images/s, ratio {e['stage_over_bare_tower']:.3f} "
                      f"(render + processor {e['preprocess_seconds']:.2f} s, fp16 + shards + manifest "
                      f"{e['other_seconds']:.2f} s of {e['stage_seconds']:.2f} s)")
        console.print(f"extract stage: cold {e['cold_seconds']:.2f} s, cached {e['cached_seconds'] * 1000:.1f} ms, "
                      f"cached/cold {e['cached_over_cold']:.4f}")
    for line in selector_training_lines(out.get("selector_training"), cfg):
        console.print(escape(line))
    f = Table(title="figures against their targets")
    for col in ("figure", "value", "target", "met"):
        f.add_column(col)
    for row in out["figures"]:
        f.add_row(row["figure"], _fmt(row["value"], ".4g"), row["target"],
                  "n/a" if row["met"] is None else ("yes" if row["met"] else "NO"))
    console.print(f)
    phases = "; ".join(f"{k} {_fmt(v['other_cores_mean'], '.2f')} (max {_fmt(v['other_cores_max'], '.2f')})"
                       for k, v in out["load_by_phase"].items())
    console.print(f"load: other processes used {_fmt(load['other_cores_mean'], '.2f')} cores on average (max "
                  f"{_fmt(load['other_cores_max'], '.2f')}) of {load['cpus']} ({phases}); loadavg "
                  f"{_fmt(load['loadavg1_start'], '.2f')} -> {_fmt(load['loadavg1_end'], '.2f')}; {load['seconds']:.0f} s")
    for w in out["warnings"]:
        console.print(f"[bold red]warning:[/] {escape(w)}")
    console.print(f"run {out['run_id']} (MLflow {out['mlflow_run_id']}); plot {out['plot']}")
