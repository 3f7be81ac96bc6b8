"""Agreement of the offline refusal judge with WildGuard on the shared completions, held-out half.

The shared Multilingual-Refusal completions (Qwen2.5-7B-Instruct and gemma-2-9b-it, harmful test
prompts, conditions ``baseline`` and ``harm_ablation``) carry WildGuard refusal labels. The
offline judge's phrase tables were tuned only on prompt ids that ``heldout_split`` puts in the
"tune" half. This script reports agreement on the "heldout" half (and, for comparison, on the
tune half) per model x language x condition:

- balanced accuracy and Cohen's kappa against WildGuard (NaN where WildGuard labels one class),
- refusal rate of both judges and their difference in percentage points,
- the targets: balanced accuracy >= 0.90 and |rate difference| <= 3 points,
- the judging speed (responses per wall second and per CPU second).

Usage (from the repository root):

    python benchmarks/judge_agreement.py                       # writes runs/benchmarks/judge_agreement.json
    python benchmarks/judge_agreement.py --markdown table.md   # also writes the Markdown tables of docs/judge.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from benchmarks.common import environment  # noqa: E402
from lrsafety import refusal_gap  # noqa: E402

TARGET_BALANCED_ACCURACY = 0.90
TARGET_RATE_DIFFERENCE = 3.0


def completions_folder() -> Path:
    """Return the shared completions folder: next to $LRSAFETY_POLYREFUSE, else ../shared/data."""
    from_environment = os.environ.get("LRSAFETY_POLYREFUSE")
    folder = Path(from_environment).parent / "completions" if from_environment else None
    if folder is None or not folder.is_dir():
        folder = REPOSITORY.parent / "shared" / "data" / "completions"
    if not folder.is_dir():
        raise FileNotFoundError(f"shared completions not found at {folder}; set LRSAFETY_POLYREFUSE")
    return folder


def agreement_by_split(table: pd.DataFrame) -> pd.DataFrame:
    """Return agreement per split x model x language x condition, with target verdicts."""
    agreement = refusal_gap.judge_agreement(table, by=("split", "model", "language", "tier", "condition"))
    agreement["meets_balanced_accuracy"] = agreement["balanced_accuracy"] >= TARGET_BALANCED_ACCURACY
    agreement["meets_rate_difference"] = agreement["rate_difference"].abs() <= TARGET_RATE_DIFFERENCE
    return agreement


def pooled_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Return agreement per split x model x condition, pooled over languages (yo kept apart)."""
    pooled = table.assign(language_group=np.where(table["language"] == "yo", "yo", "all except yo"))
    return refusal_gap.judge_agreement(pooled, by=("split", "model", "condition", "language_group"))


def markdown_table(agreement: pd.DataFrame, split: str) -> str:
    """Return one split's agreement as a Markdown table, one row per model x language x condition."""
    rows = agreement[agreement["split"] == split]
    lines = [
        "| model | language | tier | condition | n | WildGuard % | offline % | diff (pt) | bal. acc. | kappa | targets |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows.itertuples(index=False):
        balanced = "n/a" if np.isnan(row.balanced_accuracy) else f"{row.balanced_accuracy:.3f}"
        kappa = "n/a" if np.isnan(row.cohen_kappa) else f"{row.cohen_kappa:.3f}"
        verdicts = []
        if not np.isnan(row.balanced_accuracy) and not row.meets_balanced_accuracy:
            verdicts.append("BA < 0.90")
        if not row.meets_rate_difference:
            verdicts.append("diff > 3")
        lines.append(
            f"| {row.model.split('/')[-1]} | {row.language} | {row.tier} | {row.condition} | {row.n} "
            f"| {100 * row.reference_rate:.1f} | {100 * row.judge_rate:.1f} | {row.rate_difference:+.1f} "
            f"| {balanced} | {kappa} | {', '.join(verdicts) or 'met'} |"
        )
    return "\n".join(lines)


def pooled_markdown(pooled: pd.DataFrame, split: str) -> str:
    """Return the pooled agreement of one split as a Markdown table."""
    lines = [
        "| model | condition | languages | n | WildGuard % | offline % | diff (pt) | bal. acc. | kappa |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in pooled[pooled["split"] == split].itertuples(index=False):
        balanced = "n/a" if np.isnan(row.balanced_accuracy) else f"{row.balanced_accuracy:.3f}"
        kappa = "n/a" if np.isnan(row.cohen_kappa) else f"{row.cohen_kappa:.3f}"
        lines.append(
            f"| {row.model.split('/')[-1]} | {row.condition} | {row.language_group} | {row.n} "
            f"| {100 * row.reference_rate:.1f} | {100 * row.judge_rate:.1f} | {row.rate_difference:+.1f} "
            f"| {balanced} | {kappa} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPOSITORY / "runs" / "benchmarks" / "judge_agreement.json",
                        help="JSON file for the results (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables here")
    arguments = parser.parse_args(argv)

    folder = completions_folder()
    table = refusal_gap.load_completions(str(folder / "*.jsonl.gz"))
    table["split"] = table["prompt_id"].map(refusal_gap.heldout_split)

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    table, judge_settings = refusal_gap.judge_completions(table, "offline", progress=False)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start

    agreement = agreement_by_split(table)
    pooled = pooled_agreement(table)
    heldout = agreement[agreement["split"] == "heldout"]
    scored = heldout.dropna(subset=["balanced_accuracy"])
    summary = {
        "cells": int(len(heldout)),
        "cells_with_both_classes": int(len(scored)),
        "cells_meeting_balanced_accuracy": int(scored["meets_balanced_accuracy"].sum()),
        "cells_meeting_rate_difference": int(heldout["meets_rate_difference"].sum()),
        "median_balanced_accuracy": float(scored["balanced_accuracy"].median()),
    }
    record = {
        "benchmark": "judge_agreement",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "machine": environment(),
        "inputs": sorted(path.name for path in folder.glob("*.jsonl.gz")),
        "responses": int(len(table)),
        "judge": judge_settings,
        "seconds": {"wall": round(wall, 2), "cpu": round(cpu, 2)},
        "responses_per_second": {"wall": round(len(table) / wall, 1), "cpu": round(len(table) / cpu, 1)},
        "heldout_summary": summary,
        "agreement": agreement.replace({np.nan: None}).to_dict(orient="records"),
        "pooled_agreement": pooled.replace({np.nan: None}).to_dict(orient="records"),
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")

    if arguments.markdown:
        text = (
            "## Held-out half\n\n" + markdown_table(agreement, "heldout")
            + "\n\n## Pooled over languages (held-out half)\n\n" + pooled_markdown(pooled, "heldout")
            + "\n\n## Tune half (for comparison)\n\n" + markdown_table(agreement, "tune") + "\n"
        )
        arguments.markdown.write_text(text, encoding="utf-8")

    print(
        f"{len(table)} responses judged in {wall:.1f} s wall / {cpu:.1f} s CPU; held-out cells: "
        f"{summary['cells_meeting_balanced_accuracy']} of {summary['cells_with_both_classes']} with both classes reach "
        f"balanced accuracy {TARGET_BALANCED_ACCURACY}, {summary['cells_meeting_rate_difference']} of {summary['cells']} "
        f"are within {TARGET_RATE_DIFFERENCE:g} points of WildGuard; results in {arguments.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
