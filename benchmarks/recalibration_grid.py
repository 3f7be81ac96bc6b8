"""Measure 4: wall time of the recalibration grid at Qwen2.5-7B's feature sizes.

``lrsafety.gate.run_recalibration_grid`` fits and tests one gate per (target language, budget,
seed, threshold rule, readout). This script times the grid of the few-shot study, 8 budgets x
10 seeds x 6 low-resource targets x 2 threshold rules with the gate readout (960 gates), on
synthetic activations of Qwen2.5-7B's width (d = 3584):

- 10 high-resource source languages x (260 harmful + 200 harmless) train rows;
- 6 targets with 260 + 200 train rows and 572 + 500 test rows.

Each language's harmful rows are shifted along its own direction (a shared direction plus
language noise), so gates and thresholds behave as on separable real data. The target is at most
30 s on 2 cores. The grid runs on one thread (it limits BLAS to one), so its process CPU time is
its wall time on an idle machine. The headline uses CPU time unless ``--clock wall``. A second
record times the notebook's default readouts (the gate plus the random subspace and
permuted-label controls), for which no target is set.

    python -m benchmarks.recalibration_grid
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import common

BENCHMARK = "recalibration_grid"
TARGET_SECONDS = 30.0
LOW_RESOURCE_TARGETS = ("sw", "am", "my", "km", "si", "yo")


def synthetic_inputs(
    d_model: int = 3584,
    sources: tuple[str, ...] | None = None,
    targets: tuple[str, ...] = LOW_RESOURCE_TARGETS,
    n_train: tuple[int, int] = (260, 200),
    n_test: tuple[int, int] = (572, 500),
    separation: float = 3.0,
    seed: int = 0,
):
    """Return ``RecalibrationInputs`` of Gaussian activations with a harmful shift per language.

    Row ``x = language mean + noise + separation * v_language`` for harmful rows (no shift for
    harmless ones), with unit ``v_language`` = unit(shared direction + 0.5 x language noise) and
    unit-variance noise per feature. Directions are the unit difference of means of each source
    language's train rows, as notebook 03 computes them.
    """
    from lrsafety.directions import diff_of_means
    from lrsafety.gate import LabelledActivations, RecalibrationInputs
    from lrsafety.languages import high_resource_languages

    sources = tuple(sources) if sources is not None else tuple(high_resource_languages())
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d_model)
    shared /= np.linalg.norm(shared)

    def language_cells(sizes: tuple[int, int], mean: np.ndarray, direction: np.ndarray) -> LabelledActivations:
        harmful = (rng.standard_normal((sizes[0], d_model), dtype=np.float32) + mean + separation * direction)
        harmless = rng.standard_normal((sizes[1], d_model), dtype=np.float32) + mean
        return LabelledActivations(harmful=harmful.astype(np.float32), harmless=harmless.astype(np.float32))

    def language_geometry() -> tuple[np.ndarray, np.ndarray]:
        direction = shared + 0.5 * rng.standard_normal(d_model) / np.sqrt(d_model)
        mean = 0.5 * rng.standard_normal(d_model)
        return mean.astype(np.float32), (direction / np.linalg.norm(direction)).astype(np.float32)

    source_train = {}
    for language in sources:
        mean, direction = language_geometry()
        source_train[language] = language_cells(n_train, mean, direction)
    target_train, target_test = {}, {}
    for language in targets:
        mean, direction = language_geometry()
        target_train[language] = language_cells(n_train, mean, direction)
        target_test[language] = language_cells(n_test, mean, direction)
    directions = np.stack([diff_of_means(cell.harmful, cell.harmless) for cell in source_train.values()])
    return RecalibrationInputs(
        source_train=source_train, target_train=target_train, target_test=target_test,
        directions=directions.astype(np.float32), layer=15, position="t_post_inst", model="synthetic",
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=3584, help="activation width (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per cell (default: %(default)s)")
    parser.add_argument("--skip-controls", action="store_true",
                        help="time only the gate readout, not the grid with the two control readouts")
    arguments = parser.parse_args(argv)
    common.configure_torch(arguments.threads)

    from lrsafety.gate import DEFAULT_BUDGETS, READOUTS, run_recalibration_grid
    from lrsafety.thresholds import THRESHOLD_RULES

    budgets = list(DEFAULT_BUDGETS)
    seeds = list(range(arguments.seeds))
    rank = 10
    if arguments.smoke:
        inputs = synthetic_inputs(d_model=64, sources=("en", "de", "fr"), targets=("yo",), n_train=(20, 16),
                                  n_test=(24, 20))
        budgets, seeds, rank = [0, 1, 2, 4], [0, 1], 3
    else:
        inputs = synthetic_inputs(d_model=arguments.d_model)
    repeats = arguments.repeats or (1 if arguments.smoke else 3)

    grids = {"gate readout": ("gate",)}
    if not arguments.skip_controls:
        grids["gate and both control readouts"] = tuple(READOUTS)
    records = []
    for label, readouts in grids.items():
        last_grid = {}

        def run(readouts=readouts):
            last_grid["grid"] = run_recalibration_grid(inputs, budgets=budgets, seeds=seeds, rank=rank,
                                                       threshold_rules=THRESHOLD_RULES, readouts=readouts)

        timings = common.interleave({"grid": run}, repeats=repeats, warmup=0)["grid"]
        grid = last_grid["grid"]
        wall = common.spread(timings.wall)
        headline = common.spread(getattr(timings, arguments.clock))
        config = {
            "d_model": inputs.d_model, "source_languages": list(inputs.source_train),
            "target_languages": inputs.target_languages, "budgets": budgets, "seeds": len(seeds), "rank": rank,
            "threshold_rules": list(THRESHOLD_RULES), "readouts": list(readouts), "gates": len(grid),
            "repeats": repeats, "clock": arguments.clock,
        }
        details = {
            "wall_seconds": wall, "cpu_seconds": common.spread(timings.cpu),
            "gates_per_second": len(grid) / wall["median"],
            "mean_test_balanced_accuracy": float(grid["balanced_accuracy"].mean()),
        }
        records.append(common.result_record(
            BENCHMARK, f"grid time, {label}", headline["median"], f"s ({arguments.clock})",
            TARGET_SECONDS if readouts == ("gate",) else None, headline, config, details, smoke=arguments.smoke,
        ))
    return common.finish(records, arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
