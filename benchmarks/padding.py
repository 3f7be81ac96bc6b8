"""Measure 2: padded tokens / real tokens of the package's batches, against batches in file order.

Every batch is padded on the left to its longest prompt, so a batch costs rows x longest length
tokens of compute. Over the PolyRefuse train and test prompts of every language in the checkout,
tokenised with each stand-in tokenizer (byte-level, so Burmese or Thai prompts are several times
longer than English ones), this script counts padded and real tokens for:

- extraction: ``lrsafety.activations.plan_batches`` (length-grouped, token budget) against the
  same limits filled in file order, and against a proposed split with the fewest padded tokens
  for the same number of batches (``min_padding_batches``);
- generation: ``lrsafety.generation.length_sorted_batches`` (batch size 16) against chunks of
  16 in file order;
- the gate's input pass before steered generation (``lrsafety.steering.last_token_states``),
  which batches in file order.

Batches are formed within each (language, subset, split) cell, as the package does. The target
for every package batching is at most 1.10 padded tokens per real token.

    python -m benchmarks.padding
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import common

BENCHMARK = "padding"
TARGET_RATIO = 1.10
STANDINS = ("tiny-qwen2", "tiny-llama", "tiny-gemma2")


def file_order_budget_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Fill batches with consecutive rows until the next row would break the row or padded-token limit."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for row, length in enumerate(lengths):
        grown = max(width, length)
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * grown > token_budget):
            batches.append(current)
            current, grown = [], length
        current.append(row)
        width = grown
    if current:
        batches.append(current)
    return batches


def file_order_chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split rows into consecutive chunks of ``batch_size`` (the last may be shorter)."""
    return [list(range(start, min(start + batch_size, len(lengths)))) for start in range(0, len(lengths), batch_size)]


def min_padding_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int,
                        n_batches: int) -> list[list[int]]:
    """Split the rows, sorted longest first, into ``n_batches`` consecutive batches with the fewest padded tokens.

    A proposed replacement for the greedy fill of ``plan_batches``. It keeps the same limits (rows
    per batch, padded tokens per batch, a single longer row alone) and the same number of
    batches. The boundaries come from dynamic programming over the sorted lengths, in
    O(n_batches x rows x max_batch_size). Raises ValueError when no split into ``n_batches``
    fits the limits.
    """
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    sorted_lengths = np.asarray([lengths[row] for row in order], dtype=np.int64)
    n_rows = len(order)
    unreachable = np.iinfo(np.int64).max // 4
    # best[j]: fewest padded tokens for the first j sorted rows in the batches placed so far.
    best = np.full(n_rows + 1, unreachable, dtype=np.int64)
    best[0] = 0
    starts = []
    for _ in range(n_batches):
        step = np.full(n_rows + 1, unreachable, dtype=np.int64)
        start = np.zeros(n_rows + 1, dtype=np.int64)
        for size in range(1, min(max_batch_size, n_rows) + 1):
            ends = np.arange(size, n_rows + 1)
            # The batch's first row is its longest, so it is padded to that row's length.
            cost = size * sorted_lengths[ends - size]
            fits = (cost <= token_budget) | (size == 1)
            candidate = np.where(fits & (best[ends - size] < unreachable), best[ends - size] + cost, unreachable)
            better = candidate < step[ends]
            step[ends] = np.where(better, candidate, step[ends])
            start[ends] = np.where(better, ends - size, start[ends])
        best = step
        starts.append(start)
    if best[n_rows] >= unreachable:
        raise ValueError(f"{n_rows} rows cannot be split into {n_batches} batches within the limits")
    bounds, end = [], n_rows
    for start in reversed(starts):
        bounds.append((int(start[end]), end))
        end = int(start[end])
    return [[order[position] for position in range(first, last)] for first, last in reversed(bounds)]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Return the tokens the batches compute once padded: sum of rows x longest row."""
    return sum(len(rows) * max(lengths[row] for row in rows) for rows in batches)


def cell_lengths(tokenizer, table) -> list[list[int]]:
    """Return the templated token length of every prompt, one list per cell, in table order."""
    from lrsafety.prompts import encode_prompts, format_prompts

    lengths = []
    for _, cell in table.groupby(["language", "subset", "split"], sort=False):
        ids = encode_prompts(tokenizer, format_prompts(tokenizer, [str(text) for text in cell["text"]]))
        lengths.append([len(row) for row in ids])
    return lengths


def schemes(token_budget: int, max_batch_size: int, generation_batch_size: int) -> dict[str, tuple[Any, bool]]:
    """Return each batching by name: (function of a cell's lengths -> batches, whether it is the package's).

    Package batchings carry the 1.10 target. The others are baselines, or a proposed change.
    """
    from lrsafety.activations import plan_batches
    from lrsafety.generation import length_sorted_batches

    return {
        "extraction, package (length-grouped token budget)":
            (lambda lengths: plan_batches(lengths, token_budget, max_batch_size), True),
        "extraction, proposed (fewest padded tokens, same batch count)":
            (lambda lengths: min_padding_batches(lengths, token_budget, max_batch_size,
                                                 len(plan_batches(lengths, token_budget, max_batch_size))), False),
        "extraction, file order (same limits)":
            (lambda lengths: file_order_budget_batches(lengths, token_budget, max_batch_size), False),
        f"generation, package (length-sorted, {generation_batch_size} rows)":
            (lambda lengths: length_sorted_batches(lengths, generation_batch_size), True),
        f"generation, file order ({generation_batch_size} rows)":
            (lambda lengths: file_order_chunks(lengths, generation_batch_size), False),
        # steering.last_token_states slices the instruction list in order, batch_size rows at a time.
        f"gate input pass, package (file order, {generation_batch_size} rows)":
            (lambda lengths: file_order_chunks(lengths, generation_batch_size), True),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", default=",".join(STANDINS),
                        help="stand-in presets whose tokenizers to use (default: %(default)s)")
    parser.add_argument("--languages", default=None,
                        help="comma-separated languages (default: all 23; those missing from the checkout are skipped)")
    parser.add_argument("--splits", default="train,test", help="splits to count (default: %(default)s)")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="extraction token budget (default: the package's DEFAULT_TOKEN_BUDGET)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="extraction rows per batch (default: the package's DEFAULT_MAX_BATCH_SIZE)")
    parser.add_argument("--generation-batch-size", type=int, default=16,
                        help="rows per generation batch (default: %(default)s, the notebooks' value)")
    arguments = parser.parse_args(argv)
    common.configure_torch(arguments.threads)

    from lrsafety.activations import DEFAULT_MAX_BATCH_SIZE, DEFAULT_TOKEN_BUDGET
    from lrsafety.languages import LANGUAGES
    from lrsafety.standins import build_tokenizer

    token_budget = arguments.token_budget or DEFAULT_TOKEN_BUDGET
    max_batch_size = arguments.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    tokenizers = arguments.tokenizers.split(",")
    languages = arguments.languages.split(",") if arguments.languages else list(LANGUAGES)
    per_cell = None
    if arguments.smoke:
        tokenizers, languages, per_cell = tokenizers[:1], ["en", "th"], 40
    table = common.prompt_table(languages, splits=arguments.splits.split(","), per_cell=per_cell)
    present = sorted(set(table["language"]))

    records = []
    for name in tokenizers:
        tokenizer = build_tokenizer(name)
        lengths_per_cell = cell_lengths(tokenizer, table)
        real = sum(sum(lengths) for lengths in lengths_per_cell)
        all_lengths = sorted(length for lengths in lengths_per_cell for length in lengths)
        for scheme, (batcher, is_package) in schemes(token_budget, max_batch_size, arguments.generation_batch_size).items():
            per_cell_batches = [batcher(lengths) for lengths in lengths_per_cell]
            padded = sum(padded_tokens(lengths, batches) for lengths, batches in zip(lengths_per_cell, per_cell_batches))
            config = {
                "tokenizer": name, "languages": present, "splits": arguments.splits.split(","),
                "cells": len(lengths_per_cell), "prompts": len(all_lengths), "token_budget": token_budget,
                "max_batch_size": max_batch_size, "generation_batch_size": arguments.generation_batch_size,
            }
            details = {
                "real_tokens": real, "padded_tokens": padded,
                "batches": sum(len(batches) for batches in per_cell_batches),
                "prompt_length_tokens": common.spread(all_lengths),
            }
            records.append(common.result_record(
                BENCHMARK, f"{scheme}, {name}", padded / real, "padded / real tokens",
                TARGET_RATIO if is_package else None, None, config, details,
                note="" if is_package else ("proposed change, not in the package" if "proposed" in scheme
                                            else "baseline"), smoke=arguments.smoke,
            ))
    return common.finish(records, arguments.output, BENCHMARK, arguments.quiet)


if __name__ == "__main__":
    main()
