"""Data preparation against the real PolyRefuse files and small hand-written fixtures."""

from __future__ import annotations

import json
import shutil

import pytest

from lrsafety import data
from lrsafety.languages import LANGUAGES, POLYREFUSE_LANGUAGES, languages_in_tier


def test_tiers_cover_study_languages():
    assert len(LANGUAGES) == 23
    assert languages_in_tier("high") == ["en", "de", "fr", "es", "it", "nl", "pl", "ru", "zh", "ja"]
    assert languages_in_tier("mid") == ["ar", "ko", "th", "el", "he", "hi", "fa"]
    assert languages_in_tier("low") == ["sw", "am", "my", "km", "si", "yo"]


def test_real_release_counts(polyrefuse_source):
    prepared = data.load_polyrefuse(polyrefuse_source)
    counts = data.count_table(prepared.table)
    assert sorted(counts["language"].unique()) == sorted(POLYREFUSE_LANGUAGES)
    assert (counts["n"] == counts["expected"]).all()
    # 14 languages × 6 cells, less the Chinese harmless test cell missing upstream.
    assert len(counts) == 14 * 6 - 1


def test_real_release_reports_missing_cells(polyrefuse_source):
    missing = data.load_polyrefuse(polyrefuse_source).missing
    missing_languages = set(missing["language"])
    assert missing_languages == {"el", "he", "hi", "fa", "sw", "am", "my", "km", "si", "zh"}
    zh = missing[missing["language"] == "zh"]
    assert list(zip(zh["subset"], zh["split"])) == [("harmless", "test")]
    assert (missing.groupby("language").size().drop("zh") == 6).all()


def test_real_release_text_schema(polyrefuse_source):
    table = data.load_polyrefuse(polyrefuse_source).table
    yoruba_test = table[(table.language == "yo") & (table.split == "test") & (table.subset == "harmful")]
    first = yoruba_test.iloc[0]
    assert first.text_en.startswith("Write a defamatory article")
    assert first.text != first.text_en
    english_train = table[(table.language == "en") & (table.split == "train") & (table.subset == "harmful")]
    german_train = table[(table.language == "de") & (table.split == "train") & (table.subset == "harmful")]
    # Train rows are index-aligned: the German row's English source is the English row.
    assert list(german_train.text_en) == list(english_train.text)


def test_every_translation_in_own_language(polyrefuse_source):
    check = data.language_check(data.load_polyrefuse(polyrefuse_source).table).set_index("language")
    for language in POLYREFUSE_LANGUAGES:
        if language == "en":
            continue
        assert check.loc[language, "share_same_as_english"] < 0.05, language
    for language in ("ru", "zh", "ja", "ar", "ko", "th"):
        assert check.loc[language, "share_in_script"] > 0.9, language


def _write_fixture(root, harmful_test_records=None):
    """Write a small, well-formed Multilingual-Refusal layout with English and Swahili cells."""
    (root / "PolyRefuse").mkdir(parents=True)
    (root / "dataset" / "splits").mkdir(parents=True)
    english = {}
    for (subset, split), count in data.EXPECTED_COUNTS.items():
        english[(subset, split)] = [f"{subset} {split} prompt number {i}" for i in range(count)]
    for (subset, split), name in data._ENGLISH_SPLIT_FILES.items():
        records = [{"instruction": text, "category": None} for text in english[(subset, split)]]
        (root / "dataset" / "splits" / name).write_text(json.dumps(records))
    for subset in data.SUBSETS:
        texts = english[(subset, "test")]
        records = [{"instruction": t, "instruction_translated": t, "category": None} for t in texts]
        (root / "PolyRefuse" / f"{subset}_test_translated_en.json").write_text(json.dumps(records))
        for split in data.SPLITS:
            texts = english[(subset, split)]
            if split == "test":
                records = [{"instruction": t, "instruction_translated": f"ombi la {t}", "category": None} for t in texts]
                if subset == "harmful" and harmful_test_records is not None:
                    records = harmful_test_records
            else:
                records = [{"instruction": f"ombi la {t}", "category": None} for t in texts]
            (root / "PolyRefuse" / f"{subset}_{split}_translated_sw.json").write_text(json.dumps(records))
    return root


def test_fixture_loads_and_writes_table(tmp_path):
    source = _write_fixture(tmp_path / "checkout")
    prepared = data.prepare_data(source, data_dir=tmp_path / "data", languages=["en", "sw"])
    assert prepared.path.is_file()
    table = data.load_prompts(tmp_path / "data", languages=["sw"], splits=["test"])
    assert len(table) == 572 + 500
    assert set(table.columns) >= {"language", "tier", "subset", "split", "prompt_id", "text", "text_en"}
    assert (table["tier"] == "low").all()
    assert table.iloc[0]["text"].startswith("ombi la")


def test_count_mismatch_names_file(tmp_path):
    records = [{"instruction": "x", "instruction_translated": "y"}] * 10
    source = _write_fixture(tmp_path / "checkout", harmful_test_records=records)
    with pytest.raises(data.DataError, match=r"harmful_test_translated_sw\.json: expected 572 records.*found 10"):
        data.load_polyrefuse(source, languages=["sw"])


def test_missing_field_names_row_and_field(tmp_path):
    records = [{"instruction": "x", "instruction_translated": "y"} for _ in range(572)]
    del records[7]["instruction_translated"]
    source = _write_fixture(tmp_path / "checkout", harmful_test_records=records)
    with pytest.raises(data.DataError, match=r"harmful_test_translated_sw\.json: row 7 .*'instruction_translated'"):
        data.load_polyrefuse(source, languages=["sw"])


def test_invalid_json_names_file(tmp_path):
    source = _write_fixture(tmp_path / "checkout")
    (source / "PolyRefuse" / "harmless_val_translated_sw.json").write_text("[{broken")
    with pytest.raises(data.DataError, match=r"harmless_val_translated_sw\.json: invalid JSON"):
        data.load_polyrefuse(source, languages=["sw"])


def test_english_text_in_translated_cell_rejected(tmp_path):
    # A test file whose translation field holds the English source: the schema trap.
    texts = [f"harmful test prompt number {i}" for i in range(572)]
    records = [{"instruction": t, "instruction_translated": t} for t in texts]
    source = _write_fixture(tmp_path / "checkout", harmful_test_records=records)
    prepared = data.load_polyrefuse(source, languages=["sw"])
    check = data.language_check(prepared.table)
    with pytest.raises(data.DataError, match="sw: .* equal their English source"):
        data.validate_languages(check, max_same_as_english=0.1)


def test_missing_source_offline_says_how(tmp_path, monkeypatch):
    monkeypatch.delenv("LRSAFETY_POLYREFUSE", raising=False)
    with pytest.raises(data.DataError, match="LRSAFETY_POLYREFUSE=/path/to/Multilingual-Refusal"):
        data.resolve_source(None, data_dir=tmp_path / "data", allow_clone=False)


def test_source_without_layout_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="missing folder 'PolyRefuse'"):
        data.resolve_source(tmp_path / "empty")


def test_environment_variable_source(tmp_path, monkeypatch, polyrefuse_source):
    copy = tmp_path / "copy"
    shutil.copytree(polyrefuse_source / "dataset" / "splits", copy / "dataset" / "splits")
    (copy / "PolyRefuse").mkdir()
    monkeypatch.setenv("LRSAFETY_POLYREFUSE", str(copy))
    assert data.resolve_source(None) == copy


def test_load_prompts_without_table_points_to_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 00_data first"):
        data.load_prompts(tmp_path / "nothing")


def test_first_per_cell_keeps_alignment(prepared_data_dir):
    table = data.first_per_cell(data.load_prompts(prepared_data_dir, splits=["test"]), 3)
    assert set(table["prompt_id"]) == {0, 1, 2}
    per_cell = table.groupby(["language", "subset"]).size()
    assert (per_cell == 3).all()
