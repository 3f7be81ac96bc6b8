"""The recalibration gate on synthetic activations: recalibration, conformal bound, controls, I/O, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lrsafety.gate import (
    GRID_COLUMNS,
    Gate,
    LabelledActivations,
    RecalibrationInputs,
    derive_seed,
    fit_gate,
    fit_routing_gates,
    gate_path,
    group_seed_metrics,
    headline_table,
    load_recalibration_inputs,
    random_subspace_basis,
    rule_comparison_table,
    run_recalibration_grid,
    subspace_basis,
    summarize_grid,
)
from lrsafety.thresholds import conformal_miss_rate_tolerance, conformal_rank, evaluate_threshold

D_MODEL = 24
SOURCES = ("en", "de", "fr", "ja")
TARGETS = ("sw", "yo")


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def make_inputs(
    seed: int = 0,
    d_model: int = D_MODEL,
    sources=SOURCES,
    targets=TARGETS,
    source_sizes=(80, 70),
    train_sizes=(40, 40),
    test_sizes=(200, 200),
    shift: float = 8.0,
    margin: float = 3.0,
) -> RecalibrationInputs:
    """Each HRL language separates harmful (+margin) from harmless (-margin) along its own
    direction near a shared harmfulness direction u. Each target language is the same picture
    shifted by ``shift`` along u: still separable, but every prompt looks harmful to a gate
    calibrated on the sources."""
    rng = np.random.default_rng(seed)
    harm = unit(rng.standard_normal(d_model))

    def cell(offset, direction, sizes):
        n_harmful, n_harmless = sizes
        harmful = offset + margin * direction + rng.standard_normal((n_harmful, d_model))
        harmless = offset - margin * direction + rng.standard_normal((n_harmless, d_model))
        return LabelledActivations(harmful.astype(np.float32), harmless.astype(np.float32))

    source_train, directions = {}, []
    for language in sources:
        direction = unit(harm + 0.3 * unit(rng.standard_normal(d_model)))
        source_train[language] = cell(2.0 * rng.standard_normal(d_model), direction, source_sizes)
        directions.append(unit(source_train[language].harmful.mean(0) - source_train[language].harmless.mean(0)))
    target_train, target_test = {}, {}
    for language in targets:
        offset = 0.5 * rng.standard_normal(d_model) + shift * harm
        target_train[language] = cell(offset, harm, train_sizes)
        target_test[language] = cell(offset, harm, test_sizes)
    return RecalibrationInputs(source_train, target_train, target_test, np.stack(directions).astype(np.float32),
                               layer=2, model="synthetic")


@pytest.fixture(scope="module")
def inputs() -> RecalibrationInputs:
    return make_inputs()


@pytest.fixture(scope="module")
def grid(inputs) -> pd.DataFrame:
    return run_recalibration_grid(inputs, budgets=[0, 1, 4, 32], seeds=range(3), rank=4, alpha=0.05)


def test_grid_has_every_combination(grid):
    assert list(grid.columns) == list(GRID_COLUMNS)
    assert len(grid) == 2 * 4 * 3 * 2 * 3
    combinations = grid.groupby(["language", "budget", "seed", "threshold_rule", "readout"]).size()
    assert combinations.eq(1).all()
    assert set(grid["tier"]) == {"low"}
    assert (grid["n_test_harmful"] == 200).all()
    assert grid.attrs["wall_seconds"] > 0


def test_recalibration_fixes_a_shifted_language(grid):
    gate_rows = grid[(grid["readout"] == "gate") & (grid["threshold_rule"] == "balanced_macro_f1")]
    uncalibrated = gate_rows[gate_rows["budget"] == 0]
    recalibrated = gate_rows[gate_rows["budget"] == 4]
    # The shifted language is separable (AUC near 1) but every prompt crosses the source threshold.
    assert (uncalibrated["auc"] > 0.95).all()
    assert (uncalibrated["balanced_accuracy"] < 0.6).all()
    assert (uncalibrated["false_refusal_rate"] > 0.8).all()
    assert (recalibrated["balanced_accuracy"] >= 0.9).all()


def test_controls_do_worse_than_the_gate(grid):
    few_shot = grid[(grid["budget"] == 4) & (grid["threshold_rule"] == "balanced_macro_f1")]
    mean_auc = few_shot.groupby("readout")["auc"].mean()
    assert mean_auc["permuted_labels"] < 0.8
    assert mean_auc["gate"] > mean_auc["permuted_labels"] + 0.15


def test_uncertified_conformal_gates_flag_everything(grid):
    conformal = grid[grid["threshold_rule"] == "conformal"]
    small = conformal[conformal["budget"].isin([1, 4])]
    assert (~small["threshold_certified"]).all()
    assert np.isneginf(small["threshold"]).all()
    assert (small["false_refusal_rate"] == 1.0).all()
    large = conformal[conformal["budget"].isin([0, 32])]
    assert large["threshold_certified"].all()
    assert (large.loc[large["budget"] == 32, "n_calibration"] == 32).all()


def test_conformal_gate_keeps_miss_rate_within_alpha():
    """Fresh data per repeat: calibration shots and test prompts of the target are i.i.d. draws."""
    alpha, budget, n_repeats, n_test = 0.05, 64, 60, 300
    miss_rates = []
    for repeat in range(n_repeats):
        data = make_inputs(seed=1000 + repeat, d_model=12, sources=("en", "de", "fr"), targets=("sw",),
                           source_sizes=(60, 50), train_sizes=(budget, budget), test_sizes=(n_test, n_test),
                           margin=1.0)
        rows = run_recalibration_grid(data, budgets=[budget], seeds=[0], rank=3, threshold_rules=["conformal"],
                                      readouts=["gate"], alpha=alpha)
        miss_rates.append(rows["miss_rate"].item())
    mean_miss = float(np.mean(miss_rates))
    tolerance = conformal_miss_rate_tolerance(budget, alpha, n_test, n_repeats)
    assert conformal_rank(budget, alpha) == 3
    assert mean_miss <= alpha + tolerance
    assert mean_miss >= alpha - 1 / (budget + 1) - tolerance


def test_same_seed_gives_same_grid(inputs, grid):
    again = run_recalibration_grid(inputs, budgets=[0, 1, 4, 32], seeds=range(3), rank=4, alpha=0.05)
    pd.testing.assert_frame_equal(grid, again)


def test_seeds_draw_different_shots(grid):
    rows = grid[(grid["budget"] == 1) & (grid["readout"] == "gate") & (grid["threshold_rule"] == "balanced_macro_f1")]
    assert rows.groupby("language")["threshold"].nunique().gt(1).all()


def test_derived_seed_depends_on_every_part():
    reference = derive_seed(0, "m", "sw", 4, 10, "shots")
    assert reference == int("0x" + __import__("hashlib").sha256(b"0|m|sw|4|10|shots").hexdigest()[:8], 16)
    variants = [(1, "m", "sw", 4, 10, "shots"), (0, "n", "sw", 4, 10, "shots"), (0, "m", "yo", 4, 10, "shots"),
                (0, "m", "sw", 8, 10, "shots"), (0, "m", "sw", 4, 5, "shots"), (0, "m", "sw", 4, 10, "permuted_labels")]
    assert all(derive_seed(*parts) != reference for parts in variants)


@pytest.mark.parametrize("readout, rule, budget", [
    ("gate", "balanced_macro_f1", 4),
    ("random_subspace", "balanced_macro_f1", 32),
    ("permuted_labels", "conformal", 32),
    ("gate", "conformal", 0),
])
def test_fitted_gate_reproduces_its_grid_row(inputs, grid, readout, rule, budget):
    gate = fit_gate(inputs, "yo", budget, seed=1, rank=4, threshold_rule=rule, readout=readout)
    test = inputs.target_test["yo"]
    activations = np.concatenate([test.harmful, test.harmless])
    labels = np.concatenate([np.ones(len(test.harmful), bool), np.zeros(len(test.harmless), bool)])
    metrics = evaluate_threshold(labels, gate.logits(activations), gate.threshold)
    row = grid[(grid["language"] == "yo") & (grid["budget"] == budget) & (grid["seed"] == 1)
               & (grid["readout"] == readout) & (grid["threshold_rule"] == rule)].iloc[0]
    assert gate.threshold == pytest.approx(row["threshold"])
    for column in ("tp", "fn", "fp", "tn"):
        assert metrics[column] == row[column]
    assert metrics["auc"] == pytest.approx(row["auc"])


def test_gate_save_load_gives_identical_decisions(inputs, tmp_path):
    gate = fit_gate(inputs, "sw", 4, seed=2, rank=4)
    stem = tmp_path / "gates" / "sw_b4_seed2"
    tensor_path, json_path = gate.save(stem)
    assert tensor_path.name == "sw_b4_seed2.safetensors"
    assert json_path.name == "sw_b4_seed2.json"
    loaded = Gate.load(stem)
    probe = np.concatenate([inputs.target_test["sw"].harmful, inputs.target_test["sw"].harmless])
    np.testing.assert_array_equal(loaded.logits(probe), gate.logits(probe))
    np.testing.assert_array_equal(loaded.predict(probe), gate.predict(probe))
    np.testing.assert_array_equal(loaded.basis, gate.basis)
    assert loaded.threshold == gate.threshold
    assert (loaded.language, loaded.budget, loaded.seed, loaded.rank, loaded.layer) == ("sw", 4, 2, 4, 2)
    assert loaded.provenance["n_train_harmful"] == 4 * 80 + 4
    assert loaded.provenance["sklearn_version"]
    # Loading by either file name works too.
    assert Gate.load(json_path).threshold == gate.threshold


def test_uncertified_gate_round_trips_minus_infinity(inputs, tmp_path):
    gate = fit_gate(inputs, "sw", 4, seed=0, rank=4, threshold_rule="conformal", alpha=0.05)
    assert gate.threshold == -math.inf
    gate.save(tmp_path / "conformal")
    metadata = json.loads((tmp_path / "conformal.json").read_text())
    assert metadata["threshold"] == "-inf"
    loaded = Gate.load(tmp_path / "conformal")
    assert loaded.threshold == -math.inf
    assert loaded.predict(inputs.target_test["sw"].harmless).all()


def test_gate_accepts_torch_and_single_rows(inputs):
    gate = fit_gate(inputs, "yo", 1, seed=0, rank=4)
    rows = inputs.target_test["yo"].harmful[:5]
    np.testing.assert_array_equal(gate.logits(torch.from_numpy(rows)), gate.logits(rows))
    assert gate.logits(rows[0]).shape == (1,)


def test_width_mismatch_is_rejected(inputs):
    gate = fit_gate(inputs, "yo", 1, seed=0, rank=4)
    with pytest.raises(ValueError, match=rf"activation width {D_MODEL + 1} does not match the gate's width {D_MODEL}"):
        gate.predict(np.zeros((3, D_MODEL + 1), dtype=np.float32))
    wide = LabelledActivations(np.zeros((5, D_MODEL + 2), np.float32), np.zeros((5, D_MODEL + 2), np.float32))
    bad = RecalibrationInputs(inputs.source_train, {"sw": wide}, {"sw": wide}, inputs.directions, layer=2)
    with pytest.raises(ValueError, match=rf"width {D_MODEL + 2}, but the directions have width {D_MODEL}"):
        run_recalibration_grid(bad, budgets=[1], seeds=[0], rank=4)


def test_load_rejects_inconsistent_files(inputs, tmp_path):
    fit_gate(inputs, "yo", 1, seed=0, rank=4).save(tmp_path / "gate")
    metadata = json.loads((tmp_path / "gate.json").read_text())
    metadata["rank"] = 3
    (tmp_path / "gate.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="basis has shape"):
        Gate.load(tmp_path / "gate")
    (tmp_path / "gate.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="gate.safetensors not found"):
        Gate.load(tmp_path / "gate")


def test_budget_above_pool_names_language_class_and_sizes(inputs):
    with pytest.raises(ValueError, match=r"budget 41 exceeds the harmful train pool of language 'sw' \(40 prompts\)"):
        run_recalibration_grid(inputs, budgets=[0, 41], seeds=[0], rank=4)


def test_empty_language_is_rejected(inputs):
    empty = LabelledActivations(np.zeros((0, D_MODEL), np.float32), inputs.target_train["sw"].harmless)
    bad = RecalibrationInputs(inputs.source_train, {"sw": empty}, dict(inputs.target_test), inputs.directions, layer=2)
    with pytest.raises(ValueError, match="target train harmful activations of language 'sw' are empty"):
        run_recalibration_grid(bad, budgets=[1], seeds=[0], rank=4)
    with pytest.raises(ValueError, match="no target language"):
        RecalibrationInputs(inputs.source_train, {}, {}, inputs.directions, layer=2).validate()


def test_rank_above_direction_count_is_rejected(inputs):
    with pytest.raises(ValueError, match="rank 5 is invalid for 4 stacked directions"):
        run_recalibration_grid(inputs, budgets=[1], seeds=[0], rank=5)
    with pytest.raises(ValueError, match="rank 5 is invalid for 4 stacked directions"):
        fit_gate(inputs, "sw", 1, rank=5)


def test_unknown_rule_and_readout_are_rejected(inputs):
    with pytest.raises(ValueError, match="unknown threshold rules"):
        run_recalibration_grid(inputs, budgets=[1], seeds=[0], rank=4, threshold_rules=["oracle"])
    with pytest.raises(ValueError, match="unknown readouts"):
        run_recalibration_grid(inputs, budgets=[1], seeds=[0], rank=4, readouts=["mlp"])


def test_bases_are_orthonormal(inputs):
    basis = subspace_basis(inputs.directions, 3)
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    # The sign convention makes the directions project positively on the first axis.
    assert (inputs.directions @ basis[:, 0] > 0).all()
    random_basis = random_subspace_basis(D_MODEL, 3, np.random.default_rng(0))
    np.testing.assert_allclose(random_basis.T @ random_basis, np.eye(3), atol=1e-5)


def test_summaries_average_seeds_and_languages(grid):
    per_seed = group_seed_metrics(grid)
    low = per_seed[(per_seed["group"] == "low") & (per_seed["budget"] == 4) & (per_seed["seed"] == 0)
                   & (per_seed["readout"] == "gate") & (per_seed["threshold_rule"] == "balanced_macro_f1")]
    rows = grid[(grid["budget"] == 4) & (grid["seed"] == 0) & (grid["readout"] == "gate")
                & (grid["threshold_rule"] == "balanced_macro_f1")]
    assert low["balanced_accuracy"].item() == pytest.approx(rows["balanced_accuracy"].mean())

    summary = summarize_grid(grid)
    cell = summary[(summary["group"] == "sw") & (summary["budget"] == 4) & (summary["readout"] == "gate")
                   & (summary["threshold_rule"] == "balanced_macro_f1")]
    seeds = grid[(grid["language"] == "sw") & (grid["budget"] == 4) & (grid["readout"] == "gate")
                 & (grid["threshold_rule"] == "balanced_macro_f1")]["balanced_accuracy"]
    assert cell["balanced_accuracy_mean"].item() == pytest.approx(seeds.mean())
    assert cell["balanced_accuracy_sd"].item() == pytest.approx(seeds.std(ddof=1))
    assert cell["n_seeds"].item() == 3

    headline = headline_table(summary, budgets=(0, 1, 4))
    assert list(headline.columns) == ["group", "tier", "metric", "b=0", "b=1", "b=4"]
    assert list(headline["group"].unique()) == ["sw", "yo", "low", "all targets"]
    sw_row = headline[(headline["group"] == "sw") & (headline["metric"] == "balanced_accuracy")]
    mean, sd = cell["balanced_accuracy_mean"].item(), cell["balanced_accuracy_sd"].item()
    assert sw_row["b=4"].item() == f"{mean:.3f} ± {sd:.3f}"
    comparison = rule_comparison_table(summary)
    assert set(comparison["threshold_rule"]) == {"balanced_macro_f1", "conformal"}
    assert list(comparison["group"].unique()) == ["low", "all targets"]


def test_routing_gates_from_a_run_folder(tmp_path):
    from lrsafety.activations import write_cell
    from lrsafety.directions import compute_directions, save_directions
    from lrsafety.runs import RunDir, write_json

    data = make_inputs(seed=3, targets=("sw", "yo", "th"))
    n_layers, layer = 3, 1
    splits = {("train", language): cell for language, cell in {**data.source_train, **data.target_train}.items()}
    splits.update({("test", language): cell for language, cell in data.target_test.items()})
    for (split, language), cell in splits.items():
        for subset in ("harmful", "harmless"):
            rows = getattr(cell, subset)
            # The signal sits at `layer`; other layers and the t_inst position hold noise.
            stacked = np.random.default_rng(0).standard_normal((len(rows), n_layers, 2, D_MODEL)).astype(np.float32)
            stacked[:, layer, 1, :] = rows
            write_cell(tmp_path, language, subset, split, torch.from_numpy(stacked), np.arange(len(rows)),
                       {"model_name": "synthetic", "model_source": "synthetic"})
    save_directions(compute_directions(tmp_path), tmp_path)
    write_json(tmp_path / "model.json", {"name": "synthetic", "paper_layer": layer, "is_standin": True})

    loaded_inputs = load_recalibration_inputs(tmp_path)
    assert loaded_inputs.layer == layer
    assert loaded_inputs.target_languages == ["th", "sw", "yo"]
    np.testing.assert_array_equal(loaded_inputs.target_test["sw"].harmful, data.target_test["sw"].harmful)
    with pytest.raises(ValueError, match=r"target language 'ko' lacks activation cells \['ko_harmful_train'"):
        load_recalibration_inputs(tmp_path, target_languages=["ko"])

    saved = fit_routing_gates(tmp_path, budget=4, seed=0, rank=4, inputs=loaded_inputs)
    assert set(saved) == {"source", "th", "sw", "yo"}
    assert saved["sw"] == gate_path(tmp_path, "sw", 4, 0) == RunDir(tmp_path).gates / "sw_b4_seed0"
    assert (RunDir(tmp_path).gates / "source_b0_seed0.safetensors").is_file()
    gate = Gate.load(saved["yo"])
    assert (gate.layer, gate.budget, gate.language, gate.position) == (layer, 4, "yo", "t_post_inst")
    test = loaded_inputs.target_test["yo"]
    recall = gate.predict(test.harmful).mean()
    specificity = 1 - gate.predict(test.harmless).mean()
    assert (recall + specificity) / 2 >= 0.9
