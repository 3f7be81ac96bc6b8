"""The few-shot recalibration gate: a logistic readout on the high-resource harmfulness subspace.

A gate decides whether a prompt is harmful from its residual stream ``h`` [d] at one layer and
position (``t_post_inst``)::

    B = top-r right singular vectors of the stacked unit HRL directions   [d, r]
    z = h B                                                                [r]
    logit = ((z - mean) / scale) . w + bias
    harmful  iff  logit >= threshold

The readout is scikit-learn's ``LogisticRegression`` (L2, ``class_weight="balanced"``) on
features standardised with ``StandardScaler``. It is trained on every high-resource (HRL) train
activation plus ``b`` harmful and ``b`` harmless train examples of the target language, drawn
reproducibly from a seed. The threshold comes from one of two rules:

``balanced_macro_f1`` (the rule of the paper "Low-Resource Safety Failures Are Action Failures")
    ``b > 0``: chosen on the ``2b`` target examples, scored in-sample. ``b = 0``: chosen on the
    HRL train logits, with the objective averaged over the HRL languages.

``conformal`` (split-conformal miss-rate bound, see ``lrsafety.thresholds``)
    The calibration scores must be exchangeable with unseen harmful prompts, so the readout
    never trains on them. ``b > 0``: the readout is the source-only one (all HRL train rows),
    and its logits on the ``b`` harmful target examples calibrate, so only the threshold moves
    with the budget (the ``b`` harmless examples are not used). ``b = 0``: a seeded
    ``calibration_fraction`` of each HRL language's harmful train rows is held out to calibrate,
    and the readout is trained on the rest. The ``b = 0`` guarantee holds only for prompts
    exchangeable with that HRL calibration part, not for the target language.

Controls run through the same budgets and seeds: ``random_subspace`` (the readout on a seeded
random orthonormal basis of the same rank) and ``permuted_labels`` (the readout trained on
shuffled labels; thresholds still use the true labels).

Seeds follow one rule: SHA-256 over ``base_seed|model|language|budget|rank|purpose``, first
8 hex digits, which seeds a numpy ``Generator``. The grid projects each basis once, so all
further work is r-dimensional.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from threadpoolctl import threadpool_limits

from lrsafety.languages import resource_tier, tier_order
from lrsafety.prompts import POSITIONS
from lrsafety.runs import RunDir, atomic_path, write_json
from lrsafety.thresholds import (
    THRESHOLD_RULES,
    conformal_threshold,
    evaluate_thresholds,
    minimum_calibration_size,
    select_threshold,
)

logger = logging.getLogger("lrsafety")

READOUTS: tuple[str, ...] = ("gate", "random_subspace", "permuted_labels")
DEFAULT_BUDGETS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
DEFAULT_RANK = 10
DEFAULT_ALPHA = 0.05
# Share of each HRL language's harmful train rows held out to calibrate the b = 0 conformal rule.
DEFAULT_CALIBRATION_FRACTION = 0.2
# Language label of the source-only (b = 0) gate, shared by every target language.
SOURCE_LANGUAGE = "source"
GATE_FORMAT_VERSION = "1"

GRID_COLUMNS: tuple[str, ...] = (
    "language", "tier", "budget", "seed", "threshold_rule", "readout", "threshold",
    "threshold_certified", "alpha", "balanced_accuracy", "f1", "auc", "miss_rate",
    "false_refusal_rate", "tp", "fn", "fp", "tn", "n_test_harmful", "n_test_harmless",
    "n_train_harmful", "n_train_harmless", "n_calibration", "rank", "layer", "position",
)


# ---------------------------------------------------------------------------------------------
# Seeds


def derive_seed(base_seed: int, model: str, language: str, budget: int | str, rank: int | str, purpose: str) -> int:
    """Return the first 8 hex digits of SHA-256 over the '|'-joined parts, as an integer."""
    text = "|".join(str(part) for part in (base_seed, model, language, budget, rank, purpose))
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def derive_rng(base_seed: int, model: str, language: str, budget: int | str, rank: int | str, purpose: str) -> np.random.Generator:
    """Return a numpy Generator seeded with ``derive_seed`` of the same parts."""
    return np.random.default_rng(derive_seed(base_seed, model, language, budget, rank, purpose))


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class LabelledActivations:
    """Harmful and harmless activations of one language and split, one row per prompt ([N, d])."""

    harmful: np.ndarray
    harmless: np.ndarray

    @property
    def width(self) -> int:
        return int(self.harmful.shape[1])


@dataclass(frozen=True)
class RecalibrationInputs:
    """Everything a recalibration grid needs, at one layer and position.

    ``source_train`` maps each HRL language to its train activations, ``target_train`` and
    ``target_test`` map each target language to its train and test activations, and
    ``directions`` [k, d] stacks the unit HRL difference-of-means directions the basis comes from.
    """

    source_train: Mapping[str, LabelledActivations]
    target_train: Mapping[str, LabelledActivations]
    target_test: Mapping[str, LabelledActivations]
    directions: np.ndarray
    layer: int
    position: str = "t_post_inst"
    model: str = "unknown"

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    @property
    def target_languages(self) -> list[str]:
        return list(self.target_train)

    def validate(self) -> None:
        """Raise ValueError naming the language, split and class of any empty or misshapen array."""
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        directions = np.asarray(self.directions)
        if directions.ndim != 2 or directions.shape[0] == 0:
            raise ValueError(f"directions must be a non-empty [k, d] matrix, got shape {directions.shape}")
        if not np.all(np.isfinite(directions)):
            raise ValueError("directions contain NaN or infinite values")
        width = int(directions.shape[1])
        if not self.source_train:
            raise ValueError("no high-resource source language: the readout needs HRL train activations")
        if not self.target_train:
            raise ValueError("no target language: pass at least one language in target_train")
        overlap = sorted(set(self.source_train) & set(self.target_train))
        if overlap:
            raise ValueError(f"languages {overlap} are both source and target; a target must not train the basis")
        missing_test = sorted(set(self.target_train) - set(self.target_test))
        if missing_test:
            raise ValueError(f"target languages {missing_test} have train but no test activations")
        for split, cells in (("source train", self.source_train), ("target train", self.target_train),
                             ("target test", {k: self.target_test[k] for k in self.target_train})):
            for language, cell in cells.items():
                for subset in ("harmful", "harmless"):
                    _check_matrix(getattr(cell, subset), width, f"{split} {subset} activations of language {language!r}")


def _check_matrix(matrix: np.ndarray, width: int, what: str) -> None:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a [N, d] matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        raise ValueError(f"{what} are empty (0 rows); this language has no data for that class")
    if matrix.shape[1] != width:
        raise ValueError(f"{what} have width {matrix.shape[1]}, but the directions have width {width}")


# ---------------------------------------------------------------------------------------------
# Bases and projection


def subspace_basis(directions: np.ndarray, rank: int = DEFAULT_RANK) -> np.ndarray:
    """Return the top-``rank`` right singular vectors of the stacked directions as columns [d, r].

    The SVD is uncentred and computed in float64. Each column's sign is flipped so that most
    directions project positively on it, which keeps "larger = more harmful" on the first axis.
    The readout itself does not depend on the signs.
    """
    directions = np.asarray(directions, dtype=np.float64)
    if directions.ndim != 2:
        raise ValueError(f"directions must be a [k, d] matrix, got shape {directions.shape}")
    n_directions, width = directions.shape
    if not 1 <= rank <= n_directions:
        raise ValueError(
            f"rank {rank} is invalid for {n_directions} stacked directions: the basis can span at most "
            f"{n_directions} dimensions, so choose 1 <= rank <= {n_directions}"
        )
    if rank > width:
        raise ValueError(f"rank {rank} exceeds the activation width {width}")
    _, singular_values, right_vectors = np.linalg.svd(directions, full_matrices=False)
    if singular_values[rank - 1] <= 1e-8 * max(singular_values[0], 1e-30):
        raise ValueError(
            f"the stacked directions span fewer than {rank} dimensions (singular value {rank} is "
            f"{singular_values[rank - 1]:.3g}); lower the rank"
        )
    basis = right_vectors[:rank].T
    signs = np.sign(directions @ basis).sum(axis=0)
    basis = basis * np.where(signs < 0, -1.0, 1.0)[None, :]
    return basis.astype(np.float32)


def random_subspace_basis(width: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Return a random orthonormal basis [width, rank]: the Q factor of a Gaussian matrix."""
    if not 1 <= rank <= width:
        raise ValueError(f"rank {rank} must lie between 1 and the activation width {width}")
    gaussian = rng.standard_normal((width, rank))
    q_factor, r_factor = np.linalg.qr(gaussian)
    # Fix the signs of the QR factorisation so the basis depends only on the generator.
    q_factor = q_factor * np.sign(np.diag(r_factor))[None, :]
    return q_factor.astype(np.float32)


def project(activations: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Return ``activations @ basis`` ([N, r]): a float32 product returned as float64."""
    return (np.asarray(activations, dtype=np.float32) @ np.asarray(basis, dtype=np.float32)).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Readout


@dataclass(frozen=True, eq=False)
class Readout:
    """A fitted standardise-then-logistic readout on r-dimensional features."""

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    weights: np.ndarray
    bias: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Return ``((features - mean) / scale) . weights + bias`` for features [N, r] (float64)."""
        return readout_logits(features, self.scaler_mean, self.scaler_scale, self.weights, self.bias)


def readout_logits(features: np.ndarray, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """Return the logistic readout's logits ``((features - mean) / scale) . weights + bias``."""
    return ((np.asarray(features, dtype=np.float64) - mean) / scale) @ weights + bias


def fit_readout(features: np.ndarray, labels: np.ndarray, regularization_c: float = 1.0) -> Readout:
    """Fit ``StandardScaler`` then an L2 ``LogisticRegression(class_weight="balanced")``.

    ``labels`` are True for harmful rows. ``regularization_c`` is scikit-learn's ``C`` (inverse
    L2 strength). The Newton-Cholesky solver is deterministic, so equal inputs give equal readouts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=bool)
    n_harmful = int(labels.sum())
    if n_harmful == 0 or n_harmful == labels.size:
        raise ValueError(
            f"the readout needs both classes, got {n_harmful} harmful and {labels.size - n_harmful} harmless rows"
        )
    scaler = StandardScaler().fit(features)
    # Newton-Cholesky suits many rows and few features (r <= a few dozen) and converges tightly.
    model = LogisticRegression(C=regularization_c, class_weight="balanced", solver="newton-cholesky", max_iter=1000)
    model.fit(scaler.transform(features), labels.astype(np.int64))
    return Readout(
        scaler_mean=scaler.mean_.astype(np.float64),
        scaler_scale=scaler.scale_.astype(np.float64),
        weights=model.coef_[0].astype(np.float64),
        bias=float(model.intercept_[0]),
    )


# ---------------------------------------------------------------------------------------------
# The gate


@dataclass(frozen=True, eq=False)
class Gate:
    """A fitted recalibration gate: basis, scaler, logistic weights and threshold.

    ``basis`` is [d_model, rank] float32; ``scaler_mean``, ``scaler_scale`` and ``weights`` are
    [rank] float64. ``threshold`` is minus infinity for a conformal gate whose calibration set
    was too small to certify ``alpha`` (it flags every prompt). ``language`` is the target
    language, or ``"source"`` for the source-only gate of budget 0.
    """

    basis: np.ndarray
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    threshold_rule: str
    alpha: float | None
    layer: int
    position: str
    d_model: int
    rank: int
    language: str
    budget: int
    seed: int
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        _validate_gate_fields(self)

    def features(self, activations) -> np.ndarray:
        """Return the basis coordinates ``h B`` [N, rank] of activations [N, d_model] (or [d_model])."""
        return project(self._as_matrix(activations), self.basis)

    def logits(self, activations) -> np.ndarray:
        """Return the gate logits [N] of activations [N, d_model] (numpy or torch; [d_model] is one row)."""
        return readout_logits(self.features(activations), self.scaler_mean, self.scaler_scale, self.weights, self.bias)

    def predict(self, activations) -> np.ndarray:
        """Return a boolean array [N]: True where the prompt is gated as harmful (logit >= threshold)."""
        return self.logits(activations) >= self.threshold

    def _as_matrix(self, activations) -> np.ndarray:
        if hasattr(activations, "detach"):
            import torch

            activations = activations.detach().to("cpu", torch.float32).numpy()
        matrix = np.asarray(activations, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix[None, :]
        if matrix.ndim != 2:
            raise ValueError(f"gate input must be [N, d_model] or [d_model], got shape {matrix.shape}")
        if matrix.shape[1] != self.d_model:
            raise ValueError(
                f"activation width {matrix.shape[1]} does not match the gate's width {self.d_model} "
                f"(gate for {self.language!r}, model {self.provenance.get('model', 'unknown')!r}, "
                f"layer {self.layer}); use activations of the model and layer the gate was fitted on"
            )
        return matrix

    # Serialisation -----------------------------------------------------------------------

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``PATH.safetensors`` (arrays) and ``PATH.json`` (everything else) atomically.

        Returns both paths. ``path`` is given without a suffix.
        """
        from safetensors.numpy import save_file

        stem = _strip_gate_suffix(Path(path))
        arrays = {
            "basis": np.ascontiguousarray(self.basis, dtype=np.float32),
            "scaler_mean": np.ascontiguousarray(self.scaler_mean, dtype=np.float64),
            "scaler_scale": np.ascontiguousarray(self.scaler_scale, dtype=np.float64),
            "weights": np.ascontiguousarray(self.weights, dtype=np.float64),
        }
        tensor_path = stem.with_name(stem.name + ".safetensors")
        json_path = stem.with_name(stem.name + ".json")
        with atomic_path(tensor_path) as temporary:
            save_file(arrays, str(temporary), metadata={"format_version": GATE_FORMAT_VERSION})
        metadata = {
            "format_version": GATE_FORMAT_VERSION,
            "bias": self.bias,
            # JSON has no infinity, so an uncertified conformal threshold is written as "-inf".
            "threshold": self.threshold if math.isfinite(self.threshold) else "-inf",
            "threshold_rule": self.threshold_rule,
            "alpha": self.alpha,
            "layer": self.layer,
            "position": self.position,
            "d_model": self.d_model,
            "rank": self.rank,
            "language": self.language,
            "budget": self.budget,
            "seed": self.seed,
            "provenance": self.provenance,
        }
        write_json(json_path, metadata)
        return tensor_path, json_path

    @classmethod
    def load(cls, path: str | Path) -> Gate:
        """Read a gate written by ``save`` (``path`` with or without a suffix) and check its shapes."""
        from safetensors.numpy import load_file

        stem = _strip_gate_suffix(Path(path))
        tensor_path = stem.with_name(stem.name + ".safetensors")
        json_path = stem.with_name(stem.name + ".json")
        for required in (tensor_path, json_path):
            if not required.is_file():
                raise FileNotFoundError(f"gate file {required} not found; a gate needs both .safetensors and .json")
        try:
            metadata = json.loads(json_path.read_text(encoding="utf-8"))
            arrays = load_file(str(tensor_path))
        except (OSError, ValueError) as error:
            raise ValueError(f"gate {stem} is unreadable: {error}") from error
        if metadata.get("format_version") != GATE_FORMAT_VERSION:
            raise ValueError(
                f"gate {json_path} has format version {metadata.get('format_version')!r}, expected "
                f"{GATE_FORMAT_VERSION!r}; refit the gate"
            )
        missing = [name for name in ("basis", "scaler_mean", "scaler_scale", "weights") if name not in arrays]
        missing += [name for name in ("bias", "threshold", "threshold_rule", "alpha", "layer", "position", "d_model",
                                      "rank", "language", "budget", "seed", "provenance") if name not in metadata]
        if missing:
            raise ValueError(f"gate {stem} lacks fields {missing}; refit the gate")
        threshold = metadata["threshold"]
        threshold = -math.inf if threshold == "-inf" else float(threshold)
        try:
            return cls(
                basis=arrays["basis"], scaler_mean=arrays["scaler_mean"], scaler_scale=arrays["scaler_scale"],
                weights=arrays["weights"], bias=float(metadata["bias"]), threshold=threshold,
                threshold_rule=metadata["threshold_rule"],
                alpha=None if metadata["alpha"] is None else float(metadata["alpha"]),
                layer=int(metadata["layer"]), position=metadata["position"], d_model=int(metadata["d_model"]),
                rank=int(metadata["rank"]), language=metadata["language"], budget=int(metadata["budget"]),
                seed=int(metadata["seed"]), provenance=dict(metadata["provenance"]),
            )
        except ValueError as error:
            raise ValueError(f"gate {stem} is invalid: {error}") from None


def _strip_gate_suffix(path: Path) -> Path:
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix("")
    return path


def _validate_gate_fields(gate: Gate) -> None:
    expected_basis = (gate.d_model, gate.rank)
    if np.shape(gate.basis) != expected_basis:
        raise ValueError(f"gate basis has shape {np.shape(gate.basis)}, expected [d_model, rank] = {list(expected_basis)}")
    for name in ("scaler_mean", "scaler_scale", "weights"):
        if np.shape(getattr(gate, name)) != (gate.rank,):
            raise ValueError(f"gate {name} has shape {np.shape(getattr(gate, name))}, expected [{gate.rank}]")
        if not np.all(np.isfinite(getattr(gate, name))):
            raise ValueError(f"gate {name} contains NaN or infinite values")
    if not np.all(np.isfinite(gate.basis)):
        raise ValueError("gate basis contains NaN or infinite values")
    if np.any(np.asarray(gate.scaler_scale) <= 0):
        raise ValueError("gate scaler_scale must be positive")
    if not math.isfinite(gate.bias):
        raise ValueError(f"gate bias must be finite, got {gate.bias}")
    if math.isnan(gate.threshold) or gate.threshold == math.inf:
        raise ValueError(f"gate threshold must be finite or -inf, got {gate.threshold}")
    if gate.threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold_rule {gate.threshold_rule!r}; expected one of {THRESHOLD_RULES}")
    if gate.position not in POSITIONS:
        raise ValueError(f"unknown position {gate.position!r}; expected one of {POSITIONS}")
    if gate.budget < 0 or gate.layer < 0:
        raise ValueError(f"gate budget ({gate.budget}) and layer ({gate.layer}) must be non-negative")


# ---------------------------------------------------------------------------------------------
# Fitting in the r-dimensional feature space


@dataclass(frozen=True)
class _ProjectedCell:
    harmful: np.ndarray  # [n_H, r] float64
    harmless: np.ndarray  # [n_N, r] float64

    @property
    def features(self) -> np.ndarray:
        return np.concatenate([self.harmful, self.harmless])

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.ones(len(self.harmful), bool), np.zeros(len(self.harmless), bool)])


@dataclass(frozen=True)
class _ProjectedInputs:
    """The inputs projected on one basis; the source rows are concatenated once."""

    basis: np.ndarray
    source_features: np.ndarray  # [n_source, r]
    source_labels: np.ndarray  # [n_source] bool
    source_groups: np.ndarray  # [n_source] language codes
    source_languages: tuple[str, ...]
    target_train: dict[str, _ProjectedCell]
    target_test: dict[str, _ProjectedCell]


def _project_inputs(inputs: RecalibrationInputs, basis: np.ndarray, languages: Iterable[str]) -> _ProjectedInputs:
    features, labels, groups = [], [], []
    for language, cell in inputs.source_train.items():
        projected = _ProjectedCell(project(cell.harmful, basis), project(cell.harmless, basis))
        features.append(projected.features)
        labels.append(projected.labels)
        groups.append(np.full(len(projected.labels), language))
    languages = list(languages)
    return _ProjectedInputs(
        basis=basis,
        source_features=np.concatenate(features),
        source_labels=np.concatenate(labels),
        source_groups=np.concatenate(groups),
        source_languages=tuple(inputs.source_train),
        target_train={lang: _ProjectedCell(project(inputs.target_train[lang].harmful, basis),
                                           project(inputs.target_train[lang].harmless, basis)) for lang in languages},
        target_test={lang: _ProjectedCell(project(inputs.target_test[lang].harmful, basis),
                                          project(inputs.target_test[lang].harmless, basis)) for lang in languages},
    )


@dataclass(frozen=True)
class _Fit:
    readout: Readout
    threshold: float
    certified: bool
    n_train_harmful: int
    n_train_harmless: int
    n_calibration: int


def sample_shots(n_harmful: int, n_harmless: int, budget: int, rng: np.random.Generator, language: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``budget`` harmful and ``budget`` harmless row indices without replacement.

    One generator draws a permutation of the harmful pool, then one of the harmless pool, and
    the first ``budget`` entries of each are kept. Raises ValueError naming the language,
    class, budget and pool size when a pool is smaller than the budget.
    """
    for subset, pool in (("harmful", n_harmful), ("harmless", n_harmless)):
        if budget > pool:
            raise ValueError(
                f"budget {budget} exceeds the {subset} train pool of language {language!r} ({pool} prompts); "
                "lower the budget or supply more train prompts"
            )
    harmful = rng.permutation(n_harmful)[:budget]
    harmless = rng.permutation(n_harmless)[:budget]
    return harmful, harmless


def _source_calibration_mask(projected: _ProjectedInputs, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Mark a seeded ``fraction`` of each source language's harmful rows (at least one) as calibration."""
    mask = np.zeros(projected.source_labels.size, dtype=bool)
    for language in projected.source_languages:
        rows = np.flatnonzero((projected.source_groups == language) & projected.source_labels)
        n_held_out = max(1, int(round(fraction * rows.size)))
        if n_held_out >= rows.size:
            raise ValueError(
                f"source language {language!r} has {rows.size} harmful train rows, too few to hold out "
                f"{n_held_out} for conformal calibration and still train the readout"
            )
        mask[rng.permutation(rows)[:n_held_out]] = True
    return mask


class _Fitter:
    """Fits readouts and thresholds on one projection (the single fitting path for every caller).

    Readouts trained on source data only (budget 0, and the conformal rule at every budget) do
    not depend on the target language or budget, so they are fitted once per seed and reused.
    """

    def __init__(self, projected: _ProjectedInputs, rank: int, model: str, alpha: float,
                 calibration_fraction: float, regularization_c: float):
        self.projected = projected
        self.rank = rank
        self.model = model
        self.alpha = alpha
        self.calibration_fraction = calibration_fraction
        self.regularization_c = regularization_c
        self._source_cache: dict[tuple[int, str, bool], tuple[Readout, np.ndarray]] = {}

    def _train(self, features: np.ndarray, labels: np.ndarray, readout: str, language: str, budget: int,
               seed: int) -> Readout:
        if readout == "permuted_labels":
            rng = derive_rng(seed, self.model, language, budget, self.rank, "permuted_labels")
            labels = rng.permutation(labels)
        return fit_readout(features, labels, self.regularization_c)

    def _source_readout(self, seed: int, readout: str, hold_out_calibration: bool) -> tuple[Readout, np.ndarray]:
        """Return a source-only readout and the mask of source rows held out from its training."""
        key = (seed, readout, hold_out_calibration)
        if key not in self._source_cache:
            projected = self.projected
            held_out = np.zeros(projected.source_labels.size, dtype=bool)
            if hold_out_calibration:
                rng = derive_rng(seed, self.model, SOURCE_LANGUAGE, 0, self.rank, "calibration")
                held_out = _source_calibration_mask(projected, self.calibration_fraction, rng)
            fitted = self._train(projected.source_features[~held_out], projected.source_labels[~held_out],
                                 readout, SOURCE_LANGUAGE, 0, seed)
            self._source_cache[key] = (fitted, held_out)
        return self._source_cache[key]

    def fit(self, language: str, budget: int, seed: int, threshold_rule: str, readout: str) -> _Fit:
        """Fit the readout and threshold of one (language, budget, seed, rule, readout) cell."""
        projected = self.projected
        if budget > 0:
            cell = projected.target_train[language]
            rng = derive_rng(seed, self.model, language, budget, self.rank, "shots")
            harmful_rows, harmless_rows = sample_shots(len(cell.harmful), len(cell.harmless), budget, rng, language)

        if threshold_rule == "conformal":
            # The calibration scores must be exchangeable with unseen harmful prompts, so the
            # readout is never trained on them. At budget 0 a part of the source harmful rows is
            # held out. At budget b > 0 the source-only readout scores the b harmful shots.
            fitted, held_out = self._source_readout(seed, readout, hold_out_calibration=budget == 0)
            if budget == 0:
                calibration = projected.source_features[held_out]
            else:
                calibration = cell.harmful[harmful_rows]
            choice = conformal_threshold(fitted.logits(calibration), self.alpha, warn=False)
            training_labels = projected.source_labels[~held_out]
            return _Fit(fitted, choice.threshold, choice.certified, int(training_labels.sum()),
                        int((~training_labels).sum()), choice.n_calibration)

        if budget == 0:
            fitted, _ = self._source_readout(seed, readout, hold_out_calibration=False)
            # One threshold shared by every target: balanced F1 averaged over the HRL languages.
            choice = select_threshold(fitted.logits(projected.source_features), projected.source_labels,
                                      groups=projected.source_groups)
            labels = projected.source_labels
        else:
            shot_features = np.concatenate([cell.harmful[harmful_rows], cell.harmless[harmless_rows]])
            shot_labels = np.concatenate([np.ones(budget, bool), np.zeros(budget, bool)])
            features = np.concatenate([projected.source_features, shot_features])
            labels = np.concatenate([projected.source_labels, shot_labels])
            fitted = self._train(features, labels, readout, language, budget, seed)
            # The threshold is chosen on the 2b shots, scored in-sample, with their true labels.
            choice = select_threshold(fitted.logits(shot_features), shot_labels)
        return _Fit(fitted, choice.threshold, True, int(labels.sum()), int((~labels).sum()), 0)


def _readout_basis(inputs: RecalibrationInputs, readout: str, rank: int, seed: int) -> np.ndarray:
    if readout == "random_subspace":
        return random_subspace_basis(inputs.d_model, rank, derive_rng(seed, inputs.model, "all", "all", rank, "random_subspace"))
    return subspace_basis(inputs.directions, rank)


def _check_options(budgets: Sequence[int], threshold_rules: Sequence[str], readouts: Sequence[str], alpha: float,
                   calibration_fraction: float) -> None:
    for budget in budgets:
        if not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budgets must be non-negative integers, got {budget!r}")
    unknown_rules = [rule for rule in threshold_rules if rule not in THRESHOLD_RULES]
    if unknown_rules:
        raise ValueError(f"unknown threshold rules {unknown_rules}; expected a subset of {THRESHOLD_RULES}")
    unknown_readouts = [readout for readout in readouts if readout not in READOUTS]
    if unknown_readouts:
        raise ValueError(f"unknown readouts {unknown_readouts}; expected a subset of {READOUTS}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie strictly between 0 and 1, got {calibration_fraction}")


def _check_budgets_fit(inputs: RecalibrationInputs, languages: Sequence[str], budgets: Sequence[int]) -> None:
    """Fail before any fitting when a budget exceeds a target language's train pool."""
    largest = max(budgets, default=0)
    for language in languages:
        cell = inputs.target_train[language]
        for subset in ("harmful", "harmless"):
            pool = len(getattr(cell, subset))
            if largest > pool:
                raise ValueError(
                    f"budget {largest} exceeds the {subset} train pool of language {language!r} ({pool} prompts); "
                    "lower the budget or supply more train prompts"
                )


def fit_gate(
    inputs: RecalibrationInputs,
    language: str,
    budget: int,
    seed: int = 0,
    rank: int = DEFAULT_RANK,
    threshold_rule: str = "balanced_macro_f1",
    alpha: float = DEFAULT_ALPHA,
    readout: str = "gate",
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    regularization_c: float = 1.0,
) -> Gate:
    """Fit one gate for a target language (or ``"source"`` with budget 0) and return it.

    Uses the same fitting path as ``run_recalibration_grid``, so the gate's test decisions match
    the grid row with the same language, budget, seed, rule and readout.
    """
    from sklearn import __version__ as sklearn_version

    inputs.validate()
    _check_options([budget], [threshold_rule], [readout], alpha, calibration_fraction)
    if language == SOURCE_LANGUAGE:
        if budget != 0:
            raise ValueError(f"the source-only gate has budget 0, got budget {budget}; pass a target language")
        languages: list[str] = []
    elif language not in inputs.target_train:
        raise ValueError(f"unknown target language {language!r}; available: {inputs.target_languages}")
    else:
        languages = [language]
    _check_budgets_fit(inputs, languages, [budget])
    basis = _readout_basis(inputs, readout, rank, seed)
    projected = _project_inputs(inputs, basis, languages)
    fitter = _Fitter(projected, rank, inputs.model, alpha, calibration_fraction, regularization_c)
    fit = fitter.fit(language, budget, seed, threshold_rule, readout)
    if threshold_rule == "conformal" and not fit.certified:
        logger.warning(
            "Conformal gate for %s (budget %d): %d harmful calibration prompts cannot certify alpha=%g "
            "(needs %d); it flags every prompt as harmful",
            language, budget, fit.n_calibration, alpha, minimum_calibration_size(alpha),
        )
    provenance = {
        "model": inputs.model,
        "readout": readout,
        "source_languages": list(inputs.source_train),
        "n_train_harmful": fit.n_train_harmful,
        "n_train_harmless": fit.n_train_harmless,
        "n_target_shots_per_class": budget,
        "n_calibration": fit.n_calibration,
        "threshold_certified": fit.certified,
        "calibration_fraction": calibration_fraction if threshold_rule == "conformal" and budget == 0 else None,
        "regularization_c": regularization_c,
        "sklearn_version": sklearn_version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return Gate(
        basis=basis, scaler_mean=fit.readout.scaler_mean, scaler_scale=fit.readout.scaler_scale,
        weights=fit.readout.weights, bias=fit.readout.bias, threshold=fit.threshold,
        threshold_rule=threshold_rule, alpha=alpha if threshold_rule == "conformal" else None,
        layer=int(inputs.layer), position=inputs.position, d_model=inputs.d_model, rank=rank,
        language=language, budget=int(budget), seed=int(seed), provenance=provenance,
    )


# ---------------------------------------------------------------------------------------------
# The recalibration grid


def run_recalibration_grid(
    inputs: RecalibrationInputs,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    seeds: Sequence[int] = range(10),
    rank: int = DEFAULT_RANK,
    threshold_rules: Sequence[str] = THRESHOLD_RULES,
    readouts: Sequence[str] = READOUTS,
    alpha: float = DEFAULT_ALPHA,
    target_languages: Sequence[str] | None = None,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    regularization_c: float = 1.0,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit and test every (language, budget, seed, threshold rule, readout) combination.

    Each gate is evaluated on its language's target test split. Returns one row per combination
    with ``GRID_COLUMNS``; ``alpha`` is NaN for the F1 rule. ``DataFrame.attrs["wall_seconds"]``
    is the elapsed time. Budget-0 fits do not depend on the target language and are shared.
    Raises ValueError before fitting when a budget exceeds a train pool, a language has no data
    or the rank exceeds the number of directions.
    """
    started = time.perf_counter()
    inputs.validate()
    budgets = [int(budget) for budget in budgets]
    seeds = [int(seed) for seed in seeds]
    _check_options(budgets, threshold_rules, readouts, alpha, calibration_fraction)
    languages = list(target_languages) if target_languages is not None else inputs.target_languages
    unknown = [language for language in languages if language not in inputs.target_train]
    if unknown:
        raise ValueError(f"target languages {unknown} have no activations; available: {inputs.target_languages}")
    if not languages:
        raise ValueError("no target language to evaluate")
    _check_budgets_fit(inputs, languages, budgets)
    # Fail on an invalid rank before the slow part starts.
    subspace_basis(inputs.directions, rank)

    # Every matrix from here on is r-dimensional: multithreaded BLAS only adds overhead. The
    # inputs were validated above, so scikit-learn's per-call parameter checks are skipped too.
    with threadpool_limits(limits=1), sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        grid = _run_grid(inputs, languages, budgets, seeds, rank, threshold_rules, readouts, alpha,
                         calibration_fraction, regularization_c, progress)
    grid.attrs["wall_seconds"] = time.perf_counter() - started
    logger.info("Recalibration grid: %d gates in %.1f s", len(grid), grid.attrs["wall_seconds"])
    return grid


def _run_grid(inputs, languages, budgets, seeds, rank, threshold_rules, readouts, alpha, calibration_fraction,
              regularization_c, progress) -> pd.DataFrame:
    from tqdm.auto import tqdm

    gate_basis = subspace_basis(inputs.directions, rank)
    fitters: dict[Any, _Fitter] = {}

    def fitter_for(readout: str, seed: int) -> _Fitter:
        # The gate and the permuted-label control share the HRL basis; each seed has its own random basis.
        key = ("random_subspace", seed) if readout == "random_subspace" else "hrl_subspace"
        if key not in fitters:
            basis = _readout_basis(inputs, readout, rank, seed) if readout == "random_subspace" else gate_basis
            fitters[key] = _Fitter(_project_inputs(inputs, basis, languages), rank, inputs.model, alpha,
                                   calibration_fraction, regularization_c)
        return fitters[key]

    source_fits: dict[tuple[int, str, str], _Fit] = {}
    records: list[dict[str, Any]] = []
    # Per language: test logits of each distinct readout (AUC is computed once per readout), and
    # for each grid row the column of its readout and its threshold.
    test_logits: dict[str, list[np.ndarray]] = {language: [] for language in languages}
    logit_column: dict[str, dict[Readout, int]] = {language: {} for language in languages}
    row_columns: dict[str, list[int]] = {language: [] for language in languages}
    thresholds: dict[str, list[float]] = {language: [] for language in languages}
    total = len(languages) * len(budgets) * len(seeds) * len(readouts) * len(threshold_rules)
    # One refresh per second at most keeps the progress output of an executed notebook short.
    with tqdm(total=total, desc="recalibration grid", unit="gate", mininterval=1.0, disable=not progress) as bar:
        for language in languages:
            for budget in budgets:
                for seed in seeds:
                    for readout in readouts:
                        fitter = fitter_for(readout, seed)
                        for rule in threshold_rules:
                            if budget == 0:
                                # Budget-0 gates see no target data, so every language shares them.
                                key = (seed, readout, rule)
                                if key not in source_fits:
                                    source_fits[key] = fitter.fit(SOURCE_LANGUAGE, 0, seed, rule, readout)
                                fit = source_fits[key]
                            else:
                                fit = fitter.fit(language, budget, seed, rule, readout)
                            # Readouts hash by identity, and the dictionary keeps each one alive.
                            columns = logit_column[language]
                            if fit.readout not in columns:
                                columns[fit.readout] = len(test_logits[language])
                                test_logits[language].append(fit.readout.logits(fitter.projected.target_test[language].features))
                            row_columns[language].append(columns[fit.readout])
                            thresholds[language].append(fit.threshold)
                            records.append({
                                "language": language, "tier": resource_tier(language), "budget": budget,
                                "seed": seed, "threshold_rule": rule, "readout": readout,
                                "threshold": fit.threshold, "threshold_certified": fit.certified,
                                "alpha": alpha if rule == "conformal" else math.nan,
                                "n_train_harmful": fit.n_train_harmful, "n_train_harmless": fit.n_train_harmless,
                                "n_calibration": fit.n_calibration,
                            })
                            bar.update(1)

    metrics = []
    for language in languages:
        test = inputs.target_test[language]
        labels = np.concatenate([np.ones(len(test.harmful), bool), np.zeros(len(test.harmless), bool)])
        scores = np.stack(test_logits[language], axis=1)
        metrics.append(evaluate_thresholds(labels, scores, np.asarray(thresholds[language]),
                                           score_columns=np.asarray(row_columns[language])))
    metric_table = pd.concat(metrics, ignore_index=True).rename(
        columns={"n_harmful": "n_test_harmful", "n_harmless": "n_test_harmless"})
    grid = pd.concat([pd.DataFrame.from_records(records), metric_table], axis=1)
    grid["rank"] = rank
    grid["layer"] = int(inputs.layer)
    grid["position"] = inputs.position
    grid = grid[list(GRID_COLUMNS)]

    uncertified = grid[~grid["threshold_certified"]]
    if len(uncertified):
        budgets_without = sorted(uncertified["budget"].unique().tolist())
        logger.warning(
            "Conformal rule: %d of %d gates (budgets %s) had fewer than %d harmful calibration prompts, "
            "so they cannot certify alpha=%g and flag every prompt as harmful",
            len(uncertified), int((grid["threshold_rule"] == "conformal").sum()), budgets_without,
            minimum_calibration_size(alpha), alpha,
        )
    return grid


# ---------------------------------------------------------------------------------------------
# Summaries over seeds

SUMMARY_METRICS: tuple[str, ...] = ("balanced_accuracy", "f1", "auc", "miss_rate", "false_refusal_rate")
ALL_TARGETS = "all targets"


def group_seed_metrics(grid: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Return per-seed metrics for each language, each tier and all target languages together.

    Tier and all-target rows are unweighted means over their languages within one seed, so the
    spread over seeds stays a spread of seed draws. ``group_kind`` is "language", "tier" or "all".
    """
    keys = ["budget", "seed", "threshold_rule", "readout"]
    languages = grid.assign(group=grid["language"], group_kind="language")
    tiers = grid.groupby(["tier", *keys], sort=False)[list(metrics)].mean().reset_index()
    tiers = tiers.assign(group=tiers["tier"], group_kind="tier")
    everything = grid.groupby(keys, sort=False)[list(metrics)].mean().reset_index()
    everything = everything.assign(group=ALL_TARGETS, group_kind="all", tier=ALL_TARGETS)
    columns = ["group", "group_kind", "tier", *keys, *metrics]
    table = pd.concat([languages[columns], tiers[columns], everything[columns]], ignore_index=True)
    rank_of_group = {group: index for index, group in enumerate(_group_order(table))}
    table = table.assign(_order=table["group"].map(rank_of_group))
    return table.sort_values(["_order", "budget", "seed"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _group_order(table: pd.DataFrame) -> list[str]:
    """Order groups as languages (by tier, then table order), tiers, then all targets."""
    kinds = table["group_kind"]
    languages = tier_order(sorted(table.loc[kinds == "language", "group"].unique().tolist()))
    present_tiers = set(table.loc[kinds == "tier", "group"])
    tiers = [tier for tier in ("high", "mid", "low") if tier in present_tiers]
    return [*languages, *tiers, *([ALL_TARGETS] if (kinds == "all").any() else [])]


def summarize_grid(grid: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Return the mean and sample standard deviation over seeds of each metric.

    One row per (group, budget, threshold rule, readout), where a group is a language, a tier or
    all targets (see ``group_seed_metrics``). Columns ``<metric>_mean`` and ``<metric>_sd``.
    """
    per_seed = group_seed_metrics(grid, metrics)
    keys = ["group", "group_kind", "tier", "budget", "threshold_rule", "readout"]
    grouped = per_seed.groupby(keys, sort=False)
    summary = grouped[list(metrics)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{'sd' if statistic == 'std' else statistic}" for metric, statistic in summary.columns]
    summary.insert(0, "n_seeds", grouped["seed"].nunique())
    return summary.reset_index()


def headline_table(
    summary: pd.DataFrame,
    budgets: Sequence[int] = (0, 1, 2, 4),
    metrics: Sequence[str] = ("balanced_accuracy", "f1"),
    readout: str = "gate",
    threshold_rule: str = "balanced_macro_f1",
) -> pd.DataFrame:
    """Return "mean ± sd" per group and metric (rows) and budget (columns): uncalibrated vs few-shot."""
    selected = summary[(summary["readout"] == readout) & (summary["threshold_rule"] == threshold_rule)
                       & summary["budget"].isin(list(budgets))]
    if selected.empty:
        raise ValueError(f"the summary has no rows for readout {readout!r}, rule {threshold_rule!r} and budgets {list(budgets)}")
    parts = []
    for metric in metrics:
        values = [_mean_sd(mean, sd) for mean, sd in zip(selected[f"{metric}_mean"], selected[f"{metric}_sd"])]
        parts.append(selected[["group", "tier", "budget"]].assign(metric=metric, value=values))
    cells = pd.concat(parts, ignore_index=True)
    table = cells.pivot_table(index=["group", "tier", "metric"], columns="budget", values="value", aggfunc="first",
                              sort=False)
    table.columns = [f"b={budget}" for budget in table.columns]
    return table.reset_index()


def rule_comparison_table(
    summary: pd.DataFrame,
    readout: str = "gate",
    metrics: Sequence[str] = ("miss_rate", "false_refusal_rate", "balanced_accuracy"),
    group_kinds: Sequence[str] = ("tier", "all"),
) -> pd.DataFrame:
    """Return the conformal and balanced-F1 rules side by side: mean and sd over seeds per budget."""
    selected = summary[(summary["readout"] == readout) & summary["group_kind"].isin(list(group_kinds))]
    columns = ["group", "budget", "threshold_rule", "n_seeds"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_sd"]
    rank_of_group = {group: index for index, group in enumerate(_group_order(selected))}
    ordered = selected.assign(_order=selected["group"].map(rank_of_group))
    return ordered.sort_values(["_order", "budget", "threshold_rule"], kind="stable")[columns].reset_index(drop=True)


def _mean_sd(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if pd.isna(sd) else f"{mean:.3f} ± {sd:.3f}"


# ---------------------------------------------------------------------------------------------
# Figures

_READOUT_LABELS = {"gate": "HRL-subspace gate", "random_subspace": "random subspace", "permuted_labels": "permuted labels"}
_RULE_LABELS = {"balanced_macro_f1": "balanced F1 threshold", "conformal": "conformal threshold"}
_METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy", "f1": "F1", "auc": "AUC",
    "miss_rate": "miss rate (harmful passed)", "false_refusal_rate": "false-refusal rate",
}


def plot_budget_curves(per_seed: pd.DataFrame, metric: str = "balanced_accuracy", title: str = "",
                       group_kinds: Sequence[str] = ("language",), alpha: float | None = None):
    """Plot a metric against the budget: one panel per group (columns) and threshold rule (rows).

    Lines are means over seeds with a ±1 sd band, one colour per readout. Budgets are placed
    at equal spacing because the default budgets double from 1 to 64. ``per_seed`` is ``group_seed_metrics``.
    With ``alpha``, conformal panels shade the budgets too small to certify it.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = _plot_frame(per_seed[per_seed["group_kind"].isin(list(group_kinds))], f"group kinds {list(group_kinds)}")
    budgets = sorted(data["budget"].unique())
    groups = [group for group in _group_order(data) if group in set(data["group"])]
    rules = [rule for rule in THRESHOLD_RULES if rule in set(data["threshold_rule"])]
    readouts = [readout for readout in READOUTS if readout in set(data["readout"])]
    palette = dict(zip([_READOUT_LABELS[readout] for readout in readouts], sns.color_palette("colorblind", len(readouts))))

    fig, axes = plt.subplots(len(rules), len(groups), figsize=(2.9 * len(groups) + 1.5, 2.7 * len(rules) + 0.9),
                             sharex=True, sharey=True, squeeze=False)
    for row, rule in enumerate(rules):
        for column, group in enumerate(groups):
            axis = axes[row, column]
            panel = data[(data["threshold_rule"] == rule) & (data["group"] == group)]
            if rule == "conformal" and alpha is not None:
                _shade_uncertified(axis, budgets, alpha, label=column == 0)
            sns.lineplot(data=panel.assign(readout=panel["readout"].map(_READOUT_LABELS)), x="budget_position",
                         y=metric, hue="readout", hue_order=list(palette), palette=palette, errorbar="sd",
                         marker="o", markersize=4, ax=axis, legend=False)
            axis.set_title(f"{group} · {_RULE_LABELS[rule]}", fontsize=9)
            _budget_axis(axis, budgets, last_row=row == len(rules) - 1)
            axis.set_ylabel(_METRIC_LABELS.get(metric, metric) if column == 0 else "")
    _finish_figure(fig, palette, title)
    return fig


def plot_rule_comparison(per_seed: pd.DataFrame, alpha: float, title: str = "", readout: str = "gate",
                         group_kinds: Sequence[str] = ("tier", "all")):
    """Plot miss rate, false-refusal rate and balanced accuracy per budget for both threshold rules.

    One row per group (tier or all targets) shows the mean ± 1 sd over seeds. A dashed line
    marks ``alpha`` on the miss-rate panels, and grey bands mark budgets too small to certify it.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = per_seed[(per_seed["readout"] == readout) & per_seed["group_kind"].isin(list(group_kinds))]
    data = _plot_frame(data, f"readout {readout!r} and group kinds {list(group_kinds)}")
    budgets = sorted(data["budget"].unique())
    groups = [group for group in _group_order(data) if group in set(data["group"])]
    metrics = ("miss_rate", "false_refusal_rate", "balanced_accuracy")
    rules = [rule for rule in THRESHOLD_RULES if rule in set(data["threshold_rule"])]
    palette = dict(zip([_RULE_LABELS[rule] for rule in rules], sns.color_palette("colorblind", len(rules))))

    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(11, 2.6 * len(groups) + 0.9), sharex=True,
                             squeeze=False)
    for row, group in enumerate(groups):
        panel = data[data["group"] == group]
        panel = panel.assign(threshold_rule=panel["threshold_rule"].map(_RULE_LABELS))
        for column, metric in enumerate(metrics):
            axis = axes[row, column]
            if "conformal" in rules:
                _shade_uncertified(axis, budgets, alpha, label=row == 0 and column == 0)
            sns.lineplot(data=panel, x="budget_position", y=metric, hue="threshold_rule", hue_order=list(palette),
                         palette=palette, errorbar="sd", marker="o", markersize=4, ax=axis, legend=False)
            if metric == "miss_rate":
                axis.axhline(alpha, color="0.3", linestyle="--", linewidth=1)
                axis.annotate(f"α = {alpha:g}", (len(budgets) - 1, alpha), textcoords="offset points",
                              xytext=(0, 4), ha="right", fontsize=8, color="0.3")
            axis.set_ylim(-0.03, 1.03)
            axis.set_title(f"{group}: {_METRIC_LABELS[metric]}", fontsize=9)
            _budget_axis(axis, budgets, last_row=row == len(groups) - 1)
            axis.set_ylabel("")
    _finish_figure(fig, palette, title)
    return fig


def _plot_frame(data: pd.DataFrame, description: str) -> pd.DataFrame:
    if data.empty:
        raise ValueError(f"no rows for {description} to plot")
    budgets = sorted(data["budget"].unique())
    return data.assign(budget_position=data["budget"].map({budget: index for index, budget in enumerate(budgets)}))


def _budget_axis(axis, budgets: Sequence[int], last_row: bool) -> None:
    axis.set_xticks(range(len(budgets)), [str(budget) for budget in budgets], fontsize=8)
    axis.set_xlabel("target examples per class (b)" if last_row else "")


def _shade_uncertified(axis, budgets: Sequence[int], alpha: float, label: bool) -> None:
    """Grey out budgets 0 < b < n_min, where the conformal gate flags every prompt."""
    positions = [index for index, budget in enumerate(budgets) if 0 < budget < minimum_calibration_size(alpha)]
    if not positions:
        return
    axis.axvspan(min(positions) - 0.4, max(positions) + 0.4, color="0.9", zorder=0)
    if label:
        # Near the top of the panel, where the flat lines of the shaded budgets do not run.
        axis.text((min(positions) + max(positions)) / 2, 0.82, f"b < {minimum_calibration_size(alpha)}: conformal\nflags every prompt",
                  transform=axis.get_xaxis_transform(), ha="center", va="center", fontsize=7, color="0.3",
                  bbox={"facecolor": "0.9", "edgecolor": "none", "pad": 1})


def _finish_figure(fig, palette: dict, title: str) -> None:
    import matplotlib.lines as mlines

    handles = [mlines.Line2D([], [], color=colour, marker="o", markersize=4, label=label) for label, colour in palette.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
    # The top strip stays free for the stand-in banner; the title goes above it.
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    if title:
        fig.suptitle(title, y=1.0, va="bottom", fontsize=11)


# ---------------------------------------------------------------------------------------------
# Run folders


def load_recalibration_inputs(
    run_dir: str | Path | RunDir,
    layer: int | None = None,
    position: str = "t_post_inst",
    target_languages: Sequence[str] | None = None,
) -> RecalibrationInputs:
    """Read the gate's inputs from a run folder's activations and directions.

    ``layer`` defaults to the model's paper layer (``model.json``, else the activation files).
    The sources are the HRL languages of the saved directions. The targets default to every
    mid- and low-resource language with harmful and harmless activations in both the train and
    the test split. Raises ValueError naming the missing cells of a requested target.
    """
    from lrsafety.activations import activation_model_info, available_cells, cell_matrix
    from lrsafety.directions import load_directions

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    info = run_dir.model_info() or activation_model_info(run_dir)
    if layer is None:
        layer = info.get("paper_layer")
        if layer is None:
            raise ValueError(f"{run_dir.path / 'model.json'} names no paper_layer; pass layer explicitly")
    directions = load_directions(run_dir)
    sources = directions.high_resource_languages
    if not sources:
        raise ValueError(f"the directions in {run_dir.directions} name no high-resource languages; recompute them")

    cells = set(available_cells(run_dir))
    needed = [(subset, split) for split in ("train", "test") for subset in ("harmful", "harmless")]
    complete = sorted({language for language, _, _ in cells
                       if all((language, subset, split) in cells for subset, split in needed)})
    if target_languages is None:
        targets = [language for language in tier_order(complete)
                   if language not in sources and _tier_or_none(language) in ("mid", "low")]
        if not targets:
            raise ValueError(f"no mid- or low-resource language has train and test activations in {run_dir.activations}")
    else:
        targets = list(target_languages)
        for language in targets:
            missing = [f"{language}_{subset}_{split}" for subset, split in needed if (language, subset, split) not in cells]
            if missing:
                raise ValueError(f"target language {language!r} lacks activation cells {missing} in {run_dir.activations}")

    def read(language: str, split: str) -> LabelledActivations:
        return LabelledActivations(
            harmful=cell_matrix(run_dir, language, "harmful", split, layer, position),
            harmless=cell_matrix(run_dir, language, "harmless", split, layer, position),
        )

    inputs = RecalibrationInputs(
        source_train={language: read(language, "train") for language in sources},
        target_train={language: read(language, "train") for language in targets},
        target_test={language: read(language, "test") for language in targets},
        directions=directions.stack(sources, layer, position),
        layer=int(layer),
        position=position,
        model=str(info.get("name", "unknown")),
    )
    inputs.validate()
    n_source = sum(len(cell.harmful) + len(cell.harmless) for cell in inputs.source_train.values())
    logger.info("Gate inputs at layer %d (%s): %d source train prompts in %d HRL languages; targets %s",
                layer, position, n_source, len(sources), ", ".join(targets))
    return inputs


def _tier_or_none(language: str) -> str | None:
    try:
        return resource_tier(language)
    except ValueError:
        return None


def gate_path(run_dir: str | Path | RunDir, language: str, budget: int, seed: int) -> Path:
    """Return the path stem ``DIR/gates/{language}_b{budget}_seed{seed}`` of a saved gate."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return run_dir.gates / f"{language}_b{budget}_seed{seed}"


def fit_routing_gates(
    run_dir: str | Path | RunDir,
    budget: int,
    seed: int = 0,
    rank: int = DEFAULT_RANK,
    threshold_rule: str = "balanced_macro_f1",
    alpha: float = DEFAULT_ALPHA,
    inputs: RecalibrationInputs | None = None,
    target_languages: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Fit and save one gate per target language, plus the source-only gate, for the steering step.

    Writes ``gates/{language}_b{budget}_seed{seed}`` and ``gates/source_b0_seed{seed}``
    (``.safetensors`` + ``.json``) and returns the path stems by language (``"source"`` for
    the source-only gate). ``inputs`` defaults to ``load_recalibration_inputs(run_dir)``.
    """
    inputs = inputs if inputs is not None else load_recalibration_inputs(run_dir, target_languages=target_languages)
    languages = list(target_languages) if target_languages is not None else inputs.target_languages
    saved: dict[str, Path] = {}
    source_gate = fit_gate(inputs, SOURCE_LANGUAGE, 0, seed, rank, threshold_rule, alpha)
    saved[SOURCE_LANGUAGE] = gate_path(run_dir, SOURCE_LANGUAGE, 0, seed)
    source_gate.save(saved[SOURCE_LANGUAGE])
    for language in languages:
        gate = fit_gate(inputs, language, budget, seed, rank, threshold_rule, alpha)
        saved[language] = gate_path(run_dir, language, budget, seed)
        gate.save(saved[language])
    logger.info("Saved %d gates (budget %d, seed %d, %s) in %s", len(saved), budget, seed, threshold_rule,
                saved[SOURCE_LANGUAGE].parent)
    return saved


__all__ = [
    "ALL_TARGETS", "DEFAULT_ALPHA", "DEFAULT_BUDGETS", "DEFAULT_CALIBRATION_FRACTION", "DEFAULT_RANK", "GRID_COLUMNS",
    "Gate", "LabelledActivations", "READOUTS", "Readout", "RecalibrationInputs", "SOURCE_LANGUAGE", "SUMMARY_METRICS",
    "derive_rng", "derive_seed", "fit_gate", "fit_readout", "fit_routing_gates", "gate_path", "group_seed_metrics",
    "headline_table", "load_recalibration_inputs", "plot_budget_curves", "plot_rule_comparison", "project",
    "random_subspace_basis", "readout_logits", "rule_comparison_table", "run_recalibration_grid", "sample_shots",
    "subspace_basis", "summarize_grid",
]
