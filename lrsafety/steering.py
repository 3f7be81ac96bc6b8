"""Interventions on the residual stream during generation: directional ablation, directional
addition and the gate's conditional routing, with the calibration of the addition strength.

Every intervention edits decoder-block outputs ``h`` (the residual stream after a block) at every
step of a greedy, left-padded, batched generation (see ``lrsafety.generation``):

- ``DirectionalAblation``: ``h <- h - (h . v) v`` at one or more layers, every position, every row.
- ``DirectionalAddition``: ``h <- h + alpha v`` at one layer, at the final prompt token and,
  with scope ``final_prompt_then_gen``, at every generated token.
- ``ConditionalRouting``: a gate decision made per prompt before generation chooses the
  addition (predicted harmful) or the ablation at every position (predicted harmless), both at
  the gate layer. Rows of both kinds share one batch.

``v`` is the unit direction, rounded to the model's dtype before it is normalised (the
authors' hooks normalise it in bf16) and applied in float32. The addition strength is
``alpha = lambda * alpha_base`` with ``alpha_base = Q_0.75(harmful projections) -
Q_0.25(harmless projections)`` of the high-resource training activations on ``v``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrsafety.generation import HookPlan, remote_trace_options
from lrsafety.prompts import encode_prompts, format_prompts, pad_left

logger = logging.getLogger("lrsafety")

ADDITION_SCOPES = ("final_prompt_only", "final_prompt_then_gen")

# Floor of a direction's norm before normalising; a smaller norm means the direction is missing.
_MIN_DIRECTION_NORM = 1e-8


def unit_direction(direction, dtype: torch.dtype | str = torch.float32) -> torch.Tensor:
    """Return ``direction`` rounded to ``dtype`` and normalised to unit length, as float32.

    Raises ValueError for a direction that is not a finite, non-zero vector.
    """
    dtype = _as_dtype(dtype)
    vector = torch.as_tensor(np.asarray(direction) if not isinstance(direction, torch.Tensor) else direction)
    if vector.dim() != 1:
        raise ValueError(f"a direction must be a vector, got shape {tuple(vector.shape)}")
    vector = vector.detach().cpu().to(dtype).to(torch.float32)
    if not torch.isfinite(vector).all():
        raise ValueError("the direction contains NaN or infinite values")
    norm = float(vector.norm())
    if norm < _MIN_DIRECTION_NORM:
        raise ValueError(f"the direction has norm {norm:.3g}; it cannot be normalised")
    return vector / norm


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    try:
        return choices[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(choices)}") from None


def _all_rows(rows: Sequence[int]) -> torch.Tensor:
    return torch.ones(len(rows), dtype=torch.bool)


@dataclass(frozen=True)
class DirectionalAblation:
    """Directional ablation ``h <- h - (h . v) v`` of the unit direction ``v`` at every layer in
    ``layers``, at every position of the prompt pass and every generated token, on every row.

    ``direction`` is normalised on construction after rounding to ``dtype`` (the model's dtype).
    """

    direction: torch.Tensor
    layers: tuple[int, ...]
    dtype: torch.dtype | str = torch.float32
    unit: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(layer) for layer in self.layers)
        if not layers:
            raise ValueError("an ablation needs at least one layer")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "unit", unit_direction(self.direction, self.dtype))

    def hook_plan(self, rows: Sequence[int]) -> HookPlan:
        return HookPlan(ablation_layers=self.layers, ablation_direction=self.unit, ablation_rows=_all_rows(rows))


@dataclass(frozen=True)
class DirectionalAddition:
    """Directional addition ``h <- h + alpha v`` of the unit direction ``v`` at ``layer``, on every row.

    Scope ``final_prompt_only`` edits only the final prompt token of the prompt pass;
    ``final_prompt_then_gen`` edits it and then every generated token.
    """

    direction: torch.Tensor
    layer: int
    alpha: float
    scope: str = "final_prompt_then_gen"
    dtype: torch.dtype | str = torch.float32
    unit: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scope not in ADDITION_SCOPES:
            raise ValueError(f"unknown addition scope {self.scope!r}; expected one of {ADDITION_SCOPES}")
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "unit", unit_direction(self.direction, self.dtype))

    def hook_plan(self, rows: Sequence[int]) -> HookPlan:
        return HookPlan(
            addition_layer=self.layer,
            addition_vector=self.alpha * self.unit,
            addition_rows=_all_rows(rows),
            addition_during_generation=self.scope == "final_prompt_then_gen",
        )


@dataclass(frozen=True)
class ConditionalRouting:
    """The gate's routing at ``layer``, decided per prompt before generation.

    Prompts with ``harmful[i]`` True get the addition ``h <- h + alpha v`` at the final prompt
    token and then at every generated token; the others get the ablation ``h <- h - (h . v) v``
    at every position of the prompt pass and every generated token. ``harmful`` is aligned with
    the instruction list passed to ``generate_completions``.
    """

    direction: torch.Tensor
    layer: int
    alpha: float
    harmful: torch.Tensor
    dtype: torch.dtype | str = torch.float32
    unit: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        harmful = torch.as_tensor(np.asarray(self.harmful, dtype=bool) if not isinstance(self.harmful, torch.Tensor) else self.harmful)
        if harmful.dim() != 1:
            raise ValueError(f"harmful must be one decision per prompt, got shape {tuple(harmful.shape)}")
        object.__setattr__(self, "harmful", harmful.to(torch.bool).cpu())
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "unit", unit_direction(self.direction, self.dtype))

    def hook_plan(self, rows: Sequence[int]) -> HookPlan:
        rows = list(rows)
        if rows and (min(rows) < 0 or max(rows) >= len(self.harmful)):
            raise ValueError(f"batch rows {rows} fall outside the {len(self.harmful)} gate decisions")
        harmful = self.harmful[rows]
        return HookPlan(
            ablation_layers=(self.layer,),
            ablation_direction=self.unit,
            ablation_rows=~harmful,
            addition_layer=self.layer,
            addition_vector=self.alpha * self.unit,
            addition_rows=harmful,
            addition_during_generation=True,
        )


@dataclass(frozen=True)
class AlphaCalibration:
    """The addition strength ``alpha = lambda_scale * alpha_base`` and the quantiles behind it."""

    alpha: float
    alpha_base: float
    lambda_scale: float
    harmful_q75: float
    harmless_q25: float
    n_harmful: int
    n_harmless: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def project(activations, direction) -> np.ndarray:
    """Return the scores ``h . v`` (float32 products, float64 result) of ``[N, d]`` activations on unit ``v``."""
    matrix = torch.as_tensor(np.asarray(activations, dtype=np.float32))
    vector = torch.as_tensor(np.asarray(direction, dtype=np.float32))
    if matrix.dim() != 2 or matrix.shape[1] != vector.shape[0]:
        raise ValueError(f"activations of shape {tuple(matrix.shape)} cannot be projected on a direction of width {vector.shape[0]}")
    return (matrix @ vector).numpy().astype(np.float64)


def alpha_base(harmful_projections, harmless_projections) -> float:
    """Return ``Q_0.75(harmful) - Q_0.25(harmless)`` (linear interpolation, float64).

    Raises ValueError when either set is empty or the difference is not positive, because a
    non-positive strength would push harmful prompts away from refusal.
    """
    harmful = np.asarray(harmful_projections, dtype=np.float64).ravel()
    harmless = np.asarray(harmless_projections, dtype=np.float64).ravel()
    if harmful.size == 0 or harmless.size == 0:
        raise ValueError(f"alpha calibration needs harmful and harmless projections, got {harmful.size} and {harmless.size}")
    base = float(np.quantile(harmful, 0.75, method="linear") - np.quantile(harmless, 0.25, method="linear"))
    if not base > 0:
        raise ValueError(
            f"alpha_base = Q0.75(harmful) - Q0.25(harmless) = {base:.4g} is not positive; the direction "
            "does not separate harmful from harmless training prompts (check its sign and layer)"
        )
    return base


def calibrate_alpha(harmful_activations, harmless_activations, direction, lambda_scale: float = 1.0) -> AlphaCalibration:
    """Return ``alpha = lambda_scale * alpha_base`` from ``[N, d]`` training activations and a unit direction.

    ``lambda_scale`` = 0 is rejected (it would switch the addition off).
    """
    lambda_scale = float(lambda_scale)
    if lambda_scale == 0 or not math.isfinite(lambda_scale):
        raise ValueError(f"lambda_scale must be finite and non-zero, got {lambda_scale}")
    harmful = project(harmful_activations, direction)
    harmless = project(harmless_activations, direction)
    base = alpha_base(harmful, harmless)
    return AlphaCalibration(
        alpha=lambda_scale * base,
        alpha_base=base,
        lambda_scale=lambda_scale,
        harmful_q75=float(np.quantile(harmful, 0.75, method="linear")),
        harmless_q25=float(np.quantile(harmless, 0.25, method="linear")),
        n_harmful=int(harmful.size),
        n_harmless=int(harmless.size),
    )


def last_token_states(
    loaded,
    instructions: Sequence[str],
    layer: int,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    remote: bool | str = False,
    progress: bool = False,
) -> torch.Tensor:
    """Return the ``[N, d]`` float32 block-``layer`` outputs at the last prompt token (``t_post_inst``).

    One plain forward pass per left-padded batch: the gate's input, computed before generation.
    """
    from tqdm.auto import tqdm

    if not 0 <= layer < loaded.spec.n_layers:
        raise ValueError(f"layer {layer} is out of range for {loaded.spec.name} with {loaded.spec.n_layers} layers")
    tokenizer = loaded.tokenizer
    token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, list(instructions), system_prompt))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    block = loaded.layers[layer]
    states = []
    starts = range(0, len(token_ids), batch_size)
    for start in tqdm(starts, desc=f"gate inputs (layer {layer})", unit="batch", disable=not progress):
        batch = pad_left(token_ids[start:start + batch_size], pad_id)
        with torch.no_grad():
            # A remote backend carries one job, so each batch gets its own.
            options = remote_trace_options(loaded, remote)
            with loaded.model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **options):
                last = block.output[:, -1, :].detach().save()
        states.append(torch.as_tensor(last).to(torch.float32).cpu())
    if not states:
        return torch.zeros((0, loaded.spec.d_model), dtype=torch.float32)
    return torch.cat(states)


def check_gate_matches_model(gate, spec) -> None:
    """Raise ValueError when a gate was fitted for another model's width or layer count, or on
    another position than ``t_post_inst``."""
    if int(gate.d_model) != int(spec.d_model):
        raise ValueError(
            f"the gate expects activations of width {gate.d_model} but {spec.name} has width "
            f"{spec.d_model}; load the gate fitted for this model (notebook 04 of its run folder)"
        )
    if not 0 <= int(gate.layer) < int(spec.n_layers):
        raise ValueError(f"the gate reads layer {gate.layer}, which {spec.name} ({spec.n_layers} layers) does not have")
    position = getattr(gate, "position", "t_post_inst")
    if position != "t_post_inst":
        raise ValueError(
            f"the gate reads position {position!r}, but routing decides from the last prompt token "
            "(t_post_inst); fit the gate on t_post_inst activations"
        )


@dataclass(frozen=True)
class GateDecisions:
    """Per-prompt gate logits and decisions (``harmful`` iff ``logit >= threshold``)."""

    logits: np.ndarray
    harmful: np.ndarray


def gate_decisions(gate, loaded, instructions: Sequence[str], *, batch_size: int = 16, remote: bool | str = False,
                   progress: bool = False) -> GateDecisions:
    """Run the plain forward at the gate layer and return the gate's logit and decision per prompt."""
    check_gate_matches_model(gate, loaded.spec)
    states = last_token_states(loaded, instructions, int(gate.layer), batch_size=batch_size, remote=remote,
                               progress=progress).numpy()
    logits = np.asarray(gate.logits(states), dtype=np.float64).ravel()
    harmful = np.asarray(gate.predict(states), dtype=bool).ravel()
    if logits.shape[0] != len(instructions) or harmful.shape[0] != len(instructions):
        raise RuntimeError(f"the gate returned {logits.shape[0]} logits for {len(instructions)} prompts")
    return GateDecisions(logits=logits, harmful=harmful)


# ---------------------------------------------------------------------------------------------
# The steered evaluation of notebook 05: artifacts of a run folder in, judged refusal rates out.

STEERING_CONDITIONS: tuple[str, ...] = ("none", "ablation", "addition", "routing")
ROUTING_DIRECTION = "pooled_dim"
SWEEP_DIRECTION = "pc1_of_diffs"
STEERING_GROUP = ("condition", "language", "subset")
SWEEP_GROUP = ("lambda_scale", "language", "subset")

CONDITION_LABELS = {
    "none": "no intervention",
    "ablation": "ablation",
    "addition": "addition",
    "routing": "conditional routing",
}
CONDITION_PALETTE = {"none": "#7f7f7f", "ablation": "#4393c3", "addition": "#d6604d", "routing": "#1b7837"}


def gate_path(run_dir, language: str, budget: int, seed: int) -> Path:
    """Return the path stem of the gate notebook 04 writes for ``language``, ``budget`` and ``seed``."""
    return _as_run_dir(run_dir).gates / f"{language}_b{budget}_seed{seed}"


def load_gate(run_dir, language: str, budget: int, seed: int, spec):
    """Load the fitted gate of one target language and check that it fits the loaded model."""
    from lrsafety.gate import Gate

    stem = gate_path(run_dir, language, budget, seed)
    if not stem.with_name(stem.name + ".json").is_file():
        raise FileNotFoundError(
            f"no gate for language {language!r}, budget {budget}, seed {seed} at {stem}.json; run notebook "
            f"04_recalibration with this budget and seed first"
        )
    gate = Gate.load(stem)
    check_gate_matches_model(gate, spec)
    return gate


def load_direction(run_dir, name: str, layer: int) -> np.ndarray:
    """Return a stored harmfulness direction (``pooled_dim`` or ``pc1_of_diffs``) at ``t_post_inst``."""
    from lrsafety.directions import load_directions

    return np.asarray(load_directions(_as_run_dir(run_dir)).get(name, layer, "t_post_inst"), dtype=np.float32)


def hrl_training_activations(run_dir, layer: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return the pooled high-resource train activations ``(harmful, harmless, languages)`` at ``t_post_inst``."""
    from lrsafety.activations import available_cells, cell_matrix
    from lrsafety.languages import high_resource_languages

    cells = set(available_cells(run_dir))
    languages = [
        language for language in high_resource_languages()
        if (language, "harmful", "train") in cells and (language, "harmless", "train") in cells
    ]
    if not languages:
        raise FileNotFoundError(
            f"no high-resource train activations in {_as_run_dir(run_dir).activations}; run notebook 02_extraction first"
        )
    harmful = np.concatenate([cell_matrix(run_dir, language, "harmful", "train", layer) for language in languages])
    harmless = np.concatenate([cell_matrix(run_dir, language, "harmless", "train", layer) for language in languages])
    return harmful, harmless, languages


def calibrate_run_alpha(run_dir, direction, layer: int, lambda_scale: float = 1.0, dtype=torch.float32) -> AlphaCalibration:
    """Return alpha for ``direction`` at ``layer`` from the run's high-resource train activations."""
    harmful, harmless, languages = hrl_training_activations(run_dir, layer)
    calibration = calibrate_alpha(harmful, harmless, unit_direction(direction, dtype).numpy(), lambda_scale)
    logger.info(
        "alpha = %.4g x %.4g = %.4g at layer %d (%d harmful, %d harmless train prompts in %d high-resource languages)",
        calibration.lambda_scale, calibration.alpha_base, calibration.alpha, layer,
        calibration.n_harmful, calibration.n_harmless, len(languages),
    )
    return calibration


def build_intervention(condition: str, direction, layer: int, alpha: float, harmful=None, dtype=torch.float32):
    """Return the intervention of one evaluation condition, or None for ``"none"``.

    ``ablation`` ablates ``direction`` at ``layer`` on every prompt, ``addition`` adds ``alpha``
    times it (final prompt token, then every generated token) on every prompt, and ``routing``
    applies one or the other per prompt from the gate decisions ``harmful``.
    """
    if condition == "none":
        return None
    if condition == "ablation":
        return DirectionalAblation(torch.as_tensor(direction), (layer,), dtype=dtype)
    if condition == "addition":
        return DirectionalAddition(torch.as_tensor(direction), layer, alpha, "final_prompt_then_gen", dtype=dtype)
    if condition == "routing":
        if harmful is None:
            raise ValueError("the routing condition needs the gate decisions")
        return ConditionalRouting(torch.as_tensor(direction), layer, alpha, harmful, dtype=dtype)
    raise ValueError(f"unknown condition {condition!r}; expected one of {STEERING_CONDITIONS}")


def target_languages_with_data(prompts, requested: Sequence[str] | None = None) -> list[str]:
    """Return the target languages: ``requested``, or every mid- and low-resource language with
    harmful and harmless prompts in ``prompts``.

    Raises ValueError when a requested language has no harmful or no harmless prompts.
    """
    from lrsafety.languages import resource_tier, tier_order

    with_data = {
        language for language, subsets in prompts.groupby("language")["subset"]
        if {"harmful", "harmless"} <= set(subsets)
    }
    if requested is None:
        chosen = [language for language in with_data if resource_tier(language) in ("mid", "low")]
        if not chosen:
            raise ValueError("no mid- or low-resource language has harmful and harmless prompts in the table")
        return tier_order(chosen)
    requested = list(requested)
    missing = [language for language in requested if language not in with_data]
    if missing:
        raise ValueError(f"no harmful and harmless prompts for language(s) {missing}; available: {sorted(with_data)}")
    return requested


def run_steering_generation(
    loaded,
    run_dir,
    prompts,
    *,
    budget: int,
    seed: int = 0,
    lambda_scale: float = 1.0,
    conditions: Sequence[str] = STEERING_CONDITIONS,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    remote: bool | str = False,
    progress: bool = True,
    extra_metadata: dict | None = None,
):
    """Generate completions of every (condition, language, subset) group and return them as a DataFrame.

    ``prompts`` contains the evaluated rows (columns ``language, tier, subset, prompt_id, text``).
    Each language uses its own gate (``gates/{language}_b{budget}_seed{seed}``) at the gate's layer,
    ``v_HRL`` (``pooled_dim``) at that layer and ``alpha = lambda_scale * alpha_base``. Finished
    groups in ``completions/steering.jsonl`` are kept and skipped, so a rerun resumes.
    """
    from lrsafety.generation import CompletionStore, generate_completions

    run_dir = _as_run_dir(run_dir)
    unknown = sorted(set(conditions) - set(STEERING_CONDITIONS))
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; expected some of {STEERING_CONDITIONS}")
    languages = list(dict.fromkeys(prompts["language"]))
    gates = {language: load_gate(run_dir, language, budget, seed, loaded.spec) for language in languages}
    layers = sorted({int(gate.layer) for gate in gates.values()})
    directions = {layer: load_direction(run_dir, ROUTING_DIRECTION, layer) for layer in layers}
    calibrations = {
        layer: calibrate_run_alpha(run_dir, directions[layer], layer, lambda_scale, loaded.spec.dtype) for layer in layers
    }

    metadata = {
        "model": loaded.spec.name,
        "model_source": loaded.spec.source,
        "model_revision": loaded.spec.revision,
        "dtype": loaded.spec.dtype,
        "budget": budget,
        "seed": seed,
        "direction": ROUTING_DIRECTION,
        "layers": {language: int(gate.layer) for language, gate in gates.items()},
        "gate_thresholds": {language: float(gate.threshold) for language, gate in gates.items()},
        "alpha": {str(layer): calibration.to_dict() for layer, calibration in calibrations.items()},
        "addition_scope": "final_prompt_then_gen",
        "ablation_scope": "all positions, prompt pass and generated tokens",
        "decoding": {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": max_new_tokens},
        "prompts": {language: int((prompts["language"] == language).sum()) for language in languages},
        **(extra_metadata or {}),
    }
    store = CompletionStore(run_dir.completions / "steering.jsonl", metadata, STEERING_GROUP)

    for (language, subset), cell in prompts.groupby(["language", "subset"], sort=False):
        pending = [condition for condition in conditions if not store.has_group(condition, language, subset)]
        if not pending:
            continue
        gate = gates[language]
        layer = int(gate.layer)
        instructions = cell["text"].tolist()
        decisions = gate_decisions(gate, loaded, instructions, batch_size=batch_size, remote=remote)
        logger.info(
            "%s/%s: gate flags %d of %d prompts as harmful", language, subset, int(decisions.harmful.sum()), len(cell)
        )
        for condition in pending:
            intervention = build_intervention(
                condition, directions[layer], layer, calibrations[layer].alpha, decisions.harmful, loaded.spec.dtype
            )
            if progress:
                logger.info("Generating %s / %s / %s (%d prompts)", condition, language, subset, len(cell))
            completions = generate_completions(
                loaded, instructions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                intervention=intervention, remote=remote, progress=progress,
            )
            store.add_group([
                {
                    "condition": condition, "language": language, "tier": row.tier, "subset": subset,
                    "prompt_id": int(row.prompt_id), "gate_logit": float(logit), "gate_harmful": bool(flag),
                    "prompt": row.text, "completion": text,
                }
                for row, logit, flag, text in zip(cell.itertuples(), decisions.logits, decisions.harmful, completions)
            ])
    frame = store.to_frame()
    wanted = frame["condition"].isin(conditions) & frame["language"].isin(languages)
    return frame[wanted].reset_index(drop=True)


def run_activation_sweep(
    loaded,
    run_dir,
    prompts,
    *,
    lambdas: Sequence[float],
    layer: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    remote: bool | str = False,
    progress: bool = True,
    extra_metadata: dict | None = None,
):
    """Generate completions of harmful ``prompts`` under unconditional addition of ``pc1_of_diffs``
    for each ``lambda`` in ``lambdas`` and return them as a DataFrame.

    The addition is ``h <- h + lambda * alpha_base * v`` at ``layer`` (default: the model's paper
    layer), at the final prompt token and every generated token; ``lambda = 0`` is the unsteered
    model. ``alpha_base`` comes from the high-resource train projections on ``v`` itself. Finished
    groups in ``completions/activation_sweep.jsonl`` are kept and skipped.
    """
    from lrsafety.generation import CompletionStore, generate_completions

    run_dir = _as_run_dir(run_dir)
    layer = loaded.spec.paper_layer if layer is None else int(layer)
    lambdas = [float(value) for value in lambdas]
    if not lambdas or any(not math.isfinite(value) or value < 0 for value in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of finite, non-negative numbers, got {lambdas}")
    direction = load_direction(run_dir, SWEEP_DIRECTION, layer)
    calibration = calibrate_run_alpha(run_dir, direction, layer, 1.0, loaded.spec.dtype)
    metadata = {
        "model": loaded.spec.name,
        "model_source": loaded.spec.source,
        "model_revision": loaded.spec.revision,
        "dtype": loaded.spec.dtype,
        "direction": SWEEP_DIRECTION,
        "layer": layer,
        "alpha_base": calibration.to_dict(),
        "addition_scope": "final_prompt_then_gen",
        "decoding": {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": max_new_tokens},
        "prompts": int(len(prompts)),
        **(extra_metadata or {}),
    }
    store = CompletionStore(run_dir.completions / "activation_sweep.jsonl", metadata, SWEEP_GROUP)

    for lambda_scale in lambdas:
        alpha = lambda_scale * calibration.alpha_base
        for (language, subset), cell in prompts.groupby(["language", "subset"], sort=False):
            if store.has_group(lambda_scale, language, subset):
                continue
            intervention = None
            if lambda_scale > 0:
                intervention = DirectionalAddition(
                    torch.as_tensor(direction), layer, alpha, "final_prompt_then_gen", dtype=loaded.spec.dtype
                )
            if progress:
                logger.info("Sweep lambda=%g (alpha=%.4g) / %s / %s (%d prompts)", lambda_scale, alpha, language,
                            subset, len(cell))
            completions = generate_completions(
                loaded, cell["text"].tolist(), batch_size=batch_size, max_new_tokens=max_new_tokens,
                intervention=intervention, remote=remote, progress=progress,
            )
            store.add_group([
                {
                    "lambda_scale": lambda_scale, "alpha": alpha, "alpha_base": calibration.alpha_base,
                    "language": language, "tier": row.tier, "subset": subset, "prompt_id": int(row.prompt_id),
                    "prompt": row.text, "completion": text,
                }
                for row, text in zip(cell.itertuples(), completions)
            ])
    frame = store.to_frame()
    wanted = frame["lambda_scale"].isin(lambdas) & frame["language"].isin(set(prompts["language"]))
    return frame[wanted].reset_index(drop=True)


def judge_completions(completions, judge, run_dir, name: str, group_keys: Sequence[str], *, progress: bool = True):
    """Return ``completions`` with a ``refusal`` column (1, 0 or NaN when the judge could not decide).

    Labels are stored per group in ``completions/{name}.labels.jsonl`` under the judge's settings,
    each with a digest of its prompt and completion. A rerun judges only the groups that are not
    stored or whose completions changed.
    """
    import pandas as pd

    from lrsafety.generation import CompletionStore
    from lrsafety.judges.base import JudgeItem

    run_dir = _as_run_dir(run_dir)
    keys = list(group_keys) + ["prompt_id"]
    store = CompletionStore(run_dir.completions / f"{name}.labels.jsonl", judge.describe(), group_keys)
    for group, rows in completions.groupby(list(group_keys), sort=False):
        group = group if isinstance(group, tuple) else (group,)
        digests = [_text_digest(row.prompt, row.completion) for row in rows.itertuples()]
        stored = {(record["prompt_id"], record["digest"]) for record in store.group_records(*group)}
        if stored and stored == set(zip(rows["prompt_id"].astype(int), digests)):
            continue
        items = [JudgeItem(prompt=row.prompt, response=row.completion, language=row.language) for row in rows.itertuples()]
        results = judge.judge(items, progress=progress)
        store.add_group(
            [
                {**{key: _plain(getattr(row, key)) for key in keys}, "digest": digest, "refusal": result.refusal,
                 "judge_error": result.error}
                for row, digest, result in zip(rows.itertuples(), digests, results)
            ],
            replace=bool(stored),
        )
    labels = store.to_frame()
    if labels.empty:
        return completions.assign(refusal=pd.Series(dtype=float), judge_error=pd.Series(dtype=object))
    merged = completions.merge(labels[keys + ["refusal", "judge_error"]], on=keys, how="left", validate="one_to_one")
    merged["refusal"] = merged["refusal"].astype(float)
    return merged


def _text_digest(prompt: str, completion: str) -> str:
    import hashlib

    return hashlib.sha256(f"{prompt}\x00{completion}".encode("utf-8")).hexdigest()[:16]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def refusal_table(judged):
    """Return harmful and harmless refusal rates (%) and selectivity (points) per condition and language,
    then per tier (unweighted means over languages, ``language = "mean"``, counts summed).

    Selectivity = harmful refusal % - harmless refusal %. Undecided labels are left out of the
    rates and counted in ``n_unlabelled``.
    """
    import pandas as pd

    from lrsafety.languages import TIERS

    rows = []
    for (condition, language), group in judged.groupby(["condition", "language"], sort=False):
        harmful = group.loc[group["subset"] == "harmful", "refusal"]
        harmless = group.loc[group["subset"] == "harmless", "refusal"]
        harmful_rate = 100.0 * harmful.mean() if harmful.notna().any() else np.nan
        harmless_rate = 100.0 * harmless.mean() if harmless.notna().any() else np.nan
        rows.append({
            "condition": condition, "language": language, "tier": group["tier"].iloc[0],
            "harmful_refusal": harmful_rate, "harmless_refusal": harmless_rate,
            "selectivity": harmful_rate - harmless_rate,
            "n_harmful": int(harmful.notna().sum()), "n_harmless": int(harmless.notna().sum()),
            "n_unlabelled": int(group["refusal"].isna().sum()),
        })
    per_language = pd.DataFrame(rows)
    if per_language.empty:
        return per_language
    means = (
        per_language.groupby(["condition", "tier"], sort=False)
        .agg(harmful_refusal=("harmful_refusal", "mean"), harmless_refusal=("harmless_refusal", "mean"),
             selectivity=("selectivity", "mean"), n_harmful=("n_harmful", "sum"), n_harmless=("n_harmless", "sum"),
             n_unlabelled=("n_unlabelled", "sum"), n_languages=("language", "nunique"))
        .reset_index()
        .assign(language="mean")
    )
    table = pd.concat([per_language.assign(n_languages=1), means], ignore_index=True)
    table["condition"] = pd.Categorical(table["condition"], [c for c in STEERING_CONDITIONS if c in set(table["condition"])])
    table["tier"] = pd.Categorical(table["tier"], [tier for tier in TIERS if tier in set(table["tier"])])
    table["is_mean"] = table["language"] == "mean"
    table = table.sort_values(["condition", "tier", "is_mean"], kind="stable").drop(columns="is_mean")
    table["condition"] = table["condition"].astype(str)
    table["tier"] = table["tier"].astype(str)
    columns = ["condition", "language", "tier", "harmful_refusal", "harmless_refusal", "selectivity",
               "n_harmful", "n_harmless", "n_unlabelled", "n_languages"]
    return table[columns].reset_index(drop=True)


def sweep_table(judged):
    """Return the harmful refusal rate (%) per lambda and language, then per tier (unweighted means
    over languages, ``language = "mean"``), with alpha and alpha_base."""
    import pandas as pd

    from lrsafety.languages import LANGUAGES, TIERS

    per_language = (
        judged.groupby(["lambda_scale", "language"], sort=False)
        .agg(tier=("tier", "first"), alpha=("alpha", "first"), alpha_base=("alpha_base", "first"),
             refusal=("refusal", "mean"), n=("refusal", "count"), n_unlabelled=("refusal", lambda s: int(s.isna().sum())))
        .reset_index()
    )
    per_language["refusal"] = 100.0 * per_language["refusal"]
    means = (
        per_language.groupby(["lambda_scale", "tier"], sort=False)
        .agg(alpha=("alpha", "first"), alpha_base=("alpha_base", "first"), refusal=("refusal", "mean"),
             n=("n", "sum"), n_unlabelled=("n_unlabelled", "sum"))
        .reset_index()
        .assign(language="mean")
    )
    table = pd.concat([per_language, means], ignore_index=True)
    # Within each lambda: tiers in order, each tier's languages in table order, then its mean.
    position = {code: index for index, code in enumerate(LANGUAGES)}
    table["tier_rank"] = table["tier"].map({tier: index for index, tier in enumerate(TIERS)})
    table["language_rank"] = table["language"].map(position).fillna(len(position))
    table = table.sort_values(["lambda_scale", "tier_rank", "language_rank"], kind="stable")
    table = table.drop(columns=["tier_rank", "language_rank"])
    columns = ["lambda_scale", "alpha", "alpha_base", "language", "tier", "refusal", "n", "n_unlabelled"]
    return table[columns].reset_index(drop=True)


def plot_steering(table, title: str):
    """Draw harmful refusal, harmless refusal and selectivity per target language and condition.

    Languages are grouped by tier, each tier followed by its mean; every bar carries its value,
    so rates of zero stay readable.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    conditions = [condition for condition in STEERING_CONDITIONS if condition in set(table["condition"])]
    data = table.assign(
        label=table["language"].where(table["language"] != "mean", "mean " + table["tier"]),
        condition_label=table["condition"].map(CONDITION_LABELS),
    )
    order = list(dict.fromkeys(data["label"]))
    hue_order = [CONDITION_LABELS[condition] for condition in conditions]
    palette = {CONDITION_LABELS[condition]: CONDITION_PALETTE[condition] for condition in conditions}
    panels = (
        ("harmful_refusal", "harmful refusal (%)"),
        ("harmless_refusal", "harmless refusal (%)"),
        ("selectivity", "selectivity (points)"),
    )

    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.9 * len(order) + 3), 10), sharex=True)
    for ax, (column, label) in zip(axes, panels):
        sns.barplot(data=data, x="label", y=column, hue="condition_label", order=order, hue_order=hue_order,
                    palette=palette, ax=ax, errorbar=None)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.0f", fontsize=7, padding=1)
        ax.set_ylabel(label)
        ax.set_xlabel("")
        if column == "selectivity":
            # Selectivity lies in [-100, 100]; keep a visible range when every value is near zero.
            limit = max(10.0, 1.2 * float(np.nanmax(np.abs(data[column].to_numpy(dtype=float)), initial=0.0)))
            ax.set_ylim(-min(limit, 110.0), min(limit, 110.0))
            ax.axhline(0, color="black", linewidth=0.8)
        else:
            ax.set_ylim(0, 110)
        ax.get_legend().remove()
    axes[-1].set_xlabel("target language (mean: unweighted mean over the tier's languages)")
    handles, labels = axes[0].get_legend_handles_labels()
    # The top 4 % stays free for the stand-in banner that save_figure may add.
    fig.suptitle(title, y=0.955)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.935), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.925))
    return fig


def plot_activation_sweep(table, title: str):
    """Draw harmful refusal against lambda: one line per tier (mean) and thin lines per language."""
    import matplotlib.pyplot as plt

    from lrsafety.figures import TIER_PALETTE

    styles = {"high": ("o", "-"), "mid": ("s", "--"), "low": ("^", ":")}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for _, group in table[table["language"] != "mean"].groupby("language", sort=False):
        ax.plot(group["lambda_scale"], group["refusal"], color=TIER_PALETTE.get(group["tier"].iloc[0], "grey"),
                alpha=0.25, linewidth=1)
    for tier, group in table[table["language"] == "mean"].groupby("tier", sort=False):
        marker, linestyle = styles.get(tier, ("o", "-"))
        ax.plot(group["lambda_scale"], group["refusal"], color=TIER_PALETTE.get(tier, "grey"), linewidth=2.5,
                marker=marker, markersize=8, linestyle=linestyle, label=f"{tier}-resource mean")
    ax.set_xticks(sorted(set(table["lambda_scale"])))
    ax.set_xlabel("lambda (alpha = lambda x alpha_base)")
    ax.set_ylabel("harmful refusal (%)")
    ax.set_ylim(-3, 103)
    ax.legend(frameon=False, loc="best")
    ax.set_title(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _as_run_dir(run_dir):
    from lrsafety.runs import RunDir

    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
