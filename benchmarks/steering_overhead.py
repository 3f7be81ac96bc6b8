"""Measure 3: steered generation (conditional routing) through the package against plain ``generate``.

Sides, all on the same prompts, the same length-sorted batches, greedy decoding with
``min_new_tokens = max_new_tokens`` so every side generates exactly as many tokens:

- ``routing``: ``lrsafety.generation.generate_completions`` with ``ConditionalRouting`` (half the
  prompts routed to addition, half to ablation, mixed inside each batch);
- ``plain``: transformers ``model.generate`` without any edit, then the same decoding of the new
  tokens (the denominator of the target, <= 1.15);
- ``package_plain``: ``generate_completions`` without an intervention (nnsight's cost alone);
- ``hook_routing``: ``model.generate`` with one ``register_forward_hook`` applying the same
  routing edit (the cost of the edit itself, without nnsight);
- ``gate_pass``: ``lrsafety.steering.last_token_states``, the forward pass the gate needs before a
  routed generation, reported as routing + gate pass against plain;
- ``gate_pass_proposed``: the same gate inputs with length-sorted batches and a trace that stops
  after the gate's layer. This is a change proposed for the package, and its states are compared
  with those of ``gate_pass``.

Checks: ``package_plain`` must produce the same completions as ``plain``, and ``routing`` the same
as ``hook_routing``. The per-step cost of nnsight, in milliseconds, is (routing - hook_routing)
CPU time divided by the decoding steps. As for extraction, a stand-in's step takes a few
milliseconds, so the script also measures a random-weight Qwen2 of width 1024 and 8 layers.

    python -m benchmarks.steering_overhead                 # both models, about 3 minutes
    python -m benchmarks.steering_overhead --models standin --max-new-tokens 128 --repeats 5
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from benchmarks import common

BENCHMARK = "steering_overhead"
TARGET_RATIO = 1.15

logger = logging.getLogger("lrsafety")


def routing_hook(unit: torch.Tensor, alpha: float, harmful: torch.Tensor):
    """Return a forward hook applying the routing edit to a block output, as ``lrsafety.generation`` does.

    Rows with ``harmful`` True get ``h <- h + alpha v`` at the last position (the final prompt
    token in the prompt pass, the new token afterwards); the other rows get ``h <- h - (h . v) v``
    at every position. Computed in float32 and written back in the block's dtype.
    """
    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden.to(torch.float32).clone()
        direction = unit.to(hidden.device, torch.float32)
        ablate = (~harmful).to(hidden.device)[:, None, None]
        projection = (edited @ direction)[..., None]
        edited = torch.where(ablate, edited - projection * direction, edited)
        vector = (alpha * unit).to(hidden.device, torch.float32)
        edited[:, -1, :] = edited[:, -1, :] + harmful.to(hidden.device, torch.float32)[:, None] * vector
        edited = edited.to(hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def plain_generation(loaded, instructions, batch_size: int, max_new_tokens: int, routing=None) -> list[str]:
    """Generate with transformers alone, batched and decoded as ``generate_completions`` does.

    With ``routing`` (a ``ConditionalRouting``), a forward hook applies its edit at its layer.
    """
    from lrsafety.generation import decode_new_tokens, generation_settings, length_sorted_batches, stop_token_ids
    from lrsafety.prompts import encode_prompts, format_prompts, pad_left

    tokenizer = loaded.tokenizer
    module = loaded.model._module
    token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, list(instructions)))
    settings = {**generation_settings(loaded, max_new_tokens), "min_new_tokens": max_new_tokens}
    stop_ids = stop_token_ids(loaded)
    completions: list[str] = [""] * len(instructions)
    for rows in length_sorted_batches([len(ids) for ids in token_ids], batch_size):
        batch = pad_left([token_ids[row] for row in rows], settings["pad_token_id"])
        handle = None
        if routing is not None:
            hook = routing_hook(routing.unit, routing.alpha, routing.harmful[rows])
            handle = module.model.layers[routing.layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                inputs = {name: tensor.to(loaded.device) for name, tensor in batch.as_inputs().items()}
                output = module.generate(**inputs, **settings).cpu()
        finally:
            if handle is not None:
                handle.remove()
        new_ids = output[:, batch.input_ids.shape[1]:]
        for row, text in zip(rows, decode_new_tokens(tokenizer, new_ids, stop_ids)):
            completions[row] = text
    return completions


def proposed_gate_pass(loaded, instructions, layer: int, batch_size: int) -> torch.Tensor:
    """Return the gate inputs as ``last_token_states`` does, with two changes proposed for the package.

    Batches are length-sorted (``length_sorted_batches``) instead of sliced in input order, and
    each trace stops after block ``layer``, so the later blocks and the unembedding are skipped.
    Returns ``[N, d]`` float32 in input order.
    """
    from lrsafety.generation import length_sorted_batches
    from lrsafety.prompts import encode_prompts, format_prompts, pad_left

    tokenizer = loaded.tokenizer
    token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, list(instructions)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    block = loaded.layers[layer]
    states = torch.empty((len(token_ids), loaded.spec.d_model), dtype=torch.float32)
    for rows in length_sorted_batches([len(ids) for ids in token_ids], batch_size):
        batch = pad_left([token_ids[row] for row in rows], pad_id)
        with torch.no_grad():
            with loaded.model.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask) as tracer:
                last = block.output[:, -1, :].detach().save()
                tracer.stop()
        states[rows] = torch.as_tensor(last).to("cpu", torch.float32)
    return states


def measure_model(label: str, loaded, instructions: list[str], batch_size: int, max_new_tokens: int, repeats: int,
                  clock: str, smoke: bool) -> list[dict[str, Any]]:
    """Return the routing-against-plain record of one model, with the diagnostics in its details."""
    from lrsafety.generation import generate_completions, length_sorted_batches
    from lrsafety.prompts import encode_prompts, format_prompts
    from lrsafety.steering import ConditionalRouting, last_token_states

    layer = loaded.spec.paper_layer
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(loaded.spec.d_model, generator=generator)
    # Alternate decisions, so that both edits meet in every batch.
    harmful = torch.arange(len(instructions)) % 2 == 0
    routing = ConditionalRouting(direction, layer, 4.0, harmful, dtype=loaded.spec.dtype)
    extra = {"min_new_tokens": max_new_tokens}
    outputs: dict[str, Any] = {}

    def side(name, function):
        def run():
            outputs[name] = function()
        return run

    sides = {
        "routing": side("routing", lambda: generate_completions(
            loaded, instructions, batch_size=batch_size, max_new_tokens=max_new_tokens, intervention=routing,
            progress=False, generation_kwargs=extra)),
        "plain": side("plain", lambda: plain_generation(loaded, instructions, batch_size, max_new_tokens)),
        "package_plain": side("package_plain", lambda: generate_completions(
            loaded, instructions, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False,
            generation_kwargs=extra)),
        "hook_routing": side("hook_routing", lambda: plain_generation(
            loaded, instructions, batch_size, max_new_tokens, routing=routing)),
        "gate_pass": side("gate_pass", lambda: last_token_states(loaded, instructions, layer, batch_size=batch_size)),
        "gate_pass_proposed": side("gate_pass_proposed", lambda: proposed_gate_pass(loaded, instructions, layer,
                                                                                      batch_size)),
    }
    timings = common.interleave(sides, repeats=repeats, warmup=0 if smoke else 1)

    checks = {
        "package_plain_equals_plain": outputs["package_plain"] == outputs["plain"],
        "routing_equals_hook_routing": outputs["routing"] == outputs["hook_routing"],
        "routing_changes_output": outputs["routing"] != outputs["plain"],
        "gate_pass_proposed_max_abs_difference": float(
            (outputs["gate_pass"] - outputs["gate_pass_proposed"]).abs().max()),
    }
    for name in ("package_plain_equals_plain", "routing_equals_hook_routing"):
        if not checks[name]:
            logger.warning("%s: check %s failed", label, name)

    lengths = [len(ids) for ids in encode_prompts(loaded.tokenizer, format_prompts(loaded.tokenizer, instructions))]
    n_batches = len(length_sorted_batches(lengths, batch_size))
    steps = n_batches * max_new_tokens
    routing_t, plain_t = timings["routing"], timings["plain"]
    with_gate = common.Timings(
        wall=[a + b for a, b in zip(routing_t.wall, timings["gate_pass"].wall)],
        cpu=[a + b for a, b in zip(routing_t.cpu, timings["gate_pass"].cpu)],
    )
    details = {
        **common.ratio_details(routing_t, plain_t),
        f"routing_with_gate_pass_{clock}_ratio": common.spread(common.paired_ratios(with_gate, plain_t, clock)),
        f"package_plain_{clock}_ratio": common.spread(common.paired_ratios(timings["package_plain"], plain_t, clock)),
        f"hook_routing_{clock}_ratio": common.spread(common.paired_ratios(timings["hook_routing"], plain_t, clock)),
        f"gate_pass_{clock}_ratio": common.spread(common.paired_ratios(timings["gate_pass"], plain_t, clock)),
        f"gate_pass_proposed_{clock}_ratio": common.spread(
            common.paired_ratios(timings["gate_pass_proposed"], plain_t, clock)),
        "nnsight_ms_per_step_cpu": common.spread(
            [1000 * (a - b) / steps for a, b in zip(routing_t.cpu, timings["hook_routing"].cpu)]),
        "plain_ms_per_step_cpu": common.spread([1000 * value / steps for value in plain_t.cpu]),
        "seconds": {name: {"wall": value.wall, "cpu": value.cpu} for name, value in timings.items()},
        **checks,
    }
    config = {
        "model": label, "source": loaded.spec.source, "n_layers": loaded.spec.n_layers, "d_model": loaded.spec.d_model,
        "parameters": common.parameter_count(loaded), "dtype": loaded.spec.dtype, "prompts": len(instructions),
        "batch_size": batch_size, "batches": n_batches, "max_new_tokens": max_new_tokens, "layer": layer,
        "prompt_tokens": sum(lengths), "repeats": repeats, "clock": clock,
    }
    ratio = details[f"{clock}_ratio"]
    return [common.result_record(BENCHMARK, f"routed generation ratio, {label}", ratio["median"], "x plain generate",
                                 TARGET_RATIO, ratio, config, details, smoke=smoke)]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="standin,mid", help="comma-separated: standin, mid (default: %(default)s)")
    parser.add_argument("--standin", default="tiny-qwen2", help="stand-in preset (default: %(default)s)")
    parser.add_argument("--languages", default="th,yo", help="prompt languages, test split (default: %(default)s)")
    parser.add_argument("--per-cell", type=int, default=8,
                        help="stand-in prompts per (language, subset) cell (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default: %(default)s)")
    parser.add_argument("--mid-languages", default="en",
                        help="prompt languages of the mid-size model, test split; English keeps its prefill "
                             "short (default: %(default)s)")
    parser.add_argument("--mid-per-cell", type=int, default=2,
                        help="mid-size model prompts per cell (default: %(default)s)")
    parser.add_argument("--mid-max-new-tokens", type=int, default=16,
                        help="tokens generated per prompt by the mid-size model (default: %(default)s)")
    arguments = parser.parse_args(argv)
    common.configure_torch(arguments.threads)

    from lrsafety.models import load_model

    models = common.comma_choices(parser, arguments.models, ("standin", "mid"), "--models")
    languages = arguments.languages.split(",")

    records = []
    if "standin" in models:
        per_cell = 2 if arguments.smoke else arguments.per_cell
        table = common.prompt_table(languages[:1] if arguments.smoke else languages, splits=["test"], per_cell=per_cell)
        loaded = load_model(arguments.standin)
        records += measure_model(
            arguments.standin, loaded, [str(text) for text in table["text"]], arguments.batch_size,
            4 if arguments.smoke else arguments.max_new_tokens, arguments.repeats or (1 if arguments.smoke else 5),
            arguments.clock, arguments.smoke,
        )
    if "mid" in models:
        loaded = load_model(str(common.build_random_qwen2(common.MID_SHAPE)), dtype="float32")
        mid_languages = arguments.mid_languages.split(",")
        table = common.prompt_table(mid_languages[:1] if arguments.smoke else mid_languages, splits=["test"],
                                    per_cell=1 if arguments.smoke else arguments.mid_per_cell)
        records += measure_model(
            common.MID_SHAPE.name, loaded, [str(text) for text in table["text"]], arguments.batch_size,
            2 if arguments.smoke else arguments.mid_max_new_tokens, arguments.repeats or (1 if arguments.smoke else 3),
            arguments.clock, arguments.smoke,
        )
    return common.finish(records, arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
