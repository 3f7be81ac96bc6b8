"""Measure 5: wall time of the whole offline pipeline, ``lrsafety run`` on a stand-in model.

Runs the numbered notebooks through the real command line (``python -m lrsafety.cli run``) with
the runner's stand-in defaults, into a fresh run folder and a fresh data folder, and reads each
notebook's seconds from the run's ``manifest.json``. The target is at most 10 minutes on 2 cores.

The notebooks depend on each other (activations before directions before gates before
steering), so only the unbroken sequence of notebooks from ``00`` is run. When some of
``00``-``05`` are missing, the record names them, carries the time of those that ran and gives
no verdict.

    python -m benchmarks.pipeline                    # tiny-qwen2, every notebook present
    python -m benchmarks.pipeline --model tiny-gemma2 --threads 2
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

BENCHMARK = "pipeline"
TARGET_SECONDS = 600.0
EXPECTED_NOTEBOOKS = ("00", "01", "02", "03", "04", "05")


def runnable_notebooks(available: dict[str, Path]) -> list[str]:
    """Return the prefixes from ``00`` onwards that have every earlier notebook present."""
    prefixes = []
    for prefix in EXPECTED_NOTEBOOKS:
        if prefix not in available:
            break
        prefixes.append(prefix)
    return prefixes


def run_pipeline(model: str, prefixes: list[str], workspace: Path, threads: int | None,
                 extra_parameters: list[str]) -> dict[str, Any]:
    """Run ``lrsafety run`` once and return its wall and CPU seconds, exit status and manifest."""
    run_dir, data_dir = workspace / "run", workspace / "data"
    command = [sys.executable, "-m", "lrsafety.cli", "run", "--model", model, "--out", str(run_dir),
               "--notebooks", ",".join(prefixes), "--no-progress", "-p", f"data_dir={data_dir}"]
    for parameter in extra_parameters:
        command += ["-p", parameter]
    environment = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            environment[name] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=common.REPOSITORY, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {
        "command": command,
        "returncode": completed.returncode,
        "stderr_tail": completed.stderr[-2000:],
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "notebooks": [
            {"notebook": entry.get("notebook"), "status": entry.get("status"), "seconds": entry.get("seconds")}
            for entry in manifest.get("notebooks", [])
        ],
        "status": manifest.get("status"),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    # The pipeline's headline is wall time: notebooks start kernels and wait on them, which CPU time misses.
    parser.set_defaults(threads=None, clock="wall")
    parser.add_argument("--model", default="tiny-qwen2", help="stand-in preset (default: %(default)s)")
    parser.add_argument("--notebooks", default=None,
                        help="comma-separated prefixes to run (default: every notebook from 00 whose predecessors exist)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                        help="extra notebook parameter passed to lrsafety run (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder and print its path")
    arguments = parser.parse_args(argv)
    # --threads sets the child's OpenMP and MKL thread counts; by default the child uses every core.

    from lrsafety.runner import discover_notebooks

    available = discover_notebooks()
    prefixes = arguments.notebooks.split(",") if arguments.notebooks else runnable_notebooks(available)
    if arguments.smoke and not arguments.notebooks:
        prefixes = prefixes[:1]
    missing = [prefix for prefix in EXPECTED_NOTEBOOKS if prefix not in available]
    skipped = sorted(set(available) - set(prefixes))
    repeats = arguments.repeats or 1

    runs = []
    for _ in range(repeats):
        workspace = Path(tempfile.mkdtemp(prefix="lrsafety-bench-pipeline-"))
        try:
            runs.append(run_pipeline(arguments.model, prefixes, workspace, arguments.threads, arguments.parameter))
        finally:
            if arguments.keep:
                print(f"Run folder kept: {workspace}")
            else:
                shutil.rmtree(workspace, ignore_errors=True)

    succeeded = all(run["returncode"] == 0 for run in runs)
    complete = succeeded and set(prefixes) >= set(EXPECTED_NOTEBOOKS)
    wall = common.spread([run[arguments.clock] for run in runs])
    note_parts = []
    if missing:
        note_parts.append(f"notebooks {', '.join(missing)} do not exist yet")
    if skipped:
        note_parts.append(f"notebooks {', '.join(skipped)} exist but were not run (an earlier notebook is missing "
                          "or --notebooks left them out)")
    if not succeeded:
        error_lines = runs[-1]["stderr_tail"].strip().splitlines()
        note_parts.append(f"the run failed: {error_lines[-1]}" if error_lines else "the run failed")
    config = {"model": arguments.model, "notebooks": prefixes, "threads": arguments.threads, "clock": arguments.clock,
              "parameters": arguments.parameter, "repeats": repeats}
    details = {"wall_seconds": common.spread([run["wall"] for run in runs]),
               "cpu_seconds": common.spread([run["cpu"] for run in runs]),
               "complete": complete, "runs": runs}
    record = common.result_record(
        BENCHMARK, f"lrsafety run time, {arguments.model}, notebooks {','.join(prefixes)}", wall["median"],
        f"s ({arguments.clock})",
        TARGET_SECONDS, wall, config, details, note="; ".join(note_parts), smoke=arguments.smoke,
    )
    if not complete:
        # The time of a partial pipeline cannot be judged against the 10-minute target.
        record["passed"] = None
    return common.finish([record], arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
