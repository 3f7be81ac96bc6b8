"""Refusal-gap analysis: rates, tier means, agreement metrics, the held-out split, and notebook 01
run through papermill on real imported completions and on a stand-in model's own generations."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lrsafety import refusal_gap
from lrsafety.standins import STANDIN_WARNING

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOK = REPOSITORY / "notebooks" / "01_refusal_gap.ipynb"


def test_agreement_metrics_known_table():
    reference = [1, 1, 1, 1, 0, 0, 0, 0]
    judge = [1, 1, 1, 0, 0, 0, 0, 1]
    metrics = refusal_gap.agreement_metrics(judge, reference)
    # TPR = TNR = 3/4; observed agreement 0.75 against chance 0.5 gives kappa 0.5.
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["cohen_kappa"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]) == (3, 1, 1, 3)


def test_agreement_metrics_always_refusal():
    metrics = refusal_gap.agreement_metrics([1, 1, 1, 1], [1, 1, 1, 0])
    # TPR 1 and TNR 0; chance agreement 0.75 equals the observed 0.75, so kappa is 0.
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["cohen_kappa"] == pytest.approx(0.0)
    assert metrics["judge_rate"] == pytest.approx(1.0)
    assert metrics["reference_rate"] == pytest.approx(0.75)


def test_agreement_metrics_one_reference_class():
    metrics = refusal_gap.agreement_metrics([0, 1, 0], [0, 0, 0])
    assert math.isnan(metrics["balanced_accuracy"])
    assert math.isnan(metrics["cohen_kappa"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def small_table() -> pd.DataFrame:
    rows = []
    labels = {
        ("en", "baseline"): ([1, 1, 1, 1], [1, 1, 1, 0]),
        ("de", "baseline"): ([1, 0], [1, 0]),
        ("yo", "baseline"): ([0, 0, 0, 1], [1, 1, 0, 1]),
        ("en", "harm_ablation"): ([0, 0], [0, 0]),
    }
    for (language, condition), (judged, reference) in labels.items():
        for index, (label, wildguard) in enumerate(zip(judged, reference)):
            rows.append({"model": "m", "language": language, "condition": condition, "subset": "harmful",
                         "prompt_id": index, "refusal": label, "wildguard_refusal": wildguard})
    table = pd.DataFrame(rows)
    table["tier"] = table["language"].map({"en": "high", "de": "high", "yo": "low"})
    return table


def test_refusal_rates_and_unweighted_tiers():
    table = small_table()
    rates = refusal_gap.refusal_rates(table, {"offline": "refusal", "wildguard": "wildguard_refusal"})
    offline = rates[(rates["judge"] == "offline") & (rates["condition"] == "baseline")].set_index("language")
    assert offline.loc["en", "refusal_rate"] == pytest.approx(1.0)
    assert offline.loc["de", "refusal_rate"] == pytest.approx(0.5)
    assert list(offline.index) == ["en", "de", "yo"]

    tiers = refusal_gap.tier_rates(rates)
    high = tiers[(tiers["judge"] == "offline") & (tiers["condition"] == "baseline") & (tiers["tier"] == "high")]
    # Unweighted over languages: (1.0 + 0.5) / 2, not the row-weighted 5/6.
    assert high["refusal_rate"].item() == pytest.approx(0.75)
    assert high["n_languages"].item() == 2

    wide = refusal_gap.refusal_gap_table(rates, "offline")
    yo = wide[(wide["language"] == "yo")]
    assert yo["refusal_rate"].item() == pytest.approx(0.25)
    assert yo["wildguard_refusal_rate"].item() == pytest.approx(0.75)


def test_judge_agreement_per_language():
    agreement = refusal_gap.judge_agreement(small_table()).set_index(["language", "condition"])
    assert agreement.loc[("en", "baseline"), "balanced_accuracy"] == pytest.approx(0.5)
    assert agreement.loc[("de", "baseline"), "balanced_accuracy"] == pytest.approx(1.0)
    assert agreement.loc[("de", "baseline"), "cohen_kappa"] == pytest.approx(1.0)
    assert agreement.loc[("yo", "baseline"), "rate_difference"] == pytest.approx(-50.0)
    assert math.isnan(agreement.loc[("en", "harm_ablation"), "balanced_accuracy"])


def test_heldout_split_stable_and_balanced():
    labels = [refusal_gap.heldout_split(prompt_id) for prompt_id in range(572)]
    assert labels == [refusal_gap.heldout_split(prompt_id) for prompt_id in range(572)]
    assert set(labels) == {"tune", "heldout"}
    assert 0.4 < labels.count("heldout") / len(labels) < 0.6
    assert refusal_gap.heldout_split(7) == refusal_gap.heldout_split("7")


def write_jsonl_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def test_load_completions_defaults_and_subset(tmp_path):
    write_jsonl_gz(tmp_path / "a.jsonl.gz", [
        {"model": "m", "language": "sw", "instruction": "x", "response": "Samahani, siwezi."},
    ])
    write_jsonl_gz(tmp_path / "b.jsonl.gz", [
        {"model": "m", "language": "en", "prompt": "y", "response": "Sure.", "subset": "harmless",
         "condition": "steered"},
    ])
    table = refusal_gap.load_completions(str(tmp_path / "*.jsonl.gz"))
    assert list(table["subset"]) == ["harmful", "harmless"]
    assert list(table["condition"]) == ["baseline", "steered"]
    assert list(table["tier"]) == ["low", "high"]
    assert list(table["prompt"]) == ["x", "y"]
    assert list(table["source_file"]) == ["a.jsonl.gz", "b.jsonl.gz"]

    write_jsonl_gz(tmp_path / "c.jsonl.gz", [{"language": "xx", "prompt": "z", "response": "r"}])
    with pytest.raises(ValueError, match="unknown language code"):
        refusal_gap.load_completions(tmp_path / "c.jsonl.gz")
    with pytest.raises(FileNotFoundError, match="no completion file"):
        refusal_gap.load_completions(tmp_path / "missing-*.jsonl.gz")


def sample_shared_completions(folder: Path, target: Path, per_cell: int) -> Path:
    """Write the first ``per_cell`` prompt ids of every (model, language, condition) cell of
    both shared files into one small file, so the notebook test stays fast."""
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows.extend(row for row in map(json.loads, handle) if row["prompt_id"] < per_cell)
    return write_jsonl_gz(target, rows)


def run_notebook(tmp_path: Path, parameters: dict) -> dict:
    import papermill

    output = tmp_path / "01_refusal_gap.executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(output), parameters=parameters, progress_bar=False,
                               cwd=str(REPOSITORY), kernel_name="python3")
    return json.loads(output.read_text())


def notebook_text(notebook: dict) -> str:
    parts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            for value in output.get("data", {}).values():
                parts.append("".join(value) if isinstance(value, list) else str(value))
    return "\n".join(parts)


def test_notebook_on_imported_completions(completions_folder, tmp_path):
    source = sample_shared_completions(completions_folder, tmp_path / "sample.jsonl.gz", per_cell=24)
    run_dir = tmp_path / "run"
    notebook = run_notebook(tmp_path, {"completions_path": str(source), "out_dir": str(run_dir)})
    text = notebook_text(notebook)
    assert STANDIN_WARNING not in text

    gap = pd.read_csv(run_dir / "tables" / "refusal_gap.csv")
    assert set(gap["model"]) == {"Qwen/Qwen2.5-7B-Instruct", "google/gemma-2-9b-it"}
    assert set(gap["condition"]) == {"baseline", "harm_ablation"}
    assert set(gap["subset"]) == {"harmful"}
    assert gap["wildguard_refusal_rate"].notna().all()
    assert (gap["n"] == 24).all()

    agreement = pd.read_csv(run_dir / "tables" / "judge_agreement.csv")
    assert len(agreement) == len(gap)
    baseline = agreement[(agreement["condition"] == "baseline") & (agreement["language"] != "yo")]
    assert baseline["balanced_accuracy"].notna().any()
    assert (run_dir / "figures" / "refusal_gap_harmful.png").stat().st_size > 10_000
    assert not (run_dir / "completions" / "refusal_gap.jsonl").exists()


def test_notebook_generates_with_standin(prepared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    notebook = run_notebook(tmp_path, {
        "model": "tiny-qwen2", "out_dir": str(run_dir), "data_dir": str(prepared_data_dir),
        "generation_prompts_per_cell": 2, "max_new_tokens": 6, "batch_size": 4, "languages": ["en", "yo"],
    })
    assert STANDIN_WARNING in notebook_text(notebook)

    stored = [json.loads(line) for line in (run_dir / "completions" / "refusal_gap.jsonl").read_text().splitlines()]
    assert len(stored) == 8
    assert {(row["language"], row["subset"]) for row in stored} == {
        ("en", "harmful"), ("en", "harmless"), ("yo", "harmful"), ("yo", "harmless"),
    }
    gap = pd.read_csv(run_dir / "tables" / "refusal_gap.csv")
    assert set(gap["subset"]) == {"harmful", "harmless"}
    assert set(np.unique(gap["n"])) == {2}
    assert not (run_dir / "tables" / "judge_agreement.csv").exists()
    assert (run_dir / "figures" / "refusal_gap_harmless.png").is_file()
