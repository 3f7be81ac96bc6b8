"""Completion records on disk: JSON Lines in, judged JSON Lines out, with line-numbered errors.

A record is one JSON object per line (the file may be gzip-compressed, ``.gz``) holding at least
an instruction (field ``prompt`` or ``instruction``), a ``response`` string and a ``language``
code. ``judge_records`` adds ``refusal`` (1, 0 or null), ``refusal_score`` when the judge has a
score, and ``refusal_error`` when it could not decide. Every other field is kept unchanged.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lrsafety.judges.base import Judge, JudgeItem
from lrsafety.runs import atomic_path

logger = logging.getLogger("lrsafety")

PROMPT_FIELDS: tuple[str, ...] = ("prompt", "instruction")
# Fields the judges write; an input that already has them is overwritten, with a warning.
OUTPUT_FIELDS: tuple[str, ...] = ("refusal", "refusal_score", "refusal_error")


class InputError(ValueError):
    """An input file has lines that are not valid records; ``problems`` lists (line, reason)."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.path = path
        self.problems = problems
        shown = "; ".join(f"line {line}: {reason}" for line, reason in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(
            f"{path}: {len(problems)} invalid line(s): {shown}{more}. "
            "Fix them, or pass --skip-invalid to judge the valid lines only."
        )


@dataclass
class ReadResult:
    """Valid records in file order, with the line numbers of the ones skipped as invalid."""

    records: list[dict[str, Any]]
    skipped: list[tuple[int, str]] = field(default_factory=list)


@contextmanager
def open_text(path: str | Path, mode: str = "r") -> Iterator[IO[str]]:
    """Open a UTF-8 text file, through gzip when its name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, mode + "b") as raw, io.TextIOWrapper(raw, encoding="utf-8") as handle:
            yield handle
    else:
        with open(path, mode, encoding="utf-8") as handle:
            yield handle


def prompt_of(record: dict[str, Any]) -> str | None:
    """Return the record's instruction text: ``prompt`` if present, else ``instruction``."""
    for name in PROMPT_FIELDS:
        if isinstance(record.get(name), str):
            return record[name]
    return None


def validate_record(record: Any) -> str | None:
    """Return why ``record`` cannot be judged, or None if it can."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if prompt_of(record) is None:
        return "missing string field 'prompt' or 'instruction'"
    if not isinstance(record.get("response"), str):
        return "missing string field 'response'"
    if not isinstance(record.get("language"), str) or not record["language"]:
        return "missing string field 'language'"
    return None


def read_records(path: str | Path, *, skip_invalid: bool = False) -> ReadResult:
    """Read a JSONL(.gz) file of records, checking each line.

    Raises ``InputError`` naming every invalid line (1-based), unless ``skip_invalid`` is set;
    then invalid lines are left out and reported in ``ReadResult.skipped``. Blank lines are
    ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    records: list[dict[str, Any]] = []
    problems: list[tuple[int, str]] = []
    try:
        with open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    problems.append((number, f"invalid JSON ({error.msg} at column {error.colno})"))
                    continue
                reason = validate_record(record)
                if reason:
                    problems.append((number, reason))
                else:
                    records.append(record)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise InputError(path, [(len(records) + len(problems) + 1, f"unreadable file: {error}")]) from None

    if problems and not skip_invalid:
        raise InputError(path, problems)
    for number, reason in problems:
        logger.warning("Skipping %s line %d: %s", path, number, reason)
    return ReadResult(records=records, skipped=problems)


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSON Lines (gzip when the name ends in ``.gz``), atomically."""
    path = Path(path)
    with atomic_path(path) as temporary:
        if path.suffix == ".gz":
            with gzip.open(temporary, "wt", encoding="utf-8") as handle:
                _dump(records, handle)
        else:
            with open(temporary, "w", encoding="utf-8") as handle:
                _dump(records, handle)
    return path


def _dump(records: Iterable[dict[str, Any]], handle: IO[str]) -> None:
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def judge_records(
    records: list[dict[str, Any]],
    judge: Judge,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Return copies of ``records`` with the judge's ``refusal``, ``refusal_score`` and
    ``refusal_error`` fields added (the last two only where they have a value)."""
    clashes = sorted({name for record in records for name in OUTPUT_FIELDS if name in record})
    if clashes:
        logger.warning("Input already has field(s) %s; the judge's values replace them", clashes)

    items = [JudgeItem(prompt_of(record) or "", record["response"], record["language"]) for record in records]
    results = judge.judge(items, batch_size=batch_size, progress=progress)

    judged = []
    for record, result in zip(records, results, strict=True):
        row = {key: value for key, value in record.items() if key not in OUTPUT_FIELDS}
        row["refusal"] = result.refusal
        if result.score is not None:
            row["refusal_score"] = result.score
        if result.error is not None:
            row["refusal_error"] = result.error
        judged.append(row)
    return judged
