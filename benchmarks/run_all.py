"""Run the benchmark scripts one after another and collect their records in one file.

Measures 1-5 run everywhere; measure 6 (``gpu_extraction``) runs only where CUDA is available,
or as a CPU dry run with ``--smoke``. Each script also writes its own record file next to the
combined one. ``--markdown`` prints a results table in the layout of ``docs/benchmarks.md``.

    python -m benchmarks.run_all                          # default sizes, about 20 minutes on 2 idle cores
    python -m benchmarks.run_all --only padding,grid --markdown
    python -m benchmarks.run_all --smoke                  # seconds per script; checks only that they run
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from benchmarks import common

# Short name -> module, in the order they run (cheap and robust first).
BENCHMARKS: dict[str, str] = {
    "padding": "benchmarks.padding",
    "grid": "benchmarks.recalibration_grid",
    "extraction": "benchmarks.extraction_overhead",
    "steering": "benchmarks.steering_overhead",
    "pipeline": "benchmarks.pipeline",
    "gpu": "benchmarks.gpu_extraction",
}


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Return the records as a Markdown table: measure, median, spread, target and verdict."""
    lines = ["| benchmark | measure | median | spread (min–max, n) | target | result |", "|---|---|---|---|---|---|"]
    for record in records:
        value_spread = record.get("spread") or {}
        spread_text = (f"{value_spread['min']:.3g}–{value_spread['max']:.3g}, n={value_spread['n']}"
                       if value_spread.get("n") else "–")
        target = f"≤ {record['target']:g}" if record["target"] is not None else "–"
        if record["passed"] is None:
            result = "no verdict" if record["target"] is not None else "diagnostic"
        else:
            result = "pass" if record["passed"] else "miss"
        lines.append(f"| {record['benchmark']} | {record['measure']} | {record['value']:.4g} {record['unit']} | "
                     f"{spread_text} | {target} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny configurations: check that every script runs")
    parser.add_argument("--threads", type=int, default=None, help="passed to every script that takes it")
    parser.add_argument("--clock", choices=common.CLOCKS, default=None, help="passed to every script")
    parser.add_argument("--output-dir", default=str(common.RESULTS_FOLDER),
                        help="folder of the record files (default: %(default)s)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table of all records")
    parser.add_argument("--quiet", action="store_true", help="print nothing but the Markdown table")
    arguments = parser.parse_args(argv)

    names = arguments.only.split(",") if arguments.only else list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; expected some of {', '.join(BENCHMARKS)}")
    if "gpu" in names and not arguments.only and not arguments.smoke:
        import torch

        if not torch.cuda.is_available():
            names.remove("gpu")
            if not arguments.quiet:
                print("Skipping gpu: no CUDA device (run python -m benchmarks.gpu_extraction on a GPU machine)")

    output_dir = Path(arguments.output_dir)
    records: list[dict[str, Any]] = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        script_arguments = ["--output", str(output_dir / f"{module.BENCHMARK}.json")]
        if arguments.smoke:
            script_arguments.append("--smoke")
        if arguments.threads is not None:
            script_arguments += ["--threads", str(arguments.threads)]
        if arguments.clock is not None:
            script_arguments += ["--clock", arguments.clock]
        if arguments.quiet:
            script_arguments.append("--quiet")
        if not arguments.quiet:
            print(f"== {name} ({BENCHMARKS[name]})", flush=True)
        records += module.main(script_arguments)
    combined = common.write_records(records, output_dir / "all.json")
    if not arguments.quiet:
        print(f"All records: {combined}")
    if arguments.markdown:
        print(markdown_table(records))
    return records


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
