"""The run folder: where each notebook writes its tables, figures and artifacts.

A run folder ``DIR`` (one per model, e.g. ``runs/tiny-qwen2``) holds the executed notebooks,
``manifest.json`` and these subfolders::

    tables/        CSV tables (data_counts.csv, separability.csv, ...)
    figures/       every figure as PNG and SVG
    activations/   one safetensors file per (language, subset, split) cell
    directions/    harmfulness directions with their metadata
    gates/         fitted recalibration gates (safetensors + JSON)
    completions/   generated completions (JSONL)

Every file is written atomically (a temporary sibling, then a rename), so an interrupted run
never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUBFOLDERS = ("tables", "figures", "activations", "directions", "gates", "completions")


class RunDir:
    """Paths inside one run folder; subfolders are created on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def _sub(self, name: str) -> Path:
        folder = self.path / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def tables(self) -> Path:
        return self._sub("tables")

    @property
    def figures(self) -> Path:
        return self._sub("figures")

    @property
    def activations(self) -> Path:
        return self._sub("activations")

    @property
    def directions(self) -> Path:
        return self._sub("directions")

    @property
    def gates(self) -> Path:
        return self._sub("gates")

    @property
    def completions(self) -> Path:
        return self._sub("completions")

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def write_model_info(self, info: dict[str, Any]) -> Path:
        """Record the model description (``ModelSpec.to_dict()`` or ``describe_model``) as ``model.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        return write_json(self.path / "model.json", info)

    def model_info(self) -> dict[str, Any]:
        """Return the model spec recorded by the runner or by notebook 00 (empty if none)."""
        path = self.path / "model.json"
        return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp creates files readable by the owner only. Give the result the mode any new
        # file would get, so that shared run folders and the site stay readable.
        os.chmod(temporary_path, 0o666 & ~_umask())
        os.replace(temporary_path, target)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(target: str | Path, text: str) -> Path:
    """Write a text file atomically and return its path."""
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, payload: Any) -> Path:
    """Write JSON atomically (UTF-8, indented, keys in insertion order) and return its path."""
    return write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def write_table(table, target: str | Path) -> Path:
    """Write a pandas DataFrame as CSV atomically and return its path."""
    with atomic_path(target) as temporary:
        table.to_csv(temporary, index=False)
    return Path(target)


def project_root(start: str | Path | None = None) -> Path:
    """Return the nearest folder at or above ``start`` (default: the working directory) holding
    ``_quarto.yml`` or ``pyproject.toml``; fall back to ``start`` itself.

    Notebooks run with the project root as working directory under ``lrsafety run`` and plain
    ``papermill``, but with ``notebooks/`` as working directory in JupyterLab; resolving relative
    paths against the project root makes both work.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_quarto.yml").is_file() or (folder / "pyproject.toml").is_file():
            return folder
    return here


def project_path(path: str | Path) -> Path:
    """Resolve a notebook path parameter: absolute paths stay, relative ones join the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path
