"""The refusal gap: refusal rates by language and resource tier, and agreement between judges.

Used by notebook ``01_refusal_gap``. Completions come either from a JSONL(.gz) file (such as the
shared Multilingual-Refusal completions, which already carry WildGuard labels) or from greedy
generation by the run's model on the PolyRefuse test prompts. Refusal rate per (model,
language, condition, subset) is the mean of the 0/1 labels; tier rates are unweighted means
over the languages of the tier that are present. Agreement between a judge and a reference
label is balanced accuracy and Cohen's kappa (scikit-learn), per language and condition.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lrsafety.judges import get_judge
from lrsafety.judges.records import judge_records, prompt_of, read_records
from lrsafety.languages import LANGUAGES, TIERS, resource_tier, tier_order
from lrsafety.runs import project_path

logger = logging.getLogger("lrsafety")

# Label column of the WildGuard reference in the shared completion files.
REFERENCE_COLUMN = "wildguard_refusal"
GROUP_COLUMNS: tuple[str, ...] = ("model", "language", "tier", "condition", "subset")
CONDITION_COLORS = {"baseline": "#3b4cc0", "harm_ablation": "#8c8c8c"}


def resolve_completion_paths(pattern: str | Path | Sequence[str | Path]) -> list[Path]:
    """Return the files named by a path, a glob pattern or a list of them (relative paths are
    resolved against the project root); raise FileNotFoundError if none exists."""
    patterns = [pattern] if isinstance(pattern, (str, Path)) else list(pattern)
    paths: list[Path] = []
    for entry in patterns:
        resolved = project_path(entry)
        matches = sorted(glob.glob(str(resolved))) if glob.has_magic(str(resolved)) else [str(resolved)]
        paths.extend(Path(match) for match in matches if Path(match).is_file())
    if not paths:
        raise FileNotFoundError(f"no completion file matches {pattern!r} (resolved against {project_path('.')})")
    return paths


def load_completions(
    pattern: str | Path | Sequence[str | Path],
    *,
    languages: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read completion files into one table with the columns the analysis needs.

    Adds ``prompt`` (from ``prompt`` or ``instruction``), ``tier``, ``condition`` ("baseline"
    if absent) and ``subset`` ("harmful" if absent: the shared files hold harmful prompts only).
    Invalid lines raise an error that names the file and line.
    """
    frames = []
    for path in resolve_completion_paths(pattern):
        records = read_records(path).records
        frame = pd.DataFrame.from_records(records)
        frame["prompt"] = [prompt_of(record) for record in records]
        frame["source_file"] = path.name
        frames.append(frame)
        logger.info("Loaded %d completions from %s", len(frame), path)
    table = pd.concat(frames, ignore_index=True)

    unknown = sorted(set(table["language"]) - set(LANGUAGES))
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown} in the completions; expected codes of {list(LANGUAGES)}")
    if "model" not in table:
        table["model"] = "unknown"
    if "condition" not in table:
        table["condition"] = "baseline"
    if "subset" not in table:
        table["subset"] = "harmful"
    table["condition"] = table["condition"].fillna("baseline")
    table["subset"] = table["subset"].fillna("harmful")
    table["tier"] = table["language"].map(resource_tier)
    if languages:
        missing = sorted(set(languages) - set(table["language"]))
        if missing:
            logger.warning("No completions for requested language(s) %s", missing)
        table = table[table["language"].isin(languages)]
    return table.reset_index(drop=True)


def judge_completions(
    table: pd.DataFrame,
    judge: str = "offline",
    judge_options: Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Label every response with a judge; return the table with ``refusal`` (and
    ``refusal_score``/``refusal_error`` where present) and the judge's settings."""
    instance = get_judge(judge, **dict(judge_options or {}))
    records = [
        {"prompt": prompt, "response": response if isinstance(response, str) else "", "language": language}
        for prompt, response, language in zip(table["prompt"], table["response"], table["language"])
    ]
    judged = judge_records(records, instance, progress=progress)
    labelled = table.copy()
    for column in ("refusal", "refusal_score", "refusal_error"):
        labelled[column] = [row.get(column) for row in judged]
    labelled["refusal"] = labelled["refusal"].astype("Int64")
    return labelled, instance.describe()


def label_columns(table: pd.DataFrame, judge: str) -> dict[str, str]:
    """Return {label source name: column} for the judge's labels and, if present, WildGuard's."""
    columns = {judge: "refusal"}
    if REFERENCE_COLUMN in table and table[REFERENCE_COLUMN].notna().any():
        columns["wildguard"] = REFERENCE_COLUMN
    return columns


def refusal_rates(table: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """Return the refusal rate per (model, language, tier, condition, subset) and label source.

    ``labels`` maps a label source name (e.g. "offline", "wildguard") to its 0/1 column. Rows
    whose label is missing are left out of that source's rate (``n_labelled`` counts the rest).
    """
    rows = []
    for source, column in labels.items():
        for key, group in table.groupby(list(GROUP_COLUMNS), sort=False):
            values = pd.to_numeric(group[column], errors="coerce").dropna()
            rows.append(
                dict(
                    zip(GROUP_COLUMNS, key),
                    judge=source,
                    n=len(group),
                    n_labelled=len(values),
                    refusal_rate=float(values.mean()) if len(values) else np.nan,
                )
            )
    rates = pd.DataFrame(rows)
    return _sorted_by_language(rates)


def tier_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Return unweighted means of the language refusal rates per tier (and the languages used)."""
    keys = ["model", "tier", "condition", "subset", "judge"]
    summary = (
        rates.groupby(keys, sort=False)
        .agg(
            refusal_rate=("refusal_rate", "mean"),
            n_languages=("language", "nunique"),
            languages=("language", lambda codes: " ".join(tier_order(list(codes)))),
        )
        .reset_index()
    )
    summary["tier"] = pd.Categorical(summary["tier"], categories=list(TIERS), ordered=True)
    return summary.sort_values(["model", "judge", "subset", "condition", "tier"]).reset_index(drop=True)


def agreement_metrics(judge_labels: Sequence[int], reference_labels: Sequence[int]) -> dict[str, float]:
    """Return agreement of 0/1 judge labels with 0/1 reference labels.

    Balanced accuracy is the mean of the reference-positive and reference-negative recall
    (TPR + TNR) / 2 and Cohen's kappa corrects accuracy for chance; both come from
    scikit-learn. Both are NaN when the reference holds only one class, because one of the two
    recalls (and kappa's chance term) is then undefined. Confusion counts treat refusal (1) as
    the positive class.
    """
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, confusion_matrix

    judge_array = np.asarray(judge_labels, dtype=int)
    reference_array = np.asarray(reference_labels, dtype=int)
    if judge_array.shape != reference_array.shape:
        raise ValueError(f"label arrays differ in length: {judge_array.shape} vs {reference_array.shape}")
    tn, fp, fn, tp = confusion_matrix(reference_array, judge_array, labels=[0, 1]).ravel()
    both_classes = len(np.unique(reference_array)) == 2
    with warnings.catch_warnings():
        # Kappa divides by zero when both raters use one class; the NaN is the right answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = float(cohen_kappa_score(reference_array, judge_array, labels=[0, 1])) if both_classes else np.nan
    return {
        "n": int(len(reference_array)),
        "judge_rate": float(judge_array.mean()) if len(judge_array) else np.nan,
        "reference_rate": float(reference_array.mean()) if len(reference_array) else np.nan,
        "accuracy": float((judge_array == reference_array).mean()) if len(judge_array) else np.nan,
        "balanced_accuracy": float(balanced_accuracy_score(reference_array, judge_array)) if both_classes else np.nan,
        "cohen_kappa": kappa,
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }


def judge_agreement(
    table: pd.DataFrame,
    judge_column: str = "refusal",
    reference_column: str = REFERENCE_COLUMN,
    by: Sequence[str] = ("model", "language", "tier", "condition", "subset"),
) -> pd.DataFrame:
    """Return agreement of ``judge_column`` with ``reference_column`` per group of ``by``.

    Rows where either label is missing are left out. ``rate_difference`` is judge rate minus
    reference rate, in percentage points.
    """
    usable = table.dropna(subset=[judge_column, reference_column])
    rows = []
    for key, group in usable.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        metrics = agreement_metrics(group[judge_column].astype(int), group[reference_column].astype(int))
        rows.append(dict(zip(by, key), **metrics))
    agreement = pd.DataFrame(rows)
    if agreement.empty:
        return agreement
    agreement["rate_difference"] = 100.0 * (agreement["judge_rate"] - agreement["reference_rate"])
    return _sorted_by_language(agreement) if "language" in agreement else agreement


def heldout_split(prompt_id: Any) -> str:
    """Return "tune" or "heldout" for a prompt id: the parity of the first byte of
    SHA-256("lrsafety-judge-split|<id>").

    The offline judge's phrase tables were tuned only on "tune" prompt ids; agreement figures
    for it are reported on "heldout" ids. The same id is in the same half in every language.
    """
    digest = hashlib.sha256(f"lrsafety-judge-split|{prompt_id}".encode()).digest()
    return "heldout" if digest[0] % 2 else "tune"


def generate_completions_table(
    loaded,
    prompts: pd.DataFrame,
    store_path: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    remote: bool | str = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Generate greedy completions for each (language, subset) cell of a prompt table.

    Finished cells are kept in ``store_path`` (JSONL with a metadata sidecar), so an
    interrupted run resumes with the next cell. Returns one row per prompt with the columns of
    ``load_completions``.
    """
    from lrsafety.generation import CompletionStore, generate_completions

    metadata = {
        "model": loaded.spec.name,
        "source": loaded.spec.source,
        "dtype": loaded.spec.dtype,
        "max_new_tokens": int(max_new_tokens),
        "decoding": "greedy",
        "prompt_ids": sorted(int(value) for value in prompts["prompt_id"].unique()),
    }
    store = CompletionStore(store_path, metadata, group_keys=("language", "subset"))
    cells = list(prompts.groupby(["language", "subset"], sort=False))
    for (language, subset), cell in cells:
        if store.has_group(language, subset):
            continue
        logger.info("Generating %d completions for %s/%s", len(cell), language, subset)
        responses = generate_completions(
            loaded, cell["text"].tolist(), batch_size=batch_size, max_new_tokens=max_new_tokens,
            remote=remote, progress=progress,
        )
        store.add_group(
            [
                {
                    "model": loaded.spec.name,
                    "language": language,
                    "subset": subset,
                    "split": row.split,
                    "condition": "baseline",
                    "prompt_id": int(row.prompt_id),
                    "instruction": row.text,
                    "instruction_en": row.text_en,
                    "response": response,
                }
                for row, response in zip(cell.itertuples(index=False), responses, strict=True)
            ]
        )
    table = store.to_frame()
    table["prompt"] = table["instruction"]
    table["tier"] = table["language"].map(resource_tier)
    return table


def plot_refusal_gap(rates: pd.DataFrame, judge: str, *, subset: str = "harmful"):
    """Draw refusal rate by resource tier (left) and by language (right), one row per model.

    Bars are the ``judge`` labels, one colour per condition; black diamonds mark WildGuard's
    rate where the table has it. Tier values are unweighted means over the languages present,
    whose number is printed under each tier.
    """
    import matplotlib.pyplot as plt

    from lrsafety.figures import TIER_PALETTE, set_style

    set_style()
    data = rates[rates["subset"] == subset]
    if data.empty:
        raise ValueError(f"no refusal rates for subset {subset!r}")
    models = list(dict.fromkeys(data["model"]))
    conditions = list(dict.fromkeys(data["condition"]))
    n_languages = data.groupby("model")["language"].nunique().max()
    tiers = [tier for tier in TIERS if tier in set(data["tier"])]
    by_tier = tier_rates(data)

    fig, axes = plt.subplots(
        len(models), 2, figsize=(4.2 + 0.55 * n_languages * max(len(conditions), 1), 3.4 * len(models) + 0.6),
        gridspec_kw={"width_ratios": [1.2 + 0.4 * len(tiers), 1 + 0.5 * n_languages]}, squeeze=False,
    )
    width = 0.8 / max(len(conditions), 1)
    for row, model in enumerate(models):
        tier_axis, language_axis = axes[row]
        languages = tier_order(list(dict.fromkeys(data.loc[data["model"] == model, "language"])))
        for axis, keys, frame, column in (
            (tier_axis, tiers, by_tier[by_tier["model"] == model], "tier"),
            (language_axis, languages, data[data["model"] == model], "language"),
        ):
            for index, condition in enumerate(conditions):
                offset = (index - (len(conditions) - 1) / 2) * width
                for source, style in ((judge, "bar"), ("wildguard", "marker")):
                    selected = frame[(frame["condition"] == condition) & (frame["judge"] == source)]
                    values = selected.set_index(column)["refusal_rate"].reindex(keys) * 100
                    positions = np.arange(len(keys)) + offset
                    if style == "bar":
                        axis.bar(positions, values, width=width * 0.95, color=CONDITION_COLORS.get(condition),
                                 label=f"{condition} ({judge})")
                    elif values.notna().any():
                        axis.scatter(positions, values, marker="D", s=18, color="black", zorder=3,
                                     label="WildGuard" if index == 0 else None)
            axis.set_xticks(np.arange(len(keys)))
            axis.set_ylim(0, 105)
            axis.set_ylabel("harmful refusal rate (%)" if subset == "harmful" else f"{subset} refusal rate (%)")
        counts = by_tier[by_tier["model"] == model].drop_duplicates("tier").set_index("tier")["n_languages"]
        tier_axis.set_xticklabels([f"{tier}\n({int(counts.get(tier, 0))} lang.)" for tier in tiers])
        language_axis.set_xticklabels(languages)
        for label, language in zip(language_axis.get_xticklabels(), languages):
            label.set_color(TIER_PALETTE[resource_tier(language)])
            label.set_fontweight("bold")
        tier_axis.set_title(f"{model}: by resource tier", fontsize=10)
        language_axis.set_title(f"{model}: by language (label colour = tier)", fontsize=10)

    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 / len(models), 1, 0.97))
    return fig


def _sorted_by_language(table: pd.DataFrame) -> pd.DataFrame:
    position = {code: index for index, code in enumerate(LANGUAGES)}
    order = table["language"].map(position)
    sort_keys = [column for column in ("model", "judge", "subset", "condition") if column in table]
    return (
        table.assign(_order=order)
        .sort_values([*sort_keys, "_order"])
        .drop(columns="_order")
        .reset_index(drop=True)
    )
