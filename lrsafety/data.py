"""PolyRefuse prompts as one tidy table.

Source: a checkout of the public repository ``mainlp/Multilingual-Refusal``, given explicitly,
by the ``LRSAFETY_POLYREFUSE`` environment variable, or cloned into ``data/raw/`` when the
network allows. Every (language, subset, split) cell becomes rows of one table with the columns
``language, tier, subset, split, prompt_id, text, text_en, category``.

Schema of the upstream files (one JSON list per file):

- ``PolyRefuse/{subset}_{split}_translated_{lang}.json`` for train and val: ``instruction`` is
  already the text in ``lang``; the English source is the row with the same index in
  ``dataset/splits``.
- the same name for test: ``instruction`` is the English source and ``instruction_translated``
  the text in ``lang``.
- English train and val are not in ``PolyRefuse/``; they are ``dataset/splits/harmful_{train,val}.json``
  and ``harmless_{train,val}_200_sampled.json``.

Rows are index-aligned across languages within a (subset, split), so ``prompt_id`` (the row
index) names the same prompt in every language.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lrsafety.languages import LANGUAGES, resource_tier
from lrsafety.runs import atomic_path, project_path

logger = logging.getLogger("lrsafety")

UPSTREAM_REPOSITORY = "https://github.com/mainlp/Multilingual-Refusal"
SOURCE_ENVIRONMENT_VARIABLE = "LRSAFETY_POLYREFUSE"
SUBSETS: tuple[str, ...] = ("harmful", "harmless")
SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMNS = ["language", "tier", "subset", "split", "prompt_id", "text", "text_en", "category"]

# Rows per cell in the PolyRefuse release.
EXPECTED_COUNTS: dict[tuple[str, str], int] = {
    ("harmful", "train"): 260,
    ("harmful", "val"): 39,
    ("harmful", "test"): 572,
    ("harmless", "train"): 200,
    ("harmless", "val"): 200,
    ("harmless", "test"): 500,
}

_ENGLISH_SPLIT_FILES = {
    ("harmful", "train"): "harmful_train.json",
    ("harmful", "val"): "harmful_val.json",
    ("harmless", "train"): "harmless_train_200_sampled.json",
    ("harmless", "val"): "harmless_val_200_sampled.json",
}

# Unicode script of each non-Latin language, checked on the characters of its prompts.
_SCRIPT_MARKERS = {
    "Cyrillic": ("CYRILLIC",),
    "Han": ("CJK",),
    "Japanese": ("CJK", "HIRAGANA", "KATAKANA"),
    "Arabic": ("ARABIC",),
    "Hangul": ("HANGUL",),
    "Thai": ("THAI",),
    "Greek": ("GREEK",),
    "Hebrew": ("HEBREW",),
    "Devanagari": ("DEVANAGARI",),
    "Ethiopic": ("ETHIOPIC",),
    "Myanmar": ("MYANMAR",),
    "Khmer": ("KHMER",),
    "Sinhala": ("SINHALA",),
}


class DataError(ValueError):
    """A PolyRefuse file is missing, malformed or has unexpected counts."""


@dataclass(frozen=True)
class PreparedData:
    """The tidy prompt table with its provenance and the cells that could not be found."""

    table: pd.DataFrame
    source: Path
    missing: pd.DataFrame
    path: Path | None = None


def resolve_source(source: str | Path | None = None, data_dir: str | Path = "data", allow_clone: bool = True) -> Path:
    """Return the folder of a ``Multilingual-Refusal`` checkout.

    Order: ``source``, then ``$LRSAFETY_POLYREFUSE``, then an earlier clone in
    ``DATA_DIR/raw/Multilingual-Refusal``, then a fresh shallow ``git clone`` there.
    """
    if source:
        return _check_checkout(Path(source).expanduser(), "the 'polyrefuse_source' parameter")
    from_environment = os.environ.get(SOURCE_ENVIRONMENT_VARIABLE)
    if from_environment:
        return _check_checkout(Path(from_environment).expanduser(), f"${SOURCE_ENVIRONMENT_VARIABLE}")

    clone_target = project_path(data_dir) / "raw" / "Multilingual-Refusal"
    if (clone_target / "PolyRefuse").is_dir():
        return _check_checkout(clone_target, "the earlier clone")
    if allow_clone:
        _clone(clone_target)
        return _check_checkout(clone_target, "the fresh clone")
    raise DataError(_no_source_message(clone_target, "cloning is disabled"))


def _clone(target: Path) -> None:
    if shutil.which("git") is None:
        raise DataError(_no_source_message(target, "git is not installed"))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    logger.info("Cloning %s into %s", UPSTREAM_REPOSITORY, target)
    try:
        subprocess.run(
            ["git", "clone", "--depth", "1", UPSTREAM_REPOSITORY, str(partial)],
            check=True, capture_output=True, text=True, timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        shutil.rmtree(partial, ignore_errors=True)
        detail = getattr(error, "stderr", "") or str(error)
        raise DataError(_no_source_message(target, f"git clone failed: {detail.strip()[-300:]}")) from None
    os.replace(partial, target)


def _no_source_message(clone_target: Path, reason: str) -> str:
    return (
        f"PolyRefuse data not found and could not be downloaded ({reason}). Point lrsafety at a local "
        f"checkout of {UPSTREAM_REPOSITORY}: set {SOURCE_ENVIRONMENT_VARIABLE}=/path/to/Multilingual-Refusal, "
        f"pass -p polyrefuse_source=/path/to/Multilingual-Refusal, or place the checkout at {clone_target}."
    )


def _check_checkout(folder: Path, origin: str) -> Path:
    for required in ("PolyRefuse", "dataset/splits"):
        if not (folder / required).is_dir():
            raise DataError(
                f"{folder} (from {origin}) is not a Multilingual-Refusal checkout: missing folder '{required}'"
            )
    return folder


def cell_file(source: Path, language: str, subset: str, split: str) -> Path:
    """Return the upstream file of one cell (English train/val come from ``dataset/splits``)."""
    if language == "en" and split in ("train", "val"):
        return source / "dataset" / "splits" / _ENGLISH_SPLIT_FILES[(subset, split)]
    return source / "PolyRefuse" / f"{subset}_{split}_translated_{language}.json"


def _read_records(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return records


def _field(path: Path, index: int, record: object, name: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{path}: row {index} is {type(record).__name__}, expected an object")
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: row {index} has a missing or empty field '{name}'")
    return value


def _english_sources(source: Path) -> dict[tuple[str, str], list[str]]:
    english = {}
    for (subset, split), name in _ENGLISH_SPLIT_FILES.items():
        path = source / "dataset" / "splits" / name
        if not path.is_file():
            raise DataError(f"missing English split file {path}")
        english[(subset, split)] = [_field(path, i, r, "instruction") for i, r in enumerate(_read_records(path))]
    return english


def load_polyrefuse(
    source: str | Path,
    languages: list[str] | None = None,
    strict_counts: bool = True,
) -> PreparedData:
    """Read every (language, subset, split) cell into one tidy table.

    Cells whose file does not exist are listed in ``missing`` (with the expected file path)
    rather than dropped silently. A malformed file raises ``DataError`` naming the file, row and
    field; with ``strict_counts`` a cell whose row count differs from the release raises too.
    """
    source = Path(source)
    languages = list(languages) if languages else list(LANGUAGES)
    for language in languages:
        resource_tier(language)
    english = _english_sources(source)

    frames, missing = [], []
    for language in languages:
        for subset in SUBSETS:
            for split in SPLITS:
                path = cell_file(source, language, subset, split)
                if not path.is_file():
                    missing.append({"language": language, "tier": resource_tier(language), "subset": subset,
                                    "split": split, "expected_file": str(path)})
                    continue
                frames.append(_read_cell(path, language, subset, split, english, strict_counts))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    missing_table = pd.DataFrame(missing, columns=["language", "tier", "subset", "split", "expected_file"])
    return PreparedData(table=table, source=source, missing=missing_table)


def _read_cell(path, language, subset, split, english, strict_counts) -> pd.DataFrame:
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: the file contains no records; expected a JSON list of prompts")
    expected = EXPECTED_COUNTS[(subset, split)]
    if strict_counts and len(records) != expected:
        raise DataError(f"{path}: expected {expected} records for {subset}/{split}, found {len(records)}")

    rows = []
    for index, record in enumerate(records):
        if split == "test":
            # Test files keep the English source in 'instruction' and the translation beside it.
            text_en = _field(path, index, record, "instruction")
            if language == "en" and "instruction_translated" not in record:
                # Upstream's English harmful test file has no translation field.
                text = text_en
            else:
                text = _field(path, index, record, "instruction_translated")
        else:
            text = _field(path, index, record, "instruction")
            sources = english[(subset, split)]
            if len(sources) != len(records):
                raise DataError(
                    f"{path}: {len(records)} records but the English source of {subset}/{split} has "
                    f"{len(sources)}; rows must be index-aligned"
                )
            text_en = sources[index]
        category = record.get("category")
        rows.append((language, resource_tier(language), subset, split, index, text, text_en,
                     category if isinstance(category, str) else None))
    return pd.DataFrame(rows, columns=COLUMNS)


def count_table(table: pd.DataFrame) -> pd.DataFrame:
    """Count prompts per language × subset × split, with the expected count beside each cell."""
    counts = table.groupby(["language", "tier", "subset", "split"], sort=False).size().rename("n").reset_index()
    counts["expected"] = [EXPECTED_COUNTS[(s, p)] for s, p in zip(counts["subset"], counts["split"])]
    return counts


def language_check(table: pd.DataFrame) -> pd.DataFrame:
    """Check that non-English prompts are in their own language.

    Per language: the share of prompts identical to their English source, and for non-Latin
    scripts the share of letters in the expected script. English text in a translated cell (the
    test-file schema trap) shows up as a high ``share_same_as_english``.
    """
    rows = []
    for language, group in table.groupby("language", sort=False):
        script = LANGUAGES[language].script
        same = float((group["text"].str.strip() == group["text_en"].str.strip()).mean())
        script_share = _script_share(group["text"], script) if script in _SCRIPT_MARKERS else float("nan")
        rows.append({"language": language, "script": script, "n": len(group),
                     "share_same_as_english": same, "share_in_script": script_share})
    return pd.DataFrame(rows)


def _script_share(texts: pd.Series, script: str) -> float:
    markers = _SCRIPT_MARKERS[script]
    letters = in_script = 0
    for text in texts:
        for character in text:
            if not character.isalpha():
                continue
            letters += 1
            name = unicodedata.name(character, "")
            in_script += any(marker in name for marker in markers)
    return in_script / letters if letters else float("nan")


def validate_languages(check: pd.DataFrame, max_same_as_english: float = 0.1, min_in_script: float = 0.5) -> None:
    """Raise ``DataError`` when a non-English language's prompts look English or are in the wrong script."""
    problems = []
    for row in check.itertuples():
        if row.language == "en":
            continue
        if row.share_same_as_english > max_same_as_english:
            problems.append(f"{row.language}: {row.share_same_as_english:.0%} of prompts equal their English source")
        if row.share_in_script == row.share_in_script and row.share_in_script < min_in_script:
            problems.append(f"{row.language}: only {row.share_in_script:.0%} of letters are {row.script}")
    if problems:
        raise DataError("prompts are not in their own language: " + "; ".join(problems))


def tidy_table_path(data_dir: str | Path = "data") -> Path:
    """Return the path of the tidy prompt table under ``DATA_DIR``."""
    return project_path(data_dir) / "processed" / "polyrefuse.parquet"


def prepare_data(
    source: str | Path | None = None,
    data_dir: str | Path = "data",
    languages: list[str] | None = None,
    strict_counts: bool = True,
    allow_clone: bool = True,
) -> PreparedData:
    """Locate the source, load every cell, check it, and write the tidy table under ``DATA_DIR``."""
    folder = resolve_source(source, data_dir=data_dir, allow_clone=allow_clone)
    prepared = load_polyrefuse(folder, languages=languages, strict_counts=strict_counts)
    if prepared.table.empty:
        raise DataError(f"no PolyRefuse cell found under {folder}")
    validate_languages(language_check(prepared.table))

    target = tidy_table_path(data_dir)
    with atomic_path(target) as temporary:
        prepared.table.to_parquet(temporary, index=False)
    logger.info("Wrote %d prompts in %d languages to %s", len(prepared.table),
                prepared.table["language"].nunique(), target)
    return PreparedData(prepared.table, prepared.source, prepared.missing, target)


def load_prompts(
    data_dir: str | Path = "data",
    languages: list[str] | None = None,
    subsets: list[str] | None = None,
    splits: list[str] | None = None,
) -> pd.DataFrame:
    """Read the tidy prompt table written by notebook ``00_data``, optionally filtered."""
    path = tidy_table_path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt table {path} not found; run notebook 00_data first "
            "(lrsafety run --notebooks 00) with the same data_dir"
        )
    table = pd.read_parquet(path)
    for column, wanted in (("language", languages), ("subset", subsets), ("split", splits)):
        if wanted:
            unknown = sorted(set(wanted) - set(table[column]))
            if unknown:
                raise ValueError(f"{column} value(s) {unknown} not in the prompt table {path}")
            table = table[table[column].isin(wanted)]
    return table.reset_index(drop=True)


def first_per_cell(table: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """Keep the first ``n`` prompts (by prompt_id) of every cell; ``None`` keeps all.

    Taking the same prompt ids in every language keeps cells row-aligned across languages.
    """
    if n is None:
        return table
    if n < 1:
        raise ValueError(f"prompts per cell must be at least 1, got {n}")
    return table[table["prompt_id"] < n].reset_index(drop=True)
