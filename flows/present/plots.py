"""PNG plots for reports and MLflow (matplotlib, headless): held-out selector metrics, pruned
evaluation (the paper's Figs. 4-7), ``atr speed``'s speed-ups, and ``atr mask``'s overlay (Fig. 1).

Every PNG is written to a temporary name and renamed, so a crash never leaves half a picture."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"selector": ("tab:red", "o"), "selector-p0.25": ("tab:orange", "D"), "selector-range": ("tab:purple", "P"),
         "random": ("tab:gray", "s"), "uniform-grid": ("tab:blue", "^")}


SELECTOR_METRICS = (("recon_mse", "reconstruction MSE (standardized)"),
                    ("glyph_coverage", "glyph coverage (fraction of glyph tokens kept)"))


def plot_selector_metrics(rows: list[dict], path: Path, title: str = "") -> Path:
    """Write :func:`selector_metrics_figure` to ``path`` (PNG)."""
    return _save(selector_metrics_figure(rows, title), path)


def selector_metrics_figure(rows: list[dict], title: str = ""):
    """Reconstruction MSE and glyph coverage vs retention, one line per strategy: one panel per metric
    that has a value (real images carry no glyph labels, so their glyph coverage is NaN and gets no
    panel), the reconstruction panel always; a legend only where there are lines."""
    strategies = sorted({r["strategy"] for r in rows}, key=lambda s: list(STYLE).index(s) if s in STYLE else 99)

    def points(metric: str, s: str) -> list[tuple[float, float]]:
        return sorted((r["retention"], r[metric]) for r in rows
                      if r["strategy"] == s and r.get(metric) is not None and r[metric] == r[metric])

    metrics = [(m, label) for m, label in SELECTOR_METRICS
               if m == "recon_mse" or any(points(m, s) for s in strategies)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for s in strategies:
            pts = points(metric, s)
            if pts:
                color, marker = STYLE.get(s, (None, "x"))
                ax.plot(*zip(*pts), marker=marker, color=color, label=s)
        ax.set_xlabel("retention (fraction of tokens kept)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    return fig


BUDGET_LINES = {"per-crop": "-", "global": "-.", "stock": ":"}  # line styles when a run holds several budgets


VARIANT_MARKERS = ("D", "v", "P", "X", "*", "h")  # a strategy's further variants: its colour, another marker


def _variant_marker(base: str, variants: list[str], variant: str) -> str:
    """The default variant keeps the strategy's marker; each further one takes the next of VARIANT_MARKERS."""
    others = [v for v in variants if v]
    return base if not variant else VARIANT_MARKERS[others.index(variant) % len(VARIANT_MARKERS)]


def _eval_axes(ax, rows: list[dict], benchmark: str, model: str | None = None) -> None:
    """One benchmark's accuracy against retention: a line per swept strategy, variant and budget, a dashed
    level per fixed one (full, none), each in its registered style (``pipeline.strategies``; a default for
    one without; a variant other than the defaults with another marker). Threshold results have no
    retention: they are on the frontier plot (:func:`plot_frontier`)."""
    from pipeline import strategies

    mine = [r for r in rows if r["benchmark"] == benchmark and r.get("budget", "per-crop") != "threshold"]
    metric = mine[0]["metric"] if mine else "score"
    known = strategies.names()
    present = sorted({r["strategy"] for r in mine}, key=lambda n: (known.index(n) if n in known else len(known), n))
    for name in present:
        color, marker = strategies.style(name)
        spec = strategies.load().get(name)
        if spec is not None and not spec.prunes:
            pts = [r["score"] for r in mine if r["strategy"] == name]
            ax.axhline(pts[0], color=color, linestyle="--", label=spec.label)
            continue
        budgets = list(dict.fromkeys(r.get("budget", "per-crop") for r in mine if r["strategy"] == name))
        variants = list(dict.fromkeys(r.get("variant", "") for r in mine if r["strategy"] == name))
        for variant in variants:
            for budget in budgets:  # several budgets in one run: a line each, told apart by its line style
                by_r: dict[float, list[float]] = {}
                for r in mine:
                    if r["strategy"] == name and r.get("budget", "per-crop") == budget and \
                            r.get("variant", "") == variant:
                        by_r.setdefault(r["retention"], []).append(r["score"])
                if not by_r:
                    continue
                xs = sorted(by_r)
                label = name + (f" [{variant}]" if variant else "") + (f" [{budget}]" if len(budgets) > 1 else "") + \
                    (" (mean of seeds)" if any(len(v) > 1 for v in by_r.values()) else "")
                ax.plot(xs, [sum(by_r[x]) / len(by_r[x]) for x in xs], marker=_variant_marker(marker, variants, variant),
                        color=color, label=label, linestyle=BUDGET_LINES.get(budget, "-") if len(budgets) > 1 else "-")
    ax.set_title(benchmark if model is None else f"{benchmark} ({model})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("retention (fraction of encoder tokens kept)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _frontier_axes(ax, rows: list[dict], benchmark: str, model: str | None = None) -> None:
    """One benchmark's score against mean visual tokens per image: a line per fixed-budget strategy, variant
    and budget over its retentions (seeds averaged), a dashed line per threshold sweep (strategy and
    variant, each point marked with its t), full and none as horizontal reference levels."""
    from pipeline import strategies

    mine = [r for r in rows if r["benchmark"] == benchmark]
    metric = mine[0]["metric"] if mine else "score"
    known = strategies.names()
    present = sorted({r["strategy"] for r in mine}, key=lambda n: (known.index(n) if n in known else len(known), n))
    several = len({r.get("budget", "per-crop") for r in mine if r.get("budget", "per-crop") != "threshold"
                   and strategies.prunes(r["strategy"])}) > 1
    for name in present:
        color, marker = strategies.style(name)
        spec = strategies.load().get(name)
        own = [r for r in mine if r["strategy"] == name]
        if spec is not None and not spec.prunes:
            ax.axhline(own[0]["score"], color=color, linestyle="--",
                       label=f"{spec.label} ({own[0]['mean_visual_tokens']:.0f} tokens)")
            continue
        variants = list(dict.fromkeys(r.get("variant", "") for r in own))
        lines: dict[tuple, dict[float, list[dict]]] = {}
        for r in own:
            budget = r.get("budget", "per-crop")
            x = r.get("threshold", 0.0) if budget == "threshold" else r["retention"]
            lines.setdefault((r.get("variant", ""), budget), {}).setdefault(x, []).append(r)
        for (variant, budget), by_x in lines.items():
            pts = sorted((sum(r["mean_visual_tokens"] for r in g) / len(g), sum(r["score"] for r in g) / len(g), x)
                         for x, g in by_x.items())
            adaptive = budget == "threshold"
            label = name + (f" [{variant}]" if variant else "") + \
                (" @ thresholds" if adaptive else (f" [{budget}]" if several else ""))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, label=label,
                    marker="*" if adaptive else _variant_marker(marker, variants, variant),
                    linestyle=":" if adaptive else BUDGET_LINES.get(budget, "-") if several else "-")
            if adaptive:
                for tokens, score, t in pts:
                    ax.annotate(f"t={t:g}", (tokens, score), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=color)
    ax.set_title(f"{benchmark}: score vs tokens" + ("" if model is None else f" ({model})"))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("mean visual tokens per image (what the LLM saw)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the axes: the curves stay readable


def plot_frontier(rows: list[dict], path: Path, model: str | None = None) -> Path:
    """The frontier plot of a run (one model): a panel per benchmark, :func:`_frontier_axes` -- accuracy
    against the mean visual tokens per image, where fixed budgets, their variants and threshold sweeps
    meet on one axis. ``rows``: eval chunk rows (``eval_summary``)."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    cols = min(3, max(1, len(benchmarks)))
    nrows = max(1, -(-len(benchmarks) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(9.5 * cols, 4.5 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, benchmarks):
        _frontier_axes(ax, rows, b, model)
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.axis("off")
    return _save(fig, Path(path))


def plot_eval(rows: list[dict], out_dir: Path, model: str | None = None) -> list[Path]:
    """Like the paper's Figs. 4-7: per benchmark, metric vs retention for each strategy with the
    full-image (green dashed) and no-image (red dashed) levels; plus one grid of all benchmarks and the
    frontier plot (``frontier.png``: score against mean visual tokens, threshold sweeps included).
    ``model`` (one family's run) goes into every title."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    paths = []
    for b in benchmarks:
        fig, ax = plt.subplots(figsize=(6, 4))
        _eval_axes(ax, rows, b, model)
        paths.append(_save(fig, Path(out_dir) / f"eval-{b}.png"))
    cols = min(3, len(benchmarks))
    nrows = -(-len(benchmarks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, benchmarks):
        _eval_axes(ax, rows, b, model)
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.axis("off")
    paths.append(_save(fig, Path(out_dir) / "eval-grid.png"))
    if benchmarks:
        paths.append(plot_frontier(rows, Path(out_dir) / "frontier.png", model))
    return paths


def plot_speedups(prefill: dict, path: Path, title: str = "") -> Path:
    """Measured prefill speed-up vs retention next to the ideal of each FLOPs convention."""
    by_r = prefill["by_retention"]
    rs = sorted(by_r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(rs, [by_r[r]["measured_speedup"] for r in rs], "o-", color="tab:red", lw=2, label="measured (median)")
    styles = {"causal": ("tab:green", "ideal: true FLOPs, causal"), "square": ("tab:blue", "ideal: full n² square"),
              "fastv": ("tab:gray", "ideal: FastV convention")}
    for conv, (color, label) in styles.items():
        ax.plot(rs, [by_r[r][f"ideal_{conv}"] for r in rs], "--", color=color, marker=".", label=label)
    for r in rs:
        if r != 1.0:
            ax.annotate(f"{by_r[r]['measured_speedup'] / by_r[r]['ideal_causal']:.2f}", (r, by_r[r]["measured_speedup"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8, color="tab:red")
    ax.set_xlabel("retention (fraction of encoder tokens kept per crop)")
    ax.set_ylabel("prefill speed-up over the full prompt (×)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- atr mask

SELECTOR_EDGE = "#ff3b30"   # kept-token outline, selector column
RANDOM_EDGE = "#00c7ff"     # kept-token outline, random column
DIM_RGBA = (0.08, 0.08, 0.08, 0.72)  # overlay on dropped tokens
PADDING_RGBA = (0.55, 0.55, 0.55, 0.92)  # overlay on padding tokens (dropped by unpadding, never kept)


def _crop_title(i: int, grid: tuple[int, int]) -> str:
    if i == 0:
        return "base crop (whole image)"
    r, c = divmod(i - 1, grid[1])
    return f"grid crop r{r} c{c}"


def _draw_panel(ax, image, box, side, kept: list[int], valid: list[int], cls_offset: int, edge: str) -> None:
    """``side``: the crop's token grid, n (n x n) or (rows, cols) (Qwen-VL's merged grid of the whole image)."""
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    w, h = image.size
    x0, y0, x1, y1 = box
    ax.set_facecolor("black")  # padding outside the image
    cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    cx1, cy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if cx1 > cx0 and cy1 > cy0:
        part = image.crop((cx0, cy0, cx1, cy1))
        if max(part.size) > 768:  # enough for a ~3 inch panel
            part.thumbnail((768, 768))
        ax.imshow(np.asarray(part), extent=(cx0, cx1, cy1, cy0), interpolation="nearest", zorder=0)
    rows, cols = (side, side) if isinstance(side, int) else tuple(side)
    cells = [t - cls_offset for t in kept if t >= cls_offset]  # a CLS token (strategy "full") has no cell
    keep_mask = np.zeros(rows * cols, dtype=bool)
    keep_mask[cells] = True
    valid_mask = np.zeros(rows * cols, dtype=bool)
    valid_mask[[t - cls_offset for t in valid if t >= cls_offset]] = True
    overlay = np.zeros((rows, cols, 4))
    overlay[~keep_mask.reshape(rows, cols)] = DIM_RGBA
    overlay[~valid_mask.reshape(rows, cols)] = PADDING_RGBA
    ax.imshow(overlay, extent=(x0, x1, y1, y0), interpolation="nearest", zorder=1)
    tw, th = (x1 - x0) / cols, (y1 - y0) / rows
    rects = [Rectangle((x0 + (c % cols) * tw, y0 + (c // cols) * th), tw, th) for c in cells]
    ax.add_collection(PatchCollection(rects, facecolor="none", edgecolor=edge,
                                      linewidth=max(0.4, min(1.2, 24 / max(rows, cols))), zorder=2))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("auto")
    ax.set_box_aspect(1)  # square panels: a crop is S x S pixels to the vision tower
    ax.set_xticks([])
    ax.set_yticks([])


MASK_PANEL_IN = 3.0   # width of one column of ``atr mask`` (inches)
MASK_FONT_PT = 9      # its titles' font size
_CHAR_EM = 0.62       # a wide estimate of DejaVu Sans' mean character width, in ems


def fit_title(parts: list[str], width_in: float, fontsize: float = MASK_FONT_PT) -> str:
    """``parts`` as lines, each wrapped at word boundaries to fit ``width_in`` inches at ``fontsize``."""
    import textwrap

    chars = max(8, int(width_in * 72 / (fontsize * _CHAR_EM)))
    return "\n".join(line for part in parts for line in textwrap.wrap(part, chars, break_on_hyphens=False))


def mask_figure(res: dict[str, Any], image, retention: float, seed: int, image_name: str):
    """The two-column overlay (selector, random): one row per crop. Every title is wrapped to its
    column's width (a little less, for the gap), so neighbouring titles never run into each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, side = len(res["boxes"]), res["side"]
    panel, width = MASK_PANEL_IN, 0.9 * MASK_PANEL_IN
    grid = res["layout"].grid
    titles = []
    for i in range(n):
        valid, k = res["valid_indices"][i], res["k"][i]
        of = [f"{k}/{len(valid)} valid kept" + ("" if len(valid) == res["tokens"] else " (grey: padding)"),
              _crop_title(i, grid) if isinstance(side, int) else f"whole image: {side[0]} x {side[1]} merged tokens"]
        titles.append([fit_title([res.get("strategy", "selector"), *of], width),
                       fit_title([f"random (seed {seed})", *of], width)])
    lines = max(t.count("\n") + 1 for row in titles for t in row)
    head = fit_title([f"{image_name}  {image.size[0]}x{image.size[1]}  retention {retention:g}",
                      f"({res['checkpoint'].name}, trained p={res['trained_retention']:g})" if res.get("checkpoint")
                      else f"({res.get('strategy', 'selector')})"], 2 * width)
    title_in = 1.4 * MASK_FONT_PT / 72  # one title line, with its leading
    height = n * (panel + lines * title_in + 0.1) + (head.count("\n") + 1) * title_in + 0.2
    fig = Figure(figsize=(2 * panel, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2, squeeze=False)
    for i, box in enumerate(res["boxes"]):
        valid = res["valid_indices"][i]
        for j, (kept, edge) in enumerate(((res["selector"][i], SELECTOR_EDGE), (res["random"][i], RANDOM_EDGE))):
            _draw_panel(axes[i][j], image, box, side, kept, valid, res["cls_offset"], edge)
            axes[i][j].set_title(titles[i][j], fontsize=MASK_FONT_PT)
    fig.suptitle(head, fontsize=MASK_FONT_PT)
    return fig


def draw_mask(res: dict[str, Any], image, retention: float, seed: int, out: Path, image_name: str) -> Path:
    """Write :func:`mask_figure` as a PNG atomically (temp file + rename)."""
    fig = mask_figure(res, image, retention, seed, image_name)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
