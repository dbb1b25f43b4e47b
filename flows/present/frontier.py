"""The accuracy-tokens frontier: does any strategy beat the selector at equal cost?

Cost is the mean visual tokens per image the LLM saw (kept tokens, kept row newlines, extra tokens:
``mean_visual_tokens``). The selector's frontier on a benchmark is the upper envelope of every selector
result there -- every variant, every fixed retention and every threshold -- as accuracy against cost.
Another strategy's result (T tokens, score S) is compared with that envelope at T, linear between its
points (equal cost). A result cheaper than every selector point is compared with the cheapest one, which
costs more (in the selector's favour), and is marked ``extrapolated``: add a lower retention or a higher
threshold to the sweep to compare it fairly.
"""

from __future__ import annotations

from typing import Iterable, Mapping

SELECTOR = "selector"


def _tokens(row: Mapping) -> float | None:
    """Mean visual tokens of a result: ``mean_visual_tokens`` (results store, chunk summaries) or
    ``visual_tokens`` (the eval table)."""
    return row.get("mean_visual_tokens", row.get("visual_tokens"))


def _mean_by_point(rows: Iterable[Mapping]) -> list[dict]:
    """Seeds averaged: one point per (benchmark, strategy, variant, budget, retention, threshold)."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        key = (r["benchmark"], r["strategy"], r.get("variant", ""), r.get("budget", "per-crop"), r["retention"],
               r.get("threshold", 0.0) or 0.0)
        groups.setdefault(key, []).append(r)
    out = []
    for (bench, strategy, variant, budget, retention, threshold), g in groups.items():
        out.append({"benchmark": bench, "strategy": strategy, "variant": variant, "budget": budget,
                    "retention": retention, "threshold": threshold,
                    "score": sum(float(r["score"]) for r in g) / len(g),
                    "tokens": sum(float(_tokens(r)) for r in g) / len(g)})
    return out


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope (non-decreasing in score as cost grows) of (tokens, score) points."""
    best, out = float("-inf"), []
    for tokens, score in sorted(points):
        if score > best:
            out.append((tokens, score))
            best = score
    return out


def at_cost(env: list[tuple[float, float]], tokens: float) -> tuple[float, bool]:
    """(the envelope's score at ``tokens``, extrapolated): linear between envelope points, flat after the
    last; below the cheapest point that point's score, flagged as extrapolated (it costs more)."""
    if not env:
        return float("nan"), True
    if tokens < env[0][0] - 1e-9:
        return env[0][1], True
    for (t0, s0), (t1, s1) in zip(env, env[1:]):
        if tokens <= t1:
            return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0), False
    return env[-1][1], False


def frontier_gaps(rows: Iterable[Mapping], mine: str = SELECTOR) -> list[dict]:
    """One row per other swept strategy result: its benchmark, strategy, variant, retention, tokens and score,
    the selector envelope's score at its cost and the gap (its score minus the selector's; above 0: it
    beats every selector variant at equal or lower cost)."""
    points = _mean_by_point(r for r in rows if _tokens(r) is not None)
    out = []
    for bench in dict.fromkeys(p["benchmark"] for p in points):
        sel = envelope([(p["tokens"], p["score"]) for p in points if p["benchmark"] == bench and p["strategy"] == mine])
        for p in points:
            if p["benchmark"] != bench or p["strategy"] in (mine, "full", "none") or p["budget"] == "threshold":
                continue
            score, extrapolated = at_cost(sel, p["tokens"])
            out.append({**p, "selector_score": score, "gap": p["score"] - score, "extrapolated": extrapolated})
    return out


__all__ = ["SELECTOR", "envelope", "at_cost", "frontier_gaps"]
