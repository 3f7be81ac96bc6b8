"""Harmfulness directions from cached activations.

Every direction is a unit vector per layer and position, oriented so that a positive projection
means "harmful", estimated on the train split:

- per language: ``diff_of_means`` = unit(mean of harmful activations - mean of harmless ones);
- ``pooled_dim``: the difference of means over the activations of all high-resource languages
  (HRL) pooled together, the v_HRL of the gate and of the routing intervention;
- ``pc1_of_diffs``: the top right singular vector of the uncentred SVD of the stacked unit HRL
  directions, with its sign chosen to agree with English.

Statistics run in float64; vectors are stored as float32 in ``DIR/directions/directions.safetensors``
(one tensor ``[n_layers, n_positions, d_model]`` per name) with ``directions.json`` beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lrsafety.activations import CellActivations, available_cells, load_cell
from lrsafety.languages import high_resource_languages, resource_tier, tier_order
from lrsafety.runs import RunDir, atomic_path, write_json

logger = logging.getLogger("lrsafety")

EPSILON = 1e-8
POOLED_NAMES: tuple[str, ...] = ("pooled_dim", "pc1_of_diffs")
ANCHOR_LANGUAGE = "en"
DIRECTIONS_FILE = "directions.safetensors"
METADATA_FILE = "directions.json"


class DirectionError(RuntimeError):
    """Directions are missing, cannot be computed, or do not match a request."""


def unit(vector: np.ndarray, axis: int = -1) -> np.ndarray:
    """Return ``vector / max(||vector||, 1e-8)`` along ``axis``."""
    norm = np.linalg.norm(vector, axis=axis, keepdims=True)
    return vector / np.maximum(norm, EPSILON)


def diff_of_means(harmful: np.ndarray, harmless: np.ndarray) -> np.ndarray:
    """Return the unit difference of means (harmful minus harmless) over axis 0, in float64.

    Inputs are ``[n, ...]`` arrays with the same trailing shape; the result has that trailing
    shape and unit norm along its last axis.
    """
    harmful = np.asarray(harmful, dtype=np.float64)
    harmless = np.asarray(harmless, dtype=np.float64)
    if harmful.shape[0] == 0 or harmless.shape[0] == 0:
        raise ValueError(f"difference of means needs both classes, got {harmful.shape[0]} harmful and {harmless.shape[0]} harmless rows")
    if harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(f"harmful rows have shape {harmful.shape[1:]}, harmless rows {harmless.shape[1:]}")
    return unit(harmful.mean(axis=0) - harmless.mean(axis=0))


def pc1_of_diffs(unit_directions: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """Return the top right singular vector of ``[k, d]`` unit directions (uncentred SVD).

    The sign is flipped when its dot product with ``anchor`` is negative; the result is unit norm.
    """
    matrix = np.asarray(unit_directions, dtype=np.float64)
    _, _, right = np.linalg.svd(matrix, full_matrices=False)
    top = right[0]
    if float(top @ np.asarray(anchor, dtype=np.float64)) < 0:
        top = -top
    return unit(top)


def permuted_diff_of_means(harmful: np.ndarray, harmless: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return the difference of means after shuffling the harmful/harmless labels (a control)."""
    rows = np.concatenate([np.asarray(harmful, dtype=np.float64), np.asarray(harmless, dtype=np.float64)])
    labels = np.zeros(len(rows), dtype=bool)
    labels[: len(harmful)] = True
    labels = rng.permutation(labels)
    return diff_of_means(rows[labels], rows[~labels])


def random_direction(d_model: int, rng: np.random.Generator) -> np.ndarray:
    """Return a Gaussian random unit vector of width ``d_model`` (a control)."""
    return unit(rng.standard_normal(d_model))


@dataclass(frozen=True)
class Directions:
    """Unit directions per name (language code, ``pooled_dim``, ``pc1_of_diffs``), layer and position."""

    vectors: dict[str, np.ndarray]  # name -> [n_layers, n_positions, d_model], float32
    positions: tuple[str, ...]
    n_layers: int
    d_model: int
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    @property
    def languages(self) -> list[str]:
        """The languages that have their own difference-of-means direction."""
        return [name for name in self.vectors if name not in POOLED_NAMES]

    @property
    def high_resource_languages(self) -> list[str]:
        """The high-resource languages the pooled directions were built from."""
        return list(self.metadata.get("high_resource_languages", []))

    def get(self, name: str, layer: int, position: str = "t_post_inst") -> np.ndarray:
        """Return the ``[d_model]`` float32 unit direction of a name at one layer and position."""
        if name not in self.vectors:
            raise DirectionError(f"no direction named {name!r}; available: {', '.join(self.vectors)}")
        return self.vectors[name][self._layer(layer), self._position(position)]

    def stack(self, names: Sequence[str], layer: int, position: str = "t_post_inst") -> np.ndarray:
        """Return the ``[len(names), d_model]`` directions of several names, in the given order."""
        return np.stack([self.get(name, layer, position) for name in names])

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer!r} is out of range; the directions have layers 0..{self.n_layers - 1}")
        return int(layer)

    def _position(self, position: str) -> int:
        if position not in self.positions:
            raise ValueError(f"unknown position {position!r}; expected one of {list(self.positions)}")
        return self.positions.index(position)


def compute_directions(
    run_dir: str | Path | RunDir,
    languages: Sequence[str] | None = None,
    split: str = "train",
) -> Directions:
    """Compute per-language and pooled HRL directions from the cached ``split`` activations.

    ``languages`` defaults to every language with both a harmful and a harmless cell of the
    split. High-resource languages without data are logged and left out of the pooled
    directions; at least one HRL with data is required.
    """
    cells = set(available_cells(run_dir))
    with_data = sorted({language for language, _, cell_split in cells if cell_split == split})
    requested = list(languages) if languages is not None else with_data
    complete = [
        language
        for language in tier_order(requested)
        if (language, "harmful", split) in cells and (language, "harmless", split) in cells
    ]
    incomplete = sorted(set(requested) - set(complete))
    if incomplete:
        logger.warning("No %s directions for %s: a harmful or harmless %s cell is missing", split, ", ".join(incomplete), split)
    if not complete:
        raise DirectionError(f"no language has both harmful and harmless {split} activations in {RunDir(run_dir).activations}")

    hrl = [language for language in high_resource_languages() if language in complete]
    missing_hrl = [language for language in high_resource_languages() if language not in complete]
    if missing_hrl:
        logger.warning("High-resource languages without %s data, left out of the pooled directions: %s", split, ", ".join(missing_hrl))
    if not hrl:
        raise DirectionError(f"no high-resource language has {split} activations; pooled directions need at least one")

    vectors: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, int]] = {}
    pooled_sums = {"harmful": None, "harmless": None}
    pooled_counts = {"harmful": 0, "harmless": 0}
    reference: CellActivations | None = None
    for language in complete:
        harmful = load_cell(run_dir, language, "harmful", split)
        harmless = load_cell(run_dir, language, "harmless", split)
        reference = reference or harmful
        for cell in (harmful, harmless):
            _check_compatible(reference, cell)
        harmful_rows = harmful.activations.numpy()
        harmless_rows = harmless.activations.numpy()
        vectors[language] = diff_of_means(harmful_rows, harmless_rows).astype(np.float32)
        counts[language] = {"harmful": len(harmful_rows), "harmless": len(harmless_rows)}
        if language in hrl:
            # Sums in float64, so the pooled means weight every prompt equally.
            for subset, rows in (("harmful", harmful_rows), ("harmless", harmless_rows)):
                total = rows.astype(np.float64).sum(axis=0)
                pooled_sums[subset] = total if pooled_sums[subset] is None else pooled_sums[subset] + total
                pooled_counts[subset] += len(rows)
        logger.info("Direction for %s from %d harmful and %d harmless %s prompts", language, *counts[language].values(), split)

    pooled_difference = pooled_sums["harmful"] / pooled_counts["harmful"] - pooled_sums["harmless"] / pooled_counts["harmless"]
    vectors["pooled_dim"] = unit(pooled_difference).astype(np.float32)

    anchor = ANCHOR_LANGUAGE if ANCHOR_LANGUAGE in hrl else hrl[0]
    if anchor != ANCHOR_LANGUAGE:
        logger.warning("English has no %s data; pc1_of_diffs takes its sign from %s", split, anchor)
    n_layers, n_positions, d_model = vectors[hrl[0]].shape
    pc1 = np.empty((n_layers, n_positions, d_model), dtype=np.float32)
    for layer in range(n_layers):
        for position in range(n_positions):
            stacked = np.stack([vectors[language][layer, position] for language in hrl])
            pc1[layer, position] = pc1_of_diffs(stacked, vectors[anchor][layer, position])
    vectors["pc1_of_diffs"] = pc1

    metadata = {
        "model_name": reference.metadata.get("model_name"),
        "model_source": reference.metadata.get("model_source"),
        "is_standin": reference.metadata.get("is_standin") == "true",
        "split": split,
        "positions": list(reference.positions),
        "n_layers": reference.n_layers,
        "d_model": reference.d_model,
        "languages": complete,
        "tiers": {language: resource_tier(language) for language in complete if _is_study_language(language)},
        "high_resource_languages": hrl,
        "missing_high_resource_languages": missing_hrl,
        "pc1_sign_anchor": anchor,
        "counts": counts,
        "pooled_counts": pooled_counts,
        "epsilon": EPSILON,
    }
    return Directions(vectors=vectors, positions=reference.positions, n_layers=reference.n_layers, d_model=reference.d_model, metadata=metadata)


def save_directions(directions: Directions, run_dir: str | Path | RunDir) -> Path:
    """Write ``directions.safetensors`` and ``directions.json`` into ``DIR/directions`` atomically."""
    from safetensors.torch import save_file

    folder = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).directions
    target = folder / DIRECTIONS_FILE
    tensors = {name: torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32)) for name, vector in directions.vectors.items()}
    with atomic_path(target) as temporary:
        save_file(tensors, str(temporary), metadata={"names": ",".join(directions.vectors)})
    write_json(folder / METADATA_FILE, {**directions.metadata, "names": directions.names})
    logger.info("Wrote %d directions to %s", len(tensors), target)
    return target


def load_directions(run_dir: str | Path | RunDir) -> Directions:
    """Load the directions written by ``save_directions``."""
    import json

    from safetensors import safe_open

    folder = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).path / "directions"
    target, metadata_path = folder / DIRECTIONS_FILE, folder / METADATA_FILE
    if not target.is_file() or not metadata_path.is_file():
        raise DirectionError(f"no directions in {folder}; run notebook 02_extraction (or compute_directions and save_directions)")
    try:
        metadata = json.loads(metadata_path.read_text())
        with safe_open(str(target), framework="pt") as handle:
            names = (handle.metadata() or {}).get("names", "").split(",")
            vectors = {name: handle.get_tensor(name).numpy().astype(np.float32, copy=True) for name in names}
    except Exception as error:  # noqa: BLE001 - reported with the folder to fix
        raise DirectionError(f"directions in {folder} are unreadable ({error}); recompute them") from error
    shapes = {vector.shape for vector in vectors.values()}
    expected = (metadata["n_layers"], len(metadata["positions"]), metadata["d_model"])
    if shapes != {expected}:
        raise DirectionError(f"directions in {folder} have shapes {sorted(shapes)}, expected {expected}; recompute them")
    return Directions(
        vectors=vectors,
        positions=tuple(metadata["positions"]),
        n_layers=int(metadata["n_layers"]),
        d_model=int(metadata["d_model"]),
        metadata=metadata,
    )


def direction_cosines(directions: Directions, layer: int, position: str = "t_post_inst", names: Sequence[str] | None = None) -> pd.DataFrame:
    """Return the cosine similarity between directions (all names by default) at one layer."""
    names = list(names) if names is not None else [*directions.languages, *POOLED_NAMES]
    stacked = directions.stack(names, layer, position).astype(np.float64)
    stacked = unit(stacked)
    return pd.DataFrame(stacked @ stacked.T, index=names, columns=names)


def plot_direction_cosines(cosines: pd.DataFrame, model_name: str, layer: int, position: str = "t_post_inst"):
    """Plot a cosine-similarity heatmap of directions (languages labelled with their tier)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    labels = [f"{name} ({resource_tier(name)})" if _is_study_language(name) else name for name in cosines.index]
    size = 1.6 + 0.42 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    sns.heatmap(
        cosines.set_axis(labels, axis=0).set_axis(labels, axis=1), vmin=-1, vmax=1, cmap="RdBu_r", center=0,
        annot=len(labels) <= 26, fmt=".2f", annot_kws={"fontsize": 7}, square=True, ax=ax,
        cbar_kws={"label": "cosine similarity", "shrink": 0.7},
    )
    ax.set_title(f"{model_name}: harmfulness directions (train), layer {layer}, {position}", fontsize=10, pad=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return fig


def _check_compatible(reference: CellActivations, cell: CellActivations) -> None:
    for name in ("n_layers", "d_model", "positions"):
        if getattr(cell, name) != getattr(reference, name):
            raise DirectionError(
                f"cell {cell.cell_label} has {name} {getattr(cell, name)}, but cell {reference.cell_label} has "
                f"{getattr(reference, name)}; all cells of a run must come from one model"
            )
    if cell.metadata.get("model_source") != reference.metadata.get("model_source"):
        raise DirectionError(
            f"cell {cell.cell_label} comes from {cell.metadata.get('model_source')}, but {reference.cell_label} from "
            f"{reference.metadata.get('model_source')}; all cells of a run must come from one model"
        )


def _is_study_language(language: str) -> bool:
    try:
        resource_tier(language)
    except ValueError:
        return False
    return True
