"""Answer metrics as lmms-eval computes them (see ../shared/BENCHMARKS.md), as plain functions."""

from __future__ import annotations

import string
from typing import Sequence

from rapidfuzz.distance import Levenshtein

_PUNCT = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """lmms-eval's generic exact_match: optional lowercasing and punctuation deletion, then equality."""
    p, a = prediction.strip(), answer.strip()
    if ignore_case:
        p, a = p.lower(), a.lower()
    if ignore_punctuation:
        p, a = p.translate(_PUNCT), a.translate(_PUNCT)
    return float(p == a)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA ANLS: 1 - min normalized Levenshtein over the answers, 0 below ``threshold``.

    Both sides are lowercased, stripped and whitespace-collapsed; the normalizer is
    the larger *raw* length (lmms-eval's quirk), 0 distance when both are empty."""
    best = 1.0
    for gt in answers:
        g = " ".join(gt.strip().lower().split())
        p = " ".join(prediction.strip().lower().split())
        denom = max(len(gt.upper()), len(prediction.upper()))
        nl = 0.0 if denom == 0 else Levenshtein.distance(g, p) / denom
        best = min(best, nl)
    score = 1.0 - best
    return 0.0 if score < threshold else score


__all__ = ["exact_match", "anls"]
