"""Separability of harmful and harmless prompts along harmfulness directions, and the U-score.

A prompt's score for a direction is its projection ``s(x) = h(x) . unit(v)``, with harmful as
the positive class. For each layer, position, direction and language this module reports on
the test split:

- ``auc``: ROC AUC of the scores (scikit-learn, ties averaged);
- ``balanced_accuracy`` = (TPR + TNR) / 2 at a threshold fitted on train data, predicting
  harmful iff ``score >= threshold``. For shared directions it is the threshold that maximises
  balanced accuracy on the pooled high-resource (HRL) train scores. A language's own direction
  takes it from that language's train scores instead.

Directions: ``pooled_dim``, ``pc1_of_diffs``, ``own_language`` (the language's own train
difference of means), and two controls: ``random`` (seeded Gaussian unit directions) and
``permuted`` (difference of means after shuffling the pooled HRL train labels).

The U-score (OMNIGuard-style layer selection) compares row-aligned prompts across languages:
for the anchor (English) and another language, per subset on the train split, rows are
L2-normalised and ``S = A T^T``; U = mean of diag(S) - mean of the off-diagonal entries. A
language's score is the mean over the two subsets; the selection score of a layer is the mean
over the non-English HRLs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lrsafety.activations import CellActivations, available_cells, cell_prompt_ids, load_cell
from lrsafety.directions import Directions, diff_of_means, random_direction, unit
from lrsafety.languages import high_resource_languages, resource_tier, tier_order
from lrsafety.runs import RunDir

logger = logging.getLogger("lrsafety")

SHARED_DIRECTIONS: tuple[str, ...] = ("pooled_dim", "pc1_of_diffs")
OWN_DIRECTION = "own_language"
CONTROL_DIRECTIONS: tuple[str, ...] = ("random", "permuted")
DIRECTION_ORDER: tuple[str, ...] = (*SHARED_DIRECTIONS, OWN_DIRECTION, *CONTROL_DIRECTIONS)
SUBSETS: tuple[str, ...] = ("harmful", "harmless")


# ---------------------------------------------------------------------------------------------
# Scores and threshold metrics


def projection_scores(activations: np.ndarray, direction: np.ndarray, cell: str = "activations") -> np.ndarray:
    """Return ``activations @ unit(direction)`` for ``[N, d]`` activations and a ``[d]`` direction.

    Raises ``ValueError`` naming ``cell`` and both widths when they differ.
    """
    activations = np.asarray(activations)
    direction = np.asarray(direction, dtype=np.float64)
    if activations.ndim != 2 or direction.ndim != 1:
        raise ValueError(f"{cell}: expected [N, d] activations and a [d] direction, got {activations.shape} and {direction.shape}")
    if activations.shape[1] != direction.shape[0]:
        raise ValueError(
            f"{cell}: activation width {activations.shape[1]} does not match direction width {direction.shape[0]}; "
            "the directions were computed for another model"
        )
    return (activations.astype(np.float64) @ unit(direction)).astype(np.float32)


def labels_for(n_harmful: int, n_harmless: int) -> np.ndarray:
    """Return 0/1 labels with harmful (1) first, matching ``np.concatenate([harmful, harmless])``."""
    return np.concatenate([np.ones(n_harmful, dtype=np.int64), np.zeros(n_harmless, dtype=np.int64)])


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the ROC AUC of scores with harmful (label 1) as the positive class."""
    from sklearn.metrics import roc_auc_score

    _check_both_classes(labels)
    return float(roc_auc_score(labels, scores))


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the threshold that maximises balanced accuracy of ``score >= threshold``.

    Candidates are the thresholds of scikit-learn's ``roc_curve`` (every distinct score, plus
    one above the maximum). Balanced accuracy is (TPR + 1 - FPR) / 2; on ties the lowest
    threshold wins. The candidate above every score is replaced by the next float above the
    maximum, so the returned threshold is always finite.
    """
    false_positive_rate, true_positive_rate, thresholds = _roc_curve(scores, labels)
    balanced = (true_positive_rate + 1.0 - false_positive_rate) / 2.0
    # roc_curve lists thresholds in decreasing order, so the last maximum is the lowest threshold.
    best = len(balanced) - 1 - int(np.argmax(balanced[::-1]))
    threshold = float(thresholds[best])
    if not np.isfinite(threshold):
        threshold = float(np.nextafter(np.max(scores), np.inf))
    return threshold


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Return AUC and the metrics of predicting harmful iff ``score >= threshold``.

    Both come from one scikit-learn ``roc_curve``, because one call per score column keeps a
    table of tens of thousands of rows fast. AUC is ``sklearn.metrics.auc`` of the curve. The
    rates at the threshold are those of the curve point with the smallest candidate threshold
    ``>= threshold``, which is exact because every distinct score is a candidate. Balanced
    accuracy is (TPR + TNR) / 2, and F1 and the confusion counts follow from the rates.
    """
    from sklearn.metrics import auc as area_under_curve

    labels = np.asarray(labels)
    false_positive_rate, true_positive_rate, thresholds = _roc_curve(scores, labels)
    # thresholds decrease along the curve; count those >= threshold, and take the last of them.
    index = int(np.searchsorted(-thresholds, -threshold, side="right")) - 1
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    true_positives = int(round(true_positive_rate[index] * n_positive))
    false_positives = int(round(false_positive_rate[index] * n_negative))
    predicted_positive = true_positives + false_positives
    precision = true_positives / predicted_positive if predicted_positive else 0.0
    recall = true_positives / n_positive
    return {
        "auc": float(area_under_curve(false_positive_rate, true_positive_rate)),
        "balanced_accuracy": float((true_positive_rate[index] + 1.0 - false_positive_rate[index]) / 2.0),
        "true_positive_rate": float(true_positive_rate[index]),
        "true_negative_rate": float(1.0 - false_positive_rate[index]),
        "f1": float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
        "true_positives": true_positives,
        "false_positives": false_positives,
        "true_negatives": n_negative - false_positives,
        "false_negatives": n_positive - true_positives,
    }


def _roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import sklearn
    from sklearn.metrics import roc_curve

    _check_both_classes(labels)
    # Inputs are validated here once; scikit-learn's own validation dominates the run time of
    # the per-column loops otherwise.
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the activations and directions")
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        return roc_curve(labels, scores, drop_intermediate=False)


def _check_both_classes(labels: np.ndarray) -> None:
    values = set(np.unique(labels).tolist())
    if values != {0, 1}:
        raise ValueError(f"scores need both harmful (1) and harmless (0) labels, got labels {sorted(values)}")


# ---------------------------------------------------------------------------------------------
# Direction banks: every direction of one evaluation as one [K, n_layers, n_positions, d] array


@dataclass(frozen=True)
class DirectionBank:
    """The shared and control directions scored on every language, stacked along axis 0."""

    names: list[str]  # direction name per row, e.g. "pooled_dim", "random", "random"
    replicates: list[int]  # replicate index per row (0 for non-control directions)
    vectors: np.ndarray  # [K, n_layers, n_positions, d_model], float32


def control_bank(
    run_dir: str | Path | RunDir,
    directions: Directions,
    n_random_directions: int,
    n_permutations: int,
    seed: int,
    split: str = "train",
) -> DirectionBank:
    """Build the shared directions plus the random and label-permutation controls.

    Random controls draw one Gaussian unit vector per replicate, layer and position. Permuted
    controls shuffle the harmful/harmless labels of the pooled HRL ``split`` prompts
    (one permutation per replicate, shared by all layers and positions) and take the
    difference of means.
    """
    n_layers, n_positions, d_model = directions.n_layers, len(directions.positions), directions.d_model
    names: list[str] = []
    replicates: list[int] = []
    vectors: list[np.ndarray] = []
    for name in SHARED_DIRECTIONS:
        names.append(name)
        replicates.append(0)
        vectors.append(directions.vectors[name])

    random_generator = np.random.default_rng([seed, 1])
    for replicate in range(n_random_directions):
        block = np.stack([
            np.stack([random_direction(d_model, random_generator) for _ in range(n_positions)])
            for _ in range(n_layers)
        ])
        names.append("random")
        replicates.append(replicate)
        vectors.append(block.astype(np.float32))

    if n_permutations > 0:
        permuted = _permuted_directions(run_dir, directions, n_permutations, seed, split)
        for replicate, block in enumerate(permuted):
            names.append("permuted")
            replicates.append(replicate)
            vectors.append(block)

    return DirectionBank(names=names, replicates=replicates, vectors=np.stack(vectors).astype(np.float32))


def _permuted_directions(run_dir, directions: Directions, n_permutations: int, seed: int, split: str) -> list[np.ndarray]:
    hrl = directions.high_resource_languages
    cells = [(language, subset) for language in hrl for subset in SUBSETS]
    sizes = [len(cell_prompt_ids(run_dir, language, subset, split)) for language, subset in cells]
    true_labels = np.concatenate([np.full(size, subset == "harmful") for (_, subset), size in zip(cells, sizes)])
    generator = np.random.default_rng([seed, 2])
    shuffled = [generator.permutation(true_labels) for _ in range(n_permutations)]

    shape = (directions.n_layers, len(directions.positions), directions.d_model)
    sums = [{True: np.zeros(shape), False: np.zeros(shape)} for _ in range(n_permutations)]
    start = 0
    # One pass over the pooled cells: each permutation assigns every pooled row a label, and the
    # per-label sums give the permuted difference of means without holding all rows at once.
    for (language, subset), size in zip(cells, sizes):
        rows = load_cell(run_dir, language, subset, split).activations.numpy().astype(np.float64)
        for permutation, labels in enumerate(shuffled):
            mask = labels[start:start + size]
            sums[permutation][True] += rows[mask].sum(axis=0)
            sums[permutation][False] += rows[~mask].sum(axis=0)
        start += size
    n_true = int(true_labels.sum())
    n_false = len(true_labels) - n_true
    return [unit(total[True] / n_true - total[False] / n_false).astype(np.float32) for total in sums]


def _bank_scores(cell: CellActivations, vectors: np.ndarray) -> np.ndarray:
    """Return ``[N, n_layers, n_positions, K]`` float32 projections of a cell on a direction bank."""
    if cell.d_model != vectors.shape[-1]:
        raise ValueError(
            f"cell {cell.cell_label}: activation width {cell.d_model} does not match direction width "
            f"{vectors.shape[-1]}; the directions were computed for another model"
        )
    if cell.n_layers != vectors.shape[1]:
        raise ValueError(f"cell {cell.cell_label} has {cell.n_layers} layers but the directions have {vectors.shape[1]}")
    bank = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    return torch.einsum("nlpd,klpd->nlpk", cell.activations, bank).numpy()


# ---------------------------------------------------------------------------------------------
# Separability table


@dataclass(frozen=True)
class SeparabilityResult:
    """The separability table, the thresholds used, and the cells that could not be scored."""

    table: pd.DataFrame
    thresholds: pd.DataFrame
    missing: pd.DataFrame

    def threshold_for(self, layer: int, position: str, direction: str, replicate: int = 0) -> float:
        """Return the threshold fitted on pooled HRL train scores for one shared direction."""
        rows = self.thresholds[
            (self.thresholds["layer"] == layer) & (self.thresholds["position"] == position)
            & (self.thresholds["direction"] == direction) & (self.thresholds["replicate"] == replicate)
        ]
        if rows.empty:
            raise ValueError(f"no threshold for direction {direction!r} at layer {layer}, position {position!r}")
        return float(rows["threshold"].iloc[0])


def separability(
    run_dir: str | Path | RunDir,
    directions: Directions,
    *,
    split: str = "test",
    threshold_split: str = "train",
    languages: Sequence[str] | None = None,
    n_random_directions: int = 10,
    n_permutations: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> SeparabilityResult:
    """Score every language's ``split`` prompts on every direction, layer and position.

    Languages default to every language with activations. A language without both a harmful
    and a harmless ``split`` cell is listed in ``missing`` (and logged) rather than raising.
    """
    from tqdm.auto import tqdm

    cells = set(available_cells(run_dir))
    requested = list(languages) if languages is not None else tier_order(sorted({cell[0] for cell in cells}))
    missing_rows = []
    for language in requested:
        for subset in SUBSETS:
            if (language, subset, split) not in cells:
                missing_rows.append({"language": language, "subset": subset, "split": split, "reason": "no activation file"})
    missing = pd.DataFrame(missing_rows, columns=["language", "subset", "split", "reason"])
    if not missing.empty:
        logger.warning(
            "Separability skips %d cells without activations: %s",
            len(missing), ", ".join(f"{row.language}/{row.subset}/{row.split}" for row in missing.itertuples()),
        )
    scored = [language for language in requested if not ((missing["language"] == language).any())]

    bank = control_bank(run_dir, directions, n_random_directions, n_permutations, seed, threshold_split)
    thresholds = _pooled_thresholds(run_dir, directions, bank, threshold_split)

    rows = []
    for language in tqdm(scored, desc="separability", unit="language", disable=not progress):
        harmful = load_cell(run_dir, language, "harmful", split)
        harmless = load_cell(run_dir, language, "harmless", split)
        labels = labels_for(len(harmful.prompt_ids), len(harmless.prompt_ids))
        scores = np.concatenate([_bank_scores(harmful, bank.vectors), _bank_scores(harmless, bank.vectors)])
        tier = _tier(language)
        for layer in range(directions.n_layers):
            for position_index, position in enumerate(directions.positions):
                for k, (name, replicate) in enumerate(zip(bank.names, bank.replicates)):
                    threshold = thresholds[(layer, position, name, replicate)]
                    metrics = threshold_metrics(scores[:, layer, position_index, k], labels, threshold)
                    rows.append(_row(layer, position, name, replicate, language, tier, threshold, "hrl_" + threshold_split, labels, metrics))

        own = _own_language_rows(run_dir, directions, language, tier, split, threshold_split, harmful, harmless, labels)
        rows.extend(own)

    table = pd.DataFrame(rows)
    threshold_table = pd.DataFrame(
        [
            {"layer": layer, "position": position, "direction": name, "replicate": replicate, "threshold": value}
            for (layer, position, name, replicate), value in thresholds.items()
        ]
    )
    return SeparabilityResult(table=table, thresholds=threshold_table, missing=missing)


def _pooled_thresholds(run_dir, directions: Directions, bank: DirectionBank, split: str) -> dict[tuple, float]:
    """Fit one threshold per (layer, position, direction, replicate) on the pooled HRL scores."""
    scores, labels = [], []
    for language in directions.high_resource_languages:
        for subset in SUBSETS:
            cell = load_cell(run_dir, language, subset, split)
            scores.append(_bank_scores(cell, bank.vectors))
            labels.append(np.full(len(cell.prompt_ids), 1 if subset == "harmful" else 0))
    pooled, pooled_labels = np.concatenate(scores), np.concatenate(labels)
    thresholds = {}
    for layer in range(directions.n_layers):
        for position_index, position in enumerate(directions.positions):
            for k, (name, replicate) in enumerate(zip(bank.names, bank.replicates)):
                thresholds[(layer, position, name, replicate)] = fit_threshold(pooled[:, layer, position_index, k], pooled_labels)
    return thresholds


def _own_language_rows(run_dir, directions, language, tier, split, threshold_split, harmful, harmless, labels) -> list[dict]:
    if language not in directions.vectors:
        logger.info("No own-language direction for %s (no %s cells); own_language rows are skipped", language, threshold_split)
        return []
    own = directions.vectors[language][None]  # [1, n_layers, n_positions, d]
    train_harmful = load_cell(run_dir, language, "harmful", threshold_split)
    train_harmless = load_cell(run_dir, language, "harmless", threshold_split)
    train_scores = np.concatenate([_bank_scores(train_harmful, own), _bank_scores(train_harmless, own)])
    train_labels = labels_for(len(train_harmful.prompt_ids), len(train_harmless.prompt_ids))
    scores = np.concatenate([_bank_scores(harmful, own), _bank_scores(harmless, own)])
    rows = []
    for layer in range(directions.n_layers):
        for position_index, position in enumerate(directions.positions):
            threshold = fit_threshold(train_scores[:, layer, position_index, 0], train_labels)
            metrics = threshold_metrics(scores[:, layer, position_index, 0], labels, threshold)
            rows.append(_row(layer, position, OWN_DIRECTION, 0, language, tier, threshold, "own_" + threshold_split, labels, metrics))
    return rows


def _row(layer, position, direction, replicate, language, tier, threshold, threshold_source, labels, metrics) -> dict:
    return {
        "layer": layer,
        "position": position,
        "direction": direction,
        "control": direction in CONTROL_DIRECTIONS,
        "replicate": replicate,
        "language": language,
        "tier": tier,
        **metrics,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "n_harmful": int(labels.sum()),
        "n_harmless": int(len(labels) - labels.sum()),
    }


def _tier(language: str) -> str:
    try:
        return resource_tier(language)
    except ValueError:
        return "other"


def tier_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Return unweighted means over languages per layer, position, direction and tier.

    Control replicates are averaged within each language first, so every language counts once.
    """
    per_language = (
        table.groupby(["layer", "position", "direction", "tier", "language"], as_index=False)[["auc", "balanced_accuracy"]]
        .mean()
    )
    summary = per_language.groupby(["layer", "position", "direction", "tier"], as_index=False).agg(
        auc=("auc", "mean"),
        balanced_accuracy=("balanced_accuracy", "mean"),
        n_languages=("language", "nunique"),
    )
    return summary


def language_matrix(table: pd.DataFrame, layer: int, position: str = "t_post_inst", value: str = "auc") -> pd.DataFrame:
    """Return a languages x directions table of ``value`` at one layer (controls averaged)."""
    selected = table[(table["layer"] == layer) & (table["position"] == position)]
    if selected.empty:
        raise ValueError(f"no separability rows at layer {layer} and position {position!r}")
    matrix = selected.pivot_table(index="language", columns="direction", values=value, aggfunc="mean")
    columns = [name for name in DIRECTION_ORDER if name in matrix.columns]
    return matrix.loc[tier_order(list(matrix.index)), columns]


def projection_frame(
    run_dir: str | Path | RunDir,
    directions: Directions,
    layer: int,
    position: str = "t_post_inst",
    direction: str = "pooled_dim",
    split: str = "test",
    languages: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Return one row per prompt with its projection on a direction (columns language, tier, subset, score)."""
    vector = directions.get(direction, layer, position)
    cells = set(available_cells(run_dir))
    requested = list(languages) if languages is not None else tier_order(sorted({cell[0] for cell in cells}))
    frames = []
    for language in requested:
        for subset in SUBSETS:
            if (language, subset, split) not in cells:
                continue
            cell = load_cell(run_dir, language, subset, split)
            scores = projection_scores(cell.matrix(layer, position), vector, cell.cell_label)
            frames.append(pd.DataFrame({"language": language, "tier": _tier(language), "subset": subset, "score": scores}))
    if not frames:
        raise ValueError(f"no {split} activations in {RunDir(run_dir).activations}")
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# U-score


def u_score(anchor: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """Return (U, matched, random) for row-aligned ``[n, d]`` matrices.

    Rows are L2-normalised and ``S = anchor @ target.T``; matched = mean(diag S), random =
    mean of the off-diagonal entries, U = matched - random. Needs ``n >= 2``.
    """
    anchor = unit(np.asarray(anchor, dtype=np.float64))
    target = unit(np.asarray(target, dtype=np.float64))
    if anchor.shape != target.shape or anchor.shape[0] < 2:
        raise ValueError(f"U-score needs two row-aligned matrices with at least 2 rows, got {anchor.shape} and {target.shape}")
    n = anchor.shape[0]
    similarity = anchor @ target.T
    matched = float(np.trace(similarity) / n)
    random = float((similarity.sum() - np.trace(similarity)) / (n * (n - 1)))
    return matched - random, matched, random


def u_score_table(
    run_dir: str | Path | RunDir,
    *,
    anchor: str = "en",
    split: str = "train",
    languages: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Return the U-score of each language against ``anchor`` per layer and position.

    Rows are aligned by ``prompt_id`` (the ids both cells share, in the anchor's order).
    Columns: ``layer, position, language, tier, u_harmful, u_harmless, u_score``.
    """
    cells = set(available_cells(run_dir))
    for subset in SUBSETS:
        if (anchor, subset, split) not in cells:
            raise ValueError(f"U-score anchor {anchor!r} has no {subset} {split} activations in {RunDir(run_dir).activations}")
    requested = list(languages) if languages is not None else tier_order(sorted({cell[0] for cell in cells}))
    anchors = {subset: load_cell(run_dir, anchor, subset, split) for subset in SUBSETS}
    rows = []
    for language in requested:
        if language == anchor:
            continue
        if any((language, subset, split) not in cells for subset in SUBSETS):
            logger.warning("U-score skips %s: a %s cell is missing", language, split)
            continue
        per_subset = {}
        for subset in SUBSETS:
            target = load_cell(run_dir, language, subset, split)
            anchor_rows, target_rows = _aligned_rows(anchors[subset], target)
            per_subset[subset] = (anchor_rows, target_rows)
        n_layers, positions = anchors["harmful"].n_layers, anchors["harmful"].positions
        for layer in range(n_layers):
            for position_index, position in enumerate(positions):
                values = {
                    subset: u_score(a[:, layer, position_index], t[:, layer, position_index])[0]
                    for subset, (a, t) in per_subset.items()
                }
                rows.append({
                    "layer": layer,
                    "position": position,
                    "language": language,
                    "tier": _tier(language),
                    "u_harmful": values["harmful"],
                    "u_harmless": values["harmless"],
                    "u_score": (values["harmful"] + values["harmless"]) / 2,
                })
    return pd.DataFrame(rows)


def _aligned_rows(anchor: CellActivations, target: CellActivations) -> tuple[np.ndarray, np.ndarray]:
    anchor_ids = anchor.prompt_ids.tolist()
    target_index = {prompt_id: row for row, prompt_id in enumerate(target.prompt_ids.tolist())}
    shared = [(row, target_index[prompt_id]) for row, prompt_id in enumerate(anchor_ids) if prompt_id in target_index]
    if len(shared) < 2:
        raise ValueError(f"cells {anchor.cell_label} and {target.cell_label} share fewer than 2 prompt ids")
    anchor_rows = [row for row, _ in shared]
    target_rows = [row for _, row in shared]
    return anchor.activations.numpy()[anchor_rows], target.activations.numpy()[target_rows]


def u_score_by_layer(table: pd.DataFrame, anchor: str = "en") -> pd.DataFrame:
    """Return per layer and position the mean U-score over the non-anchor HRLs and per tier."""
    selection_languages = [language for language in high_resource_languages() if language != anchor]
    selection = (
        table[table["language"].isin(selection_languages)]
        .groupby(["layer", "position"], as_index=False)["u_score"].mean()
        .rename(columns={"u_score": "u_score_hrl"})
    )
    by_tier = table.pivot_table(index=["layer", "position"], columns="tier", values="u_score", aggfunc="mean")
    by_tier.columns = [f"u_score_{tier}" for tier in by_tier.columns]
    return selection.merge(by_tier.reset_index(), on=["layer", "position"], how="outer")


def select_u_score_layer(by_layer: pd.DataFrame, position: str = "t_post_inst") -> int:
    """Return the layer with the highest mean U-score over the non-English HRLs at ``position``."""
    rows = by_layer[(by_layer["position"] == position) & by_layer["u_score_hrl"].notna()]
    if rows.empty:
        raise ValueError(f"no U-score over non-English high-resource languages at position {position!r}")
    return int(rows.loc[rows["u_score_hrl"].idxmax(), "layer"])


# ---------------------------------------------------------------------------------------------
# Figures

_SUBSET_PALETTE = {"harmful": "#b2182b", "harmless": "#2166ac"}
_DIRECTION_TITLES = {
    "pooled_dim": "pooled HRL diff. of means",
    "pc1_of_diffs": "PC1 of HRL directions",
    "own_language": "own-language diff. of means",
    "random": "random direction (control)",
    "permuted": "permuted labels (control)",
}


def plot_auc_by_layer(table: pd.DataFrame, model_name: str, paper_layer: int | None = None, value: str = "auc"):
    """Plot the mean ``value`` over the languages of each tier against the layer.

    One panel per direction (columns) and position (rows); bands show the standard deviation
    over languages. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    from lrsafety.figures import TIER_PALETTE

    per_language = table.groupby(["layer", "position", "direction", "tier", "language"], as_index=False)[value].mean()
    directions = [name for name in DIRECTION_ORDER if name in set(per_language["direction"])]
    positions = [position for position in ("t_inst", "t_post_inst") if position in set(per_language["position"])]
    tiers = [tier for tier in TIER_PALETTE if tier in set(per_language["tier"])]
    fig, axes = plt.subplots(
        len(positions), len(directions), figsize=(3.1 * len(directions), 2.9 * len(positions) + 0.6),
        sharex=True, sharey=True, squeeze=False,
    )
    for row, position in enumerate(positions):
        for column, direction in enumerate(directions):
            ax = axes[row, column]
            subset = per_language[(per_language["position"] == position) & (per_language["direction"] == direction)]
            sns.lineplot(
                data=subset, x="layer", y=value, hue="tier", hue_order=tiers, palette=TIER_PALETTE,
                errorbar="sd", marker="o", markersize=4, ax=ax, legend=(row == 0 and column == 0),
            )
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
            if paper_layer is not None:
                ax.axvline(paper_layer, color="black", linestyle="--", linewidth=0.8)
            ax.set_title(f"{_DIRECTION_TITLES.get(direction, direction)}\n{position}", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel(value.replace("_", " ").upper() if value == "auc" else value.replace("_", " "))
    axes[0, 0].set_ylim(0.0, 1.02)
    axes[0, 0].xaxis.get_major_locator().set_params(integer=True)
    if axes[0, 0].get_legend() is not None:
        axes[0, 0].legend(title="tier", fontsize=8, title_fontsize=8, loc="lower left")
    label = "AUC" if value == "auc" else value.replace("_", " ")
    caption = f"{model_name}: test {label} per tier (mean ± sd over languages)"
    if paper_layer is not None:
        caption += f"; dashed line = layer {paper_layer}"
    _title_below_banner(fig, caption)
    return fig


def plot_language_heatmap(table: pd.DataFrame, layer: int, model_name: str, position: str = "t_post_inst"):
    """Plot AUC and balanced accuracy per language (rows, by tier) and direction (columns) at one layer."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = [("auc", "AUC"), ("balanced_accuracy", "balanced accuracy")]
    matrices = [language_matrix(table, layer, position, value) for value, _ in panels]
    labels = [f"{language} ({_tier(language)})" for language in matrices[0].index]
    n_rows, n_columns = matrices[0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * n_columns * 2, 1.2 + 0.36 * n_rows), sharey=True)
    for ax, matrix, (_, title) in zip(axes, matrices, panels):
        sns.heatmap(
            matrix.set_axis(labels, axis=0), annot=True, fmt=".2f", vmin=0.5, vmax=1.0, cmap="RdYlGn",
            cbar=False, ax=ax, annot_kws={"fontsize": 8}, linewidths=0.5, linecolor="white",
        )
        ax.set_title(title)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.set_xticklabels([name.replace("_", "\n") for name in matrix.columns], rotation=0, fontsize=8)
    _title_below_banner(fig, f"{model_name}: test separability at layer {layer}, {position} (controls averaged)")
    return fig


def plot_projection_distributions(frame: pd.DataFrame, model_name: str, layer: int, direction: str, threshold: float | None = None):
    """Plot harmful vs harmless projections pooled per tier, with the HRL threshold as a line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    tiers = [tier for tier in ("high", "mid", "low", "other") if tier in set(frame["tier"])]
    fig, axes = plt.subplots(1, len(tiers), figsize=(3.8 * len(tiers), 3.4), squeeze=False)
    for column, (ax, tier) in enumerate(zip(axes[0], tiers)):
        subset = frame[frame["tier"] == tier]
        sns.histplot(
            data=subset, x="score", hue="subset", hue_order=list(_SUBSET_PALETTE), palette=_SUBSET_PALETTE,
            stat="density", common_norm=False, element="step", ax=ax,
            # About sqrt(n) bins: 40 for a full tier, fewer when cells are cut to a few prompts.
            bins=int(np.clip(np.sqrt(len(subset)), 10, 40)), legend=column == len(tiers) - 1,
        )
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        languages = tier_order(sorted(set(subset["language"])))
        shown = ", ".join(languages) if len(languages) <= 6 else f"{len(languages)} languages"
        ax.set_title(f"{tier}-resource ({shown})", fontsize=9)
        ax.set_xlabel(f"projection on {direction}")
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1.0), title="subset", frameon=False)
    title = f"{model_name}: test projections at layer {layer}"
    if threshold is not None:
        title += "; dashed = threshold fitted on HRL train"
    _title_below_banner(fig, title)
    return fig


def plot_u_score(by_layer: pd.DataFrame, model_name: str, selected_layer: int | None = None, position: str = "t_post_inst"):
    """Plot the mean U-score per tier and over the non-English HRLs against the layer."""
    import matplotlib.pyplot as plt

    from lrsafety.figures import TIER_PALETTE

    rows = by_layer[by_layer["position"] == position].sort_values("layer")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    # The high tier without English is the selection curve, drawn once.
    ax.plot(rows["layer"], rows["u_score_hrl"], marker="o", color=TIER_PALETTE["high"], label="high-resource,\nnon-English (selection)")
    for tier in ("mid", "low"):
        column = f"u_score_{tier}"
        if column in rows:
            ax.plot(rows["layer"], rows[column], marker="o", color=TIER_PALETTE[tier], label=f"{tier}-resource")
    if selected_layer is not None:
        ax.axvline(selected_layer, color="grey", linestyle=":", linewidth=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("U-score")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    title = f"{model_name}: U-score against English (matched − random similarity), train, {position}"
    if selected_layer is not None:
        title += f"\nselected layer {selected_layer}"
    _title_below_banner(fig, title)
    return fig


def _title_below_banner(fig, title: str) -> None:
    """Set a figure title below the stand-in banner and lay out the axes under it."""
    # A blank first line keeps the top strip free for the banner that save_figure draws there;
    # tight_layout reserves room for an automatically placed suptitle, blank line included.
    fig.suptitle("\n" + title, fontsize=10.5, linespacing=1.9)
    fig.tight_layout()


__all__ = [
    "DirectionBank", "SeparabilityResult", "auc", "control_bank", "diff_of_means", "fit_threshold",
    "labels_for", "language_matrix", "plot_auc_by_layer", "plot_language_heatmap", "plot_projection_distributions",
    "plot_u_score", "projection_frame", "projection_scores", "select_u_score_layer", "separability",
    "threshold_metrics", "tier_summary", "u_score", "u_score_by_layer", "u_score_table",
]
