"""Held-out evaluation of selectors against random-k and a uniform grid.

For each retention r and strategy (selector top-k, random-k averaged over seeds,
uniform grid) it reports:

* recon_mse: the reconstructor rebuilds all L tokens from the kept ones
  (standardized space, mean over crops, tokens and channels);
* glyph_coverage: the fraction of glyph-bearing tokens that are kept, over all
  held-out crops that carry a glyph mask (synthetic documents); NaN otherwise.

With several selectors in a train stage, ``variants`` adds rows for more selectors at
every retention (the three-way comparison of "one selector for every budget"): the
per-p selectors (nearest p, strategy ``selector``), the single selector trained at
0.25 (``selector-p0.25``) and the range-trained one (``selector-range``).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from .selector import TokenSelector, grid_indices, grid_indices_rect, pad_grids
from .strategies import Batch, Context, seeded_generator, select, selections


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask with the same count k in every row -> (B, k) kept token indices, raster order."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def held_out_metrics(selectors: Mapping[float, TokenSelector], crops: Iterable[tuple[np.ndarray, np.ndarray | None]],
             retentions: Iterable[float], seeds: int = 3, batch_size: int = 256,
             variants: Mapping[str, tuple[float | str, TokenSelector]] | None = None) -> list[dict]:
    """Rows ``{strategy, retention, selector_retention, recon_mse, glyph_coverage, n_crops}``.

    ``selectors`` maps trained p -> model. The selector row at retention r uses the
    model trained at the p nearest to r (with one selector: that one, top-k at r);
    ``random`` and ``uniform-grid`` are scored with that same model's reconstructor.
    ``selector`` and ``random`` choose through ``strategies.select`` with eval's per-crop
    budget, and ``random`` draws as eval does, from a generator seeded by (seed, crop index)
    (``strategies.seeded_generator``); ``uniform-grid`` is an ordered-dither grid.

    ``variants`` maps a strategy name to (its train-stage checkpoint key: a float p or
    "range", model): e.g. ``selector-p0.25`` (the selector trained at 0.25, top-k at every r)
    and ``selector-range`` (the range-trained one, top-k by its p-independent ranking).
    Each variant's row is scored with ITS OWN reconstructor (its kept set rebuilt by the
    reconstructor trained with it), not with the per-p selector's; its row carries
    ``checkpoint`` (the manifest's checkpoints key) and ``selector_retention`` (the p it was
    trained at; None for the range selector). The rows of ``selector``, ``random`` and
    ``uniform-grid`` are the same with or without variants."""
    retentions = [float(r) for r in retentions]
    feats, masks = [], []
    for f, m in crops:
        feats.append(np.asarray(f, dtype=np.float32))
        masks.append(None if m is None else np.asarray(m, dtype=bool))
    if not feats:
        raise ValueError("no held-out crops to evaluate")
    x_all = torch.from_numpy(np.stack(feats))
    has_glyphs = all(m is not None for m in masks)
    g_all = torch.from_numpy(np.stack(masks)) if has_glyphs else None
    n, tokens = x_all.shape[:2]
    rows = []
    for r in retentions:
        p = min(selectors, key=lambda q: (abs(q - r), q))
        model = selectors[p]
        device = next(model.parameters()).device  # evaluated where the selector is (CUDA when it trained there)
        totals: dict[str, list[float]] = {}
        for start in range(0, n, batch_size):
            x = x_all[start:start + batch_size].to(device)
            g = g_all[start:start + batch_size].to(device) if g_all is not None else None
            # the batch's crops as the crops of one image: the selector attends within each crop
            chosen = select("selector", x, r, "per-crop", Context(selector=model)).mask
            strategies = {"selector": [kept_indices(chosen)],
                          "uniform-grid": [grid_indices(len(x), tokens, r).to(device)],
                          "random": [_random(x, r, s, start) for s in range(seeds)]}
            for name, draws in strategies.items():
                acc = totals.setdefault(name, [0.0, 0.0, 0.0])  # sum mse, kept glyph tokens, glyph tokens
                for kept in draws:
                    acc[0] += model.reconstruction_error(x, kept).sum().item() / len(draws)
                    if g is not None:
                        acc[1] += g.gather(1, kept).sum().item() / len(draws)
                        acc[2] += g.sum().item() / len(draws)
        for name, (mse, kept, glyphs) in totals.items():
            rows.append({"strategy": name, "retention": r, "selector_retention": p, "recon_mse": mse / n,
                         "glyph_coverage": kept / glyphs if glyphs else float("nan"), "n_crops": n})
        for name, (ckpt, variant) in (variants or {}).items():
            mse, kept, glyphs = _own_reconstructor_scores(variant, x_all, g_all, r, batch_size)
            trained_at = None if isinstance(ckpt, str) else float(ckpt)
            rows.append({"strategy": name, "retention": r, "selector_retention": trained_at,
                         "checkpoint": ckpt if isinstance(ckpt, str) else f"{ckpt:g}", "recon_mse": mse / n,
                         "glyph_coverage": kept / glyphs if glyphs else float("nan"), "n_crops": n})
    return rows


def _own_reconstructor_scores(model: TokenSelector, x_all: torch.Tensor, g_all: torch.Tensor | None, r: float,
                              batch_size: int) -> tuple[float, float, float]:
    """(sum of per-crop MSE, kept glyph tokens, glyph tokens) of ``model``'s top-k at ``r``, each crop
    rebuilt by ``model``'s own reconstructor."""
    device = next(model.parameters()).device
    acc = [0.0, 0.0, 0.0]
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device)
        kept = kept_indices(select("selector", x, r, "per-crop", Context(selector=model)).mask)
        acc[0] += model.reconstruction_error(x, kept).sum().item()
        if g_all is not None:
            g = g_all[start:start + batch_size].to(device)
            acc[1] += g.gather(1, kept).sum().item()
            acc[2] += g.sum().item()
    return acc[0], acc[1], acc[2]


def held_out_grid_metrics(selectors: Mapping[float, TokenSelector],
                          images: Iterable[tuple[np.ndarray, np.ndarray | None, tuple[int, int]]],
                          retentions: Iterable[float], seeds: int = 3, batch_size: int = 64,
                          variants: Mapping[str, tuple[float | str, TokenSelector]] | None = None) -> list[dict]:
    """:func:`held_out_metrics` for dynamic-grid selectors (Qwen-VL): ``images`` are ``(features (L, C),
    glyph mask (L,) or None, (rows, cols))`` with L = rows * cols varying per image. Each image is one
    crop (per-crop = the whole image); the selector and random choose through ``strategies.selections``
    with the image's grid, ``uniform-grid`` is an ordered dither over its rows x cols, and every kept set
    is rebuilt by the reconstructor (batches padded to their longest image; MSE averaged per image over
    its own tokens, then over images, in standardized space). Same rows, same keys."""
    from .strategies import Context

    retentions = [float(r) for r in retentions]
    items = [(torch.from_numpy(np.asarray(f, dtype=np.float32)), None if m is None else torch.from_numpy(
        np.asarray(m, dtype=bool)), tuple(int(v) for v in g)) for f, m, g in images]
    if not items:
        raise ValueError("no held-out images to evaluate")
    has_glyphs = all(m is not None for _, m, _ in items)
    n = len(items)

    def score(model: TokenSelector, name_masks, r: float, acc: dict) -> None:
        device = next(model.parameters()).device
        for start in range(0, n, batch_size):
            part = items[start:start + batch_size]
            x, _ = pad_grids([f for f, _, _ in part])
            x = x.to(device)
            grid = torch.tensor([g for _, _, g in part], device=device)
            for name, draws in name_masks(model, part, start, r).items():
                a = acc.setdefault(name, [0.0, 0.0, 0.0])
                for masks in draws:  # one (L_i,) bool mask per image
                    kept = torch.zeros(x.shape[:2], dtype=torch.bool, device=device)
                    for i, m in enumerate(masks):
                        kept[i, :m.shape[0]] = m.to(device)
                    a[0] += model.reconstruction_error(x, grid=grid, kept=kept).sum().item() / len(draws)
                    if has_glyphs:
                        for (_, g, _), m in zip(part, masks):
                            a[1] += (g & m.cpu()).sum().item() / len(draws)
                            a[2] += g.sum().item() / len(draws)

    def chosen(model, part, start, r):
        feats = [f[None].to(next(model.parameters()).device) for f, _, _ in part]
        per_image = [{"grid": g} for _, _, g in part]
        sel = selections("selector", feats, r, "per-crop", Context(selector=model), Batch(per_image=per_image))
        return [[s.mask[0] for s in sel]]

    def baselines(model, part, start, r):
        feats = [f[None] for f, _, _ in part]
        draws = []
        for seed in range(seeds):
            per_image = [{"generator": seeded_generator(seed, start + i)} for i in range(len(part))]
            got = selections("random", feats, r, "per-crop", batch=Batch(per_image=per_image))
            draws.append([s.mask[0] for s in got])
        uniform = []
        for _, _, (rows, cols) in part:
            m = torch.zeros(rows * cols, dtype=torch.bool)
            m[grid_indices_rect(rows, cols, r)] = True
            uniform.append(m)
        return {"uniform-grid": [uniform], "random": draws}

    rows_out = []
    for r in retentions:
        p = min(selectors, key=lambda q: (abs(q - r), q))
        model = selectors[p]
        totals: dict[str, list[float]] = {}
        score(model, lambda m, part, start, r_: {"selector": chosen(m, part, start, r_)}, r, totals)
        score(model, baselines, r, totals)
        for name in ("selector", "uniform-grid", "random"):
            mse, kept, glyphs = totals[name]
            rows_out.append({"strategy": name, "retention": r, "selector_retention": p, "recon_mse": mse / n,
                             "glyph_coverage": kept / glyphs if glyphs else float("nan"), "n_crops": n})
        for name, (ckpt, variant) in (variants or {}).items():
            own: dict[str, list[float]] = {}
            score(variant, lambda m, part, start, r_: {name: chosen(m, part, start, r_)}, r, own)
            mse, kept, glyphs = own[name]
            trained_at = None if isinstance(ckpt, str) else float(ckpt)
            rows_out.append({"strategy": name, "retention": r, "selector_retention": trained_at,
                             "checkpoint": ckpt if isinstance(ckpt, str) else f"{ckpt:g}", "recon_mse": mse / n,
                             "glyph_coverage": kept / glyphs if glyphs else float("nan"), "n_crops": n})
    return rows_out


def _random(x: torch.Tensor, retention: float, seed: int, start: int) -> torch.Tensor:
    """(B, k) random kept indices of crops ``start``.. as eval's ``random`` keeps them (one image per crop)."""
    crops = [c[None] for c in x]
    per_image = [{"generator": seeded_generator(seed, start + i)} for i in range(len(crops))]
    got = selections("random", crops, retention, "per-crop", batch=Batch(per_image=per_image))
    return kept_indices(torch.cat([sel.mask for sel in got]))
