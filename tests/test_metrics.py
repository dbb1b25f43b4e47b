"""Metrics against hand-checked cases (definitions: ../shared/BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from pipeline.metrics import anls, exact_match, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy


def test_exact_match_ignores_case_and_punctuation():
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("K7X", "k7x") == 1.0
    # neither side is stripped (HF evaluate's exact_match): the harness strips the response first,
    # and a reference with stray whitespace never matches, as in lmms-eval
    assert exact_match(" K7X ", "k7x") == 0.0
    assert exact_match("k7x", "k7x ") == 0.0
    assert exact_match("K7", "K7X") == 0.0
    assert exact_match("Red.", "red", ignore_punctuation=False) == 0.0


def test_anls_hand_checked():
    assert anls("K7X", ["K7X"]) == 1.0
    assert anls("k7x", ["K7X"]) == 1.0  # lowercased
    assert anls("K7", ["K7X"]) == pytest.approx(1 - 1 / 3)  # one edit over max(3, 2)
    assert anls("K", ["K7X"]) == 0.0  # 1 - 2/3 < 0.5
    assert anls("ab", ["abcd"]) == 0.5  # exactly 0.5 is kept
    assert anls("wrong", ["nope", "wrong answer"]) == 0.0
    assert anls("12 Main St", ["main st", "12 main st"]) == 1.0  # best over answers
    assert anls("  the   cat ", ["The cat"]) == 1.0  # whitespace collapsed
    assert anls("", [""]) == 1.0


def test_relaxed_accuracy_hand_checked():
    assert relaxed_accuracy("10.4", "10") == 1.0  # 4 % off
    assert relaxed_accuracy("10.6", "10") == 0.0  # 6 % off
    assert relaxed_accuracy("12%", "0.12") == 1.0  # trailing % divides by 100
    assert relaxed_accuracy("Yes", "yes") == 1.0  # strings: case-insensitive equality
    assert relaxed_accuracy("0", "0") == 1.0  # zero target: exact string match
    assert relaxed_accuracy("0.01", "0") == 0.0
    assert relaxed_accuracy("1,000", "1000") == 0.0  # no comma handling, as in lmms-eval


def test_vqa_normalization_and_accuracy():
    assert normalize_vqa_answer("The Dog's bowl.") == "dog 's bowl"
    assert normalize_vqa_answer("two") == "2"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("yes!") == "yes"
    # 3 of 10 annotators said "2": each leave-one-out subset has 2 or 3 matches
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    assert vqa_accuracy("A cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
