"""``lrsafety report``: the results site that mirrors the paper, built from executed run folders.

The site is a Quarto website: ``_quarto.yml``, ``index.qmd`` and one page per paper section in
``paper/`` are committed and never rewritten. Each page includes a fragment that this module
generates from the run folders found under ``--runs`` (every folder holding a ``manifest.json``):

    paper/_generated-index.qmd      headline tables across every run, list of runs
    paper/_generated-<page>.qmd     per run: provenance, stand-in warning, one embed per labeled cell
    paper/executed/<run>/           copies of the executed notebooks that the fragments embed

Quarto embeds need notebooks inside the project, and a cell label must be unique on a page, so the
copies carry the run's name as a label suffix (``fig-data-counts`` becomes
``fig-data-counts--tiny-qwen2``). Nothing is executed again: the embeds show the stored outputs.

With ``quarto`` on the PATH the command stages these files and runs ``quarto render``. Without it,
it builds an HTML preview of the same pages with nbconvert: the headline tables, every labeled
figure and table of every run, and each executed notebook in full, all without network resources.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import filecmp
import html
import json
import logging
import numbers
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lrsafety.languages import TIERS
from lrsafety.runs import project_root, write_text

logger = logging.getLogger("lrsafety")

PAGES_FOLDER = "paper"
EXECUTED_FOLDER = "executed"
GENERATED_PREFIX = "_generated-"
# A file in the output folder that marks it as built by this command, so a rebuild may clear it.
SITE_MARKER = ".lrsafety-site"
# Set while ``lrsafety report`` runs quarto, so the pre-render hook in _quarto.yml does not stage again.
STAGED_ENVIRONMENT_VARIABLE = "LRSAFETY_REPORT_STAGED"
LABEL_SEPARATOR = "--"
# The recalibration headline: the gate's own readout at b = 0 and at the few-shot budgets b = 1–4.
HEADLINE_READOUT = "gate"
HEADLINE_BUDGETS = (0, 1, 2, 3, 4)
# The position that every gate and intervention reads: the last prompt token.
HEADLINE_POSITION = "t_post_inst"

_OPTION_LINE = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_INCLUDE_LINE = re.compile(r"^\s*\{\{<\s*include\s+(\S+)\s*>\}\}\s*$")
_EMBED = re.compile(r"\{\{<\s*embed\s+(\S+?)#([\w-]+)\s*>\}\}")
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")


class ReportError(RuntimeError):
    """The site could not be built: missing runs, an unknown page or a failed quarto render."""


@dataclass(frozen=True)
class Section:
    """One page of the site: its file name in ``paper/`` and the notebooks whose results it shows."""

    page: str
    notebooks: tuple[str, ...]


SECTIONS: tuple[Section, ...] = (
    Section("data", ("00_data.ipynb",)),
    Section("refusal-gap", ("01_refusal_gap.ipynb",)),
    Section("separability", ("02_extraction.ipynb", "03_separability.ipynb")),
    Section("recalibration", ("04_recalibration.ipynb",)),
    Section("steering", ("05_steering.ipynb",)),
)


# --------------------------------------------------------------------------------------------
# Run folders


@dataclass(frozen=True)
class Run:
    """One run folder: its manifest, the model description and the executed notebooks it holds."""

    path: Path
    manifest: dict[str, Any]
    model: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def slug(self) -> str:
        """The folder name reduced to lowercase letters, digits and hyphens (labels, anchors, paths)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "run"

    @property
    def model_name(self) -> str:
        return str(self.model.get("name") or self.manifest.get("model") or self.name)

    @property
    def is_standin(self) -> bool:
        return bool(self.model.get("is_standin"))

    @property
    def standin_warning(self) -> str:
        from lrsafety.standins import STANDIN_WARNING

        return str(self.model.get("standin_warning") or STANDIN_WARNING)

    @property
    def display_name(self) -> str:
        """The model name, with the folder name when it differs, marked when it is a stand-in."""
        text = self.model_name if self.model_name == self.name else f"{self.model_name} ({self.name})"
        return f"{text} (stand-in)" if self.is_standin else text

    def notebook_record(self, notebook: str) -> dict[str, Any] | None:
        """Return the manifest entry of ``notebook`` from the latest invocation that ran it.

        The runner keeps only a summary (name and status) of earlier invocations in
        ``previous_runs``, so a notebook run by an earlier ``lrsafety run`` has no parameters here.
        """
        records = [entry for entry in self.manifest.get("notebooks", []) if entry.get("notebook") == notebook]
        if records:
            return records[-1]
        for earlier in reversed(self.manifest.get("previous_runs", [])):
            for name, status in earlier.get("notebooks", []):
                if name == notebook:
                    return {"notebook": name, "status": status, "finished": earlier.get("finished")}
        return None

    def notebook_status(self, notebook: str) -> str:
        """``ok``, ``failed``, ``interrupted``, ``running``, or ``not run`` when the run lacks it."""
        if not (self.path / notebook).is_file():
            return "not run"
        record = self.notebook_record(notebook)
        return str(record.get("status", "unknown")) if record else "unknown"

    def table(self, name: str) -> pd.DataFrame | None:
        """Read ``tables/<name>.csv``, or return None when the run has no such table."""
        path = self.path / "tables" / f"{name}.csv"
        return pd.read_csv(path) if path.is_file() else None


def find_runs(runs_root: str | Path) -> list[Run]:
    """Return every run folder (a folder with ``manifest.json``) directly under ``runs_root``.

    ``runs_root`` may also be a single run folder. Raises ``ReportError`` when it does not exist or a
    manifest is not valid JSON.
    """
    runs_root = Path(runs_root).expanduser()
    if not runs_root.is_dir():
        raise ReportError(f"runs folder {runs_root} not found; create runs with `lrsafety run --out {runs_root}/<model>`")
    candidates = [runs_root] if (runs_root / "manifest.json").is_file() else sorted(runs_root.iterdir())
    runs = []
    for folder in candidates:
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            model_path = folder / "model.json"
            model = json.loads(model_path.read_text(encoding="utf-8")) if model_path.is_file() else {}
        except json.JSONDecodeError as error:
            raise ReportError(f"{folder} has an invalid manifest.json or model.json: {error}") from None
        runs.append(Run(folder.resolve(), manifest, model))
    slugs = [run.slug for run in runs]
    duplicated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if duplicated:
        raise ReportError(f"run folder names collide after normalisation ({', '.join(duplicated)}); rename one of them")
    return runs


# --------------------------------------------------------------------------------------------
# Labeled cells of an executed notebook


@dataclass(frozen=True)
class LabeledCell:
    """A code cell whose first lines carry ``#| label: fig-…`` or ``#| label: tbl-…``."""

    label: str
    index: int
    heading: str | None
    intro: str
    has_outputs: bool

    @property
    def kind(self) -> str:
        """``figure`` for ``fig-`` labels, ``table`` for ``tbl-`` labels, otherwise ``output``."""
        if self.label.startswith("fig-"):
            return "figure"
        if self.label.startswith("tbl-"):
            return "table"
        return "output"


def cell_options(source: str) -> dict[str, str]:
    """Parse the Quarto option comments (``#| key: value``) at the top of a cell."""
    options = {}
    for line in source.splitlines():
        match = _OPTION_LINE.match(line)
        if not match:
            break
        options[match.group(1)] = match.group(2).strip("\"'")
    return options


def labeled_cells(notebook) -> list[LabeledCell]:
    """List the labeled code cells of a notebook with the Markdown that introduces each one.

    The introduction is the Markdown written since the previous labeled cell, from its last
    heading on, so a heading followed by an unlabeled helper cell still introduces the result.
    """
    cells, markdown_since = [], []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            markdown_since.append(cell.source)
            continue
        if cell.cell_type != "code":
            continue
        label = cell_options(cell.source).get("label")
        if not label:
            continue
        heading, intro = _split_intro("\n\n".join(markdown_since))
        cells.append(LabeledCell(label, index, heading, intro, bool(cell.get("outputs"))))
        markdown_since = []
    return cells


def _split_intro(markdown: str) -> tuple[str | None, str]:
    """Return the last heading of ``markdown`` and the text after it (the whole text if no heading)."""
    lines = markdown.splitlines()
    for position in range(len(lines) - 1, -1, -1):
        match = _HEADING.match(lines[position])
        if match:
            return match.group(2), "\n".join(lines[position + 1:]).strip()
    return None, markdown.strip()


def notebook_title(notebook) -> str | None:
    """Return the text of the first Markdown heading of a notebook."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                match = _HEADING.match(line)
                if match:
                    return match.group(2)
    return None


def _label_title(label: str) -> str:
    """``fig-data-counts`` -> ``Data counts (figure)``: the title of a cell with no heading of its own."""
    kind, _, name = label.partition("-")
    words = name.replace("-", " ") or label
    suffix = {"fig": " (figure)", "tbl": " (table)"}.get(kind, "")
    return words[:1].upper() + words[1:] + suffix


def _demote_headings(markdown: str, levels: int) -> str:
    """Move every Markdown heading down by ``levels`` (at most to level 6)."""
    def demote(line: str) -> str:
        match = _HEADING.match(line)
        if not match:
            return line
        return "#" * min(6, len(match.group(1)) + levels) + " " + match.group(2)

    return "\n".join(demote(line) for line in markdown.splitlines())


# --------------------------------------------------------------------------------------------
# Headline tables


@dataclass
class Headline:
    """One headline table of the index: the aggregated numbers and how they were computed."""

    key: str
    title: str
    method: str
    page: str
    table: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    decimals: int = 3


def _first_column(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in frame.columns), None)


def _tier_columns(frame: pd.DataFrame, index: list[str], value: str) -> pd.DataFrame:
    """Average ``value`` per ``index`` × tier and spread the tiers (high, mid, low) into columns."""
    table = frame.pivot_table(index=index, columns="tier", values=value, aggfunc="mean", sort=False)
    table = table[[tier for tier in TIERS if tier in table.columns]].reset_index()
    table.columns.name = None
    return table


# Rows that tables add as aggregates over languages (e.g. ``language = "mean"`` per tier); the
# headline tables average the per-language rows themselves.
_AGGREGATE_LANGUAGES = ("mean", "all", "macro", "overall")


def _per_language(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the rows of one language in a known tier (drops aggregate and source-only rows)."""
    if "language" in frame.columns:
        frame = frame[~frame["language"].astype(str).isin(_AGGREGATE_LANGUAGES)]
    if "tier" in frame.columns:
        frame = frame[frame["tier"].isin(TIERS)]
    return frame


def _collect(runs: list[Run], table_name: str, notebook: str, required: tuple[str, ...]) -> tuple[list[tuple[Run, pd.DataFrame]], list[str]]:
    """Read one table from every run; note the runs that lack it or lack required columns."""
    found, missing = [], []
    for run in runs:
        frame = run.table(table_name)
        if frame is None:
            missing.append(f"{run.display_name}: not run for this model ({notebook} wrote no tables/{table_name}.csv)")
            continue
        absent = [column for column in required if column not in frame.columns]
        if absent:
            missing.append(f"{run.display_name}: tables/{table_name}.csv lacks column(s) {', '.join(absent)}")
            continue
        found.append((run, _per_language(frame)))
    return found, missing


def refusal_gap_headline(runs: list[Run]) -> Headline:
    """Refusal rate on harmful prompts per resource tier and condition, and the high − low gap."""
    found, missing = _collect(runs, "refusal_gap", "01_refusal_gap", ("tier",))
    parts = []
    for run, frame in found:
        rate = _first_column(frame, ("refusal_rate", "rate", "refusal"))
        if rate is None:
            missing.append(f"{run.display_name}: tables/refusal_gap.csv has no refusal_rate column")
            continue
        index = [column for column in ("subset", "condition", "judge") if column in frame.columns]
        if not index:
            frame, index = frame.assign(condition="all"), ["condition"]
        table = _tier_columns(frame, index, rate)
        if "high" in table.columns and "low" in table.columns:
            table["gap high − low"] = table["high"] - table["low"]
        parts.append(table.assign(model=run.display_name))
    return Headline(
        "refusal_gap", "Refusal gap by resource tier",
        "Refusal rate (share of completions judged a refusal) of harmful and harmless test "
        "prompts, unweighted mean over the languages of each tier (tables/refusal_gap.csv).",
        "refusal-gap", _stack(parts), missing,
    )


def separability_headline(runs: list[Run]) -> Headline:
    """AUC of each harmfulness direction at the model's ``paper_layer``, per position, direction and tier."""
    found, missing = _collect(runs, "separability", "03_separability", ("layer", "tier", "auc"))
    parts = []
    for run, frame in found:
        layer = run.model.get("paper_layer")
        if layer is None:
            missing.append(f"{run.display_name}: model.json gives no paper_layer")
            continue
        at_layer = frame[frame["layer"] == int(layer)]
        if at_layer.empty:
            missing.append(f"{run.display_name}: tables/separability.csv has no row for layer {layer}")
            continue
        if "position" in at_layer.columns and HEADLINE_POSITION in set(at_layer["position"]):
            at_layer = at_layer[at_layer["position"] == HEADLINE_POSITION]
        index = [column for column in ("position", "direction", "control") if column in at_layer.columns]
        if not index:
            at_layer, index = at_layer.assign(direction="all"), ["direction"]
        if "language" in at_layer.columns:
            # Control directions come in replicates: average them per language first.
            at_layer = at_layer.groupby(index + ["language", "tier"], sort=False)["auc"].mean().reset_index()
        table = _tier_columns(at_layer, index, "auc")
        if "control" in table.columns:
            table["control"] = table["control"].map({True: "yes", False: "no"}).fillna(table["control"])
        parts.append(table.assign(model=run.display_name, layer=int(layer)))
    return Headline(
        "separability", "Separability at the paper's layer",
        "ROC AUC of the projection on each harmfulness direction, harmful vs harmless test prompts "
        "at the last prompt token (`t_post_inst`), unweighted mean over the languages of each tier "
        "(tables/separability.csv; the layer is the model's paper_layer from model.json; control "
        "directions are averaged over their replicates).",
        "separability", _stack(parts), missing, decimals=3,
    )


def recalibration_headline(runs: list[Run]) -> Headline:
    """Balanced accuracy of the gate per budget b (target-language examples per class)."""
    found, missing = _collect(runs, "recalibration", "04_recalibration", ("budget", "tier", "balanced_accuracy"))
    parts = []
    for run, frame in found:
        # The headline shows the gate itself; its controls (other readouts) and larger budgets are on the page.
        if "readout" in frame.columns:
            frame = frame[frame["readout"] == HEADLINE_READOUT]
        frame = frame[frame["budget"] <= max(HEADLINE_BUDGETS)]
        if frame.empty:
            missing.append(f"{run.display_name}: tables/recalibration.csv has no {HEADLINE_READOUT!r} rows with b <= 4")
            continue
        index = [column for column in ("threshold_rule",) if column in frame.columns]
        # Mean over seeds per language first, so every language weighs the same in its tier.
        per_language = frame.groupby(index + ["tier", "language", "budget"] if "language" in frame.columns
                                     else index + ["tier", "budget"], sort=False)["balanced_accuracy"].mean().reset_index()
        table = per_language.pivot_table(index=index + ["tier"], columns="budget", values="balanced_accuracy",
                                         aggfunc="mean", sort=False)
        table = table[sorted(table.columns)]
        table.columns = [f"b = {int(budget)}" for budget in table.columns]
        table = table.reset_index().rename(columns={"threshold_rule": "threshold rule"})
        index = ["threshold rule" if column == "threshold_rule" else column for column in index]
        order = {tier: position for position, tier in enumerate(TIERS)}
        table = table.sort_values(index + ["tier"], key=lambda column: column.map(order) if column.name == "tier" else column,
                                  kind="stable")
        parts.append(table.assign(model=run.display_name))
    return Headline(
        "recalibration", "Recalibration: b = 0 vs b = 1–4",
        "Balanced accuracy of the gate on target-language test prompts when it is refitted "
        "with b examples per class (b = 0: high-resource languages only), per threshold rule, "
        "mean over seeds, then unweighted mean over the languages of each tier "
        "(tables/recalibration.csv, readout `gate`).",
        "recalibration", _stack(parts), missing, decimals=3,
    )


def steering_headline(runs: list[Run]) -> Headline:
    """Refusal on harmful and harmless prompts and their selectivity, per steering condition."""
    found, missing = _collect(runs, "steering", "05_steering", ("condition", "selectivity"))
    parts = []
    for run, frame in found:
        values = [column for column in ("harmful_refusal", "harmless_refusal", "selectivity") if column in frame.columns]
        table = frame.groupby("condition", sort=False)[values].mean().reset_index()
        if "tier" in frame.columns:
            for tier in TIERS:
                per_tier = frame[frame["tier"] == tier].groupby("condition", sort=False)["selectivity"].mean()
                if not per_tier.empty:
                    table[f"selectivity, {tier} tier"] = table["condition"].map(per_tier)
        table = table.rename(columns=STEERING_COLUMN_NAMES)
        parts.append(table.assign(model=run.display_name))
    return Headline(
        "steering", "Selectivity per steering condition",
        "Refusal rate (%) of harmful and of harmless test prompts and the selectivity (harmful − "
        "harmless refusal, in points), unweighted mean over the target languages, overall and per "
        "tier (tables/steering.csv).",
        "steering", _stack(parts), missing, decimals=1,
    )


STEERING_COLUMN_NAMES = {
    "harmful_refusal": "harmful refusal (%)",
    "harmless_refusal": "harmless refusal (%)",
    "selectivity": "selectivity (points)",
}


def _stack(parts: list[pd.DataFrame]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    leading = [column for column in ("model", "layer") if column in table.columns]
    return table[leading + [column for column in table.columns if column not in leading]]


def headline_tables(runs: list[Run]) -> list[Headline]:
    """Build the four headline tables of the index from every run's CSV tables."""
    return [refusal_gap_headline(runs), separability_headline(runs), recalibration_headline(runs), steering_headline(runs)]


def _format_value(value: Any, decimals: int = 3) -> str:
    if isinstance(value, float):
        return "–" if pd.isna(value) else f"{value:.{decimals}f}"
    return str(value)


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """Summarise each run in one row: model, stand-in flag, folder, notebook status, data, git revision, finish time."""
    rows = []
    for run in runs:
        statuses = []
        for notebook in sorted(path.name for path in run.path.glob("[0-9][0-9]_*.ipynb")):
            statuses.append(f"{notebook[:2]} {run.notebook_status(notebook)}")
        git = run.manifest.get("git") or {}
        commit = (git.get("commit") or "unknown")[:10]
        rows.append({
            "model": run.model_name,
            "stand-in": "yes" if run.is_standin else "no",
            "run folder": run.name,
            "notebooks": ", ".join(statuses) or "none",
            "data": _data_description(run),
            "git": commit + (" (uncommitted changes)" if git.get("dirty") else ""),
            "finished": _short_time(run.manifest.get("finished")) or run.manifest.get("status", ""),
        })
    return pd.DataFrame(rows)


def _short_time(stamp: str | None) -> str:
    """``2026-12-04T19:57:19+00:00`` -> ``2026-12-04 19:57 UTC`` (empty when not recorded)."""
    if not stamp:
        return ""
    try:
        moment = dt.datetime.fromisoformat(stamp).astimezone(dt.timezone.utc)
    except ValueError:
        return stamp
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _data_description(run: Run) -> str:
    """Summarise the data parameters that the run's notebooks used (from the manifest)."""
    seen: dict[str, str] = {}
    for record in run.manifest.get("notebooks", []):
        for key in ("data_dir", "languages", "generation_prompts_per_cell"):
            value = (record.get("effective_parameters") or {}).get(key)
            if value is not None and key not in seen:
                seen[key] = _parameter_text(value)
    return ", ".join(f"{key}={value}" for key, value in seen.items()) or "not recorded"


def _parameter_text(value: Any) -> str:
    # The runner records a notebook's own defaults as source text ('"data"', 'None').
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.strip('"')


# --------------------------------------------------------------------------------------------
# Staging for Quarto: executed notebooks and generated fragments inside the project


@dataclass
class StagedSite:
    """Files written by ``stage_site``: the fragment of each page and the staged copy of each executed notebook."""

    project: Path
    runs: list[Run]
    fragments: dict[str, Path]
    notebooks: dict[tuple[str, str], Path]


def pages_folder(project: Path) -> Path:
    return project / PAGES_FOLDER


def fragment_path(project: Path, page: str) -> Path:
    return pages_folder(project) / f"{GENERATED_PREFIX}{page}.qmd"


def staged_label(label: str, run: Run) -> str:
    """Return the label of a staged cell, unique on a page because it names the run."""
    return f"{label}{LABEL_SEPARATOR}{run.slug}"


def _write_if_changed(target: Path, text: str) -> Path:
    """Write ``text`` unless ``target`` already contains it.

    ``quarto preview`` re-renders when an included or embedded file changes, and the pre-render
    step stages again before each render, so an unchanged file must keep its modification time.
    """
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return target
    return write_text(target, text)


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    """Delete the files under ``folder`` that are not in ``keep``, then the emptied folders."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def stage_notebook(run: Run, notebook: str, target: Path) -> list[Path]:
    """Copy an executed notebook and the run's tables next to it; return the files written.

    Every cell label of the copy gets the run as a suffix, and labeled cells without a caption get
    one that names the model and the notebook.
    """
    import nbformat

    executed = nbformat.read(run.path / notebook, as_version=4)
    cells = {cell.index: cell for cell in labeled_cells(executed)}
    for index, cell in enumerate(executed.cells):
        if index not in cells:
            continue
        labeled = cells[index]
        options = cell_options(cell.source)
        rewritten = []
        for line in cell.source.splitlines():
            match = _OPTION_LINE.match(line)
            if match and match.group(1) == "label":
                line = f"#| label: {staged_label(labeled.label, run)}"
            rewritten.append(line)
        caption_key = {"figure": "fig-cap", "table": "tbl-cap"}.get(labeled.kind)
        if caption_key and caption_key not in options:
            caption = f"{labeled.heading or _label_title(labeled.label)} ({run.model_name}, {notebook})"
            rewritten.insert(1, f"#| {caption_key}: {json.dumps(caption, ensure_ascii=False)}")
        cell.source = "\n".join(rewritten)
    written = [_write_if_changed(target, nbformat.writes(executed))]
    tables = run.path / "tables"
    for table in sorted(tables.glob("*")) if tables.is_dir() else []:
        if table.is_file():
            copy = target.parent / "tables" / table.name
            if not (copy.is_file() and filecmp.cmp(table, copy, shallow=False)):
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(table, copy)
            written.append(copy)
    return written


def stage_site(project: str | Path, runs: list[Run], runs_root: str | Path) -> StagedSite:
    """Write the generated fragments and the executed notebooks that the committed pages include.

    Files whose content is unchanged are left alone, and copies of runs or notebooks that are
    gone are removed.
    """
    project = Path(project)
    check_project(project)
    folder = pages_folder(project)
    staged: dict[tuple[str, str], Path] = {}
    written: set[Path] = set()
    for run in runs:
        for section in SECTIONS:
            for notebook in section.notebooks:
                if (run.path / notebook).is_file():
                    target = folder / EXECUTED_FOLDER / run.slug / notebook
                    written.update(stage_notebook(run, notebook, target))
                    staged[(run.slug, notebook)] = target
    _remove_stale(folder / EXECUTED_FOLDER, written)

    header = (
        f"<!-- Generated by `lrsafety report` from {runs_root}. "
        "Do not edit: the next report overwrites this file. -->\n\n"
    )
    fragments = {"index": _write_if_changed(fragment_path(project, "index"), header + index_fragment(runs, runs_root))}
    for section in SECTIONS:
        text = header + section_fragment(section, runs, staged, folder)
        fragments[section.page] = _write_if_changed(fragment_path(project, section.page), text)
    for path in folder.glob(f"{GENERATED_PREFIX}*.qmd"):
        if path not in fragments.values():
            path.unlink()
    return StagedSite(project, runs, fragments, staged)


def check_project(project: Path) -> None:
    """Raise ``ReportError`` unless ``project`` contains the committed site sources."""
    missing = [name for name in ["_quarto.yml", "index.qmd"] + [f"{PAGES_FOLDER}/{s.page}.qmd" for s in SECTIONS]
               if not (project / name).is_file()]
    if missing:
        raise ReportError(f"{project} is not the lrsafety site project: missing {', '.join(missing)}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pipe_table(frame: pd.DataFrame, decimals: int = 3) -> str:
    """Render a DataFrame as a Markdown pipe table (floats with ``decimals`` decimals)."""
    def cell(value: Any) -> str:
        return _format_value(value, decimals).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(column) for column in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(value) for value in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _callout(kind: str, title: str, body: str) -> str:
    return f'::: {{.callout-{kind} title="{title}"}}\n{body}\n:::\n'


def _standin_text(runs: list[Run]) -> str | None:
    standins = [run for run in runs if run.is_standin]
    if not standins:
        return None
    names = ", ".join(f"`{run.name}`" for run in standins)
    subject = "Run" if len(standins) == 1 else "Runs"
    return f"{subject} {names} used a stand-in model. {standins[0].standin_warning}"


def index_fragment(runs: list[Run], runs_root: str | Path) -> str:
    """Build the generated part of the index: stand-in warning, the runs and the four headline tables."""
    if not runs:
        return _callout("note", "No runs yet",
                        f"No run folder (a folder with manifest.json) was found under `{runs_root}`. "
                        "Run `lrsafety run --model MODEL --out runs/MODEL`, then `lrsafety report`.")
    parts = []
    standin = _standin_text(runs)
    if standin:
        parts.append(_callout("warning", "Stand-in models: numbers are meaningless", standin))
    parts.append(f"## Runs\n\nEvery run folder found under `{runs_root}`; each number below names its run.\n")
    parts.append(_pipe_table(runs_table(runs)) + "\n")
    for headline in headline_tables(runs):
        parts.append(f"## {headline.title}\n\n{headline.method} Details: [{headline.page}]({PAGES_FOLDER}/{headline.page}.qmd).\n")
        if headline.table.empty:
            parts.append("No run has this table yet.\n")
        else:
            parts.append(_pipe_table(headline.table, headline.decimals) + "\n")
        if headline.missing:
            parts.append("\n".join(f"- {note}" for note in headline.missing) + "\n")
    return "\n".join(parts)


def _provenance(run: Run) -> str:
    model = run.model
    facts = [f"family {model['family']}" if model.get("family") else None,
             f"{model['n_layers']} layers" if model.get("n_layers") else None,
             f"width {model['d_model']}" if model.get("d_model") else None,
             f"paper layer {model['paper_layer']}" if model.get("paper_layer") is not None else None,
             str(model["dtype"]) if model.get("dtype") else None]
    git = run.manifest.get("git") or {}
    revision = (git.get("commit") or "unknown")[:10] + (" with uncommitted changes" if git.get("dirty") else "")
    return (f"**Model** `{run.model_name}` ({', '.join(fact for fact in facts if fact)}), "
            f"**run folder** `{run.name}`, **git** `{revision}`.")


def _notebook_provenance(run: Run, notebook: str) -> str:
    record = run.notebook_record(notebook) or {}
    parameters = record.get("effective_parameters") or {}
    shown = ", ".join(f"`{key}={_parameter_text(value)}`" for key, value in parameters.items()
                      if key not in ("model", "out_dir"))
    finished = _short_time(record.get("finished")) or "at an unrecorded time"
    return (f"Notebook `{notebook}`, status {run.notebook_status(notebook)}, finished {finished}. "
            f"Data and parameters: {shown or 'not recorded'}.")


def _unfinished_notice(notebook: str, status: str, record: dict) -> tuple[str, str]:
    """Return the title and text of the callout for a notebook whose status is not ok."""
    if status == "running":
        # The manifest says "running" while lrsafety run is still executing this notebook.
        return (f"{notebook} is still running",
                "The run was in progress when this page was built; rebuild the report when it finishes.")
    return (f"{notebook} did not finish ({status})",
            f"{record.get('error', 'No error was recorded.')} Results after the failure are missing.")


def section_fragment(section: Section, runs: list[Run], staged: dict[tuple[str, str], Path], folder: Path) -> str:
    """Build the generated part of a page: one tab per run with provenance and one embed per labeled cell."""
    import nbformat

    if not runs:
        return _callout("note", "No runs yet", "No run folder was found; see the overview page.")
    parts = [":::: {.panel-tabset}\n"]
    for run in runs:
        parts.append(f"## {run.display_name}\n")
        if run.is_standin:
            parts.append(_callout("warning", "Stand-in model: numbers are meaningless", run.standin_warning))
        parts.append(_provenance(run) + "\n")
        for notebook in section.notebooks:
            staged_path = staged.get((run.slug, notebook))
            if staged_path is None:
                parts.append(_callout("note", f"{notebook}: not run for this model",
                                      f"The run folder `{run.name}` has no `{notebook}`. Run "
                                      f"`lrsafety run --model {run.model_name} --out {run.path} --notebooks {notebook[:2]}`."))
                continue
            executed = nbformat.read(staged_path, as_version=4)
            original = nbformat.read(run.path / notebook, as_version=4)
            parts.append(f"### {notebook_title(original) or notebook}\n\n{_notebook_provenance(run, notebook)}\n")
            status = run.notebook_status(notebook)
            if status != "ok":
                record = run.notebook_record(notebook) or {}
                parts.append(_callout("warning", *_unfinished_notice(notebook, status, record)))
            relative = staged_path.relative_to(folder).as_posix()
            for cell in labeled_cells(executed):
                label = cell.label.rsplit(LABEL_SEPARATOR, 1)[0]
                parts.append(f"#### {cell.heading or _label_title(label)}\n")
                if cell.intro:
                    parts.append(_demote_headings(cell.intro, 3) + "\n")
                if cell.has_outputs:
                    parts.append(f"{{{{< embed {relative}#{cell.label} >}}}}\n")
                else:
                    parts.append("This cell has no output in the executed notebook.\n")
    parts.append("::::\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Committed pages


@dataclass(frozen=True)
class Page:
    """A committed ``.qmd`` page: its front matter and the Markdown around the include line."""

    path: Path
    front_matter: dict[str, Any]
    before: str
    include: str | None
    after: str

    @property
    def title(self) -> str:
        return str(self.front_matter.get("title") or self.path.stem)

    @property
    def description(self) -> str:
        return str(self.front_matter.get("description") or "")


def read_page(path: Path) -> Page:
    """Split a ``.qmd`` page into front matter, Markdown before and after its include shortcode."""
    text = path.read_text(encoding="utf-8")
    front_matter: dict[str, Any] = {}
    if text.startswith("---"):
        _, header, text = text.split("---", 2)
        front_matter = yaml.safe_load(header) or {}
    before, include, after = [], None, []
    for line in text.splitlines():
        match = _INCLUDE_LINE.match(line)
        if match and include is None:
            include = match.group(1)
            continue
        (after if include is not None else before).append(line)
    return Page(path, front_matter, "\n".join(before).strip(), include, "\n".join(after).strip())


def quarto_config(project: Path) -> dict[str, Any]:
    """Parse ``_quarto.yml``."""
    return yaml.safe_load((project / "_quarto.yml").read_text(encoding="utf-8"))


def navigation(project: Path) -> list[dict[str, str]]:
    """Return the navbar entries of ``_quarto.yml`` with ``.html`` targets (``href``, ``text``)."""
    items = (quarto_config(project).get("website") or {}).get("navbar", {}).get("left", [])
    entries = []
    for item in items:
        href = str(item["href"])
        entries.append({"href": re.sub(r"\.(qmd|ipynb|md)$", ".html", href), "text": str(item.get("text") or href)})
    return entries


def embeds_in(text: str) -> list[tuple[str, str]]:
    """Return the (notebook path, cell label) of every embed shortcode in ``text``."""
    return [(match.group(1), match.group(2)) for match in _EMBED.finditer(text)]


# --------------------------------------------------------------------------------------------
# HTML preview with nbconvert (used when quarto is not installed)

_PREVIEW_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{# No script from a CDN: the preview must load offline. #}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{% block notebook_css %}
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{{ resources.lrsafety.root }}assets/jupyterlab.css">
<link rel="stylesheet" href="{{ resources.lrsafety.root }}assets/site.css">
{% endblock notebook_css %}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}" alt="{{ cell.metadata.get('lrsafety_alt', 'Figure') | escape_html }}">
</div>
{% endblock data_png %}
{%- block body_header -%}
{{ super() }}
<nav class="lr-nav">
  <span class="lr-brand">{{ resources.lrsafety.site_title | e }}</span>
  {%- for item in resources.lrsafety.nav %}
  <a href="{{ resources.lrsafety.root }}{{ item.href }}"{% if item.current %} class="lr-current"{% endif %}>{{ item.text | e }}</a>
  {%- endfor %}
</nav>
<div class="lr-preview-note">HTML preview built without Quarto by <code>lrsafety report</code> on {{ resources.lrsafety.built | e }}.</div>
{%- endblock body_header -%}
"""

_SITE_CSS = """
body.jp-Notebook { margin: 0; padding: 0 0 3rem 0; }
main { max-width: 1100px; margin: 0 auto; padding: 0 1.5rem; }
.lr-nav, .lr-preview-note { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
.lr-nav { display: flex; flex-wrap: wrap; gap: 0.25rem 1.25rem; align-items: baseline;
  padding: 0.75rem 1.5rem; background: #243447; margin: 0 -1.5rem; }
.lr-nav a { color: #dfe8f1; text-decoration: none; font-size: 0.95rem; }
.lr-nav a:hover { text-decoration: underline; }
.lr-nav a.lr-current { color: #ffffff; font-weight: 600; border-bottom: 2px solid #f1a340; }
.lr-brand { color: #ffffff; font-weight: 700; margin-right: 1rem; }
.lr-preview-note { color: #666; font-size: 0.8rem; margin: 0.4rem 0 0.8rem 0; }
.lr-callout { border-left: 5px solid; border-radius: 4px; padding: 0.6rem 1rem; margin: 0.8rem 0; }
.lr-callout strong:first-child { display: block; margin-bottom: 0.2rem; }
.lr-warning { border-color: #b2182b; background: #fbeaea; }
.lr-note { border-color: #2b6cb0; background: #eaf2fb; }
/* The .jp-RenderedHTMLCommon prefix outweighs JupyterLab's right-aligned table cells. */
.jp-RenderedHTMLCommon table.lr-table { border-collapse: collapse; margin: 0.5rem 0 1rem 0; font-size: 0.9rem; }
.jp-RenderedHTMLCommon table.lr-table th, .jp-RenderedHTMLCommon table.lr-table td {
  border: 1px solid #ccd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
.jp-RenderedHTMLCommon table.lr-table th { background: #eef1f5; }
.jp-RenderedHTMLCommon table.lr-table td:first-child { white-space: nowrap; }
.jp-RenderedHTMLCommon table.lr-table td.num { text-align: right; font-variant-numeric: tabular-nums; }
.jp-RenderedHTMLCommon table.lr-table tbody tr:nth-child(even) { background: #f7f8fa; }
.jp-RenderedImage img { max-width: 100%; height: auto; }
a.anchor-link { visibility: hidden; margin-left: 0.3rem; text-decoration: none; }
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link, h4:hover a.anchor-link { visibility: visible; }
.jp-Cell { padding-left: 0; padding-right: 0; }
"""


def _markdown_cell(text: str):
    import nbformat

    return nbformat.v4.new_markdown_cell(text)


def _html_cell(markup: str):
    import nbformat

    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": markup})]
    return cell


def _html_callout(kind: str, title: str, body_markdown: str) -> str:
    # nbconvert passes raw HTML in Markdown cells through; the body is plain text or inline code.
    body = html.escape(body_markdown)
    body = re.sub(r"`([^`]+)`", r"<code>\1</code>", body)
    return f'<div class="lr-callout lr-{kind}"><strong>{html.escape(title)}</strong>{body}</div>'


def _html_table(frame: pd.DataFrame, decimals: int = 3) -> str:
    """Render a DataFrame as an HTML table; numeric cells get the class ``num`` (right-aligned)."""
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            numeric = isinstance(value, numbers.Number) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{html.escape(_format_value(value, decimals))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="lr-table"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


@dataclass
class PreviewSite:
    """Files written by ``build_preview``: the page files and the full-notebook pages."""

    out: Path
    pages: dict[str, Path]
    notebooks: dict[tuple[str, str], Path]


class _PreviewWriter:
    """Converts synthetic notebooks (Markdown + stored outputs) to HTML pages with one exporter."""

    def __init__(self, out: Path, project: Path, built: str):
        import jinja2
        from nbconvert import HTMLExporter

        self.out, self.project, self.built = out, project, built
        loader = jinja2.DictLoader({"lrsafety_preview.html.j2": _PREVIEW_TEMPLATE})
        options = dict(template_name="lab", extra_loaders=[loader], template_file="lrsafety_preview.html.j2")
        self.outputs_only = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                                         exclude_output_prompt=True, **options)
        self.full = HTMLExporter(**options)
        index_page = read_page(project / "index.qmd")
        self.site_title = str(quarto_config(project).get("website", {}).get("title") or index_page.title)
        self.nav = navigation(project)

    def write(self, notebook, target: Path, title: str, full: bool = False) -> Path:
        depth = len(target.relative_to(self.out).parts) - 1
        current = target.relative_to(self.out).as_posix()
        resources = {
            "metadata": {"name": title},
            "lrsafety": {
                "root": "../" * depth, "site_title": self.site_title, "built": self.built,
                "nav": [dict(item, current=item["href"] == current) for item in self.nav],
            },
        }
        notebook.metadata["title"] = title
        _describe_images(notebook)
        exporter = self.full if full else self.outputs_only
        body, _ = exporter.from_notebook_node(notebook, resources=resources)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_text(target, body)


def _describe_images(notebook) -> None:
    """Give every code cell an alternative text for its images and a unique cell id."""
    labels = {cell.index: cell for cell in labeled_cells(notebook)}
    seen = set()
    for index, cell in enumerate(notebook.cells):
        if not cell.get("id") or cell["id"] in seen:
            cell["id"] = f"cell-{index}"
        seen.add(cell["id"])
        if cell.cell_type != "code" or "lrsafety_alt" in cell.metadata:
            continue
        labeled = labels.get(index)
        cell.metadata["lrsafety_alt"] = (
            f"{labeled.heading or _label_title(labeled.label)}" if labeled else f"Output of cell {index}"
        )


def _page_intro(page: Page) -> str:
    parts = [f"# {page.title}"]
    if page.description:
        parts.append(f"*{page.description}*")
    if page.before:
        parts.append(page.before)
    return "\n\n".join(parts)


def build_preview(project: str | Path, runs: list[Run], out: str | Path, runs_root: str | Path) -> PreviewSite:
    """Write the HTML preview of every page into ``out`` from the executed notebooks and tables."""
    import nbformat

    project, out = Path(project), Path(out)
    check_project(project)
    prepare_output(out)
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    lab_static = _lab_static_folder()
    write_text(assets / "jupyterlab.css",
               (lab_static / "index.css").read_text(encoding="utf-8") + "\n"
               + (lab_static / "theme-light.css").read_text(encoding="utf-8"))
    write_text(assets / "site.css", _SITE_CSS)

    writer = _PreviewWriter(out, project, _short_time(_now()))
    notebook_pages: dict[tuple[str, str], Path] = {}
    for run in runs:
        for section in SECTIONS:
            for notebook in section.notebooks:
                if (run.path / notebook).is_file():
                    executed = nbformat.read(run.path / notebook, as_version=4)
                    target = out / PAGES_FOLDER / EXECUTED_FOLDER / run.slug / notebook.replace(".ipynb", ".html")
                    notebook_pages[(run.slug, notebook)] = writer.write(
                        executed, target, f"{notebook} · {run.model_name}", full=True)
                    tables = run.path / "tables"
                    if tables.is_dir():
                        shutil.copytree(tables, target.parent / "tables", dirs_exist_ok=True)

    pages = {"index": writer.write(_index_notebook(project, runs, runs_root), out / "index.html",
                                   read_page(project / "index.qmd").title)}
    for section in SECTIONS:
        page = read_page(pages_folder(project) / f"{section.page}.qmd")
        notebook = _section_notebook(page, section, runs, notebook_pages, out)
        pages[section.page] = writer.write(notebook, out / PAGES_FOLDER / f"{section.page}.html", page.title)
    (out / SITE_MARKER).write_text("built by lrsafety report\n", encoding="utf-8")
    return PreviewSite(out, pages, notebook_pages)


def _lab_static_folder() -> Path:
    from nbconvert.exporters.templateexporter import TemplateExporter

    for folder in TemplateExporter().template_paths:
        candidate = Path(folder) / "lab" / "static"
        if (candidate / "index.css").is_file():
            return candidate
    raise ReportError("nbconvert's 'lab' template (static/index.css) was not found; reinstall nbconvert")


def _index_notebook(project: Path, runs: list[Run], runs_root: str | Path):
    import nbformat

    page = read_page(project / "index.qmd")
    cells = [_markdown_cell(_page_intro(page))]
    if not runs:
        cells.append(_markdown_cell(_html_callout("note", "No runs yet", f"No run folder was found under {runs_root}.")))
    standin = _standin_text(runs)
    if standin:
        cells.append(_markdown_cell(_html_callout("warning", "Stand-in models: numbers are meaningless", standin)))
    if runs:
        cells.append(_markdown_cell(f"## Runs\n\nEvery run folder found under `{runs_root}`; each number below names its run."))
        cells.append(_html_cell(f'<div class="lr-headline" id="headline-runs">{_html_table(runs_table(runs))}</div>'))
    for headline in headline_tables(runs) if runs else []:
        link = f"{PAGES_FOLDER}/{headline.page}.html"
        cells.append(_markdown_cell(f"## {headline.title}\n\n{headline.method} Details: [{headline.page}]({link})."))
        if headline.table.empty:
            cells.append(_markdown_cell("No run has this table yet."))
        else:
            cells.append(_html_cell(f'<div class="lr-headline" id="headline-{headline.key}">{_html_table(headline.table, headline.decimals)}</div>'))
        if headline.missing:
            cells.append(_markdown_cell("\n".join(f"- {note}" for note in headline.missing)))
    if page.after:
        cells.append(_markdown_cell(page.after))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = cells
    return notebook


def _section_notebook(page: Page, section: Section, runs: list[Run], notebook_pages: dict[tuple[str, str], Path], out: Path):
    import nbformat

    cells = [_markdown_cell(_page_intro(page))]
    if runs:
        links = " · ".join(f"[{run.display_name}](#run-{run.slug})" for run in runs)
        cells.append(_markdown_cell(f"Runs on this page: {links}"))
    else:
        cells.append(_markdown_cell(_html_callout("note", "No runs yet", "No run folder was found; see the overview page.")))
    for run in runs:
        block = [f'<div id="run-{run.slug}"></div>\n\n## {run.display_name}']
        if run.is_standin:
            block.append(_html_callout("warning", "Stand-in model: numbers are meaningless", run.standin_warning))
        block.append(_provenance(run))
        cells.append(_markdown_cell("\n\n".join(block)))
        for notebook in section.notebooks:
            if (run.slug, notebook) not in notebook_pages:
                cells.append(_markdown_cell(_html_callout(
                    "note", f"{notebook}: not run for this model",
                    f"The run folder {run.name} has no {notebook}. Run `lrsafety run --model {run.model_name} "
                    f"--out {run.path} --notebooks {notebook[:2]}`.")))
                continue
            executed = nbformat.read(run.path / notebook, as_version=4)
            link = notebook_pages[(run.slug, notebook)].relative_to(out / PAGES_FOLDER).as_posix()
            header = [f"### {notebook_title(executed) or notebook}",
                      _notebook_provenance(run, notebook) + f" [Full executed notebook]({link})."]
            status = run.notebook_status(notebook)
            if status != "ok":
                record = run.notebook_record(notebook) or {}
                header.append(_html_callout("warning", *_unfinished_notice(notebook, status, record)))
            cells.append(_markdown_cell("\n\n".join(header)))
            for labeled in labeled_cells(executed):
                text = f"#### {labeled.heading or _label_title(labeled.label)}"
                if labeled.intro:
                    text += "\n\n" + _demote_headings(labeled.intro, 3)
                cells.append(_markdown_cell(text))
                source = copy.deepcopy(executed.cells[labeled.index])
                source["id"] = f"{run.slug}{LABEL_SEPARATOR}{labeled.label}"
                source.metadata["lrsafety_alt"] = (
                    f"{labeled.heading or _label_title(labeled.label)} ({run.model_name}, {notebook})"
                )
                if labeled.has_outputs:
                    cells.append(source)
                else:
                    cells.append(_markdown_cell("This cell has no output in the executed notebook."))
    if page.after:
        cells.append(_markdown_cell(page.after))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = cells
    return notebook


def prepare_output(out: Path) -> None:
    """Empty ``out`` when an earlier report built it; refuse to write into any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / SITE_MARKER).is_file():
            raise ReportError(f"{out} is not empty and was not built by lrsafety report; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Quarto and the command line


def render_with_quarto(quarto: str, project: Path, out: Path) -> None:
    """Run ``quarto render`` on the staged project, writing the site into ``out``."""
    prepare_output(out)
    environment = dict(os.environ, **{STAGED_ENVIRONMENT_VARIABLE: "1"})
    command = [quarto, "render", str(project), "--output-dir", os.path.relpath(out.resolve(), project.resolve())]
    logger.info("Running %s", " ".join(command))
    completed = subprocess.run(command, cwd=project, env=environment)
    if completed.returncode != 0:
        raise ReportError(f"quarto render failed with exit status {completed.returncode}; its output is above")
    (out / SITE_MARKER).write_text("built by lrsafety report\n", encoding="utf-8")


def build_report(
    runs_root: str | Path = "runs",
    out: str | Path = "site",
    project: str | Path | None = None,
    preview: bool | None = None,
) -> Path:
    """Stage the site, then render it with quarto or, without quarto (or with ``preview=True``), as an
    nbconvert preview. Returns the index page that was written."""
    project = Path(project) if project else project_root(Path(__file__).resolve().parent)
    runs = find_runs(runs_root)
    if not runs:
        raise ReportError(f"no run folder (a folder with manifest.json) under {runs_root}; run `lrsafety run` first")
    logger.info("Found %d run(s): %s", len(runs), ", ".join(run.name for run in runs))
    stage_site(project, runs, runs_root)
    out = Path(out)
    quarto = shutil.which("quarto")
    if quarto and not preview:
        render_with_quarto(quarto, project, out)
    else:
        if not quarto:
            logger.warning("quarto was not found on the PATH, so the site is built as an HTML preview with nbconvert. "
                           "Install quarto (conda install -c conda-forge quarto) for the full site.")
        build_preview(project, runs, out, runs_root)
    return out / "index.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``lrsafety report``."""
    parser.add_argument("--runs", default="runs", help="folder holding one run folder per model (default: %(default)s)")
    parser.add_argument("--out", default="site", help="folder that receives the rendered site (default: %(default)s)")
    parser.add_argument("--project", default=None,
                        help="folder with _quarto.yml and the site pages (default: the lrsafety repository)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--preview", action="store_true",
                      help="build the nbconvert HTML preview even when quarto is installed")
    mode.add_argument("--stage-only", action="store_true",
                      help="only write the generated pages and notebook copies (quarto's pre-render step)")
    parser.set_defaults(handler=_report_command)


def _report_command(arguments: argparse.Namespace) -> int:
    try:
        if arguments.stage_only:
            if os.environ.get(STAGED_ENVIRONMENT_VARIABLE):
                return 0
            project = Path(arguments.project) if arguments.project else project_root(Path(__file__).resolve().parent)
            runs_root = Path(arguments.runs)
            runs = find_runs(runs_root) if runs_root.is_dir() else []
            stage_site(project, runs, arguments.runs)
            print(f"Staged {len(runs)} run(s) into {pages_folder(project)}")
            return 0
        index = build_report(arguments.runs, arguments.out, arguments.project, arguments.preview)
    except ReportError as error:
        print(f"lrsafety report: {error}", file=sys.stderr)
        return 1
    print(f"Site written: {index}")
    return 0


__all__ = [
    "SECTIONS", "Headline", "LabeledCell", "Page", "ReportError", "Run", "Section", "add_arguments",
    "build_preview", "build_report", "cell_options", "embeds_in", "find_runs", "headline_tables",
    "labeled_cells", "quarto_config", "read_page", "runs_table", "stage_site",
]


if __name__ == "__main__":
    # Quarto's pre-render step runs this module directly; building the parser here skips the
    # imports of the other subcommands (torch among them).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command_parser = argparse.ArgumentParser(prog="python -m lrsafety.report", description=__doc__.splitlines()[0])
    add_arguments(command_parser)
    command_arguments = command_parser.parse_args()
    sys.exit(command_arguments.handler(command_arguments))
