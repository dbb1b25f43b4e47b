"""DivPrune and CDPruner without the (N, N) matrix: the row-by-row path picks exactly what the whole
matrix picked (the dense code as it was before the row path, kept here as the reference), on random
inputs with padding, exact ties, several crops, both budgets, and a spent DPP rank; and its memory
does not grow with N^2."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.strategies._rows import PickedRows
from pipeline.strategies.cdpruner import cdpruner
from pipeline.strategies.core import budget_counts, image_budget
from pipeline.strategies.divprune import divprune, diversity

# ---------------------------------------------------------------- the dense reference (the code before)


def _dense_max_min(x, k, allowed):
    unit = torch.nn.functional.normalize(x, dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)
    b, n = dist.shape[:2]
    rows = torch.arange(b)
    eye = torch.eye(n, dtype=torch.bool)
    others = (~eye) & allowed[:, None, :]
    nearest = dist.masked_fill(~others, float("inf")).min(dim=2).values
    nearest = nearest.masked_fill(~allowed, float("-inf"))
    first = nearest.argmax(dim=1)
    taken = torch.zeros(b, n, dtype=torch.bool)
    taken[rows, first] = k > 0
    to_set = dist[rows, first]
    for step in range(1, int(k.max()) if k.numel() else 0):
        nxt = to_set.masked_fill(taken | ~allowed, float("-inf")).argmax(dim=1)
        more = step < k
        taken[rows[more], nxt[more]] = True
        to_set = torch.minimum(to_set, dist[rows, nxt])
    return taken


def _dense_divprune(projected, retention, budget, valid):
    crops, tokens = projected.shape[:2]
    k = torch.tensor([image_budget(valid, retention, budget)])
    return _dense_max_min(projected.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


def _dense_diversity(features, retention, budget, valid):
    crops, tokens = features.shape[:2]
    k = budget_counts(valid, retention, budget)
    if budget == "per-crop":
        return _dense_max_min(features.float(), k, valid)
    return _dense_max_min(features.float().reshape(1, crops * tokens, -1), k, valid.reshape(1, -1)).view(crops, tokens)


def _dense_dpp(kernel, k, eps=1e-10):
    n = kernel.shape[0]
    k = min(int(k), n)
    kernel = kernel.double()
    diag = torch.diagonal(kernel).clone()
    floor = eps * max(float(diag.max()), 0.0) if n else 0.0
    cis = kernel.new_zeros(k, n)
    di2 = diag.clone()
    picked = torch.zeros(n, dtype=torch.bool)
    out = torch.empty(k, dtype=torch.long)
    for i in range(k):
        open_ = di2.masked_fill(picked, float("-inf"))
        j = int(open_.argmax())
        if float(open_[j]) <= floor:
            out[i:] = diag.masked_fill(picked, float("-inf")).argsort(descending=True, stable=True)[:k - i]
            break
        out[i] = j
        picked[j] = True
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(di2[j]))
        cis[i] = e
        di2 = di2 - e * e
    return out


def _dense_cdpruner(projected, relevance, retention, budget, valid):
    crops, tokens = projected.shape[:2]
    x = torch.nn.functional.normalize(projected.float(), dim=-1)
    q = None if relevance is None else relevance.float()
    mask = torch.zeros(crops, tokens, dtype=torch.bool)
    if budget == "per-crop":
        groups = [(c, int(n)) for c, n in enumerate(budget_counts(valid, retention, budget))]
    else:
        x, mask, valid = x.reshape(1, crops * tokens, -1), mask.view(1, -1), valid.reshape(1, -1)
        q = None if q is None else q.reshape(1, -1)
        groups = [(0, image_budget(valid, retention, budget))]
    for g, k in groups:
        idx = valid[g].nonzero().flatten()
        if k == 0 or idx.numel() == 0:
            continue
        xi = x[g][idx]
        kernel = xi @ xi.T
        if q is not None:
            kernel = q[g][idx][:, None] * kernel * q[g][idx][None, :]
        mask[g][idx[_dense_dpp(kernel, k)]] = True
    return mask.view(crops, tokens)


# ---------------------------------------------------------------- random cases


def _case(seed):
    """Features (crops, L, C) with AnyRes-like padding, a relevance, a retention and a budget, drawn
    from ``seed``. Even seeds: Gaussian tokens and relevance (no ties). Odd seeds: exact ties, many of
    them: tokens of 1, 4 or 16 entries +-1 (norms 1, 2, 4), so that normalization and every dot product
    are exact in float32 whatever the BLAS's order, with duplicates and the relevance in quarters."""
    g = torch.Generator().manual_seed(seed)
    crops = (1, 3, 5)[seed % 3]
    tokens = int(torch.randint(12, 40, (1,), generator=g))
    width = (4, 8, 16, 64)[(seed // 2) % 4]  # width 4: more DPP picks than the rank
    if seed % 2 == 0:
        feats = torch.randn(crops, tokens, width, generator=g)
        relevance = torch.rand(crops, tokens, generator=g)
    else:
        nonzero = torch.tensor([1, 4, 16])[torch.randint(0, 3, (crops, tokens, 1), generator=g)].clamp(max=width)
        support = torch.rand(crops, tokens, width, generator=g).argsort(dim=-1) < nonzero
        signs = torch.randint(0, 2, (crops, tokens, width), generator=g) * 2.0 - 1.0
        feats = torch.where(support, signs, torch.zeros(()))
        src = torch.randint(0, crops * tokens, (tokens // 2,), generator=g)
        dst = torch.randint(0, crops * tokens, (tokens // 2,), generator=g)
        feats.view(-1, width)[dst] = feats.view(-1, width)[src]  # duplicates
        feats.view(-1, width)[dst[:2]] *= 4.0  # same direction, another norm (exact: a power of two)
        relevance = torch.randint(0, 5, (crops, tokens), generator=g).float() / 4
    valid = torch.ones(crops, tokens, dtype=torch.bool)
    if crops > 1:
        valid[-1, int(torch.randint(1, tokens, (1,), generator=g)):] = False  # an unpadded crop
    retention = (0.1, 0.25, 0.5, 1.0)[(seed // 3) % 4]
    budget = ("per-crop", "global")[(seed // 5) % 2]
    return feats, valid, relevance, retention, budget


SEEDS = range(64)


@pytest.mark.parametrize("seed", SEEDS)
def test_divprune_by_rows_picks_what_the_whole_matrix_picks(seed):
    feats, valid, _, retention, budget = _case(seed)
    want = _dense_divprune(feats, retention, budget, valid)
    assert torch.equal(divprune(feats, retention, budget, valid, dense_limit=0), want)
    assert torch.equal(divprune(feats, retention, budget, valid), want)  # small: the whole matrix, as before
    assert int(want.sum()) == image_budget(valid, retention, budget) and not (want & ~valid).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_diversity_by_rows_picks_what_the_whole_matrix_picks(seed):
    feats, valid, _, retention, budget = _case(seed)
    want = _dense_diversity(feats, retention, budget, valid)
    assert torch.equal(diversity(feats, retention, budget, valid, dense_limit=0), want)
    assert torch.equal(diversity(feats, retention, budget, valid), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_cdpruner_by_rows_picks_what_the_whole_kernel_picks(seed):
    feats, valid, relevance, retention, budget = _case(seed)
    for rel in (None, relevance):
        want = _dense_cdpruner(feats, rel, retention, budget, valid)
        assert torch.equal(cdpruner(feats, rel, retention, budget, valid, dense_limit=0), want)
        assert torch.equal(cdpruner(feats, rel, retention, budget, valid), want)
        assert int(want.sum()) == image_budget(valid, retention, budget)


def test_row_path_ties_go_to_the_lower_index():
    # Four copies of one token and four of its opposite: every distance is 0 or 2. Max-min takes the
    # first copy of each (lowest index), then (all remaining at distance 0) the lowest open index.
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0])
    feats = torch.stack([a, b, a, b, a, b, a, b])[None]
    valid = torch.ones(1, 8, dtype=torch.bool)
    keep = divprune(feats, 0.375, "global", valid, dense_limit=0)  # K = 3
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.equal(keep, _dense_divprune(feats, 0.375, "global", valid))
    # The DPP: rank 1 after the first pick (all copies are collinear): the rest by relevance, ties low.
    dpp = cdpruner(feats, None, 0.375, "global", valid, dense_limit=0)
    assert dpp[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.equal(dpp, _dense_cdpruner(feats, None, 0.375, "global", valid))


def test_picked_rows_returns_each_requested_row_computing_blocks_of_likely_picks():
    matrix = torch.arange(100.0).reshape(10, 10)
    rows = PickedRows(lambda ids: matrix[ids], 10, size=3)
    scores = torch.tensor([0.0, 9, 8, 7, 1, 1, 1, 1, 1, 1])
    assert rows.get(5, scores).tolist() == matrix[5].tolist() and rows.blocks == 1  # 5, then the top: 1, 2
    assert rows.get(1, scores).tolist() == matrix[1].tolist() and rows.blocks == 1
    assert rows.get(2, scores).tolist() == matrix[2].tolist() and rows.blocks == 1
    assert rows.get(3, scores).tolist() == matrix[3].tolist() and rows.blocks == 2


# ---------------------------------------------------------------- memory


_PEAK = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    from pipeline.strategies.divprune import divprune
    from pipeline.strategies.cdpruner import cdpruner
    def run(n):
        feats = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(0))
        valid = torch.ones(1, n, dtype=torch.bool)
        relevance = torch.rand(1, n, generator=torch.Generator().manual_seed(1))
        if sys.argv[2] == "divprune":
            return divprune(feats, 0.1, "global", valid, dense_limit=0)
        return cdpruner(feats, relevance, 0.1, "global", valid, dense_limit=0)
    run(64)  # warm: the libraries' own buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    keep = run(int(sys.argv[1]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(int(keep.sum()), (after - before) * 1024)
""")


@pytest.mark.parametrize("which", ["divprune", "cdpruner"])
def test_a_large_image_never_holds_the_n_by_n_matrix(which):
    # 6000 tokens: the distance matrix alone is 144 MB in float32 (the DPP kernel 288 MB in float64).
    # Row by row, the extra peak is the blocks (256 x N) and, for the DPP, the (K, N) Cholesky rows
    # (600 x 6000 float64: 29 MB).
    n = 6000
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), which], capture_output=True, text=True,
                         check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    kept, grew = (int(v) for v in out.stdout.split())
    assert kept == 600
    assert grew < 80e6, f"peak grew by {grew / 1e6:.0f} MB; the whole matrix is {n * n * 4 / 1e6:.0f} MB"
