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
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
