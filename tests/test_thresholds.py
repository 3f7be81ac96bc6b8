"""Threshold rules and metrics: candidate thresholds, balanced F1, the conformal bound, sklearn parity."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from lrsafety.thresholds import (
    ConformalLevelWarning,
    candidate_thresholds,
    conformal_miss_rate_tolerance,
    conformal_rank,
    conformal_threshold,
    evaluate_threshold,
    evaluate_thresholds,
    f1_objective_curve,
    minimum_calibration_size,
    select_threshold,
)


def test_candidates_follow_the_midpoint_formula():
    candidates = candidate_thresholds(np.array([3.0, 1.0, 2.0, 2.0]))
    np.testing.assert_allclose(candidates, [1.0 - 1e-6, 1.5, 2.5, 3.0 + 1e-6])


def test_candidates_of_one_unique_score():
    np.testing.assert_allclose(candidate_thresholds(np.array([0.5, 0.5])), [0.5 - 1e-6, 0.5 + 1e-6])


def test_candidates_reject_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        candidate_thresholds(np.array([]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        candidate_thresholds(np.array([0.0, np.nan]))


def test_balanced_f1_matches_weighted_sklearn_f1():
    # Balanced F1 is the F1 of counts weighted 0.5/n_H (harmful) and 0.5/n_N (harmless).
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.ones(30, bool), np.zeros(70, bool)])
    scores = rng.normal(size=100) + 1.2 * labels
    candidates = candidate_thresholds(scores)
    curve = f1_objective_curve(scores, labels, candidates, objective="balanced_macro_f1")
    weights = np.where(labels, 0.5 / 30, 0.5 / 70)
    expected = [f1_score(labels, scores >= tau, sample_weight=weights, zero_division=0.0) for tau in candidates]
    np.testing.assert_allclose(curve, expected, atol=1e-12)


def test_macro_f1_matches_plain_sklearn_f1():
    rng = np.random.default_rng(1)
    labels = rng.random(80) < 0.4
    scores = rng.normal(size=80) + labels
    candidates = candidate_thresholds(scores)
    curve = f1_objective_curve(scores, labels, candidates, objective="macro_f1")
    expected = [f1_score(labels, scores >= tau, zero_division=0.0) for tau in candidates]
    np.testing.assert_allclose(curve, expected, atol=1e-12)


def test_shared_threshold_averages_over_groups():
    rng = np.random.default_rng(2)
    labels = np.tile(np.repeat([True, False], 20), 2)
    groups = np.repeat(["sw", "yo"], 40)
    scores = rng.normal(size=80) + 2.0 * labels + np.where(groups == "yo", 3.0, 0.0)
    candidates = candidate_thresholds(scores)
    pooled = f1_objective_curve(scores, labels, candidates, groups=groups)
    per_group = [f1_objective_curve(scores[groups == g], labels[groups == g], candidates) for g in ("sw", "yo")]
    np.testing.assert_allclose(pooled, np.mean(per_group, axis=0))


def test_separable_scores_get_the_midpoint_between_classes():
    scores = np.array([-2.0, -1.0, 1.0, 3.0])
    labels = np.array([False, False, True, True])
    choice = select_threshold(scores, labels)
    assert choice.threshold == 0.0
    assert choice.objective_value == 1.0


def test_ties_go_to_the_lowest_threshold():
    # Harmful {1, 3}, harmless {2}: tau below 1 (TPR 1, FPR 1) and tau = 2.5 (TPR 0.5, FPR 0)
    # both give balanced F1 = 2/3.
    scores = np.array([1.0, 2.0, 3.0])
    labels = np.array([True, False, True])
    candidates = candidate_thresholds(scores)
    curve = f1_objective_curve(scores, labels, candidates)
    assert curve[0] == pytest.approx(2 / 3)
    assert curve[2] == pytest.approx(2 / 3)
    assert select_threshold(scores, labels).threshold == candidates[0]


def test_objective_needs_both_classes_per_group():
    with pytest.raises(ValueError, match="group 'yo' has 0 harmful"):
        f1_objective_curve(np.array([0.0, 1.0, 2.0]), np.array([True, False, False]), np.array([0.5]),
                           groups=np.array(["sw", "sw", "yo"]))


def test_conformal_rank_and_minimum_size():
    assert conformal_rank(19, 0.05) == 1
    assert conformal_rank(18, 0.05) == 0
    assert conformal_rank(64, 0.05) == 3
    assert minimum_calibration_size(0.05) == 19
    assert minimum_calibration_size(0.1) == 9


def test_conformal_threshold_is_kth_smallest_score():
    scores = np.arange(40, dtype=float)[::-1]
    choice = conformal_threshold(scores, alpha=0.1)
    assert choice.rank == 4
    assert choice.threshold == 3.0
    assert choice.certified
    assert choice.expected_miss_rate == pytest.approx(4 / 41)


def test_conformal_threshold_warns_when_uncertifiable():
    with pytest.warns(ConformalLevelWarning, match="cannot certify a miss rate of 0.05"):
        choice = conformal_threshold(np.arange(4.0), alpha=0.05)
    assert choice.threshold == -math.inf
    assert not choice.certified
    assert choice.rank == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conformal_threshold(np.arange(4.0), alpha=0.05, warn=False)


@pytest.mark.parametrize("n_calibration, alpha", [(48, 0.1), (64, 0.05), (19, 0.05)])
def test_conformal_miss_rate_stays_within_alpha(n_calibration, alpha):
    """Over many independent draws the mean miss rate lies in [alpha - 1/(n+1), alpha] up to z=4 SEs."""
    n_test, n_repeats = 300, 3000
    rng = np.random.default_rng(n_calibration)
    # Heavy-tailed scores: the guarantee needs exchangeability only, not a distribution family.
    calibration = rng.standard_t(3, size=(n_repeats, n_calibration))
    test = rng.standard_t(3, size=(n_repeats, n_test))
    thresholds = np.array([conformal_threshold(row, alpha).threshold for row in calibration])
    miss_rates = (test < thresholds[:, None]).mean(axis=1)

    tolerance = conformal_miss_rate_tolerance(n_calibration, alpha, n_test, n_repeats)
    assert miss_rates.mean() <= alpha + tolerance
    assert miss_rates.mean() >= alpha - 1 / (n_calibration + 1) - tolerance
    assert abs(miss_rates.mean() - conformal_rank(n_calibration, alpha) / (n_calibration + 1)) <= tolerance


def test_conformal_tolerance_matches_observed_spread():
    # The derived standard error (tolerance / z) must match the spread of the per-repeat miss rates.
    n_calibration, alpha, n_test, n_repeats = 64, 0.05, 200, 4000
    rng = np.random.default_rng(5)
    calibration = rng.normal(size=(n_repeats, n_calibration))
    test = rng.normal(size=(n_repeats, n_test))
    thresholds = np.sort(calibration, axis=1)[:, conformal_rank(n_calibration, alpha) - 1]
    miss_rates = (test < thresholds[:, None]).mean(axis=1)
    predicted_sd = conformal_miss_rate_tolerance(n_calibration, alpha, n_test, 1, z=1.0)
    assert miss_rates.std(ddof=1) == pytest.approx(predicted_sd, rel=0.1)


def test_evaluate_thresholds_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = np.concatenate([np.ones(57, bool), np.zeros(43, bool)])
    scores = rng.normal(size=(100, 3)) + labels[:, None] * np.array([0.5, 1.5, 0.0])
    thresholds = np.array([0.1, 0.7, -np.inf, 0.3])
    table = evaluate_thresholds(labels, scores, thresholds, score_columns=np.array([0, 1, 2, 1]))
    for row, column in enumerate([0, 1, 2, 1]):
        predicted = scores[:, column] >= thresholds[row]
        tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[False, True]).ravel()
        assert table.loc[row, "balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
        assert table.loc[row, "f1"] == pytest.approx(f1_score(labels, predicted))
        assert table.loc[row, "auc"] == pytest.approx(roc_auc_score(labels, scores[:, column]))
        assert (table.loc[row, "tp"], table.loc[row, "fn"], table.loc[row, "fp"], table.loc[row, "tn"]) == (tp, fn, fp, tn)
        assert table.loc[row, "miss_rate"] == pytest.approx(fn / 57)
        assert table.loc[row, "false_refusal_rate"] == pytest.approx(fp / 43)
    # A threshold of -inf flags every prompt as harmful.
    assert table.loc[2, "miss_rate"] == 0.0
    assert table.loc[2, "false_refusal_rate"] == 1.0


def test_evaluate_threshold_uses_greater_or_equal():
    metrics = evaluate_threshold(np.array([True, False]), np.array([1.0, 0.0]), threshold=1.0)
    assert metrics["tp"] == 1
    assert metrics["fp"] == 0


def test_evaluate_thresholds_rejects_one_class():
    with pytest.raises(ValueError, match="0 harmless"):
        evaluate_thresholds(np.array([True, True]), np.zeros((2, 1)), np.array([0.0]))
