"""Interventions on the residual stream during generation: directional ablation, directional
addition and the gate's conditional routing, with the calibration of the addition strength.

Every intervention edits decoder-block outputs ``h`` (the residual stream after a block) at every
step of a greedy, left-padded, batched generation (see ``lrsafety.generation``):

- ``DirectionalAblation``: ``h <- h - (h . v) v`` at one or more layers, every position, every row.
- ``DirectionalAddition``: ``h <- h + alpha v`` at one layer, at the final prompt token and,
  with scope ``final_prompt_then_gen``, at every generated token.
- ``ConditionalRouting``: per prompt, a gate decision made before generation chooses the
  addition (predicted harmful) or the ablation at every position (predicted harmless), both at
  the gate layer; rows of both kinds share one batch.

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

import numpy as np
import torch

from lrsafety.generation import HookPlan
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
            with loaded.model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask, remote=remote):
                last = block.output[:, -1, :].detach().save()
        states.append(torch.as_tensor(last).to(torch.float32).cpu())
    if not states:
        return torch.zeros((0, loaded.spec.d_model), dtype=torch.float32)
    return torch.cat(states)


def check_gate_matches_model(gate, spec) -> None:
    """Raise ValueError when a gate was fitted for another model's width or layer count."""
    if int(gate.d_model) != int(spec.d_model):
        raise ValueError(
            f"the gate expects activations of width {gate.d_model} but {spec.name} has width "
            f"{spec.d_model}; load the gate fitted for this model (notebook 04 of its run folder)"
        )
    if not 0 <= int(gate.layer) < int(spec.n_layers):
        raise ValueError(f"the gate reads layer {gate.layer}, which {spec.name} ({spec.n_layers} layers) does not have")


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
