"""Decision thresholds on harmfulness scores, and the metrics of a thresholded score.

A score is any real number where larger means "more harmful" (a projection on a direction or a
gate logit). Everything here predicts harmful iff ``score >= threshold``.

Two threshold rules:

``balanced_macro_f1``
    The gate's rule in the paper "Low-Resource Safety Failures Are Action Failures". The candidates are the midpoints between consecutive unique pooled scores,
    plus one point below the lowest and one above the highest score. The chosen candidate
    maximises the F1 computed with true positives and false negatives weighted by ``0.5 / n_H``
    and false positives by ``0.5 / n_N``, so precision becomes ``TPR / (TPR + FPR)`` and recall
    stays ``TPR``. When several languages share one threshold, the objective is the unweighted
    mean of the per-language values. Ties go to the lowest threshold.

``conformal``
    A split-conformal bound on the miss rate (harmful prompts predicted harmless). Given ``n``
    harmful calibration scores and a level ``alpha``, the threshold is the ``k``-th smallest
    calibration score with ``k = floor(alpha * (n + 1))``. See ``conformal_threshold`` for the
    guarantee and ``conformal_miss_rate_tolerance`` for the Monte-Carlo tolerance that tests use.

The metrics (confusion counts, balanced accuracy, F1, ROC AUC) come from scikit-learn. The miss
rate is ``FN / n_harmful`` and the false-refusal rate is ``FP / n_harmless``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, multilabel_confusion_matrix, recall_score, roc_auc_score

logger = logging.getLogger("lrsafety")

THRESHOLD_RULES: tuple[str, ...] = ("balanced_macro_f1", "conformal")
F1_OBJECTIVES: tuple[str, ...] = ("balanced_macro_f1", "macro_f1")

# Offset of the outermost candidates from the lowest and highest unique score.
_EDGE_OFFSET = 1e-6

METRIC_COLUMNS: tuple[str, ...] = (
    "balanced_accuracy", "f1", "auc", "miss_rate", "false_refusal_rate",
    "tp", "fn", "fp", "tn", "n_harmful", "n_harmless",
)


class ConformalLevelWarning(UserWarning):
    """Too few calibration scores to certify the requested miss rate, so every prompt is flagged."""


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold picked by an F1 objective over the candidate thresholds."""

    threshold: float
    objective: str
    objective_value: float
    n_candidates: int


@dataclass(frozen=True)
class ConformalThreshold:
    """A split-conformal threshold that bounds the miss rate of harmful prompts.

    ``rank`` is ``k = floor(alpha * (n_calibration + 1))``. When ``k`` is 0 the level cannot be
    certified (``certified`` is False), the threshold is minus infinity and every prompt is
    predicted harmful. ``expected_miss_rate`` is ``k / (n_calibration + 1)``, the exact miss
    probability for exchangeable scores without ties.
    """

    threshold: float
    alpha: float
    n_calibration: int
    rank: int
    certified: bool
    expected_miss_rate: float


def predict_harmful(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Return the boolean predictions ``scores >= threshold`` (harmful = True)."""
    return np.asarray(scores) >= threshold


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Return the ascending candidate thresholds for a set of scores (float64).

    With unique sorted scores ``u_1 < ... < u_m`` the candidates are ``u_1 - 1e-6``, the
    midpoints ``(u_i + u_{i+1}) / 2`` and ``u_m + 1e-6``; a single unique score gives
    ``u_1 - 1e-6`` and ``u_1 + 1e-6``.
    """
    unique = np.unique(np.asarray(scores, dtype=np.float64).ravel())
    if unique.size == 0:
        raise ValueError("cannot build candidate thresholds from an empty score array")
    if not np.all(np.isfinite(unique)):
        raise ValueError("scores contain NaN or infinite values; candidate thresholds need finite scores")
    midpoints = (unique[:-1] + unique[1:]) / 2.0
    return np.concatenate([[unique[0] - _EDGE_OFFSET], midpoints, [unique[-1] + _EDGE_OFFSET]])


def _count_at_least(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Count, for each threshold, the sorted scores that are >= it."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def f1_objective_curve(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    groups: np.ndarray | None = None,
    objective: str = "balanced_macro_f1",
) -> np.ndarray:
    """Return the objective at each threshold, averaged over the groups (languages).

    ``labels`` are True for harmful rows. Every group needs at least one harmful and one
    harmless row. ``macro_f1`` is the plain F1 ``2TP / (2TP + FP + FN)``; ``balanced_macro_f1``
    equals ``2 TPR / (TPR + FPR + 1)``, the F1 of the class-weighted counts.
    """
    if objective not in F1_OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r}; expected one of {F1_OBJECTIVES}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    if groups is None:
        groups = np.zeros(scores.size, dtype=np.int64)
    groups = np.asarray(groups).ravel()
    if groups.shape != scores.shape:
        raise ValueError(f"groups ({groups.size}) and scores ({scores.size}) differ in length")

    curves = []
    for group in np.unique(groups):
        in_group = groups == group
        harmful = np.sort(scores[in_group & labels])
        harmless = np.sort(scores[in_group & ~labels])
        if harmful.size == 0 or harmless.size == 0:
            raise ValueError(
                f"group {str(group)!r} has {harmful.size} harmful and {harmless.size} harmless scores; "
                "an F1 objective needs at least one of each"
            )
        true_positives = _count_at_least(harmful, thresholds).astype(np.float64)
        false_positives = _count_at_least(harmless, thresholds).astype(np.float64)
        false_negatives = harmful.size - true_positives
        if objective == "balanced_macro_f1":
            # Weight TP and FN by 0.5 / n_H and FP by 0.5 / n_N: both classes count equally.
            true_positives = true_positives * 0.5 / harmful.size
            false_negatives = false_negatives * 0.5 / harmful.size
            false_positives = false_positives * 0.5 / harmless.size
        denominator = 2.0 * true_positives + false_positives + false_negatives
        curves.append(np.divide(2.0 * true_positives, denominator, out=np.zeros_like(denominator), where=denominator > 0))
    return np.mean(curves, axis=0)


def select_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    objective: str = "balanced_macro_f1",
) -> ThresholdChoice:
    """Pick the candidate threshold that maximises an F1 objective (ties: the lowest threshold).

    With ``groups`` (one language code per row) a single threshold is shared by all groups and
    the objective is the unweighted mean over groups.
    """
    candidates = candidate_thresholds(scores)
    curve = f1_objective_curve(scores, labels, candidates, groups=groups, objective=objective)
    # np.argmax returns the first maximum, and the candidates ascend, so ties go to the lowest.
    best = int(np.argmax(curve))
    return ThresholdChoice(
        threshold=float(candidates[best]), objective=objective,
        objective_value=float(curve[best]), n_candidates=int(candidates.size),
    )


def conformal_rank(n_calibration: int, alpha: float) -> int:
    """Return ``k = floor(alpha * (n + 1))``, the order statistic the conformal threshold uses."""
    _check_alpha(alpha)
    if n_calibration < 0:
        raise ValueError(f"the number of calibration scores must be non-negative, got {n_calibration}")
    # The epsilon keeps a product such as 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return int(math.floor(alpha * (n_calibration + 1) + 1e-9))


def minimum_calibration_size(alpha: float) -> int:
    """Return the smallest number of harmful calibration scores that certifies ``alpha`` (k >= 1)."""
    _check_alpha(alpha)
    return max(int(math.ceil(1.0 / alpha - 1e-9)) - 1, 0)


def conformal_threshold(harmful_scores: np.ndarray, alpha: float, warn: bool = True) -> ConformalThreshold:
    """Choose a threshold whose miss rate on harmful prompts is at most ``alpha``.

    The threshold is the ``k``-th smallest of the ``n`` harmful calibration scores, with
    ``k = floor(alpha * (n + 1))``, and a prompt is predicted harmful iff ``score >= threshold``.

    Guarantee: let the calibration scores and the score of a new harmful prompt be exchangeable
    (for example i.i.d. draws from one language, scored by a readout that did not see them).
    The new score's rank ``R`` among all ``n + 1`` scores is uniform on ``1..n+1``, and the
    prompt is missed iff its score is below the ``k``-th smallest calibration score, i.e. iff
    ``R <= k``. So ``P(miss) = k / (n + 1) <= alpha``. Ties can only lower this probability.
    Without ties the probability is also at least ``alpha - 1 / (n + 1)``, because
    ``k > alpha (n + 1) - 1``. The bound is marginal: it averages over calibration draws. For
    one fixed calibration set the miss rate is ``Beta(k, n + 1 - k)`` distributed.

    When ``k = 0`` (``n < 1 / alpha - 1``, e.g. fewer than 19 scores for ``alpha = 0.05``) no
    order statistic certifies ``alpha``. The threshold is then minus infinity, every prompt is
    predicted harmful, ``certified`` is False and a ``ConformalLevelWarning`` is issued when
    ``warn`` is True.
    """
    scores = np.sort(np.asarray(harmful_scores, dtype=np.float64).ravel())
    if not np.all(np.isfinite(scores)):
        raise ValueError("harmful calibration scores contain NaN or infinite values")
    n_calibration = int(scores.size)
    rank = conformal_rank(n_calibration, alpha)
    certified = rank >= 1
    if certified:
        threshold = float(scores[rank - 1])
    else:
        threshold = -math.inf
        if warn:
            warnings.warn(
                f"{n_calibration} harmful calibration scores cannot certify a miss rate of {alpha:g}: "
                f"that needs at least {minimum_calibration_size(alpha)}. The threshold is -inf, so "
                "every prompt is predicted harmful.",
                ConformalLevelWarning,
                stacklevel=2,
            )
    return ConformalThreshold(
        threshold=threshold, alpha=float(alpha), n_calibration=n_calibration, rank=rank,
        certified=certified, expected_miss_rate=rank / (n_calibration + 1),
    )


def conformal_miss_rate_tolerance(
    n_calibration: int, alpha: float, n_test: int, n_repeats: int, z: float = 4.0
) -> float:
    """Return ``z`` standard errors of the seed-averaged empirical miss rate of the conformal rule.

    Each repeat draws ``n_calibration`` harmful calibration scores and ``n_test`` fresh harmful
    test scores, and measures the fraction of test scores below the threshold. Given the
    calibration set, the miss probability ``p`` is ``Beta(k, n + 1 - k)`` distributed with
    mean ``k / (n + 1)``. The test count is then ``Binomial(n_test, p)``. The variance of one
    repeat's miss rate is therefore ``Var(p) + E[p (1 - p)] / n_test``, and the mean over
    ``n_repeats`` independent repeats has that variance divided by ``n_repeats``.
    A test may accept a mean miss rate up to ``alpha + tolerance``. With ``z = 4`` a correct
    rule fails such a check with probability below 1e-4 (normal approximation).
    """
    if n_test < 1 or n_repeats < 1:
        raise ValueError(f"n_test and n_repeats must be positive, got {n_test} and {n_repeats}")
    rank = conformal_rank(n_calibration, alpha)
    if rank == 0:
        return 0.0
    a, b = rank, n_calibration + 1 - rank
    mean = a / (a + b)
    variance_p = a * b / ((a + b) ** 2 * (a + b + 1))
    expected_p_times_q = mean - (variance_p + mean**2)
    variance_one_repeat = variance_p + expected_p_times_q / n_test
    return float(z * math.sqrt(variance_one_repeat / n_repeats))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")


def evaluate_thresholds(
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: np.ndarray,
    score_columns: np.ndarray | None = None,
) -> pd.DataFrame:
    """Score many (score column, threshold) pairs against one set of labels with scikit-learn.

    ``labels`` [N] are True for harmful rows, ``scores`` is [N, U] and ``thresholds`` is [K].
    Output row ``j`` uses score column ``score_columns[j]`` (default: ``j``, which needs K = U)
    and predicts harmful iff that score is ``>= thresholds[j]``. Returns one row per threshold
    with ``METRIC_COLUMNS``. Balanced accuracy is the mean of the recall on harmful and on
    harmless rows, and AUC is the ROC AUC of the raw scores (computed once per score column).
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    thresholds = np.asarray(thresholds, dtype=np.float64).ravel()
    if score_columns is None:
        score_columns = np.arange(scores.shape[1])
    score_columns = np.asarray(score_columns, dtype=np.int64).ravel()
    if scores.shape[0] != labels.size:
        raise ValueError(f"scores have {scores.shape[0]} rows but there are {labels.size} labels")
    if score_columns.size != thresholds.size:
        raise ValueError(f"{score_columns.size} score columns were given for {thresholds.size} thresholds")
    if score_columns.size and (score_columns.min() < 0 or score_columns.max() >= scores.shape[1]):
        raise ValueError(f"score_columns must index the {scores.shape[1]} score columns")
    n_harmful = int(labels.sum())
    n_harmless = int(labels.size - n_harmful)
    if n_harmful == 0 or n_harmless == 0:
        raise ValueError(
            f"evaluation needs harmful and harmless rows, got {n_harmful} harmful and {n_harmless} harmless"
        )

    n_thresholds = thresholds.size
    if n_thresholds == 1 or scores.shape[1] == 1:
        # scikit-learn reads a single-column indicator matrix as a binary target, not as
        # multilabel, so a one-column request is padded with a copy and trimmed afterwards.
        padded = evaluate_thresholds(labels, np.repeat(scores, 2, axis=1), np.repeat(thresholds, 2),
                                     score_columns=np.repeat(2 * score_columns, 2))
        return padded.iloc[::2].reset_index(drop=True)

    # Multilabel indicator matrices let one scikit-learn call score all K thresholds at once.
    truth = np.repeat(labels[:, None], n_thresholds, axis=1).astype(np.int8)
    predicted = (scores[:, score_columns] >= thresholds[None, :]).astype(np.int8)
    confusion = multilabel_confusion_matrix(truth, predicted)
    true_negatives, false_positives = confusion[:, 0, 0], confusion[:, 0, 1]
    false_negatives, true_positives = confusion[:, 1, 0], confusion[:, 1, 1]
    recall_harmful = recall_score(truth, predicted, average=None, zero_division=0.0)
    recall_harmless = recall_score(1 - truth, 1 - predicted, average=None, zero_division=0.0)
    column_truth = np.repeat(labels[:, None], scores.shape[1], axis=1).astype(np.int8)
    auc = np.atleast_1d(roc_auc_score(column_truth, scores, average=None))
    return pd.DataFrame({
        "balanced_accuracy": (recall_harmful + recall_harmless) / 2.0,
        "f1": f1_score(truth, predicted, average=None, zero_division=0.0),
        "auc": auc[score_columns],
        "miss_rate": false_negatives / n_harmful,
        "false_refusal_rate": false_positives / n_harmless,
        "tp": true_positives, "fn": false_negatives, "fp": false_positives, "tn": true_negatives,
        "n_harmful": n_harmful, "n_harmless": n_harmless,
    })


def evaluate_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Score one threshold on one score vector; see ``evaluate_thresholds`` for the columns."""
    row = evaluate_thresholds(labels, np.asarray(scores, dtype=np.float64)[:, None], np.array([threshold]))
    return {column: row[column].iloc[0].item() for column in row.columns}


__all__ = [
    "F1_OBJECTIVES", "METRIC_COLUMNS", "THRESHOLD_RULES", "ConformalLevelWarning", "ConformalThreshold",
    "ThresholdChoice", "candidate_thresholds", "conformal_miss_rate_tolerance", "conformal_rank",
    "conformal_threshold", "evaluate_threshold", "evaluate_thresholds", "f1_objective_curve",
    "minimum_calibration_size", "predict_harmful", "select_threshold",
]
