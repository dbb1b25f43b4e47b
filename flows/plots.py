"""PNG plots for reports and MLflow (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"selector": ("tab:red", "o"), "random": ("tab:gray", "s"), "uniform-grid": ("tab:blue", "^")}


def plot_selector_metrics(rows: list[dict], path: Path, title: str = "") -> Path:
    """Reconstruction MSE and glyph coverage vs retention, one line per strategy."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    strategies = sorted({r["strategy"] for r in rows}, key=lambda s: list(STYLE).index(s) if s in STYLE else 99)
    for ax, metric, label in ((axes[0], "recon_mse", "reconstruction MSE (standardized)"),
                              (axes[1], "glyph_coverage", "glyph coverage (fraction of glyph tokens kept)")):
        for s in strategies:
            pts = sorted((r["retention"], r[metric]) for r in rows if r["strategy"] == s and r[metric] == r[metric])
            if pts:
                color, marker = STYLE.get(s, (None, "x"))
                ax.plot(*zip(*pts), marker=marker, color=color, label=s)
        ax.set_xlabel("retention (fraction of tokens kept)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


EVAL_STYLE = {"selector": ("tab:red", "o"), "random": ("tab:gray", "s"), "attention": ("tab:purple", "^"),
              "diversity": ("tab:orange", "D")}


def _eval_axes(ax, rows: list[dict], benchmark: str) -> None:
    mine = [r for r in rows if r["benchmark"] == benchmark]
    metric = mine[0]["metric"] if mine else "score"
    for name in EVAL_STYLE:
        by_r: dict[float, list[float]] = {}
        for r in mine:
            if r["strategy"] == name:
                by_r.setdefault(r["retention"], []).append(r["score"])
        if by_r:
            xs = sorted(by_r)
            color, marker = EVAL_STYLE[name]
            label = name + (" (mean of seeds)" if any(len(v) > 1 for v in by_r.values()) else "")
            ax.plot(xs, [sum(by_r[x]) / len(by_r[x]) for x in xs], marker=marker, color=color, label=label)
    for name, color in (("full", "green"), ("none", "red")):
        pts = [r["score"] for r in mine if r["strategy"] == name]
        if pts:
            ax.axhline(pts[0], color=color, linestyle="--", label="full image" if name == "full" else "no image")
    ax.set_title(benchmark)
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


def plot_eval(rows: list[dict], out_dir: Path) -> list[Path]:
    """Like the paper's Figs. 4-7: per benchmark, metric vs retention for each strategy with the
    full-image (green dashed) and no-image (red dashed) levels; plus one grid of all benchmarks."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    paths = []
    for b in benchmarks:
        fig, ax = plt.subplots(figsize=(6, 4))
        _eval_axes(ax, rows, b)
        paths.append(_save(fig, Path(out_dir) / f"eval-{b}.png"))
    cols = min(3, len(benchmarks))
    nrows = -(-len(benchmarks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
    for ax, b in zip(axes.flat, benchmarks):
        _eval_axes(ax, rows, b)
    for ax in list(axes.flat)[len(benchmarks):]:
        ax.axis("off")
    paths.append(_save(fig, Path(out_dir) / "eval-grid.png"))
    return paths
