"""Directions, separability and the U-score on synthetic activations with a planted direction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lrsafety.activations import activation_inventory, activation_model_info, load_cell, write_cell
from lrsafety.directions import (
    DirectionError,
    compute_directions,
    diff_of_means,
    load_directions,
    pc1_of_diffs,
    save_directions,
)
from lrsafety.metrics import (
    auc,
    fit_threshold,
    labels_for,
    language_matrix,
    projection_scores,
    select_u_score_layer,
    separability,
    threshold_metrics,
    tier_summary,
    u_score,
    u_score_by_layer,
    u_score_table,
)

N_LAYERS, D_MODEL = 3, 48
SIGNAL_LAYER = 2
LANGUAGES = ("en", "de", "fr", "ja", "th", "sw")
SIZES = {("harmful", "train"): 120, ("harmless", "train"): 100, ("harmful", "test"): 90, ("harmless", "test"): 80}


def planted_direction() -> np.ndarray:
    vector = np.random.default_rng(7).standard_normal(D_MODEL)
    return vector / np.linalg.norm(vector)


def write_synthetic_run(run_dir, languages=LANGUAGES, d_model=D_MODEL, skip=()):
    """Gaussian activations; harmful rows are shifted by 4 along the planted direction at SIGNAL_LAYER only.

    Harmless rows of a language share a per-prompt component across languages (row-aligned
    prompts), which gives the U-score something to find.
    """
    direction = planted_direction()[:d_model]
    shared = np.random.default_rng(11).standard_normal((200, N_LAYERS, 2, d_model))
    for index, language in enumerate(languages):
        generator = np.random.default_rng(100 + index)
        for (subset, split), size in SIZES.items():
            if (language, subset, split) in skip:
                continue
            rows = 0.5 * generator.standard_normal((size, N_LAYERS, 2, d_model)) + shared[:size]
            if subset == "harmful":
                rows[:, SIGNAL_LAYER, :, :] += 4.0 * direction
            write_cell(
                run_dir, language, subset, split, torch.tensor(rows, dtype=torch.float32), np.arange(size),
                {"model_name": "synthetic", "model_source": "synthetic"},
            )
    return direction


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("synthetic")
    # The Chinese harmless test cell is missing, as in the PolyRefuse release.
    direction = write_synthetic_run(run_dir, languages=(*LANGUAGES, "zh"), skip={("zh", "harmless", "test")})
    directions = compute_directions(run_dir)
    save_directions(directions, run_dir)
    result = separability(run_dir, directions, n_random_directions=4, n_permutations=4, seed=0, progress=False)
    return run_dir, direction, directions, result


def test_directions_recover_planted_direction(synthetic_run):
    _, direction, directions, _ = synthetic_run
    for name in ("pooled_dim", "pc1_of_diffs", "en", "sw"):
        for position in ("t_inst", "t_post_inst"):
            recovered = directions.get(name, SIGNAL_LAYER, position)
            assert np.linalg.norm(recovered) == pytest.approx(1.0, abs=1e-5)
            assert float(recovered @ direction) > 0.98, name


def test_pooled_directions_use_high_resource_languages(synthetic_run):
    _, _, directions, _ = synthetic_run
    assert directions.high_resource_languages == ["en", "de", "fr", "zh", "ja"]
    assert directions.metadata["missing_high_resource_languages"] == ["es", "it", "nl", "pl", "ru"]
    assert directions.metadata["pooled_counts"] == {"harmful": 600, "harmless": 500}


def test_directions_round_trip(synthetic_run):
    run_dir, _, directions, _ = synthetic_run
    loaded = load_directions(run_dir)
    assert loaded.names == directions.names
    for name in directions.names:
        np.testing.assert_array_equal(loaded.vectors[name], directions.vectors[name])
    assert loaded.stack(["en", "pooled_dim"], 1, "t_inst").shape == (2, D_MODEL)
    with pytest.raises(IndexError, match="layer 3"):
        loaded.get("en", 3)
    with pytest.raises(DirectionError, match="'xx'"):
        loaded.get("xx", 0)
    with pytest.raises(ValueError, match="'t_last'"):
        loaded.get("en", 0, "t_last")


def test_separability_is_near_perfect_on_signal_layer(synthetic_run):
    _, _, _, result = synthetic_run
    table = result.table
    signal = table[(table["layer"] == SIGNAL_LAYER) & table["direction"].isin(["pooled_dim", "pc1_of_diffs", "own_language"])]
    assert len(signal) == 3 * 2 * len(LANGUAGES)
    assert signal["auc"].min() > 0.99
    assert signal["balanced_accuracy"].min() > 0.95
    noise = table[(table["layer"] == 0) & (table["direction"] == "pooled_dim")]
    assert noise["auc"].sub(0.5).abs().max() < 0.15


def test_control_directions_are_near_chance(synthetic_run):
    _, _, _, result = synthetic_run
    table = result.table
    for control in ("random", "permuted"):
        rows = table[(table["layer"] == SIGNAL_LAYER) & (table["direction"] == control)]
        assert rows["control"].all()
        assert rows["replicate"].nunique() == 4
        # Single replicates can land far from 0.5; their mean over replicates and languages cannot.
        assert abs(rows["auc"].mean() - 0.5) < 0.1, control


def test_missing_cell_is_reported(synthetic_run):
    _, _, _, result = synthetic_run
    assert result.missing.to_dict("records") == [
        {"language": "zh", "subset": "harmless", "split": "test", "reason": "no activation file"}
    ]
    assert "zh" not in set(result.table["language"])


def test_summaries_have_one_row_per_group(synthetic_run):
    _, _, _, result = synthetic_run
    summary = tier_summary(result.table)
    assert set(summary["tier"]) == {"high", "mid", "low"}
    high = summary[(summary["tier"] == "high") & (summary["direction"] == "random")]
    assert (high["n_languages"] == 4).all()
    matrix = language_matrix(result.table, SIGNAL_LAYER)
    assert list(matrix.index) == ["en", "de", "fr", "ja", "th", "sw"]
    assert list(matrix.columns) == ["pooled_dim", "pc1_of_diffs", "own_language", "random", "permuted"]


def test_permuted_labels_give_chance_auc():
    direction = planted_direction()
    generator = np.random.default_rng(3)
    harmful = generator.standard_normal((400, D_MODEL)) + 4.0 * direction
    harmless = generator.standard_normal((400, D_MODEL))
    scores = projection_scores(np.concatenate([harmful, harmless]), diff_of_means(harmful, harmless))
    labels = labels_for(400, 400)
    assert auc(scores, labels) > 0.99
    assert auc(scores, generator.permutation(labels)) == pytest.approx(0.5, abs=0.06)


def test_threshold_picks_lowest_of_ties():
    scores = np.array([0.0, 1.0, 2.0, 3.0])
    labels = np.array([0, 0, 1, 1])
    # Every threshold in (1, 2] separates perfectly; the lowest candidate is the score 2.0.
    assert fit_threshold(scores, labels) == 2.0
    metrics = threshold_metrics(scores, labels, 2.0)
    assert metrics["balanced_accuracy"] == 1.0
    assert (metrics["true_positives"], metrics["true_negatives"]) == (2, 2)
    inverted = fit_threshold(scores, 1 - labels)
    assert np.isfinite(inverted)


def test_width_mismatch_names_the_cell(synthetic_run, tmp_path):
    _, _, directions, _ = synthetic_run
    write_synthetic_run(tmp_path, languages=("en", "de"), d_model=D_MODEL - 8)
    with pytest.raises(ValueError, match=r"en/harmful/train.*width 40 does not match direction width 48"):
        separability(tmp_path, directions, n_random_directions=1, n_permutations=0, progress=False)
    with pytest.raises(ValueError, match=r"cell th/harmful/test: activation width 40"):
        projection_scores(np.zeros((3, 40)), directions.get("en", 0), "cell th/harmful/test")


def test_no_training_data_raises(tmp_path):
    write_synthetic_run(tmp_path, languages=("th",))
    with pytest.raises(DirectionError, match="high-resource"):
        compute_directions(tmp_path)


def test_u_score_of_aligned_rows():
    generator = np.random.default_rng(5)
    anchor = generator.standard_normal((50, D_MODEL))
    aligned = anchor + 0.1 * generator.standard_normal((50, D_MODEL))
    value, matched, random = u_score(anchor, aligned)
    assert matched > 0.99
    assert abs(random) < 0.05
    assert value == pytest.approx(matched - random)
    shuffled_value, _, _ = u_score(anchor, aligned[generator.permutation(50)])
    assert abs(shuffled_value) < 0.1


def test_u_score_table_aligns_by_prompt_id(synthetic_run, tmp_path):
    run_dir, _, _, _ = synthetic_run
    table = u_score_table(run_dir)
    assert set(table["language"]) == {"de", "fr", "zh", "ja", "th", "sw"}
    assert (table["u_score"] > 0.5).all()

    # The same German rows stored in reverse order must give the same scores.
    write_synthetic_run(tmp_path, languages=("en", "de"))
    reversed_dir = tmp_path / "reversed"

    for language in ("en", "de"):
        for subset in ("harmful", "harmless"):
            cell = load_cell(tmp_path, language, subset, "train")
            order = torch.arange(len(cell.prompt_ids))
            if language == "de":
                order = order.flip(0)
            write_cell(reversed_dir, language, subset, "train", cell.activations[order], cell.prompt_ids[order])
    pd.testing.assert_frame_equal(u_score_table(tmp_path), u_score_table(reversed_dir), rtol=1e-5)

    by_layer = u_score_by_layer(table)
    assert select_u_score_layer(by_layer) in range(N_LAYERS)
    assert set(by_layer.columns) >= {"u_score_hrl", "u_score_high", "u_score_mid", "u_score_low"}


def test_curve_metrics_agree_with_sklearn_scorers():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    generator = np.random.default_rng(9)
    labels = labels_for(70, 50)
    # Rounded scores create ties, the case where curve points and plain predictions could disagree.
    scores = np.round(generator.standard_normal(120) + labels, 1)
    for threshold in (-1.0, 0.3, 0.35, 1.2, 5.0):
        metrics = threshold_metrics(scores, labels, threshold)
        predictions = (scores >= threshold).astype(int)
        assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
        assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
        assert metrics["f1"] == pytest.approx(f1_score(labels, predictions, zero_division=0.0))
        tn, fp, fn, tp = confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
        assert (metrics["true_positives"], metrics["false_positives"]) == (tp, fp)
        assert (metrics["true_negatives"], metrics["false_negatives"]) == (tn, fn)


def test_model_facts_come_from_cells_without_model_json(synthetic_run):
    run_dir, _, _, _ = synthetic_run
    info = activation_model_info(run_dir)
    assert (info["name"], info["n_layers"], info["d_model"]) == ("synthetic", N_LAYERS, D_MODEL)
    assert info["paper_layer"] == N_LAYERS // 2
    assert info["is_standin"] is False
    inventory = activation_inventory(run_dir)
    assert len(inventory) == 4 * (len(LANGUAGES) + 1) - 1
    assert set(inventory["n_layers"]) == {N_LAYERS}
