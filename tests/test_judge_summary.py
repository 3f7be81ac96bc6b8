"""The judge command's summary keeps conditions apart and rejects empty input."""

from __future__ import annotations

import json

from lrsafety.cli import main
from lrsafety.judges.cli import refusal_rates_by_language


def test_rates_split_by_condition():
    rows = [
        {"language": "en", "condition": "baseline", "refusal": 1},
        {"language": "en", "condition": "baseline", "refusal": 1},
        {"language": "en", "condition": "harm_ablation", "refusal": 0},
        {"language": "yo", "condition": "baseline", "refusal": 0},
    ]
    rates = refusal_rates_by_language(rows)
    assert rates == {"en/baseline": 1.0, "en/harm_ablation": 0.0, "yo/baseline": 0.0}


def test_rates_without_condition_per_language():
    rows = [{"language": "de", "refusal": 1}, {"language": "de", "refusal": 0}, {"language": "th", "refusal": None}]
    assert refusal_rates_by_language(rows) == {"de": 0.5}


def test_empty_input_rejected(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["judge", "--input", str(empty), "--judge", "offline", "--out", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "contains no rows" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_summary_names_conditions(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "p", "response": "I'm sorry, but I can't help with that.", "language": "en", "condition": "baseline"},
        {"prompt": "p", "response": "Sure! Step one: gather the materials.", "language": "en", "condition": "harm_ablation"},
    ]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert main(["judge", "--input", str(source), "--judge", "offline", "--out", str(tmp_path / "o.jsonl"), "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "en/baseline 1.00" in output
    assert "en/harm_ablation 0.00" in output
