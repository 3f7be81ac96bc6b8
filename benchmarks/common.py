"""Shared parts of the benchmark scripts: interleaved timing, spread statistics, result records,
the machine description, PolyRefuse prompt tables and a mid-size random-weight model.

Every benchmark compares the package with a plain baseline in one process. The two sides run
alternately (A, B, then B, A, ...), so a change of machine load hits both sides alike, and each
ratio is formed from one A run and the B run next to it. Wall time and process CPU time are both
recorded: on a shared machine the wall time includes waiting for a core, while the CPU time of a
single-threaded run does not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS_FOLDER = REPOSITORY / "runs" / "benchmarks"

logger = logging.getLogger("lrsafety")

_REPORTED_PACKAGES = ("torch", "transformers", "nnsight", "numpy", "scikit-learn", "pandas", "papermill")


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timings:
    """Wall and process CPU seconds of the timed runs of one side, in run order."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def time_call(function: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``function`` once and return (wall seconds, process CPU seconds, its return value)."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    value = function()
    return time.perf_counter() - wall_start, time.process_time() - cpu_start, value


def interleave(sides: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timings]:
    """Time every side ``repeats`` times, alternating the order between repetitions.

    Repetition ``r`` runs the sides rotated by ``r`` places (A, B then B, A for two sides), so
    neither side always runs first. ``warmup`` untimed rounds come before (first-call costs:
    lazy imports, allocator growth, kernel selection).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    timings = {name: Timings() for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu, _ = time_call(sides[name])
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
            logger.debug("repetition %d, %s: %.3f s wall, %.3f s CPU", repetition, name, wall, cpu)
    return timings


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Return the median, quartiles, minimum, maximum and count of ``values``."""
    values = sorted(float(value) for value in values)
    if not values:
        raise ValueError("spread of an empty list")
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1], "n": len(values)}


def paired_ratios(numerator: Timings, denominator: Timings, clock: str = "wall") -> list[float]:
    """Return the ratio of each repetition: numerator run / the denominator run of the same repetition."""
    top, bottom = getattr(numerator, clock), getattr(denominator, clock)
    return [a / b for a, b in zip(top, bottom)]


CLOCKS = ("cpu", "wall")


def ratio_details(package: Timings, baseline: Timings) -> dict[str, Any]:
    """Return the wall and CPU ratio spreads and the raw seconds of both sides."""
    return {
        "wall_ratio": spread(paired_ratios(package, baseline, "wall")),
        "cpu_ratio": spread(paired_ratios(package, baseline, "cpu")),
        "package_seconds": {"wall": package.wall, "cpu": package.cpu},
        "baseline_seconds": {"wall": baseline.wall, "cpu": baseline.cpu},
    }


# ---------------------------------------------------------------------------------------------
# Result records


def result_record(
    benchmark: str,
    measure: str,
    value: float,
    unit: str,
    target: float | None,
    value_spread: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
    note: str = "",
    smoke: bool = False,
) -> dict[str, Any]:
    """Return one result record: the value against its target (lower is better), with its context.

    ``passed`` is None when the measure has no target. A smoke record (tiny configuration, used
    by the tests) carries ``smoke: true`` and measures nothing about speed.
    """
    return {
        "benchmark": benchmark,
        "measure": measure,
        "value": float(value),
        "unit": unit,
        "target": target,
        "passed": None if target is None else bool(value <= target),
        "spread": dict(value_spread) if value_spread is not None else None,
        "config": dict(config),
        "details": dict(details or {}),
        "note": note,
        "smoke": smoke,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "environment": environment(),
    }


def environment() -> dict[str, Any]:
    """Describe the machine and software a measurement ran on."""
    import torch

    versions = {}
    for name in _REPORTED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_gib": _memory_gib(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git_commit(),
        "package_modified": _package_modified(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def _package_modified() -> list[str] | None:
    """Return the files under ``lrsafety/`` that differ from the commit (the code measured is the working tree)."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--", "lrsafety"], cwd=REPOSITORY,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in result.stdout.splitlines()]


def write_records(records: Sequence[Mapping[str, Any]], output: str | Path) -> Path:
    """Write the records as a JSON list and return the path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(list(records), indent=2, default=str) + "\n", encoding="utf-8")
    return output


def format_summary(records: Sequence[Mapping[str, Any]]) -> str:
    """Return one line per record: measure, median value with its range, target and verdict."""
    lines = []
    for record in records:
        value_spread = record.get("spread") or {}
        value_range = f" [{value_spread['min']:.3g}, {value_spread['max']:.3g}]" if value_spread.get("n", 0) > 1 else ""
        if record["target"] is None:
            verdict = "no target"
        else:
            verdict = f"target <= {record['target']:g}: {'pass' if record['passed'] else 'MISS'}"
        smoke = " (smoke configuration)" if record.get("smoke") else ""
        lines.append(f"{record['benchmark']} / {record['measure']}: {record['value']:.4g} {record['unit']}"
                     f"{value_range}; {verdict}{smoke}")
    return "\n".join(lines)


def finish(records: list[dict[str, Any]], output: str | Path | None, default_name: str, quiet: bool) -> list[dict[str, Any]]:
    """Write the records (to ``output`` or ``runs/benchmarks/<default_name>.json``), print a summary, return them."""
    path = write_records(records, output if output is not None else RESULTS_FOLDER / f"{default_name}.json")
    if not quiet:
        print(format_summary(records))
        print(f"Records written to {path}")
    return records


def base_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the options every benchmark script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default: the script's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: %(default)s; one thread keeps ratios stable on a "
                             "shared machine)")
    parser.add_argument("--output", default=None, help="JSON file for the result records "
                                                       "(default: runs/benchmarks/<script>.json)")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu",
                        help="clock of the headline ratios: process CPU time, which waiting for a busy core does "
                             "not inflate, or wall time (default: %(default)s; both are always recorded)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configuration that only checks that the script runs (no meaningful numbers)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def comma_choices(parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], option: str) -> list[str]:
    """Split a comma-separated option value and stop with a usage error on an entry not in ``allowed``."""
    chosen = [entry.strip() for entry in text.split(",") if entry.strip()]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        parser.error(f"unknown {option} entries {unknown}; expected some of {', '.join(allowed)}")
    return chosen


def configure_torch(threads: int) -> None:
    """Set torch's intra-op thread count and turn off autograd for the whole benchmark."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------------
# Inputs


def polyrefuse_source() -> Path:
    """Return the Multilingual-Refusal checkout: ``$LRSAFETY_POLYREFUSE``, else ``../shared/data`` beside the repository."""
    from_environment = os.environ.get("LRSAFETY_POLYREFUSE")
    source = Path(from_environment) if from_environment else REPOSITORY.parent / "shared" / "data" / "multilingual-refusal"
    if not (source / "PolyRefuse").is_dir():
        raise FileNotFoundError(
            f"PolyRefuse checkout not found at {source}; set LRSAFETY_POLYREFUSE to a Multilingual-Refusal checkout"
        )
    return source


def prompt_table(
    languages: Sequence[str],
    subsets: Sequence[str] = ("harmful", "harmless"),
    splits: Sequence[str] = ("train", "test"),
    per_cell: int | None = None,
):
    """Return the PolyRefuse prompt table of some cells, optionally the first ``per_cell`` rows of each.

    Cells whose file is missing from the checkout are left out (and logged).
    """
    from lrsafety.data import first_per_cell, load_polyrefuse

    prepared = load_polyrefuse(polyrefuse_source(), languages=list(languages))
    if len(prepared.missing):
        logger.info("Cells missing from the checkout: %s", ", ".join(
            f"{row.language}/{row.subset}/{row.split}" for row in prepared.missing.itertuples()))
    table = prepared.table
    table = table[table["subset"].isin(list(subsets)) & table["split"].isin(list(splits))].reset_index(drop=True)
    if per_cell is not None:
        table = first_per_cell(table, per_cell).reset_index(drop=True)
    if table.empty:
        raise ValueError(f"no prompts for languages {list(languages)}, subsets {list(subsets)}, splits {list(splits)}")
    return table


# ---------------------------------------------------------------------------------------------
# A mid-size random-weight model


@dataclass(frozen=True)
class ModelShape:
    """The size of a random-weight Qwen2 model built for benchmarking."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def name(self) -> str:
        return f"random-qwen2-w{self.hidden_size}-l{self.num_layers}"


# Width 1024 and 8 layers: enough compute per token that a CPU forward pass takes far longer than
# a trace's fixed bookkeeping, while 90 M parameters still fit a 2-core machine.
MID_SHAPE = ModelShape(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4, intermediate_size=2816)


def random_qwen2_config(shape: ModelShape, vocab_size: int | None = None):
    """Return the tiny-qwen2 byte tokenizer and a Qwen2 config of ``shape`` using its special-token ids.

    ``vocab_size`` defaults to the tokenizer's size; a larger one adds embedding rows the
    tokenizer never produces, as a real model's vocabulary would cost.
    """
    from lrsafety import standins

    tokenizer = standins.build_tokenizer("tiny-qwen2")
    config = standins.build_config("tiny-qwen2", tokenizer)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    config.hidden_size = shape.hidden_size
    config.num_hidden_layers = shape.num_layers
    config.num_attention_heads = shape.num_heads
    config.num_key_value_heads = shape.num_kv_heads
    config.intermediate_size = shape.intermediate_size
    config.head_dim = shape.hidden_size // shape.num_heads
    config.layer_types = ["full_attention"] * shape.num_layers
    return tokenizer, config


def build_random_qwen2(shape: ModelShape, seed: int = 0) -> Path:
    """Build (once) a random-weight Qwen2 checkpoint of ``shape`` with the tiny-qwen2 byte tokenizer.

    The folder lives in ``$LRSAFETY_CACHE/benchmarks`` beside the stand-ins and loads through
    ``lrsafety.models.load_model`` like any local checkpoint. Its weights are random: only its
    speed means anything.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from lrsafety import standins

    target = standins.default_cache_dir().parent / "benchmarks" / f"{shape.name}-seed{seed}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tokenizer, config = random_qwen2_config(shape)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False,
    )
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)
    logger.info("Built %s (%.0f M parameters) in %s", shape.name, sum(p.numel() for p in model.parameters()) / 1e6, target)
    return target


def parameter_count(loaded) -> int:
    """Return the number of parameters of a loaded model."""
    return sum(parameter.numel() for parameter in loaded.model._module.parameters())
