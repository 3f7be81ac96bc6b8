"""Benchmark scripts in their tiny configurations: each one runs and emits complete result records.

Speed is not checked here, because the targets belong to the benchmarks. These tests check that
every script runs on the real stand-ins and PolyRefuse files, that its records carry what the
results page needs, and that its equality checks between package and baseline hold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from benchmarks import common, padding, run_all  # noqa: E402

RECORD_FIELDS = {"benchmark", "measure", "value", "unit", "target", "passed", "spread", "config", "details", "note",
                 "smoke", "date", "command", "environment"}


@pytest.fixture(autouse=True)
def polyrefuse_environment(polyrefuse_source, monkeypatch):
    monkeypatch.setenv("LRSAFETY_POLYREFUSE", str(polyrefuse_source))


def run_script(module_name: str, tmp_path: Path, *arguments: str) -> list[dict]:
    """Run a benchmark's ``main`` in its smoke configuration and return the records it wrote."""
    import importlib

    module = importlib.import_module(module_name)
    output = tmp_path / f"{module.BENCHMARK}.json"
    returned = module.main(["--smoke", "--quiet", "--output", str(output), *arguments])
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(returned, default=str))
    for record in written:
        assert RECORD_FIELDS <= set(record), f"record lacks {RECORD_FIELDS - set(record)}"
        assert record["benchmark"] == module.BENCHMARK
        assert record["smoke"] is True
        assert record["environment"]["logical_cpus"] >= 1
    return written


def test_spread_statistics():
    values = common.spread([4.0, 1.0, 3.0, 2.0])
    assert values["median"] == 2.5
    assert values["min"] == 1.0
    assert values["max"] == 4.0
    assert values["n"] == 4
    assert values["q1"] == 1.75
    assert values["q3"] == 3.25


def test_interleave_alternates_order():
    calls = []
    common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_file_order_batches_respect_limits():
    lengths = [5, 40, 3, 30, 30, 2, 50, 1]
    batches = padding.file_order_budget_batches(lengths, token_budget=100, max_batch_size=3)
    assert [row for rows in batches for row in rows] == list(range(len(lengths)))
    for rows in batches:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * max(lengths[row] for row in rows) <= 100


def test_min_padding_batches_beats_greedy():
    import itertools
    import random

    from lrsafety.activations import plan_batches

    generator = random.Random(0)
    for _ in range(100):
        lengths = [generator.randint(1, 30) for _ in range(generator.randint(1, 9))]
        budget, max_rows = generator.randint(10, 100), generator.randint(1, 4)
        greedy = plan_batches(lengths, budget, max_rows)
        proposed = padding.min_padding_batches(lengths, budget, max_rows, len(greedy))
        assert sorted(row for rows in proposed for row in rows) == list(range(len(lengths)))
        assert len(proposed) == len(greedy)
        for rows in proposed:
            assert len(rows) <= max_rows
            assert len(rows) == 1 or len(rows) * max(lengths[row] for row in rows) <= budget
        # Brute force over every split of the sorted rows into the same number of batches.
        order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
        costs = []
        for cuts in itertools.combinations(range(1, len(order)), len(greedy) - 1):
            bounds = [0, *cuts, len(order)]
            parts = [order[start:end] for start, end in zip(bounds, bounds[1:])]
            if all(len(part) <= max_rows and (len(part) == 1 or len(part) * max(lengths[row] for row in part) <= budget)
                   for part in parts):
                costs.append(padding.padded_tokens(lengths, parts))
        assert padding.padded_tokens(lengths, proposed) == min(costs)
        assert padding.padded_tokens(lengths, proposed) <= padding.padded_tokens(lengths, greedy)


def test_padded_tokens_counts_longest_row():
    lengths = [3, 5, 2, 7]
    assert padding.padded_tokens(lengths, [[0, 1], [2, 3]]) == 2 * 5 + 2 * 7


def test_padding_script(tmp_path):
    records = run_script("benchmarks.padding", tmp_path)
    assert len(records) == 6
    for record in records:
        details = record["details"]
        assert details["padded_tokens"] >= details["real_tokens"] > 0
        assert record["value"] == pytest.approx(details["padded_tokens"] / details["real_tokens"])
    package = [record for record in records if ", package" in record["measure"]]
    assert all(record["target"] == 1.10 for record in package)
    assert all(record["passed"] in (True, False) for record in package)


def test_recalibration_grid_script(tmp_path):
    records = run_script("benchmarks.recalibration_grid", tmp_path)
    gate, controls = records
    # One target language, 4 budgets, 2 seeds, 2 threshold rules; the controls add two readouts.
    assert gate["config"]["gates"] == 16
    assert controls["config"]["gates"] == 48
    assert gate["target"] == 30.0
    assert controls["target"] is None
    assert 0.0 <= gate["details"]["mean_test_balanced_accuracy"] <= 1.0


def test_extraction_script_outputs_match(tmp_path):
    records = run_script("benchmarks.extraction_overhead", tmp_path, "--parts", "standin,deep,storage")
    by_measure = {record["measure"]: record for record in records}
    end_to_end = by_measure["end-to-end extraction ratio, tiny-qwen2"]
    assert end_to_end["details"]["outputs_equal"] is True
    assert end_to_end["details"]["max_abs_difference"] == 0.0
    assert end_to_end["target"] == 1.10
    assert end_to_end["value"] > 0
    trace = by_measure["trace-only ratio (one batch), tiny-qwen2"]
    assert trace["details"]["n_batches"] == trace["config"]["batches"]
    deep = by_measure["nnsight cost per trace, random-qwen2-w64-l28"]
    assert deep["config"]["n_layers"] == 28
    assert deep["unit"] == "ms"
    storage = by_measure["storage per prompt at Qwen2.5-7B activation size, package"]
    assert storage["details"]["megabytes_per_cell_float32"] > 0
    assert storage["details"]["cell_file_only_ms_per_prompt"]["median"] > 0


def test_steering_script_checks_hold(tmp_path):
    (record,) = run_script("benchmarks.steering_overhead", tmp_path, "--models", "standin")
    details = record["details"]
    assert details["package_plain_equals_plain"] is True
    assert details["routing_equals_hook_routing"] is True
    assert details["gate_pass_proposed_max_abs_difference"] < 1e-4
    assert record["target"] == 1.15
    assert record["config"]["max_new_tokens"] == 4


def test_gpu_script_refuses_cpu_without_dry_run(capsys):
    import torch

    from benchmarks import gpu_extraction

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so the script would run the full benchmark")
    with pytest.raises(SystemExit) as stopped:
        gpu_extraction.main([])
    assert stopped.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_script_dry_run(tmp_path):
    records = run_script("benchmarks.gpu_extraction", tmp_path, "--skip-generation")
    throughput, ratio = records
    assert throughput["details"]["matmul_tflops"] > 0
    assert throughput["details"]["real_tokens_per_second"] > 0
    assert ratio["target"] == 1.10
    assert "dry run" in ratio["note"]


def test_pipeline_script_runs_first_notebook(tmp_path):
    (record,) = run_script("benchmarks.pipeline", tmp_path)
    details = record["details"]
    assert details["runs"][0]["returncode"] == 0, details["runs"][0]["stderr_tail"]
    assert record["config"]["notebooks"] == ["00"]
    assert [entry["status"] for entry in details["runs"][0]["notebooks"]] == ["ok"]
    # A partial pipeline gives no verdict on the 10-minute target.
    assert record["passed"] is None


def test_run_all_combines_records(tmp_path, capsys):
    records = run_all.main(["--smoke", "--only", "padding", "--output-dir", str(tmp_path), "--markdown", "--quiet"])
    combined = json.loads((tmp_path / "all.json").read_text())
    assert len(combined) == len(records) == 6
    table = capsys.readouterr().out
    assert table.count("\n| padding |") == 6
