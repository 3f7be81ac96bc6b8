"""``lrsafety judge``: label every response of a JSONL(.gz) file as refusal or not.

    lrsafety judge --input completions.jsonl.gz --judge offline --out judged.jsonl.gz

The output contains the input rows (all fields kept) plus ``refusal`` and, where the judge has
them, ``refusal_score`` and ``refusal_error``. It is written atomically, gzip-compressed when
its name ends in ``.gz``, with the judge's settings and counts in ``OUT.meta.json`` beside it.
One summary line reports the rows judged and the refusal rate per language.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from lrsafety.judges.base import get_judge
from lrsafety.judges.records import InputError, judge_records, read_records, write_records
from lrsafety.languages import tier_order
from lrsafety.runs import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``lrsafety judge``."""
    parser.add_argument("--input", required=True, type=Path,
                        help="JSONL or JSONL.gz file; each line needs prompt or instruction, response, language")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL file (.gz compresses it)")
    parser.add_argument("--judge", choices=("offline", "guard", "llm"), default="offline",
                        help="which judge labels the responses (default: %(default)s)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="leave out invalid input lines (reported by line number) instead of stopping")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="responses per judge batch (default: the judge's own)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    guard = parser.add_argument_group("guard judge")
    guard.add_argument("--guard-model", default="allenai/wildguard",
                       help="Hub id or folder of the guard model (default: %(default)s)")
    guard.add_argument("--guard-format", choices=("wildguard", "qwen3guard", "polyguard"), default=None,
                       help="input/output format (default: inferred from the model id)")
    guard.add_argument("--dtype", default="bfloat16", help="guard model dtype (default: %(default)s)")
    guard.add_argument("--device", default=None, help="guard model device (default: cuda if available, else cpu)")
    guard.add_argument("--max-new-tokens", type=int, default=128,
                       help="tokens the guard may generate per answer (default: %(default)s)")

    llm = parser.add_argument_group("llm judge")
    llm.add_argument("--base-url", default=None,
                     help="OpenAI-compatible API root, e.g. https://openrouter.ai/api/v1")
    llm.add_argument("--llm-model", default=None, help="model name sent to the endpoint, e.g. openai/gpt-4o-mini")
    llm.add_argument("--api-key-env", default="LRSAFETY_JUDGE_API_KEY",
                     help="NAME of the environment variable holding the API key (default: %(default)s); "
                          "pass an empty string for an endpoint without authentication")
    llm.add_argument("--max-concurrency", type=int, default=16, help="parallel requests (default: %(default)s)")
    llm.add_argument("--max-attempts", type=int, default=3, help="tries per request (default: %(default)s)")
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    parser.set_defaults(handler=run_judge_command)


def judge_options(arguments: argparse.Namespace) -> dict[str, Any]:
    """Return the ``get_judge`` options selected by the command-line arguments."""
    if arguments.judge == "guard":
        return {
            "model_id": arguments.guard_model,
            "guard_format": arguments.guard_format,
            "dtype": arguments.dtype,
            "device": arguments.device,
            "max_new_tokens": arguments.max_new_tokens,
        }
    if arguments.judge == "llm":
        if not arguments.base_url or not arguments.llm_model:
            raise ValueError("the llm judge needs --base-url and --llm-model")
        return {
            "base_url": arguments.base_url,
            "model": arguments.llm_model,
            "api_key_env": arguments.api_key_env or None,
            "max_concurrency": arguments.max_concurrency,
            "max_attempts": arguments.max_attempts,
            "timeout_s": arguments.timeout,
        }
    return {}


def refusal_rates_by_language(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Return the refusal rate per language over the rows the judge could label, in tier order.

    When rows carry a ``condition`` or ``subset`` field, rates are kept apart per value
    (``"en/baseline"``), because pooling conditions would mix refusal rates that differ by design.
    """
    split_fields = [name for name in ("condition", "subset") if any(name in row for row in rows)]
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    languages: dict[str, str] = {}
    for row in rows:
        if row.get("refusal") is None:
            continue
        key = "/".join([str(row["language"]), *(str(row.get(name)) for name in split_fields)])
        languages[key] = row["language"]
        counts[key][0] += int(row["refusal"])
        counts[key][1] += 1
    order = {language: index for index, language in enumerate(tier_order(sorted(set(languages.values()))))}
    keys = sorted(counts, key=lambda key: (order[languages[key]], key))
    return {key: counts[key][0] / counts[key][1] for key in keys}


def run_judge_command(arguments: argparse.Namespace) -> int:
    """Read, judge and write one file; print a one-line summary. Returns the exit status."""
    started = time.perf_counter()
    try:
        options = judge_options(arguments)
        read = read_records(arguments.input, skip_invalid=arguments.skip_invalid)
        judge = get_judge(arguments.judge, **options)
        if not read.records:
            raise ValueError(f"{arguments.input} contains no rows to judge")
        if arguments.batch_size is not None and arguments.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {arguments.batch_size}")
    except (InputError, OSError, ValueError) as error:
        # OSError covers a missing input file and a guard model that cannot be loaded.
        print(f"lrsafety judge: {error}", file=sys.stderr)
        return 2

    rows = judge_records(read.records, judge, batch_size=arguments.batch_size, progress=not arguments.no_progress)
    write_records(arguments.out, rows)
    elapsed = time.perf_counter() - started

    rates = refusal_rates_by_language(rows)
    n_errors = sum(row["refusal"] is None for row in rows)
    write_json(
        Path(f"{arguments.out}.meta.json"),
        {
            "input": str(arguments.input),
            "output": str(arguments.out),
            "judge": judge.describe(),
            "rows": len(rows),
            "skipped_lines": [number for number, _ in read.skipped],
            "errors": n_errors,
            "refusal_rate_by_language": rates,
            "seconds": round(elapsed, 2),
        },
    )

    rate_text = " ".join(f"{language} {rate:.2f}" for language, rate in rates.items())
    extras = []
    if read.skipped:
        extras.append(f"{len(read.skipped)} invalid lines skipped")
    if n_errors:
        extras.append(f"{n_errors} unlabelled")
    extra_text = f" ({', '.join(extras)})" if extras else ""
    print(
        f"judged {len(rows)} rows with {arguments.judge} in {elapsed:.1f} s{extra_text} -> {arguments.out}; "
        f"refusal rate: {rate_text}"
    )
    return 0
