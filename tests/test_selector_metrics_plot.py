"""``selector_metrics.png``: real images (no glyph labels) get the reconstruction panel only, with no
empty panel and no legend warning; synthetic documents (glyph masks) get both panels."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from flows.present.plots import plot_selector_metrics, selector_metrics_figure
from pipeline.selector import SelectorConfig, TokenSelector
from pipeline.selector_eval import held_out_metrics


def _rows(glyphs: bool) -> list[dict]:
    torch.manual_seed(0)
    tokens, channels = 16, 8
    selector = TokenSelector(SelectorConfig(d_model=8, n_heads=2, selector_layers=1, reconstructor_layers=1),
                             tokens, channels).eval()
    rng = np.random.default_rng(0)
    crops = [(rng.standard_normal((tokens, channels)).astype(np.float32),
              (rng.random(tokens) < 0.3) if glyphs else None) for _ in range(6)]
    return held_out_metrics({0.25: selector}, crops, [0.25, 0.5], seeds=1)


def _panels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes]


def test_real_images_get_no_glyph_panel_and_no_legend_warning(tmp_path):
    rows = _rows(glyphs=False)
    assert rows and all(r["glyph_coverage"] != r["glyph_coverage"] for r in rows)  # NaN: real images
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" would raise
        fig = selector_metrics_figure(rows, title="held-out")
        assert _panels(fig) == ["reconstruction MSE (standardized)"]
        assert sorted(fig.axes[0].get_legend_handles_labels()[1]) == ["random", "selector", "uniform-grid"]
        out = plot_selector_metrics(rows, tmp_path / "selector_metrics.png")
    assert out.stat().st_size > 0 and not list(tmp_path.glob("*.tmp.png"))


def test_synthetic_documents_get_both_panels_each_with_a_legend():
    rows = _rows(glyphs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = selector_metrics_figure(rows)
    assert _panels(fig) == ["reconstruction MSE (standardized)", "glyph coverage (fraction of glyph tokens kept)"]
    assert all(ax.get_legend() is not None for ax in fig.axes)
    coverage = {line.get_label(): line.get_ydata().tolist() for line in fig.axes[1].get_lines()}
    assert set(coverage) == {"random", "selector", "uniform-grid"}
    assert all(0.0 <= v <= 1.0 for ys in coverage.values() for v in ys)
