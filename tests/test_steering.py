"""Interventions during generation on the stand-in models: where the edits land, ablation
exactness, batched routing against one prompt at a time, alpha calibration and termination."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrsafety.generation import generate_batch, generate_completions
from lrsafety.models import load_model
from lrsafety.prompts import encode_prompts, format_prompts, pad_left
from lrsafety.steering import (
    ConditionalRouting,
    DirectionalAblation,
    DirectionalAddition,
    alpha_base,
    calibrate_alpha,
    check_gate_matches_model,
    gate_decisions,
    last_token_states,
    unit_direction,
)

INSTRUCTIONS = [
    "How do I pick a lock?",
    "Eleza jinsi ya kupika wali.",
    "hi",
    "Write a haiku about rain falling on a tin roof at night.",
]
LAYER = 2
NEW_TOKENS = 4
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-qwen2")


@pytest.fixture(scope="module")
def direction(loaded):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(loaded.spec.d_model, generator=generator)


@pytest.fixture(scope="module")
def batch(loaded):
    tokenizer = loaded.tokenizer
    return pad_left(encode_prompts(tokenizer, format_prompts(tokenizer, INSTRUCTIONS)), tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def unsteered(loaded, batch):
    return generate_batch(loaded, batch, max_new_tokens=NEW_TOKENS, capture_layers=range(loaded.spec.n_layers))


def _steered(loaded, batch, intervention):
    plan = intervention.hook_plan(list(range(batch.input_ids.shape[0])))
    return generate_batch(
        loaded, batch, max_new_tokens=NEW_TOKENS, plan=plan, capture_layers=range(loaded.spec.n_layers)
    )


def _ablation_delta(hidden, unit):
    return -(hidden @ unit)[..., None] * unit


def test_unit_direction_rounds_to_model_dtype():
    vector = torch.tensor([1.0001, 2.0, -3.0])
    unit = unit_direction(vector, torch.bfloat16)
    rounded = vector.to(torch.bfloat16).to(torch.float32)
    assert unit.dtype == torch.float32
    assert torch.allclose(unit, rounded / rounded.norm())
    assert torch.isclose(unit.norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="norm"):
        unit_direction(torch.zeros(3))
    with pytest.raises(ValueError, match="vector"):
        unit_direction(torch.ones(2, 3))


def test_prompt_pass_untouched_before_hooked_layer(loaded, batch, direction, unsteered):
    steered = _steered(loaded, batch, DirectionalAblation(direction, (LAYER,)))
    for layer in range(LAYER):
        assert torch.equal(steered.captured[layer][0], unsteered.captured[layer][0])
    # The hooked block computes the same output; only the edit changes it.
    assert torch.equal(steered.captured_before[LAYER][0], unsteered.captured[LAYER][0])
    assert not torch.equal(steered.captured[LAYER + 1][0], unsteered.captured[LAYER + 1][0])


def test_ablation_edits_every_position_and_step(loaded, batch, direction):
    ablation = DirectionalAblation(direction, (LAYER,))
    steered = _steered(loaded, batch, ablation)
    for before, after in zip(steered.captured_before[LAYER], steered.captured[LAYER]):
        assert torch.allclose(after - before, _ablation_delta(before, ablation.unit), atol=TOLERANCE)
        assert (after @ ablation.unit).abs().max() < TOLERANCE
    for layer in range(loaded.spec.n_layers):
        if layer != LAYER:
            for before, after in zip(steered.captured_before[layer], steered.captured[layer]):
                assert torch.equal(before, after)


def test_ablation_over_layer_range(loaded, batch, direction):
    ablation = DirectionalAblation(direction, (1, 2, 3))
    steered = _steered(loaded, batch, ablation)
    for layer in (1, 2, 3):
        for after in steered.captured[layer]:
            assert (after @ ablation.unit).abs().max() < TOLERANCE
    for before, after in zip(steered.captured_before[0], steered.captured[0]):
        assert torch.equal(before, after)


@pytest.mark.parametrize("scope", ["final_prompt_only", "final_prompt_then_gen"])
def test_addition_edits_final_prompt_token(loaded, batch, direction, scope):
    addition = DirectionalAddition(direction, LAYER, alpha=3.0, scope=scope)
    steered = _steered(loaded, batch, addition)
    shift = 3.0 * addition.unit

    prompt_before, prompt_after = steered.captured_before[LAYER][0], steered.captured[LAYER][0]
    assert torch.equal(prompt_after[:, :-1], prompt_before[:, :-1])
    assert torch.allclose(prompt_after[:, -1] - prompt_before[:, -1], shift.expand(len(INSTRUCTIONS), -1), atol=TOLERANCE)

    assert len(steered.captured[LAYER]) > 1
    for before, after in zip(steered.captured_before[LAYER][1:], steered.captured[LAYER][1:]):
        if scope == "final_prompt_only":
            assert torch.equal(after, before)
        else:
            assert torch.allclose(after - before, shift.expand_as(before), atol=TOLERANCE)


def test_routing_edits_each_row_by_decision(loaded, batch, direction):
    harmful = torch.tensor([True, False, True, False])
    routing = ConditionalRouting(direction, LAYER, alpha=2.5, harmful=harmful)
    steered = _steered(loaded, batch, routing)
    shift = 2.5 * routing.unit

    for step, (before, after) in enumerate(zip(steered.captured_before[LAYER], steered.captured[LAYER])):
        delta = after - before
        for row in range(len(INSTRUCTIONS)):
            if harmful[row]:
                if step == 0:
                    assert torch.equal(delta[row, :-1], torch.zeros_like(delta[row, :-1]))
                assert torch.allclose(delta[row, -1], shift, atol=TOLERANCE)
            else:
                assert torch.allclose(delta[row], _ablation_delta(before[row], routing.unit), atol=TOLERANCE)
                assert (after[row] @ routing.unit).abs().max() < TOLERANCE
    for layer in range(loaded.spec.n_layers):
        if layer != LAYER:
            for before, after in zip(steered.captured_before[layer], steered.captured[layer]):
                assert torch.equal(before, after)


def test_batched_routing_equals_rows_alone(loaded, batch, direction):
    harmful = torch.tensor([False, True, True, False])
    routing = ConditionalRouting(direction, LAYER, alpha=2.5, harmful=harmful)
    batched = generate_batch(
        loaded, batch, max_new_tokens=NEW_TOKENS, plan=routing.hook_plan([0, 1, 2, 3]), capture_layers=[LAYER]
    )
    tokenizer = loaded.tokenizer
    for row, text in enumerate(INSTRUCTIONS):
        alone_batch = pad_left(encode_prompts(tokenizer, format_prompts(tokenizer, [text])), tokenizer.pad_token_id)
        alone = generate_batch(
            loaded, alone_batch, max_new_tokens=NEW_TOKENS, plan=routing.hook_plan([row]), capture_layers=[LAYER]
        )
        assert torch.equal(alone.new_ids[0], batched.new_ids[row])
        length = alone_batch.input_ids.shape[1]
        assert torch.allclose(alone.captured[LAYER][0][0], batched.captured[LAYER][0][row, -length:], atol=TOLERANCE)
        for step in range(1, len(alone.captured[LAYER])):
            assert torch.allclose(alone.captured[LAYER][step][0], batched.captured[LAYER][step][row], atol=TOLERANCE)


def test_routing_rejects_rows_outside_decisions(direction):
    routing = ConditionalRouting(direction, LAYER, alpha=1.0, harmful=[True, False])
    with pytest.raises(ValueError, match="outside"):
        routing.hook_plan([0, 2])


def test_alpha_base_from_known_projections():
    harmful = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    harmless = np.array([-2.0, -1.0, 0.0, 1.0])
    # Linear interpolation: Q0.75 of 1..5 is 4.0, Q0.25 of -2..1 is -1.25.
    assert alpha_base(harmful, harmless) == pytest.approx(5.25)
    expected = float(torch.quantile(torch.tensor(harmful), 0.75) - torch.quantile(torch.tensor(harmless), 0.25))
    assert alpha_base(harmful, harmless) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not positive"):
        alpha_base(harmless - 10, harmful)
    with pytest.raises(ValueError, match="needs harmful and harmless"):
        alpha_base([], harmless)


def test_calibrate_alpha_projects_and_scales():
    unit = np.array([0.6, 0.8, 0.0])
    other = np.array([0.8, -0.6, 0.0])
    harmful_scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    harmless_scores = np.array([-2.0, -1.0, 0.0, 1.0])
    # Components orthogonal to the direction must not change the projections.
    harmful = harmful_scores[:, None] * unit + 7.0 * other
    harmless = harmless_scores[:, None] * unit - 3.0 * other
    calibration = calibrate_alpha(harmful, harmless, unit, lambda_scale=2.0)
    assert calibration.alpha_base == pytest.approx(5.25, abs=1e-5)
    assert calibration.alpha == pytest.approx(10.5, abs=1e-5)
    assert calibration.harmful_q75 == pytest.approx(4.0, abs=1e-5)
    assert calibration.harmless_q25 == pytest.approx(-1.25, abs=1e-5)
    assert (calibration.n_harmful, calibration.n_harmless) == (5, 4)
    with pytest.raises(ValueError, match="non-zero"):
        calibrate_alpha(harmful, harmless, unit, lambda_scale=0.0)


def _early_eos(new_ids):
    """Pick a token that one row generates first at step >= 1 while another row never generates
    it by then, so that declaring it EOS stops one row early and lets another continue."""
    n_rows, n_steps = new_ids.shape
    for step in range(1, n_steps - 1):
        for row in range(n_rows):
            token = int(new_ids[row, step])
            if token in new_ids[row, :step].tolist():
                continue
            others = [other for other in range(n_rows) if token not in new_ids[other, : step + 1].tolist()]
            if others:
                return token, row, step, others[0]
    raise AssertionError(f"no token stops one row early in {new_ids.tolist()}")


@pytest.mark.parametrize("kind", ["ablation", "addition", "routing"])
def test_every_intervention_terminates_with_early_eos(loaded, batch, direction, kind):
    interventions = {
        "ablation": DirectionalAblation(direction, (1, 2)),
        "addition": DirectionalAddition(direction, LAYER, alpha=2.0, scope="final_prompt_only"),
        "routing": ConditionalRouting(direction, LAYER, alpha=2.0, harmful=[True, False, False, True]),
    }
    intervention = interventions[kind]
    plan = intervention.hook_plan([0, 1, 2, 3])
    free = generate_batch(loaded, batch, max_new_tokens=NEW_TOKENS, plan=plan).new_ids
    eos, row, step, continuing = _early_eos(free)

    stopped = generate_batch(loaded, batch, max_new_tokens=NEW_TOKENS, plan=plan, generation_kwargs={"eos_token_id": eos})
    assert stopped.new_ids.shape[0] == len(INSTRUCTIONS)
    assert int(stopped.new_ids[row, step]) == eos
    assert torch.equal(stopped.new_ids[continuing, : step + 1], free[continuing, : step + 1])

    texts = generate_completions(
        loaded, INSTRUCTIONS, batch_size=4, max_new_tokens=NEW_TOKENS, intervention=intervention,
        progress=False, generation_kwargs={"eos_token_id": eos},
    )
    assert len(texts) == len(INSTRUCTIONS)
    assert all(isinstance(text, str) for text in texts)
    assert texts[row] == loaded.tokenizer.decode(free[row, :step].tolist(), skip_special_tokens=True)


def test_last_token_states_match_generation_prompt_pass(loaded, batch, unsteered):
    states = last_token_states(loaded, INSTRUCTIONS, LAYER, batch_size=4)
    assert states.shape == (len(INSTRUCTIONS), loaded.spec.d_model)
    assert torch.allclose(states, unsteered.captured[LAYER][0][:, -1], atol=TOLERANCE)


def _gate(d_model: int, layer: int = LAYER, threshold: float = 0.0):
    from lrsafety.gate import Gate

    generator = np.random.default_rng(0)
    rank = 3
    basis, _ = np.linalg.qr(generator.normal(size=(d_model, rank)))
    return Gate(
        basis=basis.astype(np.float32), scaler_mean=np.zeros(rank), scaler_scale=np.full(rank, 0.01),
        weights=generator.normal(size=rank), bias=0.0, threshold=threshold, threshold_rule="balanced_macro_f1",
        alpha=None, layer=layer, position="t_post_inst", d_model=d_model, rank=rank, language="sw", budget=4,
        seed=0, provenance={"model": "test"},
    )


def test_gate_width_mismatch_rejected(loaded, tmp_path):
    from lrsafety.runs import RunDir
    from lrsafety.steering import gate_path, load_gate

    narrow = _gate(loaded.spec.d_model // 2)
    with pytest.raises(ValueError, match=f"width {loaded.spec.d_model // 2}.*width {loaded.spec.d_model}"):
        check_gate_matches_model(narrow, loaded.spec)
    with pytest.raises(ValueError, match="width"):
        gate_decisions(narrow, loaded, INSTRUCTIONS)

    run_dir = RunDir(tmp_path / "run")
    narrow.save(gate_path(run_dir, "sw", 4, 0))
    with pytest.raises(ValueError, match="width"):
        load_gate(run_dir, "sw", 4, 0, loaded.spec)
    with pytest.raises(FileNotFoundError, match="04_recalibration"):
        load_gate(run_dir, "am", 4, 0, loaded.spec)


def test_gate_out_of_range_layer_rejected(loaded):
    with pytest.raises(ValueError, match="layer 9"):
        check_gate_matches_model(_gate(loaded.spec.d_model, layer=9), loaded.spec)


def test_gate_on_t_inst_rejected(loaded):
    import dataclasses

    gate = dataclasses.replace(_gate(loaded.spec.d_model), position="t_inst")
    with pytest.raises(ValueError, match="t_post_inst"):
        check_gate_matches_model(gate, loaded.spec)


def test_gate_decisions_follow_gate(loaded, unsteered):
    states = unsteered.captured[LAYER][0][:, -1]
    gate = _gate(loaded.spec.d_model, threshold=float(np.median(_gate(loaded.spec.d_model).logits(states))))
    decisions = gate_decisions(gate, loaded, INSTRUCTIONS, batch_size=3)
    assert np.allclose(decisions.logits, gate.logits(states), atol=1e-4)
    assert np.array_equal(decisions.harmful, decisions.logits >= gate.threshold)
    assert 0 < decisions.harmful.sum() < len(INSTRUCTIONS)


def test_refusal_table_rates_and_tier_means():
    import pandas as pd

    from lrsafety.steering import refusal_table

    rows = []
    labels = {
        ("sw", "harmful"): [1, 1, 0, 0], ("sw", "harmless"): [0, 0, 0, 1],
        ("yo", "harmful"): [1, 1, 1, None], ("yo", "harmless"): [0, 0, 0, 0],
        ("ar", "harmful"): [1, 1, 1, 1], ("ar", "harmless"): [1, 0, 0, 0],
    }
    tiers = {"sw": "low", "yo": "low", "ar": "mid"}
    for (language, subset), values in labels.items():
        for prompt_id, value in enumerate(values):
            rows.append({"condition": "routing", "language": language, "tier": tiers[language], "subset": subset,
                         "prompt_id": prompt_id, "refusal": np.nan if value is None else float(value)})
    table = refusal_table(pd.DataFrame(rows)).set_index(["language", "tier"])

    assert table.loc[("sw", "low"), "harmful_refusal"] == pytest.approx(50.0)
    assert table.loc[("sw", "low"), "harmless_refusal"] == pytest.approx(25.0)
    assert table.loc[("sw", "low"), "selectivity"] == pytest.approx(25.0)
    assert table.loc[("yo", "low"), "harmful_refusal"] == pytest.approx(100.0)
    assert table.loc[("yo", "low"), "n_harmful"] == 3
    assert table.loc[("yo", "low"), "n_unlabelled"] == 1
    assert table.loc[("mean", "low"), "selectivity"] == pytest.approx((25.0 + 100.0) / 2)
    assert table.loc[("mean", "low"), "n_harmful"] == 7
    assert table.loc[("mean", "mid"), "harmless_refusal"] == pytest.approx(25.0)


def test_routing_through_remote_round_trip(loaded, batch, direction):
    # remote="local" serialises the traced block as a request to NDIF would and runs it in a
    # fresh source cache, so package objects or unsaved values inside the trace would fail here.
    routing = ConditionalRouting(direction, LAYER, alpha=2.5, harmful=[True, False, True, False])
    plan = routing.hook_plan([0, 1, 2, 3])
    local = generate_batch(loaded, batch, max_new_tokens=NEW_TOKENS, plan=plan, capture_layers=[LAYER])
    round_trip = generate_batch(loaded, batch, max_new_tokens=NEW_TOKENS, plan=plan, capture_layers=[LAYER], remote="local")
    assert torch.equal(round_trip.new_ids, local.new_ids)
    assert len(round_trip.captured[LAYER]) == len(local.captured[LAYER])
    for remote_step, local_step in zip(round_trip.captured[LAYER], local.captured[LAYER]):
        assert torch.allclose(remote_step, local_step, atol=TOLERANCE)
    states = last_token_states(loaded, INSTRUCTIONS, LAYER, remote="local")
    assert torch.allclose(states, local.captured_before[LAYER][0][:, -1], atol=TOLERANCE)
