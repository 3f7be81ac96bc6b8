"""Measure 1: activation extraction through the package (nnsight) against plain forward hooks.

The package side is ``lrsafety.activations.extract_activations`` into a fresh run folder: chat
template, tokenisation, length-grouped token-budget batches, one nnsight trace per batch,
checkpoint shards and the final cell files. The baseline does the same work with transformers
alone: the same prompts, token ids and batches (``plan_batches``), one forward pass per batch with
``register_forward_hook`` on every decoder block, and one safetensors file per cell. Both must
produce equal activations; the script checks that before it reports a ratio. The baseline runs
the decoder stack (``model.model``) without the unembedding, because the package's trace stops
after the last block: neither side computes logits.

Parts, chosen with ``--parts``:

- ``standin``: end-to-end and trace-only ratios on a stand-in (width 64, 4 layers), where a
  batch needs a few milliseconds of compute, so fixed costs weigh heavily;
- ``mid``: the same on a random-weight Qwen2 of width 1024 and 8 layers, whose batches take
  seconds on a CPU, so the ratio reflects real compute;
- ``deep``: nnsight's fixed cost per trace, in milliseconds, on a 28-layer model of width 64
  (Qwen2.5-7B's depth, almost no compute), from many small traced batches;
- ``storage``: no model. The package's storage per prompt (checkpoint shard plus cell file) at
  Qwen2.5-7B's activation size (28 layers x 2 positions x 3584 floats), against one plain
  safetensors file. A GPU computes a prompt in milliseconds, so this cost can decide the GPU ratio.

The end-to-end target is a ratio of at most 1.10.

    python -m benchmarks.extraction_overhead                 # every part, about 3 minutes
    python -m benchmarks.extraction_overhead --parts standin --repeats 7
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

BENCHMARK = "extraction_overhead"
TARGET_RATIO = 1.10
PARTS = ("standin", "mid", "deep", "storage")

# Qwen2.5-7B's depth with a stand-in's width: traces cost nnsight's bookkeeping for 28 layers but
# almost no arithmetic.
DEEP_SHAPE = common.ModelShape(hidden_size=64, num_layers=28, num_heads=4, num_kv_heads=2, intermediate_size=128)
# Floats stored per prompt for Qwen2.5-7B-Instruct: 28 layers x 2 positions x width 3584.
QWEN25_7B_ROW = (28, 2, 3584)

logger = logging.getLogger("lrsafety")


def forward_inputs(batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Return a left-padded batch's model inputs on ``device``, with position ids counted from each row's first token.

    nnsight adds these position ids to a left-padded batch (and ``generate`` computes the same),
    so the baseline passes them too and both sides compute the same numbers.
    """
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {**batch.as_inputs(), "position_ids": position_ids}
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _capture_hooks(blocks, positions: list[int], captured: dict[int, torch.Tensor]) -> list:
    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            # transformers 5 returns a tensor from a decoder block; older versions a tuple.
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, positions, :].detach()

        return hook

    return [block.register_forward_hook(make_hook(layer)) for layer, block in enumerate(blocks)]


def _cells(table):
    return table.groupby(["language", "subset", "split"], sort=False)


def hook_extraction(loaded, table, token_budget: int, max_batch_size: int, output_dir: Path) -> dict[str, torch.Tensor]:
    """Extract the package's tensor layout with plain forward hooks; return ``{cell name: [N, L, 2, d]}``.

    Uses the same prompts, token ids and batches as ``extract_activations``. Writes one safetensors
    file per cell (activations and prompt ids), so that both sides end with the data on disk.
    """
    from safetensors.torch import save_file

    from lrsafety.activations import plan_batches
    from lrsafety.prompts import encode_prompts, find_t_inst_offset, format_prompts, pad_left

    tokenizer = loaded.tokenizer
    positions = [find_t_inst_offset(tokenizer), -1]
    module = loaded.model._module
    blocks = module.model.layers
    captured: dict[int, torch.Tensor] = {}
    handles = _capture_hooks(blocks, positions, captured)
    results = {}
    try:
        for (language, subset, split), cell in _cells(table):
            texts = [str(text) for text in cell["text"].tolist()]
            token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, texts))
            batches = plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size)
            result = torch.empty((len(texts), len(blocks), len(positions), loaded.spec.d_model), dtype=torch.float32)
            for rows in batches:
                batch = pad_left([token_ids[row] for row in rows], tokenizer.pad_token_id)
                with torch.no_grad():
                    module.model(**forward_inputs(batch, loaded.device))
                stacked = torch.stack([captured[layer] for layer in range(len(blocks))], dim=1)
                result[rows] = stacked.to("cpu", torch.float32)
            name = f"{language}_{subset}_{split}"
            prompt_ids = torch.tensor(cell["prompt_id"].tolist(), dtype=torch.int64)
            save_file({"activations": result, "prompt_ids": prompt_ids}, str(output_dir / f"{name}.safetensors"))
            results[name] = result
    finally:
        for handle in handles:
            handle.remove()
    return results


def package_extraction(loaded, table, token_budget: int, max_batch_size: int, run_dir: Path) -> list[Path]:
    from lrsafety.activations import extract_activations

    return extract_activations(loaded, table, run_dir, token_budget=token_budget, max_batch_size=max_batch_size,
                               progress=False)


def compare_outputs(table, run_dir: Path, baseline: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Return whether the package's cell files equal the baseline tensors, and the largest difference."""
    from lrsafety.activations import load_cell

    equal, largest = True, 0.0
    for (language, subset, split), _ in _cells(table):
        package = load_cell(run_dir, language, subset, split).activations
        reference = baseline[f"{language}_{subset}_{split}"]
        if package.shape != reference.shape:
            return {"outputs_equal": False, "max_abs_difference": None,
                    "shape_mismatch": f"{language}/{subset}/{split}: {tuple(package.shape)} vs {tuple(reference.shape)}"}
        equal = equal and torch.equal(package, reference)
        largest = max(largest, float((package - reference).abs().max()))
    return {"outputs_equal": equal, "max_abs_difference": largest}


def padded_batches(loaded, table, token_budget: int, max_batch_size: int) -> list:
    """Return the package's left-padded batches for ``table``, cell by cell."""
    from lrsafety.activations import plan_batches
    from lrsafety.prompts import encode_prompts, format_prompts, pad_left

    tokenizer = loaded.tokenizer
    batches = []
    for _, cell in _cells(table):
        token_ids = encode_prompts(tokenizer, format_prompts(tokenizer, [str(text) for text in cell["text"]]))
        for rows in plan_batches([len(ids) for ids in token_ids], token_budget, max_batch_size):
            batches.append(pad_left([token_ids[row] for row in rows], tokenizer.pad_token_id))
    return batches


def trace_only(loaded, table, token_budget: int, max_batch_size: int, repeats: int,
               max_batches: int | None = None) -> dict[str, Any]:
    """Time one nnsight trace against one hooked forward pass, batch by batch, interleaved.

    Uses the package's per-batch tracer (``lrsafety.activations._trace_batch``), so the numbers
    isolate what nnsight adds to a forward pass, without files and checksums. The per-trace cost
    is the difference of the times of the two sides. ``max_batches`` keeps only the first batches.
    """
    from lrsafety import activations
    from lrsafety.prompts import find_t_inst_offset

    offset = find_t_inst_offset(loaded.tokenizer)
    module = loaded.model._module
    batches = padded_batches(loaded, table, token_budget, max_batch_size)[:max_batches]
    captured: dict[int, torch.Tensor] = {}
    package, baseline = common.Timings(), common.Timings()
    # Hooks stay registered on both sides, so the nnsight side pays their (tiny) cost too.
    handles = _capture_hooks(module.model.layers, [offset, -1], captured)
    try:
        for batch in batches:
            timings = common.interleave({
                "package": lambda: activations._trace_batch(loaded, batch, offset, False),
                "baseline": lambda: module.model(**forward_inputs(batch, loaded.device)),
            }, repeats=repeats, warmup=1)
            for side, into in (("package", package), ("baseline", baseline)):
                into.wall.extend(timings[side].wall)
                into.cpu.extend(timings[side].cpu)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "timings": (package, baseline),
        "n_batches": len(batches),
        "tokens_per_batch": [int(batch.input_ids.numel()) for batch in batches],
        "overhead_ms_per_trace_cpu": common.spread([1000 * (a - b) for a, b in zip(package.cpu, baseline.cpu)]),
        "overhead_ms_per_trace_wall": common.spread([1000 * (a - b) for a, b in zip(package.wall, baseline.wall)]),
    }


def model_config(label: str, loaded, table, token_budget: int, max_batch_size: int, repeats: int) -> dict[str, Any]:
    batches = padded_batches(loaded, table, token_budget, max_batch_size)
    return {
        "model": label, "source": loaded.spec.source, "n_layers": loaded.spec.n_layers, "d_model": loaded.spec.d_model,
        "parameters": common.parameter_count(loaded), "dtype": loaded.spec.dtype, "prompts": len(table),
        "cells": int(_cells(table).ngroups), "real_tokens": int(sum(int(batch.attention_mask.sum()) for batch in batches)),
        "padded_tokens": int(sum(batch.input_ids.numel() for batch in batches)), "batches": len(batches),
        "token_budget": token_budget, "max_batch_size": max_batch_size, "repeats": repeats,
    }


def measure_model(label: str, loaded, table, token_budget: int, max_batch_size: int, repeats: int, clock: str,
                  smoke: bool) -> list[dict[str, Any]]:
    """Return the end-to-end and trace-only records of one model."""
    scratch = Path(tempfile.mkdtemp(prefix="lrsafety-bench-extraction-"))
    runs = iter(range(10**6))
    package_dirs: list[Path] = []
    baseline_outputs: dict[str, torch.Tensor] = {}

    def run_package():
        run_dir = scratch / f"package-{next(runs)}"
        package_dirs.append(run_dir)
        package_extraction(loaded, table, token_budget, max_batch_size, run_dir)

    def run_baseline():
        folder = scratch / f"baseline-{next(runs)}"
        folder.mkdir()
        baseline_outputs.update(hook_extraction(loaded, table, token_budget, max_batch_size, folder))

    try:
        timings = common.interleave({"package": run_package, "baseline": run_baseline}, repeats=repeats,
                                    warmup=0 if smoke else 1)
        check = compare_outputs(table, package_dirs[-1], baseline_outputs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not check["outputs_equal"]:
        logger.warning("%s: package and baseline activations differ (%s)", label, check)

    config = {**model_config(label, loaded, table, token_budget, max_batch_size, repeats), "clock": clock}
    end_to_end = {**common.ratio_details(timings["package"], timings["baseline"]), **check}
    headline = end_to_end[f"{clock}_ratio"]
    records = [common.result_record(
        BENCHMARK, f"end-to-end extraction ratio, {label}", headline["median"], "x plain hooks", TARGET_RATIO,
        headline, config, end_to_end, smoke=smoke,
    )]

    trace = trace_only(loaded, table, token_budget, max_batch_size, repeats=repeats)
    package, baseline = trace.pop("timings")
    trace_details = {**common.ratio_details(package, baseline), **trace}
    headline = trace_details[f"{clock}_ratio"]
    records.append(common.result_record(
        BENCHMARK, f"trace-only ratio (one batch), {label}", headline["median"], "x plain hooks", None, headline,
        config, trace_details, note="diagnostic: nnsight's cost per trace without the package's files", smoke=smoke,
    ))
    return records


def measure_trace_cost(label: str, loaded, table, repeats: int, clock: str, smoke: bool) -> dict[str, Any]:
    """Return the record of nnsight's fixed cost per trace (ms) on a model with almost no compute."""
    # One prompt per batch: the forward pass is as short as it gets, so the difference is bookkeeping.
    trace = trace_only(loaded, table, token_budget=1, max_batch_size=1, repeats=repeats)
    package, baseline = trace.pop("timings")
    overhead = trace[f"overhead_ms_per_trace_{clock}"]
    config = {**model_config(label, loaded, table, 1, 1, repeats), "clock": clock}
    details = {**common.ratio_details(package, baseline), **trace,
               "baseline_ms_per_forward_cpu": common.spread([1000 * value for value in baseline.cpu])}
    return common.result_record(
        BENCHMARK, f"nnsight cost per trace, {label}", overhead["median"], "ms", None, overhead, config, details,
        note="fixed cost of one traced batch saving every layer's output at two positions", smoke=smoke,
    )


def measure_storage(rows: int, batch_rows: int, repeats: int, clock: str, smoke: bool) -> dict[str, Any]:
    """Return the record of the package's storage cost per prompt at Qwen2.5-7B's activation size.

    ``package``: one checkpoint shard per batch (``_write_shard``), then the cell file
    (``write_cell``, with its checksum), then the shard folder removed, as ``_extract_cell``
    does. Variants in the details: the same path with bfloat16 activations, and the cell file
    alone (no shards). Baseline: one plain ``safetensors`` file of the float32 cell.
    """
    from safetensors.torch import save_file

    from lrsafety import activations

    row_shape = (4, 2, 64) if smoke else QWEN25_7B_ROW
    generator = torch.Generator().manual_seed(0)
    values = {"float32": torch.randn((rows, *row_shape), generator=generator)}
    values["bfloat16"] = values["float32"].to(torch.bfloat16)
    prompt_ids = torch.arange(rows, dtype=torch.int64)
    batches = [list(range(start, min(start + batch_rows, rows))) for start in range(0, rows, batch_rows)]
    scratch = Path(tempfile.mkdtemp(prefix="lrsafety-bench-storage-"))
    runs = iter(range(10**6))

    def package_path(dtype: str, shards: bool):
        def run():
            run_dir = scratch / f"package-{next(runs)}"
            shard_dir = run_dir / "activations" / ".shards"
            shard_dir.mkdir(parents=True)
            if shards:
                for index, batch in enumerate(batches):
                    activations._write_shard(shard_dir / f"batch_{index:05d}.safetensors", values[dtype][batch], batch,
                                             "content")
            activations.write_cell(run_dir, "en", "harmful", "train", values[dtype], prompt_ids,
                                   {"model_name": "benchmark"})
            shutil.rmtree(run_dir)

        return run

    def run_baseline():
        folder = scratch / f"baseline-{next(runs)}"
        folder.mkdir()
        save_file({"activations": values["float32"], "prompt_ids": prompt_ids},
                  str(folder / "en_harmful_train.safetensors"))
        shutil.rmtree(folder)

    sides = {
        "package": package_path("float32", shards=True),
        "baseline": run_baseline,
        "package_bfloat16": package_path("bfloat16", shards=True),
        "cell_file_only": package_path("float32", shards=False),
    }
    try:
        timings = common.interleave(sides, repeats=repeats, warmup=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def per_prompt(side: str) -> dict[str, float | int]:
        return common.spread([1000 * value / rows for value in getattr(timings[side], clock)])

    details = {
        **common.ratio_details(timings["package"], timings["baseline"]),
        **{f"{side}_ms_per_prompt": per_prompt(side) for side in sides},
        "megabytes_per_cell_float32": values["float32"].numel() * 4 / 2**20,
    }
    config = {"rows": rows, "batch_rows": batch_rows, "row_shape": list(row_shape), "dtype": "float32",
              "repeats": repeats, "clock": clock}
    headline = details["package_ms_per_prompt"]
    return common.result_record(
        BENCHMARK, "storage per prompt at Qwen2.5-7B activation size, package", headline["median"], "ms", None,
        headline, config, details, note="compare with the baseline_ms_per_prompt detail (one plain file)", smoke=smoke,
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: %(default)s)")
    parser.add_argument("--standin", default="tiny-qwen2", help="stand-in preset (default: %(default)s)")
    parser.add_argument("--languages", default="en,th,ja,yo",
                        help="languages of the stand-in prompts, harmful train cells (default: %(default)s)")
    parser.add_argument("--per-cell", type=int, default=32, help="stand-in prompts per cell (default: %(default)s)")
    parser.add_argument("--mid-languages", default="en,de", help="languages of the mid-size model (default: %(default)s)")
    parser.add_argument("--mid-per-cell", type=int, default=3, help="mid-size model prompts per cell (default: %(default)s)")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="padded tokens per batch (default: the package's DEFAULT_TOKEN_BUDGET)")
    parser.add_argument("--mid-token-budget", type=int, default=1024,
                        help="padded tokens per batch for the mid-size model, small enough to give several "
                             "batches (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="rows per batch (default: the package's DEFAULT_MAX_BATCH_SIZE)")
    parser.add_argument("--storage-rows", type=int, default=256,
                        help="prompts in the storage part's cell (default: %(default)s)")
    arguments = parser.parse_args(argv)
    common.configure_torch(arguments.threads)
    parts = common.comma_choices(parser, arguments.parts, PARTS, "--parts")

    from lrsafety.activations import DEFAULT_MAX_BATCH_SIZE, DEFAULT_TOKEN_BUDGET
    from lrsafety.models import load_model

    token_budget = arguments.token_budget or DEFAULT_TOKEN_BUDGET
    max_batch_size = arguments.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    smoke, clock = arguments.smoke, arguments.clock

    records = []
    if "standin" in parts:
        table = common.prompt_table(["en"] if smoke else arguments.languages.split(","), subsets=["harmful"],
                                    splits=["train"], per_cell=3 if smoke else arguments.per_cell)
        loaded = load_model(arguments.standin)
        repeats = arguments.repeats or (1 if smoke else 5)
        records += measure_model(arguments.standin, loaded, table, token_budget, max_batch_size, repeats, clock, smoke)
    if "mid" in parts:
        loaded = load_model(str(common.build_random_qwen2(common.MID_SHAPE)), dtype="float32")
        table = common.prompt_table(arguments.mid_languages.split(","), subsets=["harmful"], splits=["train"],
                                    per_cell=2 if smoke else arguments.mid_per_cell)
        repeats = arguments.repeats or (1 if smoke else 3)
        records += measure_model(common.MID_SHAPE.name, loaded, table, arguments.mid_token_budget, max_batch_size,
                                 repeats, clock, smoke)
    if "deep" in parts:
        loaded = load_model(str(common.build_random_qwen2(DEEP_SHAPE)), dtype="float32")
        table = common.prompt_table(["en"], subsets=["harmful"], splits=["train"], per_cell=2 if smoke else 6)
        records.append(measure_trace_cost(DEEP_SHAPE.name, loaded, table, arguments.repeats or (2 if smoke else 10),
                                          clock, smoke))
    if "storage" in parts:
        records.append(measure_storage(8 if smoke else arguments.storage_rows, 4 if smoke else max_batch_size,
                                       arguments.repeats or (1 if smoke else 3), clock, smoke))
    return common.finish(records, arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
